"""The NVFP4 numerics core: pure torch, no I/O, bit-exact to the canonical formulas."""

from .e2m1 import E2M1_MAX, e2m1_decode, e2m1_round_nearest, e2m1_round_stochastic, pack_nibbles, unpack_nibbles
from .fp8 import fp8_dequantize, fp8_fake_quant, fp8_quantize, fp8_scale
from .gemm import nvfp4_gemm
from .hadamard import DEFAULT_RHT_SIGN, inverse_rht, rht, rht_butterfly, rht_matrix
from .mx import MXParts, mx_dequantize, mx_quantize, mxfp4_quantize, mxfp8_quantize
from .nvfp4 import BLOCK_1D, BLOCK_2D, BLOCK_SIZE, NVFP4Parts, block_amax, dequantize_parts, quantize_parts
from .scales import (
    E4M3_MAX,
    NVFP4_RANGE,
    decode_from_encode,
    e4m3_rtne,
    encode_from_decode,
    global_decode_scale,
    global_encode_scale,
    tensor_amax,
)
from .tensor import NVFP4Tensor

__all__ = [name for name in dir() if not name.startswith("_")]
