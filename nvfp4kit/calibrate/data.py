"""Calibration and evaluation text: sources, tokenization, N samples of L tokens.

Sources (``load_text``):

* ``"builtin"`` (the default): English prose of the Python reference manual, which ships with
  every Python (``pydoc_data.topics``), so calibration never needs a download. Its topics are
  split deterministically into a calibration part and a disjoint evaluation part
  (``builtin_text("calib")`` / ``builtin_text("eval")``: every fourth topic, in sorted order,
  is held out for evaluation).
* a plain text file (``.txt``, ``.md``, ``.rst`` or no suffix): read as UTF-8.
* a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, or a folder of such files: loaded with
  the ``datasets`` library, offline; the ``text`` column (or ``text_field``) is joined.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

BUILTIN = "builtin"
_EVAL_EVERY = 4
_DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


def builtin_text(split: str = "calib") -> str:
    """The built-in corpus: ``"calib"`` (3/4 of the topics) or ``"eval"`` (the other, disjoint 1/4)."""
    if split not in ("calib", "eval"):
        raise ValueError(f"builtin_text: split must be 'calib' or 'eval', got {split!r}")
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held_out = split == "eval"
    parts = [topics[k] for i, k in enumerate(keys) if (i % _EVAL_EVERY == _EVAL_EVERY - 1) == held_out]
    return "\n\n".join(parts)


def _dataset_text(files: list[str], builder: str, text_field: str, source: str) -> str:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    ds = datasets.load_dataset(builder, data_files=files, split="train")
    if text_field not in ds.column_names:
        raise ValueError(
            f"calibration data {source!r}: no {text_field!r} column (columns: {', '.join(ds.column_names)}); "
            "pass the text column's name"
        )
    return "\n\n".join(str(t) for t in ds[text_field] if t)


def load_text(source: str | os.PathLike | None = None, split: str = "calib", text_field: str = "text") -> str:
    """Text of a calibration / evaluation source (see the module docs); ``split`` picks the built-in part."""
    if source is None or str(source) == BUILTIN:
        return builtin_text(split)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"calibration/evaluation text {str(source)!r} does not exist "
            f"(give a .txt/.jsonl/.json/.parquet/.csv file, a folder of them, or {BUILTIN!r})"
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _DATASET_SUFFIXES)
        builders = {_DATASET_SUFFIXES[p.suffix.lower()] for p in files}
        if files and len(builders) == 1:
            return _dataset_text([str(p) for p in files], builders.pop(), text_field, str(source))
        texts = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
        if not texts:
            raise ValueError(f"calibration folder {str(source)!r} holds no text, jsonl, json, parquet or csv files "
                             "(or mixes several dataset formats)")
        return "\n\n".join(p.read_text(encoding="utf-8") for p in texts)
    suffix = path.suffix.lower()
    if suffix in _DATASET_SUFFIXES:
        return _dataset_text([str(path)], _DATASET_SUFFIXES[suffix], text_field, str(source))
    return path.read_text(encoding="utf-8")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as a 1-D int64 tensor (no special tokens added)."""
    if not text:
        raise ValueError("tokenize: the text is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_samples(token_ids: torch.Tensor, n_samples: int, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` consecutive, non-overlapping windows from the start of ``token_ids``.

    Raises when not even one window fits; returns fewer than ``n_samples`` rows when the text runs out
    (the caller reports how many it got).
    """
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(f"need a positive number of samples and sequence length, got {n_samples} x {seq_len}")
    ids = token_ids.reshape(-1)
    n = min(n_samples, ids.numel() // seq_len)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one sample of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len).clone()


def calibration_samples(tokenizer, source=None, n_samples: int = 64, seq_len: int = 256,
                        text_field: str = "text") -> torch.Tensor:
    """Tokenized calibration samples ``[n, seq_len]`` from a source (built-in by default)."""
    return token_samples(tokenize(tokenizer, load_text(source, "calib", text_field)), n_samples, seq_len)
