"""Perplexity of a high-precision or quantized model on a text (the job behind ``nvfp4kit eval``).

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
from ..evaluate.emulation import apply_kv_cache, apply_quantized
from ..evaluate.perplexity import Perplexity, perplexity
from .quantize import LoadedModel, is_quantized_checkpoint, load_source_model


def load_quantized_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         quantize_inputs: bool = True, kv_cache: bool = True) -> LoadedModel:
    """An HF model built from a quantized checkpoint's config, its quantized Linears emulated
    (and, with ``kv_cache``, its FP8 KV cache if the checkpoint has one)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import load_quantized

    p = Path(path)
    if qm_is_hybrid(p):
        return _load_quantized_hybrid(p, dtype, quantize_inputs, kv_cache)
    with progress.task(f"loading {p.name}", total=1) as t:
        qm = load_quantized(p)
        config = AutoConfig.from_pretrained(str(p))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
    return LoadedModel(model, tok, str(p), "quantized", qm)


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
    kind: str
    result: Perplexity
    seconds: float
    kv_cache: str | None = None  # "fp8" when a static FP8 KV cache was emulated


def run_eval(model: str | None, text: str | None = None, seq_len: int = 512, max_tokens: int | None = None,
             loaded: LoadedModel | None = None, weight_only: bool = False, kv_cache: bool = True) -> EvalResult:
    """Perplexity of ``model`` on ``text`` (a file, a dataset file, or the built-in evaluation text).
    ``kv_cache=False`` leaves a checkpoint's FP8 KV cache unemulated (keys/values in full precision)."""
    loaded = loaded or load_model(model, quantize_inputs=not weight_only, kv_cache=kv_cache)
    ids = tokenize(loaded.tokenizer, load_text(text, "eval"))
    t0 = time.perf_counter()
    res = perplexity(loaded.model, ids, seq_len, max_tokens, desc=f"perplexity ({loaded.kind})")
    kv = loaded.quantized.kv_cache_format if (kv_cache and loaded.quantized is not None
                                               and loaded.quantized.kv_cache_amax) else None
    return EvalResult(loaded.source, loaded.kind, res, time.perf_counter() - t0, kv)
