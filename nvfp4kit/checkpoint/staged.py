"""A checkpoint written unit by unit into a staging folder beside the output, so that an interrupted run
resumes after the last finished unit and gives the same bytes as one that never stopped.

Layout of ``.OUT.partial/`` (a fixed name: the same command finds it again)::

    manifest.json             the job's signature, the units finished, the pieces, the resume state
    piece-00000.safetensors   the entries of one unit (records in a format-independent layout; a large
                              tensor equal to the source's tensor of the same name is stored as a
                              reference to it, so embeddings and heads are not written twice)
    state-inputs.safetensors  what the next unit needs (the calibration activations between blocks)
    companions/               tokenizer, generation config, model card ... copied into the output

:meth:`StagedCheckpoint.finish` writes the real checkpoint from the pieces, in order, through
:class:`~nvfp4kit.checkpoint.quantized.RecordWriter` (so the shards are exactly those an in-memory
``save_quantized`` of the same entries makes), renames it into place and removes the staging folder.
Nothing appears under the output name before that.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from .. import scratch
from ..formats.nvfp4 import NVFP4Parts
from .errors import CheckpointError
from .quantized import RecordWriter, check_write_format, stored_dtype
from .reader import ST_DTYPES
from .types import QuantizedLinearWeight
from .writer import DEFAULT_MAX_SHARD_BYTES, check_output_dir

MANIFEST = "manifest.json"
COMPANIONS = "companions"
SPILL = "spill"  # the calibration activations spilled to disk by a run (not needed to resume)
_META = "nvfp4kit.entries"
_SOURCE_REF = "source"  # an entry kind: a tensor the checkpoint holds exactly as the source's of that name
_PARTS = {"nvfp4": ("packed", "block_scale", "global_decode_scale"), "fp8": ("fp8_weight", "fp8_weight_scale"),
          "bf16": ("weight",)}


def staging_dir(out) -> Path:
    """The staging folder of an output path: ``.NAME.partial`` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


# ----------------------------------------------------------------------------- pieces


# tensors from this size up are looked up in the source (smaller ones are cheaper to store again)
SOURCE_REFERENCE_MIN_BYTES = 1 << 20


def _same_as_source(source, name: str, value: torch.Tensor, stored_dtype) -> bool:
    """Whether the checkpoint's tensor ``name`` (``value`` written in ``stored_dtype``) is the source's."""
    if source is None or name not in source or source.shape(name) != tuple(value.shape):
        return False
    dtype = stored_dtype(name, value) if stored_dtype is not None else value.dtype
    if value.numel() * torch.empty((), dtype=dtype).element_size() < SOURCE_REFERENCE_MIN_BYTES:
        return False
    if ST_DTYPES.get(source.dtype_str(name)) != dtype:
        return False
    value = value.detach()
    if value.ndim == 0:
        return torch.equal(source.get(name), value.cpu().to(dtype))
    value = value.reshape(value.shape[0], -1)
    step = max(1, (64 << 20) // max(1, value[0].numel() * value.element_size()))  # ~64 MB of rows at a time
    for r in range(0, value.shape[0], step):
        src = source.get_rows(name, r, r + step)
        if not torch.equal(src.reshape(src.shape[0], -1), value[r:r + step].cpu().to(dtype)):
            return False
    return True


def write_piece(path: Path, entries: list[tuple[str, str, object]], source=None, stored_dtype=None) -> None:
    """Store ``(kind, name, value)`` entries (plain tensors, Linear records, KV amaxes) in one
    safetensors file, atomically. ``source``: a :class:`~nvfp4kit.checkpoint.reader.CheckpointReader`
    of the source model; a large tensor that the checkpoint will hold exactly as the source's tensor
    of the same name (written in ``stored_dtype(name, value)``) is stored as a reference."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = []
    for i, (kind, name, value) in enumerate(entries):
        if kind == _SOURCE_REF or (kind == "tensor" and _same_as_source(source, name, value, stored_dtype)):
            meta.append({"kind": "tensor", "name": name, "source": name})
        elif kind == "tensor":
            tensors[f"{i}"] = value.detach().contiguous().clone()
            meta.append({"kind": kind, "name": name})
        elif kind == "kv":
            meta.append({"kind": kind, "name": name, "k": float(value[0]), "v": float(value[1])})
        else:
            rec: QuantizedLinearWeight = value
            src = rec.nvfp4 if rec.format == "nvfp4" else rec
            for part in _PARTS[rec.format]:
                tensors[f"{i}.{part}"] = getattr(src, part).detach().contiguous().clone()
            if rec.bias is not None:
                tensors[f"{i}.bias"] = rec.bias.detach().contiguous().clone()
            meta.append({"kind": kind, "name": name, "format": rec.format, "shape": list(rec.shape),
                         "input_amax": rec.input_amax, "block": list(rec.nvfp4.block) if rec.nvfp4 else None})
    tmp = path.with_name(scratch.owned(f".{path.name}.tmp-"))
    try:
        save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)})
    except OSError as e:  # the disk filled up after the checks before the work: the staged units stay
        tmp.unlink(missing_ok=True)
        from .space import write_error

        raise write_error(path, e, "the blocks staged so far are kept: free some space and run the same command "
                                   "again to resume") from None
    os.replace(tmp, path)


def read_piece(path: Path, source=None):
    """The entries :func:`write_piece` stored, in order (references resolved from ``source``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[_META])
            for i, e in enumerate(meta):
                kind, name = e["kind"], e["name"]
                if kind == "tensor" and "source" in e:
                    if source is None or e["source"] not in source:
                        raise CheckpointError(f"staged piece {path} refers to the source tensor {e['source']!r}, "
                                              "which the source no longer has; remove the staging folder and "
                                              "start again")
                    yield kind, name, source.get(e["source"])
                elif kind == "tensor":
                    yield kind, name, f.get_tensor(f"{i}")
                elif kind == "kv":
                    yield kind, name, (e["k"], e["v"])
                else:
                    parts = {p: f.get_tensor(f"{i}.{p}") for p in _PARTS[e["format"]]}
                    bias = f.get_tensor(f"{i}.bias") if f"{i}.bias" in f.keys() else None
                    shape = tuple(e["shape"])
                    if e["format"] == "nvfp4":
                        rec = QuantizedLinearWeight("nvfp4", shape, nvfp4=NVFP4Parts(
                            parts["packed"], parts["block_scale"], parts["global_decode_scale"], tuple(e["block"])),
                            input_amax=e["input_amax"], bias=bias)
                    else:
                        rec = QuantizedLinearWeight(e["format"], shape, input_amax=e["input_amax"], bias=bias, **parts)
                    yield kind, name, rec
    except (OSError, KeyError, ValueError, json.JSONDecodeError, SafetensorError) as e:
        raise CheckpointError(f"staged piece {path} is unreadable ({e}); remove {path.parent} and start again") \
            from None


# ----------------------------------------------------------------------------- the staged checkpoint


def _open_source(source_dir):
    """A reader of the source's safetensors (closing each file after a read), or None (no folder, GGUF...)."""
    from .reader import CheckpointReader

    if source_dir is None or not Path(source_dir).is_dir():
        return None
    try:
        return CheckpointReader(source_dir, max_open_files=0)
    except CheckpointError:
        return None


def clean_stale_staging(folder: Path) -> list[Path]:
    """Remove what a run killed inside the staging folder left (its pieces and manifest stay, so the run
    resumes): temporary ``.NAME.tmp-pid<PID>-*`` files and spilled-activation folders of dead processes."""
    return scratch.remove_stale(folder, ".*.tmp-pid*") + scratch.remove_stale(folder / SPILL, "*-pid*")


class StagedCheckpoint:
    """A :class:`~nvfp4kit.calibrate.blockwise.RecordSink` that stages each unit as a piece and, at
    :meth:`finish`, writes the checkpoint (see the module docs).

    ``signature``: what must be equal for a staging folder to be resumed (the job's options and its
    source); a folder of another job is refused. ``overwrite`` starts again in any case.
    ``source_dir``: the source model's safetensors folder, whose unchanged tensors the pieces refer to.
    """

    def __init__(self, out, fmt: str, signature: dict, *, config: dict, exclude_modules=(), kv_cache_format=None,
                 max_shard_size=DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False, tensor_dtype=None, sources=(),
                 source_dir=None, tensor_dtypes=None):
        self.out = check_output_dir(out, overwrite, sources)
        self.fmt = check_write_format(fmt)
        self.dir = staging_dir(self.out)
        self.signature = json.loads(json.dumps(signature))
        self.writer_options = dict(config=config, exclude_modules=list(exclude_modules),
                                   kv_cache_format=kv_cache_format, max_shard_size=max_shard_size,
                                   overwrite=overwrite, tensor_dtype=tensor_dtype, tensor_dtypes=tensor_dtypes,
                                   sources=tuple(sources))
        self.manifest = {"signature": self.signature, "units": 0, "pieces": [], "state": {}}
        self._source = _open_source(source_dir)
        self._stored_dtype = functools.partial(stored_dtype, tensor_dtype=tensor_dtype, tensor_dtypes=tensor_dtypes)
        self._entries: list = []
        existing = self._read_manifest()
        if overwrite and self.dir.exists():
            shutil.rmtree(self.dir)
        elif existing is not None and existing.get("signature") == self.signature:
            self.manifest = existing
        elif self.dir.exists():
            if existing is not None and int(existing.get("units", 0)) > 0:
                raise CheckpointError(
                    f"{self.dir} holds an unfinished run of another job (different options or source); "
                    "remove it, or pass --overwrite to start again")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(self.dir)
        (self.dir / COMPANIONS).mkdir(exist_ok=True)
        self._write_manifest()

    # ------------------------------------------------------------------ state

    def _read_manifest(self) -> dict | None:
        path = self.dir / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _write_manifest(self) -> None:
        tmp = self.dir / scratch.owned(f".{MANIFEST}.tmp-")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.dir / MANIFEST)

    @property
    def units_done(self) -> int:
        """How many units (0: the part before the blocks, 1 + i: block i) are staged."""
        return int(self.manifest["units"])

    @property
    def companions(self) -> Path:
        """The folder whose files are copied into the checkpoint (tokenizer and the like)."""
        return self.dir / COMPANIONS

    def state(self) -> dict:
        """The resume state saved with the last finished unit (paths are inside the staging folder)."""
        return dict(self.manifest.get("state") or {})

    # ------------------------------------------------------------------ the sink

    def tensor(self, name: str, t: torch.Tensor) -> None:
        # a copy of the source's tensor is recorded as a reference at once, so the unit's entries do not hold
        # it until the unit ends (the modules after the blocks are handed over a piece at a time)
        if _same_as_source(self._source, name, t, self._stored_dtype):
            self._entries.append((_SOURCE_REF, name, None))
        else:
            self._entries.append(("tensor", name, t))

    def linear(self, name: str, record: QuantizedLinearWeight) -> None:
        self._entries.append(("linear", name, record))

    def kv(self, attention: str, k_amax: float, v_amax: float) -> None:
        self._entries.append(("kv", attention, (k_amax, v_amax)))

    def end_unit(self, unit: int, state: dict) -> None:
        """Stage the entries of ``unit`` as a piece and record what resuming after it needs: an
        :class:`~nvfp4kit.calibrate.activations.ActivationStore` under ``"inputs"`` is saved to a file,
        other values must be JSON."""
        if unit < self.units_done:  # already staged by an earlier, interrupted run
            self._entries = []
            return
        piece = f"piece-{unit:05d}.safetensors"
        write_piece(self.dir / piece, self._entries, self._source, self._stored_dtype)
        self._entries = []
        saved = {}
        for key, value in state.items():
            if hasattr(value, "save"):
                fname = f"state-{key}.safetensors"
                value.save(self.dir / fname)
                saved[key] = {"file": fname}
            else:
                saved[key] = value
        self.manifest["pieces"] = [p for p in self.manifest["pieces"] if p != piece] + [piece]
        self.manifest["units"] = unit + 1
        self.manifest["state"] = saved
        self._write_manifest()

    # ------------------------------------------------------------------ finish

    def discard_if_empty(self) -> None:
        """Remove the staging folder when no unit was finished (a run that failed early leaves nothing)."""
        if self.units_done == 0:
            shutil.rmtree(self.dir, ignore_errors=True)

    def finish(self) -> Path:
        """Write the checkpoint from the staged pieces and rename it into place; returns its path."""
        with RecordWriter(self.out, self.fmt, source_dir=str(self.companions), **self.writer_options) as w:
            for piece in self.manifest["pieces"]:
                for kind, name, value in read_piece(self.dir / piece, self._source):
                    if kind == "tensor":
                        w.tensor(name, value)
                    elif kind == "linear":
                        w.linear(name, value)
                    else:
                        w.kv(name, *value)
        shutil.rmtree(self.dir, ignore_errors=True)
        return w.out


__all__ = ["StagedCheckpoint", "read_piece", "staging_dir", "write_piece"]
