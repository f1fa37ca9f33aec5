"""Save and load quantized checkpoints: format detection, the record writer, and the public
``save_quantized`` / ``load_quantized`` entry points."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import compressed_tensors as ct
from . import kv_cache as kvc
from . import modelopt_hf as mo
from .errors import CheckpointError
from .layout import scheme_of, validate_linear
from .reader import CONFIG_NAME, CheckpointReader
from .markers import undeclared_quantized_tensors  # noqa: F401  (re-exported)
from .rules import check_shared_global_scales, expand_regex_patterns, is_excluded
from .types import QuantizedLinearWeight, QuantizedModel
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter

MODELOPT = mo.FORMAT  # "modelopt"
COMPRESSED_TENSORS = ct.FORMAT  # "compressed-tensors"
UNQUANTIZED = "unquantized"
WRITE_FORMATS = (MODELOPT, COMPRESSED_TENSORS)


def producer() -> dict:
    from ..version import __version__

    return {"name": "nvfp4kit", "version": __version__}


def declare_dtype(config: dict, dtype: torch.dtype | None) -> dict:
    """``config`` declaring ``dtype`` for its floating tensors: the key(s) the config already uses
    (``torch_dtype``, as released checkpoints write it, and/or ``dtype``, newer transformers'),
    else ``dtype``."""
    if dtype is None:
        return config
    config = dict(config)
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]:
        config[key] = str(dtype).removeprefix("torch.")
    return config


def check_write_format(fmt: str) -> str:
    aliases = {"modelopt": MODELOPT, "modelopt-hf": MODELOPT, "compressed-tensors": COMPRESSED_TENSORS, "ct": COMPRESSED_TENSORS}
    if fmt not in aliases:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    return aliases[fmt]


# ============================================================================= detection


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, read from its configs (no tensor loaded).

    ``format``: ``"modelopt"``, ``"compressed-tensors"`` or ``"unquantized"``. ``scheme``: modelopt's
    ``quant_algo`` (NVFP4, W4A16_NVFP4, FP8, MIXED_PRECISION) or compressed-tensors' ``format``.
    ``quantization``: the parsed quantization section. ``config``: config.json without
    ``quantization_config``. ``exclude_modules``: patterns kept in high precision.
    """

    path: Path
    format: str
    scheme: str | None
    config: dict
    quantization: dict = field(default_factory=dict)
    exclude_modules: list[str] = field(default_factory=list)
    kv_cache_format: str | None = None


def detect_format(path, reader: CheckpointReader | None = None) -> CheckpointInfo:
    """Identify a checkpoint's format from ``hf_quant_config.json`` / ``config.json``."""
    reader = reader or CheckpointReader(path)
    where = str(reader.dir)
    config = reader.json(CONFIG_NAME) or {}
    hf_quant = reader.json(mo.HF_QUANT_CONFIG)
    base = {k: v for k, v in config.items() if k != "quantization_config"}
    if mo.detect(config, hf_quant):
        q = mo.quantization_section(config, hf_quant, where)
        return CheckpointInfo(
            reader.dir, MODELOPT, q["quant_algo"], base, q, list(q.get("exclude_modules") or []),
            kvc.kv_format_of_modelopt_algo(q.get("kv_cache_quant_algo"), where),
        )
    if ct.detect(config):
        qc = ct.quantization_section(config, where)
        return CheckpointInfo(
            reader.dir, COMPRESSED_TENSORS, qc.get("format"), base, qc,
            [ct.exclude_pattern(e) for e in qc.get("ignore") or []],
            kvc.kv_format_of_ct_scheme(qc.get("kv_cache_scheme"), where),
        )
    qc = config.get("quantization_config")
    if qc:
        raise CheckpointError(
            f"{where}/config.json: quantization_config with quant_method {qc.get('quant_method')!r} is not supported "
            f"(nvfp4kit reads modelopt and compressed-tensors checkpoints)"
        )
    stray = undeclared_quantized_tensors(reader)
    if stray:
        shown = ", ".join(f"{n} ({reader.dtype_str(n)} {list(reader.shape(n))})" for n in stray[:3])
        raise CheckpointError(
            f"{where}: {len(stray)} tensor(s) are quantized weights or scales, e.g. {shown}, but neither "
            f"config.json (quantization_config) nor {mo.HF_QUANT_CONFIG} declares a quantization, so they cannot be "
            "read as plain weights; restore the config files the checkpoint was written with"
        )
    return CheckpointInfo(reader.dir, UNQUANTIZED, None, base)


def iter_records(reader: CheckpointReader, info: CheckpointInfo) -> Iterator[tuple[str, str, object]]:
    """Records of a checkpoint one module at a time: ``("linear", module, QuantizedLinearWeight)``,
    ``("kv", attention, (k_amax, v_amax))``, ``("tensor", name, Tensor)``."""
    if info.format == MODELOPT:
        return mo.iter_records(reader, info.quantization)
    if info.format == COMPRESSED_TENSORS:
        return ct.iter_records(reader, info.quantization)
    return (("tensor", n, reader.get(n)) for n in reader.names())


@dataclass
class CheckpointSummary:
    """What :func:`summarize_checkpoint` reports: the format facts, each quantized Linear's scheme
    and shape, and sizes, all read from configs and safetensors headers (no tensor data loaded)."""

    info: CheckpointInfo
    linears: dict[str, tuple[str, tuple[int, int]]]
    tensors: int
    files: int
    bytes: int
    bytes_by_dtype: dict[str, int]


def summarize_checkpoint(path) -> CheckpointSummary:
    """Format, per-Linear schemes (``nvfp4``, ``nvfp4-w4a16``, ``fp8``, ``fp8-w8a16``) and sizes of a
    checkpoint, from its configs and headers only (cheap for checkpoints of any size)."""
    with CheckpointReader(path) as reader:
        info = detect_format(path, reader)
        if info.format == MODELOPT:
            linears = mo.linear_schemes(reader)
        elif info.format == COMPRESSED_TENSORS:
            linears = ct.linear_schemes(reader)
        else:
            linears = {}
        by_dtype: dict[str, int] = {}
        for n in reader.names():
            by_dtype[reader.dtype_str(n)] = by_dtype.get(reader.dtype_str(n), 0) + reader.nbytes(n)
        return CheckpointSummary(info, linears, len(reader.names()), len(reader.files),
                                 sum(reader.file_bytes().values()), by_dtype)


# ============================================================================= loading


def load_quantized(path) -> QuantizedModel:
    """Load a modelopt (NVFP4 / FP8 / MIXED_PRECISION), compressed-tensors (nvfp4-pack-quantized,
    float-quantized, mixed-precision) or unquantized safetensors checkpoint into a
    :class:`QuantizedModel` (tensors on CPU; safetensors only, never pickle).

    Quantized Linears become ``linears`` records (NVFP4 global scales in the decode direction,
    whatever the format stored); every other tensor is kept by name in ``tensors``.
    """
    with CheckpointReader(path) as reader:
        info = detect_format(path, reader)
        model = QuantizedModel(
            config=copy.deepcopy(info.config),
            exclude_modules=list(info.exclude_modules),
            source_dir=str(reader.dir),
            kv_cache_format=info.kv_cache_format,
        )
        for kind, name, rec in iter_records(reader, info):
            if kind == "linear":
                validate_linear(name, rec)
                model.linears[name] = rec
            elif kind == "kv":
                model.kv_cache_amax[name] = rec
            else:
                model.tensors[name] = rec
    if model.kv_cache_amax and model.kv_cache_format is None:
        model.kv_cache_format = "fp8"
    return model


# ============================================================================= writing


def stored_dtype(name: str, t: torch.Tensor, tensor_dtype: torch.dtype | None = None,
                 tensor_dtypes: dict[str, torch.dtype] | None = None) -> torch.dtype:
    """The dtype the unquantized tensor ``name`` is written in: its own entry of ``tensor_dtypes``,
    else ``tensor_dtype``, else its dtype (non-floating tensors keep theirs)."""
    if not t.is_floating_point():
        return t.dtype
    return (tensor_dtypes or {}).get(name) or tensor_dtype or t.dtype


class RecordWriter:
    """Writes records (Linears, plain tensors, KV scales) in one format through a
    :class:`ShardedWriter`, then the configs; the directory appears only when all is written.

    ``strict_fused``: raise (True, the default) if fused groups (q/k/v, gate/up) do not share their
    weight global scale; otherwise log a warning. ``tensor_dtype``: the dtype floating tensors that are
    not quantized (and biases) are stored in, e.g. the source model's own (None: as given);
    ``tensor_dtypes``: per tensor name, a dtype that overrides it (the source's own for each tensor,
    e.g. a float32 router bias in a bfloat16 checkpoint).

    The finished temporary folder is checked against vLLM's and SGLang's loaders
    (:func:`~nvfp4kit.checkpoint.serving.verify_serving`) before it is renamed into place; a checkpoint
    that fails is not written (``strict_fused=False`` lets unshared fused scales through as warnings).
    """

    def __init__(
        self,
        out_dir,
        fmt: str = MODELOPT,
        *,
        config: dict | None = None,
        exclude_modules=(),
        source_dir=None,
        kv_cache_format: str | None = None,
        max_shard_size=DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
        strict_fused: bool = True,
        sources=(),
        tensor_dtype: torch.dtype | None = None,
        tensor_dtypes: dict[str, torch.dtype] | None = None,
    ):
        self.fmt = check_write_format(fmt)
        self.tensor_dtype = tensor_dtype
        self.tensor_dtypes = dict(tensor_dtypes or {})
        self.fmod = mo if self.fmt == MODELOPT else ct
        if kv_cache_format is not None and kv_cache_format not in kvc.KV_CACHE_FORMATS:
            raise CheckpointError(f"kv_cache_format must be None or one of {', '.join(kvc.KV_CACHE_FORMATS)}, "
                                  f"got {kv_cache_format!r}")
        self.config = {k: v for k, v in (config or {}).items() if k != "quantization_config"}
        self.exclude_modules = list(exclude_modules)
        self.source_dir = source_dir
        self.kv_cache_format = kv_cache_format
        self.strict_fused = strict_fused
        self.writer = ShardedWriter(out_dir, max_shard_size, overwrite, sources=(*sources, source_dir),
                                    verify=self._verify)
        self.schemes: dict[str, str] = {}
        self.bf16_linears: list[str] = []
        self._weight_scales: dict[str, torch.Tensor] = {}
        self._fp8_scales: dict[str, torch.Tensor] = {}
        self.warnings: list[str] = []

    @property
    def out(self) -> Path:
        return self.writer.out

    def __enter__(self) -> "RecordWriter":
        self.writer.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._write_configs()
            except BaseException as e:
                self.writer.__exit__(type(e), e, e.__traceback__)
                raise
        return self.writer.__exit__(exc_type, exc, tb)

    def _stored(self, name: str, t: torch.Tensor) -> torch.Tensor:
        dtype = stored_dtype(name, t, self.tensor_dtype, self.tensor_dtypes)
        return t if t.dtype == dtype else t.to(dtype)

    def linear(self, name: str, lw: QuantizedLinearWeight) -> None:
        validate_linear(name, lw)
        if lw.bias is not None:
            lw = dataclasses.replace(lw, bias=self._stored(f"{name}.bias", lw.bias))
        scheme = scheme_of(lw)
        if scheme is None:
            self.bf16_linears.append(name)
        else:
            self.schemes[name] = scheme
        if lw.format == "nvfp4":
            self._weight_scales[name] = lw.nvfp4.global_decode_scale
        elif lw.format == "fp8":
            self._fp8_scales[name] = lw.fp8_weight_scale
        self.writer.add_all(self.fmod.linear_tensors(name, lw))

    def make_room(self, nbytes: int) -> None:
        """See :meth:`ShardedWriter.make_room`."""
        self.writer.make_room(nbytes)

    def tensor(self, name: str, t: torch.Tensor) -> None:
        self.writer.add(name, self._stored(name, t))

    def kv(self, attn: str, k_amax: float, v_amax: float) -> None:
        if self.kv_cache_format is None:
            raise CheckpointError(f"{attn}: KV cache scales given but kv_cache_format is None")
        self.writer.add_all(self.fmod.kv_tensors(attn, k_amax, v_amax, self.kv_cache_format))

    def _verify(self, folder: Path) -> list:
        """The serving check of the finished temporary folder (raises when it fails; warnings are logged)."""
        from .. import progress
        from .serving import verify_serving

        found = verify_serving(folder, strict_fused=self.strict_fused, what=str(self.out))
        for f in found:
            progress.log(f"warning: {f}")
        self.warnings += [str(f) for f in found]
        return found

    def _modules(self) -> set[str]:
        return {n.rpartition(".")[0] for n in self.writer.names() if "." in n}

    def _write_configs(self) -> None:
        from .. import progress

        problems = check_shared_global_scales(self._weight_scales, strict=self.strict_fused)
        problems += check_shared_global_scales(self._fp8_scales, strict=self.strict_fused)
        for p in problems:
            progress.log(f"warning: {p}")
        self.warnings += problems
        exclude = list(self.exclude_modules)
        config = copy.deepcopy(self.config)
        if self.fmt == MODELOPT:
            # modelopt readers match exclude_modules with fnmatch: spell regexes out as module names
            exclude = expand_regex_patterns(exclude, self._modules())
            exclude += [m for m in self.bf16_linears if not is_excluded(m, exclude)]
            hf_quant, qc = mo.quant_configs(self.schemes, exclude, self.kv_cache_format, producer())
            self.writer.write_json(mo.HF_QUANT_CONFIG, hf_quant)
        else:
            qc = ct.quant_config(self.schemes, exclude, self.kv_cache_format, self.bf16_linears)
        config["quantization_config"] = qc
        self.writer.write_json(CONFIG_NAME, config)
        if self.source_dir is not None:
            self.writer.copy_from(self.source_dir, skip=(CONFIG_NAME, mo.HF_QUANT_CONFIG))


def save_quantized(
    model: QuantizedModel,
    out_dir,
    format: str = MODELOPT,
    *,
    max_shard_size=DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    strict_fused: bool = True,
    tensor_dtype: torch.dtype | None = None,
    tensor_dtypes: dict[str, torch.dtype] | None = None,
    sources=(),
) -> Path:
    """Write ``model`` as a modelopt HF (default) or compressed-tensors checkpoint directory.

    Sharded safetensors (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``;
    one shard is ``model.safetensors``), ``config.json`` with ``quantization_config``,
    ``hf_quant_config.json`` (modelopt), tokenizer / generation files copied from
    ``model.source_dir``. Written to a temporary directory beside ``out_dir`` and renamed when
    complete. Refuses an existing ``out_dir`` unless ``overwrite``. ``tensor_dtype``: store the
    unquantized floating tensors (and biases) in this dtype; ``tensor_dtypes``: per-name overrides
    (see :class:`RecordWriter`). ``sources``: paths the output must not be, contain or lie inside (the
    model's ``source_dir`` is one too). Returns the output path.
    """
    if not isinstance(model, QuantizedModel):
        raise TypeError(f"save_quantized: expected a QuantizedModel, got {type(model).__name__}")
    clash = [f"{n}.weight" for n in model.linears if f"{n}.weight" in model.tensors]
    if clash:
        raise CheckpointError(f"tensors {clash[:3]} are given both as Linear records and as plain tensors")
    with RecordWriter(
        out_dir,
        format,
        config=model.config,
        exclude_modules=model.exclude_modules,
        source_dir=model.source_dir,
        kv_cache_format=model.kv_cache_format,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        strict_fused=strict_fused,
        tensor_dtype=tensor_dtype,
        tensor_dtypes=tensor_dtypes,
        sources=sources,
    ) as w:
        for kind, name, value in model.entries():
            if kind == "tensor":
                w.tensor(name, value)
            elif kind == "linear":
                w.linear(name, value)
            else:
                w.kv(name, *value)
    return w.out
