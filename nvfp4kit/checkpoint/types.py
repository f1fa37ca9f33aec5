"""In-memory records of a quantized model, independent of any on-disk format.

The PTQ/QAT pipelines produce these; the writers in this package turn them into modelopt HF or
compressed-tensors checkpoints, and the readers turn checkpoints back into them. On-disk names
(``weight_scale_2``, ``weight_global_scale``, ...) live in the format modules alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..formats.nvfp4 import NVFP4Parts

QUANT_FORMATS = ("nvfp4", "fp8", "bf16")
# static KV-cache formats of QuantizedModel.kv_cache_format (their rules: checkpoint/kv_cache.py)
KV_CACHE_FORMATS = ("fp8", "nvfp4")


@dataclass
class QuantizedLinearWeight:
    """One Linear's quantized weight and its static activation scale.

    ``format == "nvfp4"``: ``nvfp4`` holds the parts (decode-direction global scale);
    ``input_amax`` is the calibrated activation amax (None for weight-only, W4A16).
    ``format == "fp8"``: ``fp8_weight`` float8_e4m3fn [N, K] and ``fp8_weight_scale`` float32 0-dim
    (decode: amax/448); ``input_amax`` likewise.
    ``format == "bf16"``: kept in high precision (listed so mixed maps are explicit); ``weight`` holds it.
    """

    format: str
    shape: tuple[int, int]
    nvfp4: NVFP4Parts | None = None
    fp8_weight: torch.Tensor | None = None
    fp8_weight_scale: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    input_amax: float | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self):
        if self.format not in QUANT_FORMATS:
            raise ValueError(f"QuantizedLinearWeight: format must be one of {QUANT_FORMATS}, got {self.format!r}")


@dataclass
class QuantizedModel:
    """Everything a quantized checkpoint holds.

    ``linears``: module name (e.g. ``model.layers.0.mlp.up_proj``) -> its quantized weight.
    ``tensors``: every other tensor by full checkpoint name (embeddings, norms, biases of excluded modules...).
    ``config``: the HF ``config.json`` dict of the source model (without quantization_config).
    ``exclude_modules``: fnmatch patterns of modules left unquantized.
    ``source_dir``: where tokenizer / generation files are copied from (optional).
    ``kv_cache_format``: None, or ``"fp8"`` / ``"nvfp4"`` for a static FP8 / NVFP4 KV cache
    (:mod:`nvfp4kit.checkpoint.kv_cache`); then ``kv_cache_amax`` maps each
    attention module (e.g. ``model.layers.3.self_attn``) to its calibrated ``(k_amax, v_amax)``.
    ``order``: ``(kind, name)`` pairs (kind ``"tensor"``, ``"linear"`` or ``"kv"``) giving the order in
    which the writers store the entries (the model's order); empty: tensors, then Linears, then KV.
    """

    linears: dict[str, QuantizedLinearWeight] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    exclude_modules: list[str] = field(default_factory=list)
    source_dir: str | None = None
    kv_cache_format: str | None = None
    kv_cache_amax: dict[str, tuple[float, float]] = field(default_factory=dict)
    order: list[tuple[str, str]] = field(default_factory=list)

    def entries(self):
        """``(kind, name, value)`` of every entry, in :attr:`order` (then anything it does not name)."""
        tables = {"tensor": self.tensors, "linear": self.linears, "kv": self.kv_cache_amax}
        done = set()
        for kind, name in self.order:
            if name in tables[kind] and (kind, name) not in done:
                done.add((kind, name))
                yield kind, name, tables[kind][name]
        for kind in ("tensor", "linear", "kv"):
            for name, value in tables[kind].items():
                if (kind, name) not in done:
                    yield kind, name, value