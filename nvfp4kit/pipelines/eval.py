"""Quality of a high-precision or quantized model on a text (the job behind ``nvfp4kit eval``).

Causal LMs are measured by perplexity (and, given a reference model, the gap to it). Encoders
(e.g. a sentence-transformers ``BertModel``) are measured by the cosine similarity of their sentence
embeddings to those of a reference model (:mod:`nvfp4kit.evaluate.embedding`), so they need one.

Quantized checkpoints (modelopt HF or compressed-tensors) are loaded into the architecture named by
their ``config.json`` with every quantized Linear emulated (:mod:`nvfp4kit.evaluate.emulation`):
W4A16 uses the dequantized weights; W4A4 also quantizes each Linear's input per 1x16 block with the
static input global scale of the checkpoint. A checkpoint with an FP8 KV cache (``k_scale`` /
``v_scale``) also gets its cached keys (post-RoPE) and values quantize-dequantized to FP8 E4M3 with
those static scales in every attention, unless ``kv_cache=False``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import progress
from ..calibrate.data import load_text, tokenize
from ..calibrate.moe import unfuse_experts
from ..evaluate.embedding import EmbeddingSimilarity, compare_embeddings, embed, pooling_mode, split_sentences
from ..evaluate.emulation import apply_kv_cache, apply_quantized
from ..evaluate.perplexity import Perplexity, perplexity
from .hf_models import CAUSAL_LM, ENCODER, max_positions
from .quantize import LoadedModel, is_quantized_checkpoint, load_source_model


def load_quantized_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         quantize_inputs: bool = True, kv_cache: bool = True) -> LoadedModel:
    """An HF model built from a quantized checkpoint's config, its quantized Linears emulated
    (and, with ``kv_cache``, its FP8 KV cache if the checkpoint has one)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..checkpoint import load_quantized
    from .hf_models import hf_model_class

    p = Path(path)
    if qm_is_hybrid(p):
        return _load_quantized_hybrid(p, dtype, quantize_inputs, kv_cache)
    with progress.task(f"loading {p.name}", total=1) as t:
        qm = load_quantized(p)
        config = AutoConfig.from_pretrained(str(p))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model_class = hf_model_class(config)
        model = model_class.from_config(config, dtype)
        unfuse_experts(model)
        apply_quantized(model, qm, dtype, quantize_inputs)
        result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in qm.tensors.items()},
                                       strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{p}: tensors the model does not have: {', '.join(result.unexpected_keys[:5])}")
        tied = set()
        if getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "text_config", None),
                                                                     "tie_word_embeddings", False):
            model.tie_weights()
            tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
        missing = [k for k in result.missing_keys if k not in tied]
        if missing:
            raise ValueError(f"{p}: checkpoint lacks tensors the model needs: {', '.join(missing[:5])}")
        if kv_cache:
            apply_kv_cache(model, qm)
        tok = AutoTokenizer.from_pretrained(str(p))
        t.advance(1)
    model.eval()
    return LoadedModel(model, tok, str(p), "quantized", qm, task=model_class.kind)


def qm_is_hybrid(path: Path) -> bool:
    from .quantize import is_hybrid_checkpoint

    return is_hybrid_checkpoint(path)


def _load_quantized_hybrid(p: Path, dtype: torch.dtype, quantize_inputs: bool, kv_cache: bool = True) -> LoadedModel:
    """A quantized Nemotron 3 hybrid checkpoint in nvfp4kit's model, quantized Linears emulated."""
    from ..checkpoint import load_quantized
    from ..model.config import NemotronConfig
    from ..model.lm import NemotronForCausalLM
    from .quantize import _tokenizer_or_none

    with progress.task(f"loading {p.name}", total=1) as t:
        qm = load_quantized(p)
        cfg = {k: v for k, v in qm.config.items() if k != "quantization_config"}
        model = NemotronForCausalLM(NemotronConfig.from_dict(cfg), dtype=dtype)
        apply_quantized(model, qm, dtype, quantize_inputs)
        result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in qm.tensors.items()},
                                       strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
        if result.unexpected_keys or missing:
            bad = result.unexpected_keys or missing
            raise ValueError(f"{p}: checkpoint tensors do not match the model: {', '.join(bad[:5])}")
        if kv_cache:
            apply_kv_cache(model, qm)
        t.advance(1)
    model.eval()
    return LoadedModel(model, _tokenizer_or_none(p), str(p), "quantized", qm)


def load_model(path: str | os.PathLike | None, dtype: torch.dtype = torch.float32,
               quantize_inputs: bool = True, kv_cache: bool = True) -> LoadedModel:
    """Any model ``nvfp4kit eval`` accepts: HF folder, ``.gguf``, quantized checkpoint, or the embedded default."""
    if path is not None and Path(path).is_dir() and is_quantized_checkpoint(Path(path)):
        return load_quantized_model(path, dtype, quantize_inputs, kv_cache)
    return load_source_model(path, dtype)


@dataclass
class EvalResult:
    model: str
    kind: str  # how the model was loaded: hf, gguf, hybrid, quantized
    task: str  # CAUSAL_LM or ENCODER
    result: Perplexity | None  # causal LMs
    seconds: float
    reference: str | None = None
    reference_result: Perplexity | None = None  # causal LMs, with a reference
    similarity: EmbeddingSimilarity | None = None  # encoders
    kv_cache: str | None = None  # "fp8" when a static FP8 KV cache was emulated

    @property
    def ppl_gap(self) -> float | None:
        """Relative perplexity increase over the reference (0.05 = +5%)."""
        if self.result is None or self.reference_result is None:
            return None
        return self.result.ppl / self.reference_result.ppl - 1.0


def run_eval(model: str | None, text: str | None = None, seq_len: int = 512, max_tokens: int | None = None,
             loaded: LoadedModel | None = None, weight_only: bool = False, against: str | None = None,
             max_sentences: int = 256, kv_cache: bool = True) -> EvalResult:
    """Evaluate ``model`` on ``text`` (a file, a dataset file, or the built-in evaluation text).

    Causal LMs: perplexity over windows of ``seq_len`` tokens (and the reference's, with ``against``).
    Encoders: embedding cosine similarity to ``against`` (required) over up to ``max_sentences``
    sentences, each truncated to ``seq_len`` tokens. ``kv_cache=False`` leaves a checkpoint's FP8 KV
    cache unemulated (keys/values in full precision).
    """
    loaded = loaded or load_model(model, quantize_inputs=not weight_only, kv_cache=kv_cache)
    if loaded.tokenizer is None:
        raise ValueError(f"--model {loaded.source!r} has no tokenizer files, needed to tokenize the evaluation text")
    source_text = load_text(text, "eval")
    t0 = time.perf_counter()
    if loaded.task == ENCODER:
        if against is None:
            raise ValueError(f"--model {loaded.source!r} is an encoder ({type(loaded.model).__name__}): it is "
                             "evaluated by the similarity of its sentence embeddings to a reference model's; "
                             "pass --against REFERENCE (e.g. the model it was quantized from)")
        ref = load_model(against)
        if ref.task != ENCODER:
            raise ValueError(f"--against {against!r} is a causal LM but --model {loaded.source!r} is an encoder")
        sentences = split_sentences(source_text, max_sentences)
        limit = min(seq_len, *(m for m in (max_positions(loaded.model), max_positions(ref.model)) if m))
        mode = pooling_mode(against if Path(against).is_dir() else None)
        emb = embed(loaded.model, loaded.tokenizer, sentences, limit, mode, desc=f"embedding ({loaded.kind})")
        ref_emb = embed(ref.model, ref.tokenizer or loaded.tokenizer, sentences, limit, mode,
                        desc=f"embedding ({ref.kind})")
        return EvalResult(loaded.source, loaded.kind, ENCODER, None, time.perf_counter() - t0, ref.source,
                          similarity=compare_embeddings(emb, ref_emb))
    ids = tokenize(loaded.tokenizer, source_text)
    res = perplexity(loaded.model, ids, seq_len, max_tokens, desc=f"perplexity ({loaded.kind})")
    ref_res = ref_source = None
    if against is not None:
        ref = load_model(against)
        if ref.task != CAUSAL_LM:
            raise ValueError(f"--against {against!r} is an encoder but --model {loaded.source!r} is a causal LM")
        ref_ids = ids if ref.tokenizer is None else tokenize(ref.tokenizer, source_text)
        if not torch.equal(ref_ids, ids):
            raise ValueError(f"--against {against!r} tokenizes the text differently from --model {loaded.source!r}; "
                             "perplexities would not be comparable")
        ref_res = perplexity(ref.model, ids, seq_len, max_tokens, desc=f"perplexity ({ref.kind})")
        ref_source = ref.source
    kv = loaded.quantized.kv_cache_format if (kv_cache and loaded.quantized is not None
                                               and loaded.quantized.kv_cache_amax) else None
    return EvalResult(loaded.source, loaded.kind, CAUSAL_LM, res, time.perf_counter() - t0, ref_source, ref_res,
                      kv_cache=kv)
