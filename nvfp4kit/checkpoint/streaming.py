"""Weight-only quantization of a sharded high-precision HF checkpoint, one tensor at a time.

No model is built and no calibration is run: every 2-dim floating ``*.weight`` is a candidate Linear,
and :func:`nvfp4kit.policy.plan_precision` (the same plan as in-memory PTQ: ``--exclude`` patterns,
the default exclusions, K % 16) decides which are quantized (NVFP4 W4A16, or per-tensor FP8 W8A16);
everything else is copied. Tensors
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
from ..formats.fp8 import fp8_quantize, fp8_scale
from ..formats.nvfp4 import BLOCK_SIZE, NVFP4Parts
from ..policy import DEFAULT_EXCLUDE, PrecisionPlan, fused_groups, plan_precision
from .errors import CheckpointError
from .layout import FP8_W8A16
from .quantized import UNQUANTIZED, RecordWriter, check_write_format, detect_format
from .reader import FLOAT_DTYPES, CheckpointReader
from .serving import check_plan
from .space import check_free_space
from .types import QuantizedLinearWeight
from .writer import parse_size

STREAM_SCHEMES = ("nvfp4", "fp8")
# the PTQ scheme each streaming scheme is (weight-only: no calibration, no input scales)
_PLAN_SCHEME = {"nvfp4": "w4a16", "fp8": "fp8"}
# Elements per quantization chunk. The quantizer's float32 temporaries take ~24 bytes per element
# of a chunk, so chunks of (output shard bytes / 128) elements keep the working set to ~0.2 shard;
# clamped so tiny shards do not make tiny (slow) chunks and huge ones do not make huge temporaries.
MIN_CHUNK_ELEMENTS = 1 << 16
MAX_CHUNK_ELEMENTS = 1 << 22


def chunk_elements(max_shard_bytes: int) -> int:
    return int(min(max(max_shard_bytes // 128, MIN_CHUNK_ELEMENTS), MAX_CHUNK_ELEMENTS))


def _rows_per_chunk(w: torch.Tensor, chunk: int) -> int:
    return max(1, chunk // max(1, w.shape[-1]))


def plan_linears(reader: CheckpointReader, scheme: str = "nvfp4", exclude=(),
                 use_default_exclude: bool = True) -> PrecisionPlan:
    """The precision plan of the checkpoint's candidate Linears (every 2-dim floating ``X.weight``),
    from the tensor headers alone: :func:`nvfp4kit.policy.plan_precision` with ``exclude`` and, unless
    ``use_default_exclude`` is False, the default exclusions. Raises :class:`CheckpointError` for
    exclude patterns that match no candidate."""
    shapes = {}
    for n in reader.names():
        if n.endswith(".weight") and len(reader.shape(n)) == 2 and reader.dtype_str(n) in FLOAT_DTYPES:
            shapes[n[: -len(".weight")]] = tuple(reader.shape(n))
    try:
        return plan_precision(shapes, _PLAN_SCHEME[scheme], exclude,
                              default_exclude=DEFAULT_EXCLUDE if use_default_exclude else ())
    except ValueError as e:
        raise CheckpointError(f"{reader.dir}: {e}") from None


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


def quantize_fp8_rows(w: torch.Tensor, scale: torch.Tensor, chunk: int = MAX_CHUNK_ELEMENTS) -> torch.Tensor:
    """Per-tensor FP8 (:mod:`nvfp4kit.formats.fp8`) of ``w`` with a given scale, in row chunks."""
    rows = _rows_per_chunk(w, chunk)
    out = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(0, max(w.shape[0], 1), rows):
        out[i : i + rows] = fp8_quantize(w[i : i + rows], scale=scale)[0]
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
    match something), in addition to :data:`nvfp4kit.policy.DEFAULT_EXCLUDE` (the output head,
    embeddings, routers, conv1d, MTP). The checkpoint lists the modules kept in high precision.
    ``format``: ``"modelopt"`` or ``"compressed-tensors"``. ``max_shard_size`` defaults to the largest
    source file. Every check (formats, patterns, K % 16, output directory) runs before anything is
    written; the output appears only when complete.
    """
    if scheme not in STREAM_SCHEMES:
        raise CheckpointError(f"scheme must be one of {', '.join(STREAM_SCHEMES)}, got {scheme!r}")
    check_plan(check_write_format(format), [FP8_W8A16] if scheme == "fp8" else [])  # not servable as modelopt
    exclude = list(exclude)
    reader = CheckpointReader(src, max_open_files=0)  # no shard stays mapped
    with reader:
        info = detect_format(src, reader)
        if info.format != UNQUANTIZED:
            raise CheckpointError(f"{reader.dir} is already quantized ({info.format} {info.scheme}); use convert_checkpoint")
        plan = plan_linears(reader, scheme, exclude, use_default_exclude)
        quantize = plan.quantized()
        if not quantize:
            raise CheckpointError(f"{reader.dir}: no Linear weight left to quantize after exclusions")
        for name, lp in plan.layers.items():
            if lp.format == "bf16" and lp.reason.startswith("in_features"):
                progress.log(f"{name}: kept in high precision ({lp.reason})")
        groups = {m: g for g in fused_groups(quantize) for m in g}
        size = parse_size(max_shard_size) if max_shard_size else max(max(reader.file_bytes().values()), 1 << 20)
        chunk = chunk_elements(size)
        targets = set(quantize)
        need = sum(_output_bytes(reader.shape(n), scheme) if n.endswith(".weight") and n[:-7] in targets
                   else reader.nbytes(n) for n in reader.names())
        check_free_space(out, need, f"the {scheme} checkpoint", option="output folder")
        done: set[str] = set()
        with progress.task(f"quantizing to {scheme}", total=len(quantize)) as task, RecordWriter(
            out, format, config=info.config, exclude_modules=sorted(plan.excluded()), source_dir=reader.dir,
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
                                s = fp8_scale(shared)
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
