"""Convert quantized checkpoints between formats, or dequantize them, one module at a time.

modelopt <-> compressed-tensors is exact: E2M1 codes, block scales and FP8 weights are copied byte for
byte, and each NVFP4 global scale is replaced by its float32 reciprocal (modelopt stores the decode
direction, compressed-tensors the encode direction). Note that float32 reciprocation is not an
involution (``1/(1/x)`` differs from ``x`` by one ulp for about one value in six), so a
modelopt -> compressed-tensors -> modelopt round trip can move a global scale by one float32 ulp;
codes and block scales never change.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import progress
from .errors import CheckpointError
from .layout import dequantize_linear
from .quantized import UNQUANTIZED, RecordWriter, check_write_format, declare_dtype, detect_format, iter_records
from .reader import CONFIG_NAME, CheckpointReader
from .writer import ShardedWriter

BF16 = "bf16"


def _default_shard_size(reader: CheckpointReader, minimum: int = 1 << 20) -> int:
    return max(max(reader.file_bytes().values()), minimum)


def convert_checkpoint(src, out, to: str, *, max_shard_size=None, overwrite: bool = False) -> Path:
    """Rewrite the quantized checkpoint ``src`` in format ``to`` (``modelopt``, ``compressed-tensors``,
    or ``bf16`` to dequantize) at ``out``; memory is bounded by about one output shard.

    ``max_shard_size`` defaults to the size of the largest source file. Returns the output path.
    """
    if to in (BF16, "bfloat16"):
        return dequantize_checkpoint(src, out, torch.bfloat16, max_shard_size=max_shard_size, overwrite=overwrite)
    fmt = check_write_format(to)
    reader = CheckpointReader(src, max_open_files=0)  # no shard stays mapped
    with reader:
        info = detect_format(src, reader)
        if info.format == UNQUANTIZED:
            raise CheckpointError(
                f"{reader.dir} is not a quantized checkpoint; quantize it with quantize_checkpoint (nvfp4kit convert --quantize)"
            )
        size = max_shard_size or _default_shard_size(reader)
        with progress.task(f"converting {info.format} -> {fmt}", total=None) as task, RecordWriter(
            out,
            fmt,
            config=info.config,
            exclude_modules=info.exclude_modules,
            source_dir=reader.dir,
            kv_cache_format=info.kv_cache_format,
            max_shard_size=size,
            overwrite=overwrite,
            strict_fused=False,  # keep the source exactly; a violation is reported as a warning
        ) as w:
            for kind, name, rec in iter_records(reader, info):
                if kind == "linear":
                    w.linear(name, rec)
                elif kind == "kv":
                    w.kv(name, *rec)
                else:
                    w.tensor(name, rec)
                task.advance(1)
    return w.out


def dequantize_checkpoint(src, out, dtype: torch.dtype = torch.bfloat16, *, max_shard_size=None, overwrite=False) -> Path:
    """Write ``src`` (any readable checkpoint) as a plain high-precision HF checkpoint: quantized
    Linears dequantized to ``dtype``, other floating tensors cast to it, no quantization_config."""
    if not dtype.is_floating_point:
        raise CheckpointError(f"dequantize: dtype must be floating, got {dtype}")
    reader = CheckpointReader(src, max_open_files=0)  # no shard stays mapped
    with reader:
        info = detect_format(src, reader)
        size = max_shard_size or _default_shard_size(reader)
        with progress.task(f"dequantizing {info.format} -> {str(dtype).removeprefix('torch.')}",
                           total=None) as task, ShardedWriter(
            out, size, overwrite, sources=(reader.dir,)
        ) as w:
            for kind, name, rec in iter_records(reader, info):
                if kind == "linear":
                    w.add(f"{name}.weight", dequantize_linear(rec, dtype))
                    if rec.bias is not None:
                        w.add(f"{name}.bias", rec.bias.to(dtype))
                elif kind == "tensor":
                    w.add(name, rec.to(dtype) if rec.dtype.is_floating_point else rec)
                # KV-cache scales have no meaning without quantization: dropped
                task.advance(1)
            w.write_json(CONFIG_NAME, declare_dtype(info.config, dtype))
            w.copy_from(reader.dir, skip=(CONFIG_NAME,))
    return w.out
