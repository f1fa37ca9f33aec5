"""Lazy, validated access to the safetensors of a checkpoint directory (sharded or single file).

:class:`CheckpointReader` opens only headers up front (so a 100 GB checkpoint costs nothing to
inspect), checks that every file the index names exists and has a valid header, and loads one
tensor at a time with ``safe_open``. Every error names the file and, where it applies, the tensor.
Never unpickles anything: ``*.bin`` / ``*.pt`` / ``*.pth`` / ``*.ckpt`` checkpoints are refused
(:func:`pickle_refusal`, the one message every command gives, says how to convert them).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# safetensors dtype strings
ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# files torch writes with pickle (``torch.save``): never opened, whatever they hold
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def pickle_files(folder: Path) -> list[str]:
    """Names of the pickle weight files (:data:`PICKLE_SUFFIXES`) directly inside ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def pickle_refusal(where, files) -> CheckpointError:
    """The one error for a source whose weights are only in pickle files: nvfp4kit never unpickles
    (loading a pickle can run arbitrary code), so it says how to convert them to safetensors once."""
    files = list(files)
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    one = files[0] if files else "pytorch_model.bin"
    return CheckpointError(
        f"{where}: the weights are in pickle files ({shown}), and pickle checkpoints are not loaded: nvfp4kit reads "
        "safetensors only and never unpickles (a pickle can run code when loaded). Convert them once, where you trust the file: with transformers, "
        "from_pretrained(FOLDER) then save_pretrained(NEW_FOLDER) (it writes safetensors; keep the tokenizer files), "
        "or for a single file: python -c \"import torch, safetensors.torch as st; "
        f"st.save_file({{k: v.contiguous().clone() for k, v in torch.load('{one}', weights_only=True).items()}}, "
        "'model.safetensors', metadata={'format': 'pt'})\""
    )


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


class CheckpointReader:
    """Tensors of a HF-style checkpoint directory, loaded lazily.

    ``path`` is a directory with ``model.safetensors.index.json`` (sharded), ``model.safetensors``, or
    other ``*.safetensors`` files; or a single ``.safetensors`` file.
    """

    def __init__(self, path, max_open_files: int = 2):
        """``max_open_files``: safetensors files kept open (memory-mapped) at once; 0 closes each
        file after every tensor read, so no shard's pages stay mapped (streaming use)."""
        from safetensors import safe_open  # noqa: F401  (fail early if missing)

        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"checkpoint {self.path} does not exist")
        self.dir = self.path if self.path.is_dir() else self.path.parent
        # 0: close the file after every tensor read (no shard stays mapped into this process)
        self._max_open = max(0, max_open_files)
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._weight_map: dict[str, str] = {}  # tensor name -> file name (relative to dir)
        self._info: dict[str, tuple[str, tuple[int, ...]]] = {}  # tensor -> (dtype str, shape)
        self.files: list[str] = []
        self._index_path: Path | None = None

        if self.path.is_file():
            if self.path.suffix in PICKLE_SUFFIXES:
                raise pickle_refusal(f"checkpoint {self.path}", [self.path.name])
            self.files = [self.path.name]
        elif (self.path / INDEX_NAME).exists():
            self._index_path = self.path / INDEX_NAME
            index = read_json(self._index_path, "index")
            wm = index.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"index {self._index_path}: no 'weight_map' object")
            self.files = sorted(set(wm.values()))
            missing = [f for f in self.files if not (self.path / f).is_file()]
            if missing:
                raise CheckpointError(f"index {self._index_path} names shard(s) that do not exist: {missing}")
        elif (self.path / SINGLE_NAME).exists():
            self.files = [SINGLE_NAME]
        else:
            self.files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not self.files:
                pickles = pickle_files(self.path)
                if pickles:
                    raise pickle_refusal(f"checkpoint {self.path}", pickles)
                raise CheckpointError(f"checkpoint {self.path}: no *.safetensors files")

        for fname in self.files:
            for name, dtype, shape in self._header(fname):
                if name in self._info:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {self._weight_map[name]} and {fname} of {self.dir}"
                    )
                self._weight_map[name] = fname
                self._info[name] = (dtype, shape)
        if self._index_path is not None:
            lost = [n for n, f in wm.items() if self._weight_map.get(n) != f]
            if lost:
                raise CheckpointError(
                    f"index {self._index_path} lists {len(lost)} tensor(s) not found in the named shard, "
                    f"e.g. {lost[:3]} (is the checkpoint incomplete?)"
                )

    # ------------------------------------------------------------------ files

    def _open(self, fname: str):
        from safetensors import safe_open

        h = self._handles.get(fname)
        if h is not None:
            self._handles.move_to_end(fname)
            return h
        path = self.dir / fname
        try:
            h = safe_open(str(path), framework="pt", device="cpu")
        except FileNotFoundError:
            raise CheckpointError(f"safetensors file {path} does not exist") from None
        except Exception as e:  # SafetensorError: corrupt / truncated header or data
            raise CheckpointError(f"safetensors file {path} is corrupt or truncated: {e}") from None
        self._handles[fname] = h
        while len(self._handles) > max(self._max_open, 1):
            self._handles.popitem(last=False)
        return h

    def _header(self, fname: str):
        h = self._open(fname)
        for name in h.offset_keys() if hasattr(h, "offset_keys") else h.keys():
            sl = h.get_slice(name)
            yield name, sl.get_dtype(), tuple(int(d) for d in sl.get_shape())

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ tensors

    def names(self) -> list[str]:
        """All tensor names, file by file, in on-disk order."""
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def file_of(self, name: str) -> str:
        self._require(name)
        return self._weight_map[name]

    def dtype_str(self, name: str) -> str:
        """The safetensors dtype string ("U8", "F8_E4M3", "BF16", ...)."""
        self._require(name)
        return self._info[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return self._info[name][1]

    def nbytes(self, name: str) -> int:
        """Size of a tensor's data in bytes (from the header; nothing is loaded)."""
        dtype, shape = self._info[name]
        n = torch.empty((), dtype=ST_DTYPES[dtype]).element_size() if dtype in ST_DTYPES else 1
        for d in shape:
            n *= d
        return n

    def file_bytes(self) -> dict[str, int]:
        return {f: os.path.getsize(self.dir / f) for f in self.files}

    def where(self, name: str) -> str:
        """``'tensor NAME in FILE'`` for messages."""
        return f"tensor {name!r} in {self.dir / self._weight_map[name]}" if name in self._weight_map else f"tensor {name!r}"

    def _require(self, name: str) -> None:
        if name not in self._info:
            raise CheckpointError(f"checkpoint {self.dir}: tensor {name!r} is missing")

    def get(self, name: str, dtype_str: str | tuple[str, ...] | None = None, shape=None) -> torch.Tensor:
        """Load one tensor; if ``dtype_str`` / ``shape`` are given, check them first (clear error)."""
        self._require(name)
        if dtype_str is not None:
            self.expect_dtype(name, dtype_str)
        if shape is not None:
            self.expect_shape(name, shape)
        h = self._open(self._weight_map[name])
        try:
            t = h.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read {self.where(name)}: {e}") from None
        if self._max_open == 0:  # streaming: unmap the shard; its pages stay in the page cache only
            self._handles.clear()
        return t

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along its first dim), read without loading the rest."""
        self._require(name)
        h = self._open(self._weight_map[name])
        try:
            t = h.get_slice(name)[start:stop]
        except Exception as e:
            raise CheckpointError(f"cannot read {self.where(name)}: {e}") from None
        if self._max_open == 0:
            self._handles.clear()
        return t

    def expect_dtype(self, name: str, dtype_str: str | tuple[str, ...]) -> None:
        allowed = (dtype_str,) if isinstance(dtype_str, str) else tuple(dtype_str)
        got = self.dtype_str(name)
        if got not in allowed:
            raise CheckpointError(f"{self.where(name)} has dtype {got}, expected {' or '.join(allowed)}")

    def expect_shape(self, name: str, shape) -> None:
        got = self.shape(name)
        want = tuple(shape)
        if got != want:
            raise CheckpointError(f"{self.where(name)} has shape {list(got)}, expected {list(want)}")

    # ------------------------------------------------------------------ configs

    def json(self, fname: str) -> dict | None:
        """A JSON file of the checkpoint directory, or None if absent."""
        p = self.dir / fname
        return read_json(p, fname) if p.exists() else None
