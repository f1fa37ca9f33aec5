"""Embedding similarity of an encoder (e.g. a sentence-transformers BERT) against a reference model.

Perplexity does not apply to encoders; what their users need kept is the sentence embedding. Each
sentence of a text is embedded by both models (pooled last hidden state: mean over real tokens,
the first token, or the max, as the folder's sentence-transformers ``1_Pooling/config.json`` says;
mean by default) and the cosine similarity of the two embeddings is reported: its mean, its
minimum, and how often the nearest neighbour of each sentence among the others is the same under
both models (a retrieval-level check).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import progress

POOLING_MODES = ("mean", "cls", "max")


@dataclass(frozen=True)
class EmbeddingSimilarity:
    mean_cosine: float
    min_cosine: float
    neighbour_agreement: float  # fraction of sentences whose nearest other sentence is the same in both models
    n_sentences: int


def pooling_mode(folder: str | Path | None) -> str:
    """The pooling of a sentence-transformers folder (``1_Pooling/config.json`` or the module named in
    ``modules.json``); ``"mean"`` when the folder does not say."""
    if folder is None or not Path(folder).is_dir():
        return "mean"
    root = Path(folder)
    candidates = []
    try:
        for m in json.loads((root / "modules.json").read_text()):
            if str(m.get("type", "")).endswith("Pooling") and m.get("path"):
                candidates.append(root / m["path"] / "config.json")
    except (OSError, ValueError, AttributeError):
        pass
    candidates.append(root / "1_Pooling" / "config.json")
    for c in candidates:
        try:
            cfg = json.loads(c.read_text())
        except (OSError, ValueError):
            continue
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        if cfg.get("pooling_mode_max_tokens"):
            return "max"
        return "mean"
    return "mean"


def split_sentences(text: str, max_sentences: int = 256, min_words: int = 4) -> list[str]:
    """Sentences of ``text`` (split at . ! ? and blank lines), each of at least ``min_words`` words."""
    pieces = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    out = []
    for p in pieces:
        s = " ".join(p.split())
        if len(s.split()) >= min_words:
            out.append(s)
            if len(out) >= max_sentences:
                break
    return out


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """``[B, L, H]`` hidden states -> ``[B, H]`` sentence embeddings, padding ignored."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {mode!r}")
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).amax(dim=1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def _last_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        states = getattr(out, "hidden_states", None)
        if not states:
            raise ValueError(f"{type(model).__name__} returns no hidden states to embed sentences with")
        hidden = states[-1]
    return hidden


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], max_length: int, mode: str = "mean",
          batch_size: int = 32, desc: str = "embedding") -> torch.Tensor:
    """``[len(sentences), H]`` float32 embeddings."""
    if not sentences:
        raise ValueError("no sentences to embed (the text has no sentence of at least 4 words)")
    from .perplexity import model_device

    model.eval()
    device = model_device(model)
    chunks = []
    with progress.task(desc, total=len(sentences)) as t:
        for i in range(0, len(sentences), batch_size):
            part = sentences[i:i + batch_size]
            batch = {k: v.to(device) for k, v in tokenizer(part, padding=True, truncation=True, max_length=max_length,
                                                            return_tensors="pt").items()}
            hidden = _last_hidden(model, batch).float()
            chunks.append(pool(hidden, batch["attention_mask"], mode).cpu())
            t.advance(len(part))
    return torch.cat(chunks)


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row."""
    e = F.normalize(emb.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=-1)


def compare_embeddings(emb: torch.Tensor, ref: torch.Tensor) -> EmbeddingSimilarity:
    """Cosine similarity per sentence between two embeddings of the same sentences."""
    if emb.shape != ref.shape:
        raise ValueError(f"embeddings of shape {tuple(emb.shape)} and {tuple(ref.shape)} do not match")
    cos = F.cosine_similarity(emb.double(), ref.double(), dim=-1)
    agree = float((nearest_neighbours(emb) == nearest_neighbours(ref)).double().mean()) if emb.shape[0] > 2 else 1.0
    return EmbeddingSimilarity(float(cos.mean()), float(cos.min()), agree, int(emb.shape[0]))
