"""Sharded, atomic safetensors writer.

Tensors are buffered until a shard reaches ``max_shard_bytes``, then written to a temporary
directory beside the output (same parent, so the final ``os.rename`` is atomic). Only when
everything is written are the shards renamed ``model-0000i-of-0000n.safetensors``, the index
``model.safetensors.index.json`` written (a single shard is ``model.safetensors``, as transformers
does), and the directory renamed into place. An interrupted or failed run removes the temporary
directory: no half-written checkpoint is ever visible under the output name.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import torch

from .. import scratch
from .errors import CheckpointError
from .reader import INDEX_NAME, SINGLE_NAME
from .space import check_writable, write_error

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Files copied from the source model directory: tokenizer, generation settings, chat templates,
# remote modeling code, and the model card / licence. Weights and configs are written anew.
COPY_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "generation_config.json",
    "chat_template*",
    "preprocessor_config.json",
    "processor_config.json",
    "*.py",
    "README*",
    "LICENSE*",
    # sentence-transformers: the module list and its settings (module folders: see module_dirs)
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def parse_size(size) -> int:
    """``5GB``, ``500MB``, ``1.5GiB`` or an int number of bytes -> bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise CheckpointError(f"max shard size must be positive, got {size}")
        return size
    s = str(size).strip().upper()
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            try:
                value = float(s[: -len(u)])
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * mult)
    else:
        if s.isdigit() and int(s) > 0:
            return int(s)
    raise CheckpointError(f"cannot read shard size {size!r} (use e.g. 5GB, 500MB, 2GiB)")


def files_to_copy(source_dir) -> list[Path]:
    """Top-level files of ``source_dir`` matching :data:`COPY_PATTERNS`."""
    src = Path(source_dir)
    if not src.is_dir():
        return []
    out = []
    for p in sorted(src.iterdir()):
        if p.is_file() and any(p.match(pat) for pat in COPY_PATTERNS):
            out.append(p)
    return out


def module_dirs(source_dir) -> list[Path]:
    """Sub-folders a sentence-transformers ``modules.json`` names (e.g. ``1_Pooling``, ``2_Normalize``)."""
    src = Path(source_dir)
    try:
        modules = json.loads((src / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for m in modules if isinstance(modules, list) else []:
        path = m.get("path") if isinstance(m, dict) else None
        if path and (src / path).is_dir() and (src / path).resolve().parent == src.resolve():
            out.append(src / path)
    return out


def copy_companion_files(source_dir, dest_dir, skip=()) -> list[str]:
    """Copy the non-weight files of a model folder (tokenizer, generation config, model card, licence,
    sentence-transformers modules) into ``dest_dir``, keeping files already there; returns their names."""
    dest = Path(dest_dir)
    copied = []
    for p in files_to_copy(source_dir):
        if p.name in skip or (dest / p.name).exists():
            continue
        shutil.copy2(p, dest / p.name)
        copied.append(p.name)
    for d in module_dirs(source_dir):
        if d.name in skip or (dest / d.name).exists():
            continue
        shutil.copytree(d, dest / d.name)
        copied.append(d.name)
    return copied


def _real_locations(source: Path) -> list[Path]:
    """Where a source's data really is: the path itself and, for a folder, the targets of its top-level
    symbolic links (a Hugging Face cache snapshot links each file to a blob elsewhere), symlinks resolved."""
    out = [source.resolve()]
    if source.is_dir():
        try:
            entries = sorted(source.iterdir())
        except OSError:
            entries = []
        out += [p.resolve() for p in entries if p.is_symlink()]
    return out


def check_apart_from_sources(out, sources, what: str = "output folder") -> Path:
    """Refuse an output path that is a source, contains one or lies inside one, symlinks resolved (writing
    it, or replacing it with ``--overwrite``, would destroy or alter the source); sources that do not exist
    locally (a hub id, a built-in name) are skipped. Returns the output as an absolute Path."""
    out = Path(out).expanduser().absolute()
    real_out = out.resolve()
    for s in sources:
        if s is None or str(s) == "":
            continue
        src = Path(s).expanduser().absolute()
        if not src.exists():
            continue
        for real in _real_locations(src):
            if real_out == real:
                how = "is"
            elif real_out in real.parents:
                how = "contains"
            elif real in real_out.parents:
                how = "lies inside"
            else:
                continue
            shown = f"{src}" if real == src else f"{src} (really {real})"
            where = f" (really {real_out})" if real_out != out else ""
            raise CheckpointError(f"{what} {out}{where} {how} the source {shown}: writing it would destroy or "
                                  "change the source; choose another output (nothing was written)")
    return out


def check_output_dir(out_dir, overwrite: bool = False, sources=()) -> Path:
    """Validate an output directory before any work starts (:func:`check_apart_from_sources` for
    ``sources``); returns it as an absolute Path."""
    out = check_apart_from_sources(out_dir, sources)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists; remove it or pass overwrite=True (--overwrite)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} exists and is not a directory")
    if not out.parent.is_dir():
        raise CheckpointError(f"parent directory {out.parent} of the output does not exist")
    check_writable(out, "output directory")
    return out


def clean_stale_beside(out) -> list[Path]:
    """Remove what writers killed before they finished left beside the output folders of ``out``'s parent
    (see :mod:`nvfp4kit.scratch`): ``.NAME.partial-pid<PID>-*`` folders of dead processes, and the
    ``.OUT.old-pid<PID>-*`` folder a replaced ``out`` was moved to, once ``out`` itself is back in place.
    The resumable staging folder ``.OUT.partial`` carries no owner and is never touched."""
    out = Path(out).absolute()
    removed = scratch.remove_stale(out.parent, ".*.partial-pid*")
    if out.exists():
        removed += scratch.remove_stale(out.parent, f".{glob.escape(out.name)}.old-pid*")
    return removed


class ShardedWriter:
    """Write a checkpoint directory atomically, one tensor at a time.

    Use as a context manager: the output appears only if the ``with`` block completes::

        with ShardedWriter(out_dir, max_shard_bytes=2 * 1024**3) as w:
            w.add("model.embed_tokens.weight", emb)
            w.write_json("config.json", config)
            w.copy_from(source_dir)
        # out_dir now holds model-0000i-of-0000n.safetensors + index, config.json, tokenizer files

    Before the rename, the complete temporary folder is checked against what serving engines load
    (:func:`~nvfp4kit.checkpoint.serving.verify_serving`); a folder that fails is removed and the error
    lists every problem. ``verify``: a callable run on the temporary folder instead (it raises to refuse;
    what it returns is kept in :attr:`findings`), or None to skip the check.
    """

    def __init__(self, out_dir, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False, sources=(),
                 verify="serving"):
        self.out = check_output_dir(out_dir, overwrite, sources)
        self.overwrite = overwrite
        self.verify = verify
        self.findings: list = []  # what the check returned (warnings), once finished
        self.max_shard_bytes = parse_size(max_shard_bytes)
        self.tmp: Path | None = None
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._storages: set[int] = set()  # storages of the buffered tensors
        self._shards: list[tuple[str, list[str], int]] = []  # (temp file name, names, bytes)
        self._names: set[str] = set()
        self._finished = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "ShardedWriter":
        clean_stale_beside(self.out)
        self.tmp = scratch.make_dir(f".{self.out.name}.partial-", self.out.parent)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self._abort()
                raise
        else:
            self._abort()
        return False

    def _abort(self) -> None:
        self._buffer.clear()
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _need_open(self) -> Path:
        if self.tmp is None or self._finished:
            raise RuntimeError("ShardedWriter: use it as a context manager (with ShardedWriter(...) as w:)")
        return self.tmp

    # ------------------------------------------------------------------ content

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (written when its shard fills up)."""
        self._need_open()
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} written twice")
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(f"tensor {name!r}: expected a plain torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        # safetensors refuses tensors sharing memory (tied embeddings, views of one buffer): copy
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        if storage is not None and storage in self._storages:
            t = t.clone()
            storage = t.untyped_storage().data_ptr()
        if storage is not None:
            self._storages.add(storage)
        self._buffer[name] = t
        self._buffer_bytes += nbytes
        self._names.add(name)

    def make_room(self, nbytes: int) -> None:
        """Flush now if ``nbytes`` more would overflow the current shard, so a caller can free the
        buffer *before* loading its next tensor (keeps peak memory near one shard)."""
        self._need_open()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()

    def names(self) -> set[str]:
        """Names of the tensors added so far."""
        return set(self._names)

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def flush(self) -> None:
        """Write the buffered tensors as one shard now."""
        from safetensors.torch import save_file

        tmp = self._need_open()
        if not self._buffer:
            return
        fname = f"shard-{len(self._shards) + 1:05d}.safetensors"
        try:
            save_file(self._buffer, str(tmp / fname), metadata={"format": "pt"})
            scratch.publish(tmp / fname)  # safetensors writes 0600: the user's umask instead
        except OSError as e:  # the disk filled up (or was unmounted) after the checks before the work
            raise write_error(self.out, e) from None
        self._shards.append((fname, list(self._buffer), self._buffer_bytes))
        self._buffer = {}
        self._buffer_bytes = 0
        self._storages = set()

    def write_json(self, fname: str, obj: dict) -> None:
        tmp = self._need_open()
        with open(tmp / fname, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    def copy_from(self, source_dir, skip=()) -> list[str]:
        """Copy tokenizer / generation / model-card / sentence-transformers files of ``source_dir``;
        returns their names."""
        return copy_companion_files(source_dir, self._need_open(), skip)

    # ------------------------------------------------------------------ finish

    def _finish(self) -> None:
        self.flush()
        tmp = self._need_open()
        if not self._shards:
            raise CheckpointError(f"no tensors were written to {self.out}")
        n = len(self._shards)
        if n == 1:
            os.rename(tmp / self._shards[0][0], tmp / SINGLE_NAME)
        else:
            weight_map = {}
            total = 0
            for i, (fname, names, nbytes) in enumerate(self._shards, start=1):
                final = f"model-{i:05d}-of-{n:05d}.safetensors"
                os.rename(tmp / fname, tmp / final)
                for name in names:
                    weight_map[name] = final
                total += nbytes
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            with open(tmp / INDEX_NAME, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        self._check(tmp)
        self._finished = True
        scratch.publish(tmp)  # mkdtemp made it 0700: the output gets the user's umask
        self._move_into_place(tmp)

    def _check(self, tmp: Path) -> None:
        """Run the serving check on the complete temporary folder (it raises to refuse the checkpoint)."""
        if self.verify is None:
            return
        if self.verify == "serving":
            from .serving import verify_serving

            self.findings = verify_serving(tmp, what=str(self.out))
        else:
            self.findings = list(self.verify(tmp) or [])

    def _move_into_place(self, tmp: Path) -> None:
        if self.out.exists():
            if not self.overwrite:  # appeared while we were writing
                raise CheckpointError(f"output directory {self.out} appeared while writing; not overwriting it")
            trash = scratch.make_dir(f".{self.out.name}.old-", self.out.parent)
            os.rename(self.out, trash / "old")
            try:
                os.rename(tmp, self.out)
            except BaseException:
                os.rename(trash / "old", self.out)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, self.out)
        self.tmp = None
