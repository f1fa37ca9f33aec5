"""Which transformers class builds a Hugging Face folder's model, and what kind of model it is.

A folder's ``config.json`` names its class in ``architectures`` (``LlamaForCausalLM``,
``BertModel``, ``Qwen2ForCausalLM``, ...). Loading every folder with ``AutoModelForCausalLM`` would
be wrong for encoders: a ``BertModel`` folder would come back as ``BertLMHeadModel`` with a randomly
initialised head (and its pooler dropped), and that random head would then be quantized and
exported. So the class named by the config is used when transformers has it; without
``architectures``, the causal-LM class of the ``model_type`` if there is one, else the bare
``AutoModel``.

``kind`` is ``"causal-lm"`` (evaluated by perplexity) or ``"encoder"`` (any other model whose
last hidden state is its output, evaluated by embedding similarity against a reference).
"""

from __future__ import annotations

from dataclasses import dataclass

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"


@dataclass(frozen=True)
class HFModelClass:
    cls: type
    kind: str  # CAUSAL_LM or ENCODER

    @property
    def name(self) -> str:
        return self.cls.__name__

    def from_config(self, config, dtype):
        """A randomly initialised model of this class (weights are loaded afterwards)."""
        from transformers import PreTrainedModel

        if issubclass(self.cls, PreTrainedModel):
            return self.cls._from_config(config, dtype=dtype)
        return self.cls.from_config(config, dtype=dtype)


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (list, tuple)) else [v])
    return names


def hf_model_class(config) -> HFModelClass:
    """The class that builds the model described by ``config`` (a transformers ``PretrainedConfig``)."""
    import transformers

    causal = _causal_lm_class_names()
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            is_causal = arch in causal or arch.endswith("ForCausalLM")
            return HFModelClass(cls, CAUSAL_LM if is_causal else ENCODER)
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return HFModelClass(AutoModelForCausalLM, CAUSAL_LM)
    return HFModelClass(AutoModel, ENCODER)


def model_kind(model) -> str:
    """``"causal-lm"`` for a model that returns next-token logits, else ``"encoder"``."""
    from ..model.lm import NemotronForCausalLM

    if isinstance(model, NemotronForCausalLM):
        return CAUSAL_LM
    return CAUSAL_LM if type(model).__name__ in _causal_lm_class_names() or type(model).__name__.endswith(
        "ForCausalLM") else ENCODER


def max_positions(model) -> int | None:
    """The longest sequence a model with learned absolute position embeddings accepts (e.g. 512 for
    BERT; RoBERTa-style tables offset by ``padding_idx + 1`` lose those rows); None when unbounded."""
    from torch import nn

    limits = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and name.rpartition(".")[2] in ("position_embeddings", "wpe", "embed_positions"):
            offset = getattr(m, "offset", 0) or 0  # OPT / BART-style tables keep extra rows
            if m.padding_idx is not None:
                offset = max(offset, m.padding_idx + 1)
            limits.append(m.num_embeddings - offset)
    return min(limits) if limits else None


def check_sequence_length(model, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse a sequence length the model's position embeddings cannot index."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"{option} {seq_len} is longer than the {limit} positions {type(model).__name__} "
                         f"has embeddings for; use {option} {limit} or less")
