"""Quality of a high-precision or quantized model on a text (the job behind ``nvfp4kit eval``).

Causal LMs are measured by perplexity (and, given a reference model, the gap to it). Encoders
(e.g. a sentence-transformers ``BertModel``) are measured by the cosine similarity of their sentence
embeddings to those of a reference model (:mod:`nvfp4kit.evaluate.embedding`), so they need one.

Quantized checkpoints (modelopt HF or compressed-tensors) are loaded into the architecture named by
their ``config.json`` with every quantized Linear emulated (:mod:`nvfp4kit.calibrate.emulation`):
W4A16 uses the dequantized weights; W4A4 also quantizes each Linear's input per 1x16 block with the
static input global scale of the checkpoint. A checkpoint with an FP8 or NVFP4 KV cache (``k_scale`` /
``v_scale``) also gets its cached keys (post-RoPE) and values quantize-dequantized to FP8 E4M3, or to
NVFP4 along the head dim, with those static scales in every attention, unless ``kv_cache=False``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibrate.data import load_text, sample_bos, tokenize
from ..evaluate.embedding import EmbeddingSimilarity, compare_embeddings, embed, pooling_mode, split_sentences
from ..evaluate.perplexity import Perplexity, perplexity
from ..devices import resolve_device
from .models import CAUSAL_LM, ENCODER, LoadedModel, load_model, max_positions


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
    kv_cache: str | None = None  # "fp8" / "nvfp4" when a static KV cache was emulated
    warnings: list[str] = field(default_factory=list)  # e.g. why a perplexity is not finite

    @property
    def ppl_gap(self) -> float | None:
        """Relative perplexity increase over the reference (0.05 = +5%)."""
        if self.result is None or self.reference_result is None:
            return None
        return self.result.ppl / self.reference_result.ppl - 1.0


def run_eval(model: str | None, text: str | None = None, seq_len: int = 512, max_tokens: int | None = None,
             loaded: LoadedModel | None = None, weight_only: bool = False, against: str | None = None,
             max_sentences: int = 256, kv_cache: bool = True, device: str = "auto", bos: bool = True) -> EvalResult:
    """Evaluate ``model`` on ``text`` (a file, a dataset file, or the built-in evaluation text).

    Causal LMs: perplexity over windows of ``seq_len`` tokens (and the reference's, with ``against``).
    Encoders: embedding cosine similarity to ``against`` (required) over up to ``max_sentences``
    sentences, each truncated to ``seq_len`` tokens. ``kv_cache=False`` leaves a checkpoint's FP8 / NVFP4
    KV cache unemulated (keys/values in full precision). ``device``: auto | cpu | cuda | cuda:N. ``bos``:
    every perplexity window starts with the tokenizer's BOS when it adds one (False: windows start in the text).
    """
    dev = resolve_device(device)
    loaded = loaded or load_model(model, quantize_inputs=not weight_only, kv_cache=kv_cache, device=dev)
    if loaded.tokenizer is None:
        raise ValueError(f"--model {loaded.source!r} has no tokenizer files, needed to tokenize the evaluation text")
    source_text = load_text(text, "eval")
    t0 = time.perf_counter()
    if loaded.task == ENCODER:
        if against is None:
            raise ValueError(f"--model {loaded.source!r} is an encoder ({type(loaded.model).__name__}): it is "
                             "evaluated by the similarity of its sentence embeddings to a reference model's; "
                             "pass --against REFERENCE (e.g. the model it was quantized from)")
        ref = load_model(against, device=dev)
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
    bos_id = sample_bos(loaded.tokenizer, bos)
    res = perplexity(loaded.model, ids, seq_len, max_tokens, desc=f"perplexity ({loaded.kind})", bos_id=bos_id)
    ref_res = ref_source = None
    if against is not None:
        ref = load_model(against, device=dev)
        if ref.task != CAUSAL_LM:
            raise ValueError(f"--against {against!r} is an encoder but --model {loaded.source!r} is a causal LM")
        ref_ids = ids if ref.tokenizer is None else tokenize(ref.tokenizer, source_text)
        if not torch.equal(ref_ids, ids):
            raise ValueError(f"--against {against!r} tokenizes the text differently from --model {loaded.source!r}; "
                             "perplexities would not be comparable")
        if ref.tokenizer is not None and sample_bos(ref.tokenizer, bos) != bos_id:
            raise ValueError(f"--against {against!r} starts its inputs with another BOS than --model "
                             f"{loaded.source!r}; perplexities would not be comparable")
        ref_res = perplexity(ref.model, ids, seq_len, max_tokens, desc=f"perplexity ({ref.kind})", bos_id=bos_id)
        ref_source = ref.source
    warnings = [] if res.finite else [nonfinite_warning(loaded, res)]
    if ref_res is not None and not ref_res.finite:
        warnings.append(nonfinite_warning(ref, ref_res))
    kv = loaded.quantized.kv_cache_format if (kv_cache and loaded.quantized is not None
                                               and loaded.quantized.kv_cache_amax) else None
    return EvalResult(loaded.source, loaded.kind, CAUSAL_LM, res, time.perf_counter() - t0, ref_source, ref_res,
                      kv_cache=kv, warnings=warnings)


def nonfinite_warning(loaded: LoadedModel, result: Perplexity) -> str:
    """Why the perplexity of ``loaded`` came out infinite or NaN, naming the tensors at fault: the
    checkpoint's broken scales and non-finite values (:mod:`nvfp4kit.checkpoint.health`), or the model's
    non-finite parameters."""
    from ..checkpoint.health import checkpoint_problems, nonfinite_tensors

    if loaded.quantized is not None:
        problems = checkpoint_problems(loaded.source, loaded.quantized)
    else:
        problems = nonfinite_tensors(loaded.model.named_parameters())
    head = (f"the perplexity of {loaded.source} is {result.ppl} (mean NLL {result.nll:.4g} nats per token): "
            "the model's outputs are not usable")
    if problems:
        more = f"; and {len(problems) - 5} more (nvfp4kit inspect lists them)" if len(problems) > 5 else ""
        return f"{head}; the checkpoint holds broken values: " + "; ".join(problems[:5]) + more
    return (f"{head}, though no weight or scale is NaN or infinite: the logits overflowed, or finite weights are "
            "corrupt (compare it with its source: nvfp4kit inspect CHECKPOINT --against SOURCE)")
