"""The modelopt HF checkpoint format (NVIDIA's released ``*-NVFP4`` / ``*-FP8`` models).

All on-disk names of this format live here.

* ``hf_quant_config.json``: ``{"producer": {...}, "quantization": {"quant_algo", "kv_cache_quant_algo",
  "group_size", "exclude_modules", "quantized_layers" (MIXED_PRECISION only)}}``
* ``config.json`` ``quantization_config``: the same facts in the ``quant_method: "modelopt"`` layout
  (``quant_algo``, ``ignore``, ``config_groups``, ``kv_cache_scheme``).
* NVFP4 Linear ``X``: ``X.weight`` U8 [N, K/2], ``X.weight_scale`` F8_E4M3 [N, K/16],
  ``X.weight_scale_2`` F32 0-dim and ``X.input_scale`` F32 0-dim, both DECODE direction (amax / 2688).
* FP8 Linear ``X``: ``X.weight`` F8_E4M3 [N, K], ``X.weight_scale`` and ``X.input_scale`` F32 0-dim
  (amax / 448).
* KV cache of attention ``A`` (FP8 or NVFP4): ``A.k_proj.k_scale`` and ``A.v_proj.v_scale``, 0-dim F32,
  ``kv_cache_quant_algo`` ``"FP8"`` / ``"NVFP4"`` (names, values and config fields: :mod:`.kv_cache`).
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..formats.nvfp4 import BLOCK_SIZE, NVFP4Parts
from . import kv_cache as kvc
from .errors import CheckpointError
from .layout import (
    FP8,
    FP8_RANGE,
    FP8_W8A16,
    NVFP4,
    NVFP4_ACT_RANGE,
    NVFP4_W4A16,
    amax_from_decode,
    input_decode_scale,
)
from .reader import CheckpointReader
from .types import QuantizedLinearWeight

FORMAT = "modelopt"
HF_QUANT_CONFIG = "hf_quant_config.json"
QUANT_METHOD = "modelopt"
GROUP_SIZE = BLOCK_SIZE

# tensor suffixes
WEIGHT = "weight"
BIAS = "bias"
WEIGHT_SCALE = "weight_scale"
WEIGHT_SCALE_2 = "weight_scale_2"
INPUT_SCALE = "input_scale"
K_SCALE, V_SCALE = (tuple(n.split(".")) for n in kvc.scale_leaf_names(kvc.MODELOPT))  # ("k_proj", "k_scale")
LINEAR_SUFFIXES = (WEIGHT, BIAS, WEIGHT_SCALE, WEIGHT_SCALE_2, INPUT_SCALE)

# quant_algo strings per scheme
ALGO_OF_SCHEME = {NVFP4: "NVFP4", NVFP4_W4A16: "W4A16_NVFP4", FP8: "FP8", FP8_W8A16: "FP8"}
MIXED = "MIXED_PRECISION"
KNOWN_ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8", MIXED)


# ============================================================================= writing


def linear_tensors(name: str, lw: QuantizedLinearWeight) -> dict[str, torch.Tensor]:
    """On-disk tensors of one Linear record (validated beforehand)."""
    out: dict[str, torch.Tensor] = {}
    if lw.format == "nvfp4":
        p = lw.nvfp4
        out[f"{name}.{WEIGHT}"] = p.packed
        out[f"{name}.{WEIGHT_SCALE}"] = p.block_scale
        out[f"{name}.{WEIGHT_SCALE_2}"] = p.global_decode_scale.to(torch.float32).reshape(())
        if lw.input_amax is not None:
            out[f"{name}.{INPUT_SCALE}"] = input_decode_scale(lw.input_amax, NVFP4_ACT_RANGE)
    elif lw.format == "fp8":
        out[f"{name}.{WEIGHT}"] = lw.fp8_weight
        out[f"{name}.{WEIGHT_SCALE}"] = lw.fp8_weight_scale.to(torch.float32).reshape(())
        if lw.input_amax is not None:
            out[f"{name}.{INPUT_SCALE}"] = input_decode_scale(lw.input_amax, FP8_RANGE)
    else:
        out[f"{name}.{WEIGHT}"] = lw.weight
    if lw.bias is not None:
        out[f"{name}.{BIAS}"] = lw.bias
    return out


def kv_tensors(attn: str, k_amax: float, v_amax: float, kv_format: str = "fp8") -> dict[str, torch.Tensor]:
    k_name, v_name = kvc.kv_scale_names(kvc.MODELOPT, attn, kv_format)
    return {k_name: kvc.kv_scale(kv_format, k_amax), v_name: kvc.kv_scale(kv_format, v_amax)}


def _layer_entry(scheme: str) -> dict:
    algo = ALGO_OF_SCHEME[scheme]
    return {"quant_algo": algo, "group_size": GROUP_SIZE} if "NVFP4" in algo else {"quant_algo": algo}


def _group_details(algo: str) -> dict:
    fp4 = "NVFP4" in algo
    weights = {"dynamic": False, "num_bits": 4 if fp4 else 8, "type": "float"}
    if fp4:
        weights["group_size"] = GROUP_SIZE
    out = {"weights": weights}
    if algo in ("NVFP4", "FP8"):
        acts = dict(weights)
        out = {"input_activations": acts, "weights": weights}
    return out


def quant_configs(
    schemes: dict[str, str], exclude_modules: list[str], kv_cache_format: str | None, producer: dict
) -> tuple[dict, dict]:
    """``(hf_quant_config.json content, config.json quantization_config)`` for the given per-Linear
    schemes (module -> scheme of :mod:`layout`; excluded Linears are absent)."""
    algos = {ALGO_OF_SCHEME[s] for s in schemes.values()}
    if not algos:
        raise CheckpointError("no quantized Linear to write (every module is excluded)")
    quant: dict = {}
    if len(algos) == 1:
        quant["quant_algo"] = algos.pop()
    else:
        quant["quant_algo"] = MIXED
    quant["kv_cache_quant_algo"] = kvc.modelopt_kv_algo(kv_cache_format)
    if any("NVFP4" in ALGO_OF_SCHEME[s] for s in schemes.values()):
        quant["group_size"] = GROUP_SIZE
    quant["exclude_modules"] = list(exclude_modules)
    if quant["quant_algo"] == MIXED:
        quant["quantized_layers"] = {m: _layer_entry(s) for m, s in sorted(schemes.items())}
    hf_quant = {"producer": dict(producer), "quantization": quant}

    qc: dict = {"quant_method": QUANT_METHOD, "quant_algo": quant["quant_algo"]}
    if quant["quant_algo"] == MIXED:
        by_algo: dict[str, list[str]] = {}
        for m, s in sorted(schemes.items()):
            by_algo.setdefault(ALGO_OF_SCHEME[s], []).append(m)
        qc["config_groups"] = {
            f"group_{i}": {**_group_details(a), "targets": mods} for i, (a, mods) in enumerate(sorted(by_algo.items()))
        }
        qc["quantized_layers"] = quant["quantized_layers"]
    else:
        qc["config_groups"] = {"group_0": {**_group_details(quant["quant_algo"]), "targets": ["Linear"]}}
    qc["ignore"] = list(exclude_modules)
    if kv_cache_format is not None:
        qc["kv_cache_scheme"] = kvc.modelopt_kv_cache_scheme(kv_cache_format)
    qc["producer"] = dict(producer)
    return hf_quant, qc


# ============================================================================= reading


def detect(config: dict | None, hf_quant: dict | None) -> bool:
    if hf_quant is not None and "quantization" in hf_quant:
        return True
    qc = (config or {}).get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def quantization_section(config: dict | None, hf_quant: dict | None, where: str) -> dict:
    """The ``quantization`` dict, from hf_quant_config.json or else config.json's quantization_config."""
    if hf_quant is not None:
        q = hf_quant.get("quantization")
        if not isinstance(q, dict):
            raise CheckpointError(f"{where}/{HF_QUANT_CONFIG}: no 'quantization' object")
    else:
        qc = (config or {}).get("quantization_config") or {}
        q = {
            "quant_algo": qc.get("quant_algo"),
            "exclude_modules": qc.get("ignore", []),
            "quantized_layers": qc.get("quantized_layers"),
            "kv_cache_quant_algo": kvc.modelopt_kv_algo(kvc.kv_format_of_modelopt_scheme(qc.get("kv_cache_scheme"),
                                                                                          where)),
        }
    algo = q.get("quant_algo")
    if algo not in KNOWN_ALGOS:
        raise CheckpointError(f"{where}: quant_algo {algo!r} is not supported (supported: {', '.join(KNOWN_ALGOS)})")
    if algo == MIXED and not isinstance(q.get("quantized_layers"), dict):
        raise CheckpointError(f"{where}: quant_algo MIXED_PRECISION needs a 'quantized_layers' object")
    if algo == MIXED:
        for m, entry in q["quantized_layers"].items():
            a = (entry or {}).get("quant_algo")
            if a not in KNOWN_ALGOS or a == MIXED:
                raise CheckpointError(f"{where}: quantized_layers[{m!r}] has unsupported quant_algo {a!r}")
    kvc.kv_format_of_modelopt_algo(q.get("kv_cache_quant_algo"), where)
    gs = q.get("group_size", GROUP_SIZE)
    if gs not in (None, GROUP_SIZE):
        raise CheckpointError(f"{where}: group_size {gs} is not supported (NVFP4 uses {GROUP_SIZE})")
    return q


def _scalar(reader: CheckpointReader, name: str) -> torch.Tensor:
    reader.expect_dtype(name, "F32")
    if len(reader.shape(name)) > 1 or (reader.shape(name) and reader.shape(name)[0] != 1):
        raise CheckpointError(f"{reader.where(name)} must be a float32 scalar, has shape {list(reader.shape(name))}")
    t = reader.get(name).reshape(())
    if not bool(torch.isfinite(t)) or float(t) < 0:
        raise CheckpointError(f"{reader.where(name)} must be finite and non-negative, got {float(t)}")
    return t


def read_linear(reader: CheckpointReader, module: str, expected_algo: str | None) -> QuantizedLinearWeight:
    """One quantized Linear's record (format told by the dtype of ``X.weight``)."""
    w = f"{module}.{WEIGHT}"
    wdt = reader.dtype_str(w)
    bias = reader.get(f"{module}.{BIAS}") if f"{module}.{BIAS}" in reader else None
    in_name = f"{module}.{INPUT_SCALE}"
    if wdt == "U8":
        if expected_algo is not None and "NVFP4" not in expected_algo:
            raise CheckpointError(f"{reader.where(w)} is packed NVFP4 (U8) but the config says {expected_algo}")
        shp = reader.shape(w)
        if len(shp) != 2:
            raise CheckpointError(f"{reader.where(w)}: NVFP4 weight must be 2-dim [N, K/2], has shape {list(shp)}")
        N, K = shp[0], shp[1] * 2
        if K % BLOCK_SIZE:
            raise CheckpointError(f"{reader.where(w)}: K={K} is not a multiple of {BLOCK_SIZE}")
        packed = reader.get(w)
        scale = reader.get(f"{module}.{WEIGHT_SCALE}", "F8_E4M3", (N, K // BLOCK_SIZE))
        g = _scalar(reader, f"{module}.{WEIGHT_SCALE_2}")
        input_amax = amax_from_decode(_scalar(reader, in_name), NVFP4_ACT_RANGE) if in_name in reader else None
        return QuantizedLinearWeight("nvfp4", (N, K), nvfp4=NVFP4Parts(packed, scale, g), input_amax=input_amax, bias=bias)
    if wdt == "F8_E4M3":
        if expected_algo is not None and expected_algo != "FP8":
            raise CheckpointError(f"{reader.where(w)} is FP8 (F8_E4M3) but the config says {expected_algo}")
        shp = reader.shape(w)
        if len(shp) != 2:
            raise CheckpointError(f"{reader.where(w)}: FP8 weight must be 2-dim, has shape {list(shp)}")
        s_name = f"{module}.{WEIGHT_SCALE}"
        if int(torch.Size(reader.shape(s_name)).numel()) != 1:
            raise CheckpointError(
                f"{reader.where(s_name)}: only per-tensor FP8 weight scales are supported, got shape {list(reader.shape(s_name))}"
            )
        ws = _scalar(reader, s_name)
        input_amax = amax_from_decode(_scalar(reader, in_name), FP8_RANGE) if in_name in reader else None
        return QuantizedLinearWeight(
            "fp8", (shp[0], shp[1]), fp8_weight=reader.get(w), fp8_weight_scale=ws, input_amax=input_amax, bias=bias
        )
    raise CheckpointError(
        f"{reader.where(w)} has dtype {wdt} but {module}.{WEIGHT_SCALE} marks it quantized "
        "(expected U8 for NVFP4 or F8_E4M3 for FP8)"
    )


def linear_schemes(reader: CheckpointReader) -> dict[str, tuple[str, tuple[int, int]]]:
    """module -> (scheme, (N, K)) of every quantized Linear, from the headers alone."""
    out = {}
    for n in reader.names():
        if not n.endswith("." + WEIGHT_SCALE):
            continue
        m = n[: -len(WEIGHT_SCALE) - 1]
        w = f"{m}.{WEIGHT}"
        if w not in reader or len(reader.shape(w)) != 2:
            continue
        N, k = reader.shape(w)
        has_input = f"{m}.{INPUT_SCALE}" in reader
        if reader.dtype_str(w) == "U8":
            out[m] = (NVFP4 if has_input else NVFP4_W4A16, (N, 2 * k))
        elif reader.dtype_str(w) == "F8_E4M3":
            out[m] = (FP8 if has_input else FP8_W8A16, (N, k))
    return out


def iter_records(reader: CheckpointReader, q: dict) -> Iterator[tuple[str, str, object]]:
    """Yield ``("linear", module, QuantizedLinearWeight)``, ``("kv", attention, (k_amax, v_amax))``
    and ``("tensor", name, Tensor)`` one at a time (a module's tensors are loaded together)."""
    names = reader.names()
    present = set(names)
    quantized = {n[: -len(WEIGHT_SCALE) - 1] for n in names if n.endswith("." + WEIGHT_SCALE)}
    algo = q["quant_algo"]
    layers = q.get("quantized_layers") or {}
    if algo == MIXED:
        missing = [m for m in layers if m not in quantized]
        if missing:
            raise CheckpointError(
                f"{reader.dir}: quantized_layers lists {len(missing)} module(s) with no {WEIGHT_SCALE} tensor, e.g. {missing[:3]}"
            )
    for m in sorted(quantized):
        if f"{m}.{WEIGHT}" not in present:
            raise CheckpointError(f"{reader.dir}: {m}.{WEIGHT_SCALE} has no matching {m}.{WEIGHT}")
    done: set[str] = set()
    kv_done: set[str] = set()
    # scales without a declared KV format are read as FP8 (what they were before NVFP4 KV caches)
    kv_format = kvc.kv_format_of_modelopt_algo(q.get("kv_cache_quant_algo"), str(reader.dir)) or kvc.FP8
    for n in names:
        if n in done:
            continue
        module, _, leaf = n.rpartition(".")
        # KV-cache scales first: A.k_proj may itself be a quantized Linear
        proj, _, _ = module.rpartition(".")  # A.k_proj.k_scale -> A
        if (module.endswith("." + K_SCALE[0]) and leaf == K_SCALE[1]) or (
            module.endswith("." + V_SCALE[0]) and leaf == V_SCALE[1]
        ):
            attn = proj
            if attn in kv_done:
                continue
            k_name, v_name = kvc.kv_scale_names(kvc.MODELOPT, attn, kv_format)
            for x in (k_name, v_name):
                if x not in present:
                    raise CheckpointError(f"{reader.dir}: {x} is missing ({kv_format.upper()} KV cache needs both "
                                          "k_scale and v_scale)")
            kv_done.add(attn)
            done.update((k_name, v_name))
            yield "kv", attn, (kvc.kv_amax(kv_format, _scalar(reader, k_name)),
                               kvc.kv_amax(kv_format, _scalar(reader, v_name)))
            continue
        if module in quantized:
            if leaf not in LINEAR_SUFFIXES:
                raise CheckpointError(
                    f"{reader.where(n)}: unsupported tensor of a quantized Linear ({leaf!r}; "
                    f"nvfp4kit reads {', '.join(LINEAR_SUFFIXES)})"
                )
            expected = (layers.get(module) or {}).get("quant_algo") if algo == MIXED else algo
            if algo == MIXED and module not in layers:
                raise CheckpointError(f"{reader.dir}: {module} is quantized but missing from quantized_layers")
            yield "linear", module, read_linear(reader, module, expected)
            done.update(f"{module}.{s}" for s in LINEAR_SUFFIXES)
            continue
        yield "tensor", n, reader.get(n)
