"""Convert quantized checkpoints between formats, or dequantize them, one module at a time.

modelopt <-> compressed-tensors is exact: E2M1 codes, block scales and FP8 weights are copied byte for
byte, and each NVFP4 global scale is replaced by its float32 reciprocal (modelopt stores the decode
direction, compressed-tensors the encode direction). Note that float32 reciprocation is not an
involution (``1/(1/x)`` differs from ``x`` by one ulp for about one value in six), so a
modelopt -> compressed-tensors -> modelopt round trip can move a global scale by one float32 ulp;
codes and block scales never change.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import progress
from .errors import CheckpointError
from .layout import dequantize_linear
from .quantized import UNQUANTIZED, RecordWriter, check_write_format, declare_dtype, detect_format, iter_records
from .reader import CONFIG_NAME, FLOAT_DTYPES, CheckpointReader
from .health import model_tensors, nonfinite_tensors, scale_problems
from .space import check_free_space
from .types import QuantizedModel
from .writer import ShardedWriter

BF16 = "bf16"


def dequantized_bytes(reader: CheckpointReader, dtype: torch.dtype) -> int:
    """About what ``reader``'s checkpoint takes dequantized to ``dtype`` (from the headers): packed U8
    weights hold two values a byte, FP8 weights one; floating tensors are cast, others kept, the scales
    dropped (counted all the same: an estimate errs on the safe side)."""
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    for n in reader.names():
        d, numel = reader.dtype_str(n), math.prod(reader.shape(n))
        if d == "U8" and n.rpartition(".")[2] in ("weight", "weight_packed"):
            total += 2 * numel * elem
        elif d in FLOAT_DTYPES or d.startswith("F8"):
            total += numel * elem
        else:
            total += reader.nbytes(n)
    return total


def _warn_nonfinite(named) -> None:
    for problem in nonfinite_tensors(named):
        progress.log(f"warning: {problem} (copied as it is: the checkpoint is corrupt)")


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
        # codes and scales are copied: the output takes what the source takes
        check_free_space(out, sum(reader.nbytes(n) for n in reader.names()), f"the {fmt} checkpoint",
                         option="output folder")
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
                    _warn_nonfinite(model_tensors(QuantizedModel(linears={name: rec})))
                    w.linear(name, rec)
                elif kind == "kv":
                    w.kv(name, *rec)
                else:
                    _warn_nonfinite([(name, rec)])
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
        if info.format != UNQUANTIZED:
            broken = scale_problems(reader.dir)
            if broken:  # NaN / negative / zero scales would dequantize to NaN or wrong weights
                raise CheckpointError(f"{reader.dir}: {len(broken)} broken scale(s), so the weights cannot be "
                                      "dequantized (the checkpoint is corrupt):\n"
                                      + "\n".join(f"  - {b}" for b in broken[:25]))
        size = max_shard_size or _default_shard_size(reader)
        check_free_space(out, dequantized_bytes(reader, dtype), f"the {str(dtype).removeprefix('torch.')} checkpoint",
                         option="output folder")
        with progress.task(f"dequantizing {info.format} -> {str(dtype).removeprefix('torch.')}",
                           total=None) as task, ShardedWriter(
            out, size, overwrite, sources=(reader.dir,)
        ) as w:
            for kind, name, rec in iter_records(reader, info):
                _warn_nonfinite(model_tensors(QuantizedModel(linears={name: rec})) if kind == "linear"
                                else [(name, rec)] if kind == "tensor" else [])
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
