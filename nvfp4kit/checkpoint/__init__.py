"""On-disk quantized checkpoints: modelopt HF and compressed-tensors, read and written.

The in-memory records (:mod:`.types`) are format independent: a :class:`QuantizedModel` holds
``linears`` (module name -> :class:`QuantizedLinearWeight`: NVFP4 parts with the DECODE-direction
global scale, or FP8, or bf16), ``tensors`` (everything else by checkpoint name), the HF ``config``,
``exclude_modules`` (fnmatch patterns), ``source_dir`` (tokenizer files) and the FP8 KV-cache amaxes.

Writing::

    from nvfp4kit.checkpoint import save_quantized
    save_quantized(model, "out/Model-NVFP4")                               # modelopt HF (default)
    save_quantized(model, "out/Model-NVFP4-ct", format="compressed-tensors",
                   max_shard_size="2GB", overwrite=False)

    The output is written to a temporary directory beside ``out`` and renamed when complete; an
    existing output directory is refused unless ``overwrite=True``. Fused groups (q/k/v, gate/up) must
    share one weight global scale (``strict_fused=False`` turns the error into a warning); use
    :func:`nvfp4kit.policy.fused_groups` when quantizing to get the groups.

Reading::

    from nvfp4kit.checkpoint import load_quantized, detect_format, dequantized_state_dict
    info = detect_format("nvidia/Some-NVFP4")     # .format: modelopt | compressed-tensors | unquantized
    model = load_quantized("nvidia/Some-NVFP4")   # QuantizedModel (CPU tensors, safetensors only)
    sd = dequantized_state_dict(model, torch.bfloat16)   # plain HF state dict
    s = summarize_checkpoint("nvidia/Some-NVFP4")  # headers only: s.linears {module: (scheme, (N, K))}

Converting and streaming (bounded memory, one tensor / module at a time)::

    from nvfp4kit.checkpoint import convert_checkpoint, quantize_checkpoint
    # exact: codes and block scales copied byte for byte, global scales replaced by float32 reciprocals
    convert_checkpoint("Model-NVFP4", "Model-NVFP4-ct", to="compressed-tensors")
    convert_checkpoint("Model-NVFP4", "Model-bf16", to="bf16")          # dequantize
    # weight-only NVFP4 of a bf16 checkpoint, one tensor at a time (peak memory ~ one shard)
    quantize_checkpoint("Model-bf16", "Model-NVFP4", scheme="nvfp4", exclude=["model.layers.0.*"])

Command line: ``nvfp4kit convert SRC --out DIR --to modelopt|compressed-tensors|bf16`` and
``nvfp4kit convert SRC --out DIR --quantize nvfp4|fp8 [--exclude PAT ...] [--to FORMAT]``.

Lower level, for pipelines that produce records one at a time: :class:`RecordWriter` (``.linear``,
``.tensor``, ``.kv`` inside a ``with`` block), :func:`iter_records` (one module at a time from a
:class:`CheckpointReader`), :class:`ShardedWriter` (atomic sharded safetensors).

Scale conventions: ``QuantizedLinearWeight.nvfp4.global_decode_scale`` is amax/2688 (modelopt's
``weight_scale_2``; compressed-tensors stores its reciprocal); ``input_amax`` is the calibrated
activation amax (modelopt ``input_scale`` = amax/2688 for NVFP4, amax/448 for FP8). FP8 weights carry
``fp8_weight_scale`` = amax/448.

Errors are :class:`CheckpointError` (a ``ValueError``) naming the file, tensor or option at fault.
"""

from .convert import convert_checkpoint, dequantize_checkpoint
from .errors import CheckpointError
from .layout import dequantize_linear, dequantized_state_dict, scheme_of, validate_linear, validate_model
from .quantized import (
    COMPRESSED_TENSORS,
    MODELOPT,
    UNQUANTIZED,
    WRITE_FORMATS,
    CheckpointInfo,
    CheckpointSummary,
    RecordWriter,
    detect_format,
    iter_records,
    load_quantized,
    save_quantized,
    summarize_checkpoint,
)
from .nvfp4_file import load_nvfp4, save_nvfp4
from .reader import CheckpointReader
from .streaming import quantize_checkpoint
from .rules import check_exclude_patterns, check_shared_global_scales, is_excluded
from .types import QuantizedLinearWeight, QuantizedModel
from .writer import ShardedWriter

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointSummary",
    "CheckpointReader",
    "COMPRESSED_TENSORS",
    "MODELOPT",
    "QuantizedLinearWeight",
    "QuantizedModel",
    "RecordWriter",
    "ShardedWriter",
    "UNQUANTIZED",
    "WRITE_FORMATS",
    "check_exclude_patterns",
    "check_shared_global_scales",
    "convert_checkpoint",
    "dequantize_checkpoint",
    "dequantize_linear",
    "dequantized_state_dict",
    "detect_format",
    "is_excluded",
    "iter_records",
    "load_nvfp4",
    "load_quantized",
    "quantize_checkpoint",
    "save_nvfp4",
    "save_quantized",
    "scheme_of",
    "summarize_checkpoint",
    "validate_linear",
    "validate_model",
]
