"""nvfp4kit.model: the Nemotron 3 hybrid (Mamba-2 / attention / LatentMoE / MTP) in PyTorch.

Module names equal the released HF checkpoint names; every projection is a :class:`Linear` with a
per-module precision (see :mod:`nvfp4kit.model.linear`).
"""

from .config import NemotronConfig
from .io import CheckpointError, load_pretrained, load_weights, save_pretrained
from .linear import Linear, iter_linears, make_linear, set_precision
from .lm import LMOutput, ModelCache, NemotronForCausalLM, SpeculativeStats, build_model
from .params import ParamCounts, checkpoint_tensors, count_parameters
from .presets import PRESETS, get_preset, preset_names

__all__ = [
    "NemotronConfig", "NemotronForCausalLM", "LMOutput", "ModelCache", "SpeculativeStats", "build_model",
    "Linear", "make_linear", "iter_linears", "set_precision", "load_pretrained", "load_weights",
    "save_pretrained", "CheckpointError", "count_parameters", "checkpoint_tensors", "ParamCounts",
    "PRESETS", "get_preset", "preset_names",
]
