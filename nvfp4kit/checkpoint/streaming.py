"""Weight-only quantization of a sharded high-precision HF checkpoint, one tensor at a time.

No model is built and no calibration is run: every 2-dim floating ``*.weight`` whose module is not
excluded is quantized (NVFP4 W4A16, or per-tensor FP8 W8A16), everything else is copied. Tensors
are read lazily from the source shards and quantized in row chunks, and output shards are flushed as
they fill, so peak memory is about one output shard plus one source tensor: checkpoints larger than
RAM convert on a small machine.

Fused groups (q/k/v, gate/up) are quantized together with one shared global amax, as serving
engines require.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import progress
from ..formats.nvfp4 import BLOCK_SIZE, NVFP4Parts
from ..formats.scales import E4M3_MAX, e4m3_rtne
from .errors import CheckpointError
from .quantized import UNQUANTIZED, RecordWriter, detect_format
from .reader import FLOAT_DTYPES, CheckpointReader
from .rules import DEFAULT_EXCLUDE, check_exclude_patterns, is_excluded, shared_global_amax_groups
from .types import QuantizedLinearWeight
from .writer import parse_size

STREAM_SCHEMES = ("nvfp4", "fp8")
# Elements per quantization chunk. The quantizer's float32 temporaries take ~24 bytes per element
# of a chunk, so chunks of (output shard bytes / 128) elements keep the working set to ~0.2 shard;
# clamped so tiny shards do not make tiny (slow) chunks and huge ones do not make huge temporaries.
MIN_CHUNK_ELEMENTS = 1 << 16
MAX_CHUNK_ELEMENTS = 1 << 22


def chunk_elements(max_shard_bytes: int) -> int:
    return int(min(max(max_shard_bytes // 128, MIN_CHUNK_ELEMENTS), MAX_CHUNK_ELEMENTS))


def _rows_per_chunk(w: torch.Tensor, chunk: int) -> int:
    return max(1, chunk // max(1, w.shape[-1]))


def plan_linears(reader: CheckpointReader, exclude=(), use_default_exclude: bool = True) -> tuple[list[str], list[str]]:
    """``(modules to quantize, excluded modules)`` from the tensor headers alone.

    A candidate is a 2-dim floating ``X.weight``; ``exclude`` (fnmatch over module names) and, unless
    ``use_default_exclude`` is False, :data:`DEFAULT_EXCLUDE` keep candidates in high precision. Raises
    :class:`CheckpointError` for exclude patterns that match nothing and for candidates whose K is
    not a multiple of 16.
    """
    names = reader.names()
    modules = sorted({n.rpartition(".")[0] for n in names if "." in n})
    check_exclude_patterns(list(exclude), modules)
    patterns = list(exclude) + (list(DEFAULT_EXCLUDE) if use_default_exclude else [])
    quantize, excluded = [], []
    for n in names:
        if not n.endswith(".weight"):
            continue
        m = n[: -len(".weight")]
        if len(reader.shape(n)) != 2 or reader.dtype_str(n) not in FLOAT_DTYPES:
            continue
        (excluded if is_excluded(m, patterns) else quantize).append(m)
    bad = [(m, reader.shape(f"{m}.weight")) for m in quantize if reader.shape(f"{m}.weight")[1] % BLOCK_SIZE]
    if bad:
        listing = ", ".join(f"{m} {list(s)}" for m, s in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise CheckpointError(
            f"{len(bad)} Linear weight(s) have K (the last dim) not a multiple of {BLOCK_SIZE}: {listing}; "
            "keep them in high precision with exclude patterns (--exclude)"
        )
    return quantize, excluded


def _tensor_amax(w: torch.Tensor, where: str, chunk: int = MAX_CHUNK_ELEMENTS) -> torch.Tensor:
    amax = torch.zeros((), dtype=torch.float32)
    rows = _rows_per_chunk(w, chunk)
    for i in range(0, w.shape[0], rows):
        part = w[i : i + rows]  # in its own dtype: abs and max are exact, no float32 copy needed
        if not bool(torch.isfinite(part).all()):
            raise CheckpointError(f"{where} contains NaN or inf values; it cannot be quantized (exclude it)")
        if part.numel():
            amax = torch.maximum(amax, part.abs().amax().float())
    return amax


def quantize_nvfp4_rows(
    w: torch.Tensor, global_amax: torch.Tensor, backend: str = "auto", chunk: int = MAX_CHUNK_ELEMENTS
) -> NVFP4Parts:
    """NVFP4 (1x16 blocks) of a 2-dim tensor with a given global amax, in row chunks written into
    preallocated outputs; identical to quantizing the whole tensor at once (1x16 blocks never span
    rows)."""
    from ..kernels.dispatch import quantize_parts

    N, K = w.shape
    rows = _rows_per_chunk(w, chunk)
    packed = torch.empty(N, K // 2, dtype=torch.uint8)
    scales = torch.empty(N, K // BLOCK_SIZE, dtype=torch.float8_e4m3fn)
    g = None
    for i in range(0, max(N, 1), rows):
        p = quantize_parts(w[i : i + rows], global_amax=global_amax, backend=backend)
        packed[i : i + rows] = p.packed
        scales[i : i + rows] = p.block_scale
        g = p.global_decode_scale
        del p
    return NVFP4Parts(packed, scales, g.reshape(()))


def fp8_decode_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 weight scale (decode direction): float32(amax / 448), 1 if amax is 0."""
    s = amax.float() / torch.tensor(E4M3_MAX, dtype=torch.float32)
    return torch.where(amax > 0, s, torch.ones_like(s)).reshape(())


def quantize_fp8_rows(w: torch.Tensor, scale: torch.Tensor, chunk: int = MAX_CHUNK_ELEMENTS) -> torch.Tensor:
    """E4M3 (RTNE, saturating) of ``w / scale`` in row chunks."""
    rows = _rows_per_chunk(w, chunk)
    out = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(0, max(w.shape[0], 1), rows):
        out[i : i + rows] = e4m3_rtne(w[i : i + rows].float() / scale)
    return out


def _output_bytes(shape, scheme: str) -> int:
    N, K = shape
    if scheme == "nvfp4":
        return N * K // 2 + N * (K // BLOCK_SIZE) + 8
    return N * K + 8


def quantize_checkpoint(
    src,
    out,
    scheme: str = "nvfp4",
    exclude=(),
    *,
    format: str = "modelopt",
    use_default_exclude: bool = True,
    max_shard_size=None,
    overwrite: bool = False,
    backend: str = "auto",
) -> Path:
    """Weight-only quantize the high-precision safetensors checkpoint ``src`` into ``out``.

    ``scheme``: ``"nvfp4"`` (W4A16: E2M1 + E4M3 block scales + global scale) or ``"fp8"`` (W8A16,
    per-tensor). ``exclude``: fnmatch patterns over module names kept in high precision (each must
    match something), in addition to :data:`DEFAULT_EXCLUDE` (embeddings, ``lm_head``, MoE routers).
    ``format``: ``"modelopt"`` or ``"compressed-tensors"``. ``max_shard_size`` defaults to the largest
    source file. Every check (formats, patterns, K % 16, output directory) runs before anything is
    written; the output appears only when complete.
    """
    if scheme not in STREAM_SCHEMES:
        raise CheckpointError(f"scheme must be one of {', '.join(STREAM_SCHEMES)}, got {scheme!r}")
    exclude = list(exclude)
    reader = CheckpointReader(src, max_open_files=0)  # no shard stays mapped
    with reader:
        info = detect_format(src, reader)
        if info.format != UNQUANTIZED:
            raise CheckpointError(f"{reader.dir} is already quantized ({info.format} {info.scheme}); use convert_checkpoint")
        quantize, excluded = plan_linears(reader, exclude, use_default_exclude)
        if not quantize:
            raise CheckpointError(f"{reader.dir}: no Linear weight left to quantize after exclusions")
        patterns = exclude + (list(DEFAULT_EXCLUDE) if use_default_exclude else [])
        # record the patterns that excluded something (defaults that match nothing are noise)
        used = [p for p in patterns if any(is_excluded(m, [p]) for m in excluded)]
        groups = {m: g for g in shared_global_amax_groups(quantize) for m in g}
        size = parse_size(max_shard_size) if max_shard_size else max(max(reader.file_bytes().values()), 1 << 20)
        chunk = chunk_elements(size)
        targets = set(quantize)
        done: set[str] = set()
        with progress.task(f"quantizing to {scheme}", total=len(quantize)) as task, RecordWriter(
            out, format, config=info.config, exclude_modules=used, source_dir=reader.dir,
            max_shard_size=size, overwrite=overwrite,
        ) as w:
            for name in reader.names():
                module = name.rpartition(".")[0]
                if module in targets and name == f"{module}.weight":
                    if module in done:
                        continue
                    members = groups.get(module, [module])
                    w.make_room(sum(_output_bytes(reader.shape(f"{m}.weight"), scheme) for m in members))
                    # one member in memory at a time: amaxes first, then each member again
                    # (a second read of a group member comes from the page cache)
                    amaxes = [_tensor_amax(reader.get(f"{m}.weight"), reader.where(f"{m}.weight"), chunk)
                              for m in members]
                    shared = torch.stack(amaxes).amax()
                    for m in members:
                        t = reader.get(f"{m}.weight")
                        N, K = t.shape
                        try:
                            if scheme == "nvfp4":
                                parts = quantize_nvfp4_rows(t, shared, backend, chunk)
                                lw = QuantizedLinearWeight("nvfp4", (N, K), nvfp4=parts)
                            else:
                                s = fp8_decode_scale(shared)
                                lw = QuantizedLinearWeight("fp8", (N, K), fp8_weight=quantize_fp8_rows(t, s, chunk),
                                                           fp8_weight_scale=s)
                        except (ValueError, TypeError) as e:  # numerics refused the values
                            raise CheckpointError(f"cannot quantize {reader.where(f'{m}.weight')}: {e}") from None
                        del t
                        w.linear(m, lw)
                        done.add(m)
                        task.advance(1, module=m)
                    continue
                w.make_room(reader.nbytes(name))
                w.tensor(name, reader.get(name))
    return w.out
