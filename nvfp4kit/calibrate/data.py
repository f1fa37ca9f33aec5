"""Calibration and evaluation text: sources, tokenization, N samples of L tokens.

Sources (``load_text``):

* ``"builtin"`` (the default): English prose of the Python reference manual, which ships with
  every Python (``pydoc_data.topics``), so calibration never needs a download. Its topics are
  split deterministically into a calibration part and a disjoint evaluation part
  (``builtin_text("calib")`` / ``builtin_text("eval")``: every fourth topic, in sorted order,
  is held out for evaluation).
* a plain text file (``.txt``, ``.md``, ``.rst`` or no suffix): read as UTF-8.
* a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, or a folder of such files: the ``text``
  field (or ``text_field``) of every record, joined.

Every file is read by :func:`nvfp4kit.textfiles.read_documents`, which refuses a binary, non-UTF-8,
malformed or empty file naming it and what was expected.

BOS: a model whose tokenizer puts a token in front of every input (BOS for Llama 3, Gemma, Mistral;
``[CLS]`` for BERT) has only ever seen inputs that start with it, and its first position is where
activation outliers live. So, as lm-eval-harness and llama.cpp's perplexity do, every calibration
sample and every evaluation window starts with that token when the tokenizer adds one
(:func:`leading_special_token`); the text fills the rest. Tokenizers that add nothing in front
(GPT-2, Qwen, SmolLM2) are unaffected. ``bos=False`` opts out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..textfiles import RECORD_BUILDERS, TEXT_SUFFIXES, TextFileError, read_documents

BUILTIN = "builtin"
_EVAL_EVERY = 4
_WHAT = "calibration/evaluation text"


def builtin_text(split: str = "calib") -> str:
    """The built-in corpus: ``"calib"`` (3/4 of the topics) or ``"eval"`` (the other, disjoint 1/4)."""
    if split not in ("calib", "eval"):
        raise ValueError(f"builtin_text: split must be 'calib' or 'eval', got {split!r}")
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held_out = split == "eval"
    parts = [topics[k] for i, k in enumerate(keys) if (i % _EVAL_EVERY == _EVAL_EVERY - 1) == held_out]
    return "\n\n".join(parts)


def _files_text(files: list[Path], text_field: str) -> str:
    return "\n\n".join(t for f in files for t in read_documents(f, text_field, _WHAT))


def load_text(source: str | os.PathLike | None = None, split: str = "calib", text_field: str = "text") -> str:
    """Text of a calibration / evaluation source (see the module docs); ``split`` picks the built-in part.
    Raises :class:`~nvfp4kit.textfiles.TextFileError` (a ``ValueError``) naming the file that is not
    what it should be, or the source when it holds no text."""
    if source is None or str(source) == BUILTIN:
        return builtin_text(split)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{_WHAT} {str(source)!r} does not exist "
            f"(give a .txt/.jsonl/.json/.parquet/.csv file, a folder of them, or {BUILTIN!r})"
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in RECORD_BUILDERS)
        builders = {RECORD_BUILDERS[p.suffix.lower()] for p in files}
        if not (files and len(builders) == 1):
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"calibration folder {str(source)!r} holds no text, jsonl, json, parquet or csv files "
                             "(or mixes several dataset formats)")
        text = _files_text(files, text_field)
    else:
        text = _files_text([path], text_field)
    if not text or text.isspace():
        raise TextFileError(f"{_WHAT} {str(source)!r} is empty (or only white space); expected text")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as a 1-D int64 tensor (no special tokens added)."""
    if not text:
        raise ValueError("tokenize: the text is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def leading_special_token(tokenizer) -> int | None:
    """The id the tokenizer puts in front of an input when it adds its special tokens (BOS, or BERT's
    ``[CLS]``), or None when it adds nothing in front."""
    probe = "The quick brown fox"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if len(with_special) > len(without) and with_special[1:1 + len(without)] == without:
        return int(with_special[0])
    return None


def sample_bos(tokenizer, bos: bool = True) -> int | None:
    """The token every sample and evaluation window starts with: the tokenizer's leading special token
    when ``bos`` (the default) and it adds one, else None."""
    return leading_special_token(tokenizer) if bos and tokenizer is not None else None


def token_samples(token_ids: torch.Tensor, n_samples: int, seq_len: int, bos_id: int | None = None) -> torch.Tensor:
    """``[n, seq_len]`` consecutive, non-overlapping windows from the start of ``token_ids``; with
    ``bos_id`` each row is that token followed by the next ``seq_len - 1`` tokens of the text.

    Raises when not even one window fits; returns fewer than ``n_samples`` rows when the text runs out
    (the caller reports how many it got).
    """
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(f"need a positive number of samples and sequence length, got {n_samples} x {seq_len}")
    if bos_id is not None and seq_len < 2:
        raise ValueError(f"a sample that starts with BOS needs at least 2 tokens, got --seq-len {seq_len}")
    ids = token_ids.reshape(-1)
    width = seq_len - (bos_id is not None)
    n = min(n_samples, ids.numel() // width)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one sample of {seq_len}")
    rows = ids[: n * width].reshape(n, width)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=rows.dtype), rows], dim=1)
    return rows.clone()


def calibration_samples(tokenizer, source=None, n_samples: int = 64, seq_len: int = 256,
                        text_field: str = "text", bos: bool = True) -> torch.Tensor:
    """Tokenized calibration samples ``[n, seq_len]`` from a source (built-in by default), each
    starting with the tokenizer's BOS when it adds one (``bos=False``: never)."""
    return token_samples(tokenize(tokenizer, load_text(source, "calib", text_field)), n_samples, seq_len,
                         sample_bos(tokenizer, bos))
