"""KV-cache formats of a quantized checkpoint: what ``k_scale`` / ``v_scale`` mean, where each checkpoint
format stores them, and the config fields that announce them. Every KV rule of nvfp4kit is here; the
format modules, the emulation (:func:`nvfp4kit.calibrate.emulation.apply_kv_cache`) and the serving
checks import it.

Formats (``--kv-cache``):

* ``fp8``: keys and values cached as FP8 E4M3 with one static float32 scale per tensor,
  ``k_scale = k_amax / 448`` (``formats.fp8``: ``q = e4m3(x / k_scale)``).
* ``nvfp4``: keys and values cached as NVFP4: E2M1 values in 1x16 blocks along the head dim, one E4M3
  block scale per block computed by the engine when it writes the cache, and one static float32
  second-level scale per tensor, ``k_scale = k_amax / (6 * 448)``: the NVFP4 global *decode* scale of
  the format core (``formats.nvfp4`` with ``global_amax = k_amax``; block scale
  ``e4m3(block_amax / 6 * (1 / k_scale))``, value ``e2m1 * block_scale * k_scale``).

What the engines read (public code, facts only):

* vLLM: ``vllm/config/cache.py`` ``CacheDType`` has ``"fp8"`` and ``"nvfp4"`` (``--kv-cache-dtype nvfp4``).
  ``vllm/model_executor/layers/quantization/modelopt.py``: ``KV_CACHE_QUANT_ALGOS = ["FP8", "NVFP4"]``,
  read from ``hf_quant_config.json`` ``quantization.kv_cache_quant_algo`` (its config.json form maps
  only an FP8 ``kv_cache_scheme`` dict, num_bits 8, to a KV algorithm).
  ``vllm/model_executor/layers/quantization/kv_cache.py`` (``BaseKVCacheMethod``): one per-tensor
  ``k_scale`` / ``v_scale`` per attention layer, taken as stored (1.0 when absent, also for nvfp4:
  ``tests/quantization/test_nvfp4_kv_cache.py``). Its NVFP4 cache-store CUDA kernel
  (``reshape_and_cache_nvfp4_kernel``) uses ``1 / k_scale`` as the encode multiplier of the two-level
  NVFP4 quantization of each 16-element group of a head, and the read path (``nvfp4_dequant_kv_cache``,
  the Triton attention's ``k_descale``) multiplies by ``k_scale`` (the decode direction); vLLM's own on-the-fly calibration
  (``Attention.calc_kv_scales``, nvfp4) sets ``k_scale = absmax / (6 * 448)``. Cache layout per token
  and head: ``head_dim / 2`` bytes of packed E2M1 then ``head_dim / 16`` E4M3 scales (``head_dim`` a
  multiple of 16). compressed-tensors checkpoints: ``compressed_tensors.py``
  (``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme``) accepts ``type: float`` with
  ``strategy: tensor`` and ``symmetric: true``.
* TensorRT-LLM (``tensorrt_llm/_torch/modules/linear.py``, ``load_kv_cache_scales``): ``k_scale`` /
  ``v_scale`` become the fused qkv Linear's ``kv_scales`` (quant -> orig, multiplied on the way out) and
  ``inv_kv_scales`` (their reciprocals, orig -> quant) of its FP4 KV cache.
* modelopt (``modelopt/torch/export/quant_utils.py``): ``kv_cache_quant_algo`` is ``"FP8"`` or ``"NVFP4"``
  (``get_kv_cache_dtype``: NVFP4 for E2M1 ``k_bmm_quantizer`` / ``v_bmm_quantizer``, block 16 along the last
  dim, E4M3 block scales: ``modelopt_recipes/configs/numerics/nvfp4.yaml``); the export renames
  ``k_bmm_quantizer._amax`` to ``<attn>.k_proj.k_scale`` and ``v_bmm_quantizer._amax`` to
  ``<attn>.v_proj.v_scale``. ``convert_hf_config.py`` writes config.json ``kv_cache_scheme`` as the FP8 dict,
  else the algorithm string (``"NVFP4"``). Note: modelopt's HF export divides the NVFP4 amax by 448, not
  by 6 * 448 (``unified_export_hf.py``: "kv cache scale as amax / 448 for both FP8 and NVFP4"); the engines
  use the stored number the same way either way (as the decode multiplier), so such a checkpoint keeps
  its E4M3 block scales below 448 / 6. nvfp4kit writes the format core's own decode scale,
  ``amax / (6 * 448)`` (what vLLM's calibration computes), so that the whole E4M3 range is used and the
  emulated cache is the format core's NVFP4 with the calibrated amax; any stored ``k_scale`` (either
  convention) is emulated as the engines apply it: exactly for nvfp4kit's own scales
  (:func:`exact_kv_amax`), within one float32 ulp of the second-level scale for others'.

On-disk names (the same for both KV formats): modelopt ``<attn>.k_proj.k_scale`` /
``<attn>.v_proj.v_scale``, 0-dim float32; compressed-tensors ``<attn>.k_scale`` / ``<attn>.v_scale``,
float32 [1]. ``<attn>`` is the attention module (the module with ``k_proj`` and ``v_proj`` children).
"""

from __future__ import annotations

import torch

from ..formats.scales import E4M3_MAX, NVFP4_RANGE, decode_from_encode, encode_from_decode, global_encode_scale
from .errors import CheckpointError
from .layout import amax_from_decode, exact_input_amax, input_decode_scale
from .types import KV_CACHE_FORMATS

FP8, NVFP4 = KV_CACHE_FORMATS

# the amax that k_scale = 1 stands for: k_scale = amax / range
_SCALE_RANGE = {FP8: E4M3_MAX, NVFP4: NVFP4_RANGE}

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"

# modelopt: hf_quant_config.json quantization.kv_cache_quant_algo
_MODELOPT_ALGO = {FP8: "FP8", NVFP4: "NVFP4"}
# compressed-tensors: config.json quantization_config.kv_cache_scheme (per-tensor static scales)
_CT_SCHEME = {
    FP8: {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False},
    NVFP4: {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False},
}


def check_kv_cache_format(kv_cache: str | None, option: str = "--kv-cache") -> None:
    """Raise ``ValueError`` naming ``option`` unless ``kv_cache`` is None or a known KV-cache format."""
    if kv_cache is not None and kv_cache not in KV_CACHE_FORMATS:
        raise ValueError(f"{option} must be one of {', '.join(KV_CACHE_FORMATS)} (or left out), got {kv_cache!r}")


def _known(kv_format: str) -> str:
    if kv_format not in KV_CACHE_FORMATS:
        raise CheckpointError(f"KV-cache format must be one of {', '.join(KV_CACHE_FORMATS)}, got {kv_format!r}")
    return kv_format


def kv_scale_range(kv_format: str) -> float:
    """The amax a stored ``k_scale`` of 1 stands for: 448 (fp8) or 6 * 448 (nvfp4)."""
    return _SCALE_RANGE[_known(kv_format)]


def kv_scale(kv_format: str, amax: float) -> torch.Tensor:
    """The stored ``k_scale`` / ``v_scale`` of a calibrated amax: float32(amax / range), a 0-dim tensor
    (decode direction: the engines multiply by it when they read the cache)."""
    return input_decode_scale(amax, kv_scale_range(kv_format))


def kv_amax(kv_format: str, scale: torch.Tensor) -> float:
    """The amax a stored scale stands for (exact in float64: ``scale * range``)."""
    return amax_from_decode(scale, kv_scale_range(kv_format))


def _nvfp4_exact(c: float) -> bool:
    stored = kv_scale(NVFP4, c)  # what the checkpoint holds
    back = torch.tensor(kv_amax(NVFP4, stored), dtype=torch.float32)  # what a reader gets back
    s_enc = global_encode_scale(back)  # the format core's scales from that amax
    return (float(back) == c and torch.equal(decode_from_encode(s_enc), stored)
            and torch.equal(encode_from_decode(stored), s_enc))


def exact_kv_amax(kv_format: str, amax: float, max_steps: int = 64) -> float:
    """A calibrated amax moved (by at most a few float32 ulps) so that the KV cache computes bit for bit
    the same before the checkpoint is written and after it is read back from either format. FP8: any
    amax (``formats.fp8`` divides by the stored scale itself). NVFP4: the format core derives its scales
    from the amax (``S_enc = 2688 / amax``, ``S_dec = 1 / S_enc``), so the amax is moved to the first
    float32 at or above it whose stored scale reads back to the same amax, equals the core's ``S_dec``
    and has ``1 / k_scale == S_enc`` (the engines' encode multiplier): the stored scale then is exactly the
    emulated one. Returns ``amax`` itself when it is 0, not finite, or no such value is near."""
    if _known(kv_format) == FP8:
        return float(amax)
    a = float(torch.tensor(float(amax), dtype=torch.float32))
    if not (a > 0) or a == float("inf"):
        return float(amax)
    cand, up = torch.tensor(a, dtype=torch.float32), torch.tensor(float("inf"), dtype=torch.float32)
    for _ in range(max_steps):
        if _nvfp4_exact(float(cand)):
            return float(cand)
        cand = torch.nextafter(cand, up)
    return exact_input_amax(amax, NVFP4_RANGE)


def kv_scale_names(checkpoint_format: str, attention: str, kv_format: str) -> tuple[str, str]:
    """``(k_scale name, v_scale name)`` of attention module ``attention`` in a checkpoint format
    (``"modelopt"`` or ``"compressed-tensors"``) for a KV-cache format (the names are the same for fp8 and
    nvfp4 in both checkpoint formats)."""
    _known(kv_format)
    if checkpoint_format == MODELOPT:
        return f"{attention}.k_proj.k_scale", f"{attention}.v_proj.v_scale"
    if checkpoint_format == COMPRESSED_TENSORS:
        return f"{attention}.k_scale", f"{attention}.v_scale"
    raise CheckpointError(f"no KV-cache scale names for checkpoint format {checkpoint_format!r}")


def scale_leaf_names(checkpoint_format: str) -> tuple[str, str]:
    """The k/v scale names relative to the attention module (e.g. ``("k_proj.k_scale", "v_proj.v_scale")``)."""
    k, v = kv_scale_names(checkpoint_format, "", FP8)
    return k[1:], v[1:]


# ----------------------------------------------------------------------------- config fields


def modelopt_kv_algo(kv_format: str | None) -> str | None:
    """hf_quant_config.json ``kv_cache_quant_algo``: ``"FP8"``, ``"NVFP4"`` or None."""
    return None if kv_format is None else _MODELOPT_ALGO[_known(kv_format)]


def modelopt_kv_cache_scheme(kv_format: str | None):
    """config.json ``quantization_config.kv_cache_scheme`` of the modelopt layout, as modelopt writes it:
    the FP8 dict, the algorithm string ``"NVFP4"``, or None (absent)."""
    if kv_format is None:
        return None
    if _known(kv_format) == FP8:
        return {"dynamic": False, "num_bits": 8, "type": "float"}
    return _MODELOPT_ALGO[kv_format]


def kv_format_of_modelopt_algo(algo, where: str) -> str | None:
    """The KV format of a modelopt ``kv_cache_quant_algo`` (case-insensitive); a clear error for others."""
    if algo is None:
        return None
    for fmt, name in _MODELOPT_ALGO.items():
        if isinstance(algo, str) and algo.upper() == name:
            return fmt
    raise CheckpointError(f"{where}: kv_cache_quant_algo {algo!r} is not supported "
                          f"(None, {', '.join(_MODELOPT_ALGO.values())})")


def kv_format_of_modelopt_scheme(scheme, where: str) -> str | None:
    """The KV format of the modelopt config.json ``kv_cache_scheme`` (FP8 dict, algorithm string, or a
    ``{"num_bits": 4, "type": "float"}`` dict)."""
    if not scheme:
        return None
    if isinstance(scheme, str):
        return kv_format_of_modelopt_algo(scheme, where)
    if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") in (8, 4):
        return FP8 if scheme["num_bits"] == 8 else NVFP4
    raise CheckpointError(f"{where}/config.json: kv_cache_scheme {scheme!r} is not supported (FP8 or NVFP4)")


def ct_kv_cache_scheme(kv_format: str | None) -> dict | None:
    """compressed-tensors config.json ``kv_cache_scheme``: per-tensor static scales, 8-bit (fp8) or 4-bit
    (nvfp4) floats; None without a quantized KV cache."""
    return None if kv_format is None else dict(_CT_SCHEME[_known(kv_format)])


def kv_format_of_ct_scheme(scheme, where: str) -> str | None:
    """The KV format of a compressed-tensors ``kv_cache_scheme``; a clear error for what nvfp4kit cannot
    emulate (other types or widths, scales that are not per tensor)."""
    if not scheme:
        return None
    if not isinstance(scheme, dict) or scheme.get("type") != "float" or scheme.get("num_bits") not in (8, 4):
        raise CheckpointError(f"{where}/config.json: kv_cache_scheme {scheme!r} is not supported "
                              "(8-bit floats: FP8, or 4-bit floats: NVFP4)")
    if scheme.get("strategy", "tensor") != "tensor":
        raise CheckpointError(f"{where}/config.json: kv_cache_scheme strategy {scheme.get('strategy')!r} is not "
                              "supported (one static scale per tensor: 'tensor')")
    return FP8 if scheme["num_bits"] == 8 else NVFP4


__all__ = [
    "KV_CACHE_FORMATS", "check_kv_cache_format", "ct_kv_cache_scheme", "exact_kv_amax", "kv_amax",
    "kv_format_of_ct_scheme", "kv_format_of_modelopt_algo", "kv_format_of_modelopt_scheme", "kv_scale",
    "kv_scale_names", "kv_scale_range", "modelopt_kv_algo", "modelopt_kv_cache_scheme", "scale_leaf_names",
]
