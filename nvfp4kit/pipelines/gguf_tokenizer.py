"""Checks of the tokenizer transformers builds from a ``.gguf`` file.

A GGUF file carries no ``tokenizer.json``: transformers rebuilds the tokenizer from the vocabulary,
scores, merges and token types in the file's metadata, and some releases rebuild some of them wrongly.
A wrong tokenizer gives no error: calibration and perplexity simply run on the wrong tokens (a Gemma 3
GGUF on transformers 5.17 splits prose almost character by character, and its perplexity comes out
several times too high). So every GGUF tokenizer nvfp4kit loads passes two checks, each a warning
naming the file, the transformers version and the fix:

* :data:`KNOWN_WRONG`: conversions known to be wrong in a range of transformers releases. Up to 5.17
  transformers built GGUF tokenizers with its old converters (``integrations/ggml.py``): the Gemma family
  (``gemma2`` / ``gemma3`` / ``gemma4``) as a ``Unigram`` model driven by the file's scores, where the
  reference Gemma tokenizer is a BPE whose merge order is the file's token order (transformers PR
  #48656, in 5.18, rebuilt them from the file order; issue #41494 / PR #41609 report the Unigram); and
  tokens the file marks user-defined (``<think>``, ``<tool_call>``) were not kept whole (PR #49008).
  5.18 to 5.22 ignore the file's ``tokenizer.ggml.add_bos_token`` flag (read from 5.23 on).
* :func:`probe`: whatever the cause, a fixed plain-English sentence must not come out near one token
  per character from a vocabulary of :data:`MIN_VOCAB` pieces or more (BPE and SentencePiece
  vocabularies of that size give 3 to 5 characters per token on such text; character level is ~1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import progress
from ..optional import require

PROBE_SENTENCE = ("The people of the town walked down to the river every morning, and they talked about "
                  "the weather, their families and the work they had to do before the evening.")
# fewer characters per token than this on PROBE_SENTENCE means the vocabulary is not being used
MIN_CHARS_PER_TOKEN = 2.0
# below this many pieces a vocabulary may be (nearly) character level by design
MIN_VOCAB = 1000
FIX = "upgrade transformers (pip install -U 'transformers>=5.23'), or load the model's Hugging Face folder"


@dataclass(frozen=True)
class KnownWrong:
    """A GGUF tokenizer conversion known to be wrong in transformers ``[first, fixed)``."""

    model_types: tuple[str, ...]  # the config's model_type (the GGUF architecture as transformers names it)
    first: tuple[int, ...]
    fixed: tuple[int, ...]
    what: str

    def applies(self, model_type: str | None, version: tuple[int, ...]) -> bool:
        return (model_type in self.model_types or not self.model_types) and self.first <= version < self.fixed


KNOWN_WRONG = (
    KnownWrong(("gemma", "gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text"), (0,), (5, 18),
               "builds a Gemma GGUF tokenizer as a Unigram model from the file's scores, while Gemma's "
               "tokenizer is a BPE merging in the file's token order (fixed in 5.18, transformers PR #48656): "
               "prose splits into far too many tokens and perplexity comes out too high"),
)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"5.17.0"`` -> ``(5, 17, 0)`` (a pre-release suffix is ignored: ``"5.23.0.dev0"`` -> ``(5, 23, 0)``)."""
    parts = []
    for p in version.split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def probe(tokenizer) -> tuple[int, float]:
    """Tokens of :data:`PROBE_SENTENCE` (no special tokens) and its characters per token."""
    ids = tokenizer(PROBE_SENTENCE, add_special_tokens=False)["input_ids"]
    return len(ids), len(PROBE_SENTENCE) / max(1, len(ids))


def gguf_tokenizer_warnings(tokenizer, path: str | Path, model_type: str | None,
                            transformers_version: str | None = None) -> list[str]:
    """The warnings for the tokenizer transformers built from the GGUF file ``path`` (empty when it
    passes): a conversion :data:`KNOWN_WRONG` for this ``model_type`` and version, and the probe."""
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    version = version_tuple(transformers_version)
    where = f"{Path(path).name} (transformers {transformers_version})"
    out = [f"the tokenizer of {where} is known to be wrong: transformers {transformers_version} {k.what}; {FIX}"
           for k in KNOWN_WRONG if k.applies(model_type, version)]
    n, cpt = probe(tokenizer)
    if len(tokenizer) >= MIN_VOCAB and cpt < MIN_CHARS_PER_TOKEN:
        out.append(f"the tokenizer of {where} splits a plain English sentence of {len(PROBE_SENTENCE)} characters "
                   f"into {n} tokens ({cpt:.2f} characters per token; a vocabulary of {len(tokenizer)} pieces "
                   f"gives 3 or more): its conversion from GGUF looks wrong, and calibration and perplexity on it "
                   f"would be too; {FIX}")
    return out


def check_gguf_tokenizer(tokenizer, path: str | Path, model_type: str | None) -> list[str]:
    """Log (``progress.log``, as warnings) what :func:`gguf_tokenizer_warnings` finds; return it."""
    found = gguf_tokenizer_warnings(tokenizer, path, model_type) if tokenizer is not None else []
    for w in found:
        progress.log(f"warning: {w}")
    return found


def load_gguf_tokenizer(path: str | Path, model_type: str | None):
    """The tokenizer transformers builds from the GGUF file ``path``, checked (:func:`check_gguf_tokenizer`):
    every GGUF model nvfp4kit loads gets its tokenizer here."""
    path = Path(path)
    auto = require("transformers", "reading a GGUF file's tokenizer").AutoTokenizer
    tok = auto.from_pretrained(str(path.parent), gguf_file=path.name)
    check_gguf_tokenizer(tok, path, model_type)
    return tok
