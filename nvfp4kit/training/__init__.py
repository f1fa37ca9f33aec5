"""Low-precision training: the per-module precision, the Linear that computes in it, the NVFP4
pretraining recipe's autograd linears, recipes (precision rules by name and depth), the loop, data,
exact-resume checkpoints, data parallelism and the optional Transformer Engine backend."""

from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import ByteTokenizer, HFTokenizer, PackedLoader, load_packed_text, load_tokenizer, pack
from .distributed import init_distributed, wrap_data_parallel
from .linear import Linear, check_precision_fits, iter_linears, precision_map, set_precision
from .loop import TrainConfig, evaluate, lr_at, make_optimizer, model_loss, train
from .precision import BF16, FORMATS, LinearPrecision
from .qlinear import emulated_linear, quantized_linear, set_amax_reduction
from .recipes import RECIPES, Recipe, Rule, apply_recipe, get_recipe, resolve_recipe

__all__ = [
    "BF16",
    "ByteTokenizer",
    "FORMATS",
    "HFTokenizer",
    "Linear",
    "LinearPrecision",
    "PackedLoader",
    "RECIPES",
    "Recipe",
    "Rule",
    "TrainConfig",
    "apply_recipe",
    "check_precision_fits",
    "emulated_linear",
    "evaluate",
    "get_recipe",
    "init_distributed",
    "iter_linears",
    "latest_checkpoint",
    "load_checkpoint",
    "load_packed_text",
    "load_tokenizer",
    "lr_at",
    "make_optimizer",
    "model_loss",
    "pack",
    "precision_map",
    "quantized_linear",
    "resolve_recipe",
    "save_checkpoint",
    "set_amax_reduction",
    "set_precision",
    "train",
    "wrap_data_parallel",
]
