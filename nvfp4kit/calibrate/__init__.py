"""Calibration and post-training quantization: the algorithms, independent of any command or file.

* :mod:`.ptq` - the PTQ lifecycle: :func:`plan_model` -> :func:`calibrate_model` -> :func:`quantize_linears`
  (:mod:`.records`), composed by :func:`quantize_model` (one-shot, or block by block);
* :mod:`.blockwise` - the block-by-block engine (in memory, or from disk with a memory peak of one block);
* :mod:`.data` - calibration / evaluation text and token samples;
* :mod:`.observers` - input amax and GPTQ Hessians per Linear (every MoE expert on every token);
* :mod:`.kv_cache` - the post-RoPE key/value amax of every attention (static FP8 KV cache);
* :mod:`.weight_scales` - how a weight becomes NVFP4: ``max``, ``mse``, ``4over6``, ``gptq``;
* :mod:`.transforms` - function-preserving transforms before quantization: :mod:`.smoothing` (AWQ /
  SmoothQuant per-channel scales, per block) and :mod:`.rotation` (the offline Hadamard rotation);
* :mod:`.sequential` - a model's block structure; :mod:`.activations` - activations between blocks;
* :mod:`.emulation` - Linears computing with records;
* :mod:`.mixed` - the mixed-precision search under a bits budget; :mod:`.qat` - QAT / QAD;
* :mod:`.moe` (fused experts split into Linears), :mod:`.surgery` (module swaps).

Which module gets which format is :mod:`nvfp4kit.policy`.
"""

from .data import (
    builtin_text,
    calibration_samples,
    leading_special_token,
    load_text,
    sample_bos,
    token_samples,
    tokenize,
)
from .emulation import EmulatedLinear, apply_kv_cache, apply_quantized
from .transforms import DEFAULT_ROTATE, DEFAULT_SMOOTH, SMOOTHING_METHODS, Transforms
from .kv_cache import KV_CACHE_FORMATS, attention_modules, kv_hooks, observe_kv_cache
from .mixed import MixedPrecisionPlan, estimate_sensitivity, ptq_precision_plan, search_mixed_precision
from .moe import unfuse_experts
from .observers import Calibrator, LinearStats, calibrate
from .blockwise import quantize_by_block
from .ptq import DEFAULT_SCHEME, QuantizeResult, calibrate_model, plan_model, quantize_model
from .records import needed_statistics, quantize_linears, quantized_model
from .weight_scales import DEFAULT_WEIGHT_SCALE, WEIGHT_SCALE_METHODS, nvfp4_weight_parts

__all__ = [
    "Calibrator",
    "DEFAULT_ROTATE",
    "DEFAULT_SMOOTH",
    "SMOOTHING_METHODS",
    "Transforms",
    "DEFAULT_SCHEME",
    "DEFAULT_WEIGHT_SCALE",
    "EmulatedLinear",
    "KV_CACHE_FORMATS",
    "LinearStats",
    "MixedPrecisionPlan",
    "QuantizeResult",
    "WEIGHT_SCALE_METHODS",
    "apply_kv_cache",
    "apply_quantized",
    "attention_modules",
    "builtin_text",
    "calibrate",
    "calibrate_model",
    "calibration_samples",
    "estimate_sensitivity",
    "kv_hooks",
    "leading_special_token",
    "load_text",
    "needed_statistics",
    "nvfp4_weight_parts",
    "observe_kv_cache",
    "plan_model",
    "ptq_precision_plan",
    "quantize_linears",
    "quantize_by_block",
    "quantize_model",
    "quantized_model",
    "search_mixed_precision",
    "sample_bos",
    "token_samples",
    "tokenize",
    "unfuse_experts",
]
