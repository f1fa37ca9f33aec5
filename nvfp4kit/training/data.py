"""Training data: a tokenizer (a local Hugging Face tokenizer or a byte-level fallback), local text
files, packed into fixed-length sequences, and a loader whose position is a small dict so a run can
stop and resume on exactly the same batches.

Documents: a plain text file is one document; a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file
gives one per record (its ``text`` field). Every file is read by
:func:`nvfp4kit.textfiles.read_documents`, which refuses a binary, non-UTF-8 or malformed file naming it.

Packing: every document's tokens followed by an end-of-text token are concatenated, then cut into
non-overlapping sequences of ``seq_len`` tokens (the tail shorter than that is dropped). A fixed
fraction of the sequences, chosen by a seeded permutation independent of the training seed, is held
out for validation.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..textfiles import read_documents


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-text 256."""

    name = "bytes"
    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer saved in a local directory (``tokenizer.json`` etc.), loaded offline."""

    def __init__(self, path: str | os.PathLike):
        from ..optional import require

        AutoTokenizer = require("transformers", "--tokenizer DIR (a Hugging Face tokenizer)").AutoTokenizer

        if not Path(path).exists():
            raise FileNotFoundError(f"tokenizer: {path} does not exist (give a local directory, or 'bytes')")
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.name = str(path)
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        self.eos_token_id = int(eos) if eos is not None else None

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def load_tokenizer(spec: str | None):
    """``None`` or ``"bytes"``: the byte-level tokenizer; otherwise a local tokenizer directory."""
    if spec in (None, "", "bytes", "byte"):
        return ByteTokenizer()
    return HFTokenizer(spec)


def resolve_text_files(paths) -> list[str]:
    """Text files named by ``paths``: files, directories (``*.txt`` inside, recursively) or globs."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "*.txt"), recursive=True))
            if not found:
                raise FileNotFoundError(f"--data {p}: the directory holds no *.txt files")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            found = sorted(glob.glob(p, recursive=True))
            if not found:
                raise FileNotFoundError(f"--data {p}: no such file, directory or glob match")
            files += found
    return files


def tokenize_files(files: list[str], tokenizer) -> torch.Tensor:
    """All documents of the files (see the module docs) tokenized, each followed by end-of-text,
    concatenated into one int64 tensor."""
    docs = [d for f in files for d in read_documents(f, what="--data file")]
    if not any(docs):
        raise ValueError(f"--data: the files {files[:3]}{' ...' if len(files) > 3 else ''} hold no text")
    return tokenize_texts(docs, tokenizer)


def tokenize_texts(texts: list[str], tokenizer) -> torch.Tensor:
    """Like :func:`tokenize_files` for in-memory documents."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t) + ([eos] if eos is not None else [])
    return torch.tensor(ids, dtype=torch.int64)


@dataclass
class PackedData:
    train: torch.Tensor  # [n_train, seq_len] int64
    val: torch.Tensor  # [n_val, seq_len]
    vocab_size: int

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def pack(tokens: torch.Tensor, seq_len: int, val_fraction: float = 0.05, split_seed: int = 1234,
         vocab_size: int | None = None) -> PackedData:
    """Cut ``tokens`` into ``[n, seq_len]`` sequences; hold out ``val_fraction`` of them."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = tokens.numel() // seq_len
    n_val = int(round(n * val_fraction)) if val_fraction else 0
    if val_fraction and n_val == 0 and n >= 2:
        n_val = 1
    if n - n_val < 1:
        raise ValueError(
            f"the data has {tokens.numel()} tokens: fewer than one training sequence of {seq_len} "
            f"(plus {n_val} held out); give more text or a shorter --seq-len"
        )
    seqs = tokens[: n * seq_len].reshape(n, seq_len)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val = seqs[perm[:n_val]].contiguous()
    train = seqs[perm[n_val:]].contiguous()
    return PackedData(train, val, int(vocab_size or int(tokens.max()) + 1))


class PackedLoader:
    """Batches of training sequences in a seeded random order per epoch.

    ``global_batch`` sequences make one optimizer step; data-parallel rank ``rank`` of ``world`` takes
    its contiguous slice of them. ``state()`` / ``load_state()`` is the exact position.
    """

    def __init__(self, data: torch.Tensor, global_batch: int, seed: int = 0, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"--batch-size {global_batch} must be divisible by the {world} data-parallel ranks")
        if global_batch > data.shape[0]:
            raise ValueError(
                f"--batch-size {global_batch} is larger than the {data.shape[0]} training sequences; "
                "give more text or a smaller batch"
            )
        self.data = data
        self.global_batch = global_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.position = 0
        self._perm = None

    def _order(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.data.shape[0], generator=g)
        return self._perm

    def next(self) -> torch.Tensor:
        """The next ``[global_batch / world, seq_len]`` batch of this rank."""
        if self.position + self.global_batch > self.data.shape[0]:
            self.epoch += 1
            self.position = 0
            self._perm = None
        idx = self._order()[self.position:self.position + self.global_batch]
        self.position += self.global_batch
        per = self.global_batch // self.world
        return self.data[idx[self.rank * per:(self.rank + 1) * per]]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "global_batch": self.global_batch, "num_sequences": int(self.data.shape[0])}

    def load_state(self, state: dict) -> None:
        if int(state["num_sequences"]) != self.data.shape[0] or int(state["global_batch"]) != self.global_batch:
            raise ValueError(
                f"resume: the checkpoint's data position is for {state['num_sequences']} sequences in batches of "
                f"{state['global_batch']}, this run has {self.data.shape[0]} in batches of {self.global_batch}; "
                "resume with the same --data, --seq-len and --batch-size"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._perm = None


def load_packed_text(paths, tokenizer, seq_len: int, val_fraction: float = 0.05) -> PackedData:
    files = resolve_text_files(paths)
    tokens = tokenize_files(files, tokenizer)
    return pack(tokens, seq_len, val_fraction, vocab_size=tokenizer.vocab_size)
