"""nvfp4kit: NVFP4 quantization, compression and low-precision training toolkit."""

from .api import dequantize, quantize
from .checkpoint.nvfp4_file import load_nvfp4, save_nvfp4
from .formats import (
    BLOCK_1D,
    BLOCK_2D,
    DEFAULT_RHT_SIGN,
    MXParts,
    NVFP4Parts,
    NVFP4Tensor,
    decode_from_encode,
    encode_from_decode,
    global_decode_scale,
    global_encode_scale,
    inverse_rht,
    mx_dequantize,
    mx_quantize,
    mxfp4_quantize,
    mxfp8_quantize,
    nvfp4_gemm,
    rht,
)
from .version import __version__

__all__ = [
    "BLOCK_1D",
    "BLOCK_2D",
    "DEFAULT_RHT_SIGN",
    "MXParts",
    "NVFP4Parts",
    "NVFP4Tensor",
    "decode_from_encode",
    "dequantize",
    "encode_from_decode",
    "global_decode_scale",
    "global_encode_scale",
    "inverse_rht",
    "load_nvfp4",
    "mx_dequantize",
    "mx_quantize",
    "mxfp4_quantize",
    "mxfp8_quantize",
    "nvfp4_gemm",
    "quantize",
    "rht",
    "save_nvfp4",
]
