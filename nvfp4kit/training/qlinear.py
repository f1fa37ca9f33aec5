"""Emulated low-precision linear layers: autograd functions for NVFP4 (the pretraining recipe),
MXFP8 and per-tensor FP8, exact on any device.

NVFP4 recipe (arXiv 2509.25149; ``numerics.md`` section 4), for ``y = x W^T + b`` with x ``[T, K]``
and W ``[N, K]``:

* fprop  ``y  = Q1x16(x) @ Q16x16(W)^T``           (round to nearest even)
* dgrad  ``dx = Q1x16_SR(dy) @ Q16x16(W)``          (the same 2D-quantized W, transposed exactly;
  with 1D weights W is re-quantized with blocks along N)
* wgrad  ``dW = Q1x16_SR(RHT(dy^T)) @ Q1x16(RHT(x^T))^T``  (16-point random Hadamard transform
  along the token dim on both operands, so it cancels in the product; tokens are zero-padded to a
  multiple of the block size, which adds nothing to the sum)

Every element is a switch of :class:`~nvfp4kit.training.precision.LinearPrecision`. The global amax of
every operand is recomputed on every call (current scaling), after the RHT for the wgrad operands;
:func:`set_amax_reduction` makes activation/gradient amaxes global across a process group.

Per-tensor FP8 uses :mod:`nvfp4kit.formats.fp8` (decode scale ``amax / 448``, current scaling).
GEMMs multiply exact float32 operand values (E2M1 value times E4M3 block scale; E4M3 times an
E8M0/fp32 scale for the FP8 formats) and accumulate in float32, as a tensor core does; autocast is
switched off inside, so the result is the same under ``torch.autocast``. Stochastic rounding draws
from torch's default generator of the device (checkpoint its state for exact resume), in this order
per backward call: the dgrad ``dy`` ``[T, N]`` first, then the wgrad ``dy^T`` ``[N, T_pad]``.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..formats.e2m1 import e2m1_value_table
from ..formats.fp8 import fp8_dequantize, fp8_quantize, fp8_scale
from ..formats.hadamard import DEFAULT_RHT_SIGN, RHT_SIZE, rht_matrix
from ..formats.mx import MX_BLOCK_SIZE, mx_dequantize, mx_quantize
from ..formats.nvfp4 import BLOCK_1D, BLOCK_2D, BLOCK_SIZE, NVFP4Parts
from ..formats.scales import tensor_amax
from ..kernels.dispatch import backend_available
from ..kernels.dispatch import quantize_parts as dispatch_quantize_parts
from .precision import LinearPrecision, as_precision

_AMAX_GROUP = None
_AMAX_REDUCE = False


def set_amax_reduction(group=None, enabled: bool = True) -> None:
    """Reduce (MAX) the global amax of activations and gradients across ``group`` (a
    ``torch.distributed`` process group; None = the default group), so data-parallel ranks quantize
    with the amax of the whole global batch. ``enabled=False`` switches it off."""
    global _AMAX_GROUP, _AMAX_REDUCE
    _AMAX_GROUP = group
    _AMAX_REDUCE = bool(enabled)


def _global_amax(t: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    amax = tensor_amax(t)
    if _AMAX_REDUCE and reduce:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            amax = amax.clone()
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=_AMAX_GROUP)
    return amax


@lru_cache(maxsize=None)
def default_rht_sign(size: int) -> tuple[int, ...]:
    """The fixed sign vector of a ``size``-point RHT: Transformer Engine's for 16 points, a fixed
    pseudo-random one (seed 0) for other sizes."""
    if size == RHT_SIZE:
        return DEFAULT_RHT_SIGN
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (size,), generator=g)
    return tuple(int(v) for v in (1 - 2 * bits))


def _check_rht_size(size: int) -> None:
    if size < BLOCK_SIZE or size & (size - 1):
        raise ValueError(f"LinearPrecision.rht_size must be a power of two >= {BLOCK_SIZE}, got {size}")


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _check_features(name: str, n: int, multiple: int, fmt: str, what: str) -> None:
    if n % multiple:
        raise ValueError(
            f"{name}: {what} {n} is not a multiple of {multiple}, which {fmt} needs "
            f"(keep this Linear in bf16, or pad the layer)"
        )


def _no_autocast(device_type: str):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.dtype.is_floating_point else torch.float32


# ----------------------------------------------------------------------------- NVFP4 recipe


@lru_cache(maxsize=None)
def _backend_for(device_type: str) -> str:
    """The fused CPU kernel for every CPU operand when it builds here (the dispatch's ``auto``
    keeps the reference for small tensors, and a linear's operands are often small: its fixed
    cost is what matters); ``auto`` otherwise. All backends give identical parts."""
    if device_type == "cpu" and backend_available("compiled", "cpu")[0]:
        return "compiled"
    return "auto"


def quantize_parts(t: torch.Tensor, block=BLOCK_1D, rounding="nearest", global_amax=None, scale_rule="max",
                   name="input") -> NVFP4Parts:
    return dispatch_quantize_parts(t, block=block, rounding=rounding, global_amax=global_amax,
                                   scale_rule=scale_rule, backend=_backend_for(t.device.type), name=name)


def _q(t: torch.Tensor, block=BLOCK_1D, rounding="nearest", scale_rule="max", name="input",
       reduce: bool = True) -> NVFP4Parts:
    return quantize_parts(t, block=block, rounding=rounding, scale_rule=scale_rule, name=name,
                          global_amax=_global_amax(t) if (_AMAX_REDUCE and reduce) else None)


def quantize_weight(weight: torch.Tensor, precision: LinearPrecision) -> NVFP4Parts:
    """The fprop weight operand: 16x16 blocks (or 1x16), Four Over Six scales if switched on."""
    return quantize_parts(weight.detach(), block=BLOCK_2D if precision.weight_2d else BLOCK_1D,
                          scale_rule="4over6" if precision.four_over_six else "max", name="weight")


@lru_cache(maxsize=None)
def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the E2M1 values of a packed byte's low and high nibble."""
    vals = e2m1_value_table(torch.float32, device)
    b = torch.arange(256, device=device)
    return torch.stack([vals[b & 0xF], vals[b >> 4]], dim=1).contiguous()


def operand_values(parts: NVFP4Parts) -> torch.Tensor:
    """E2M1 values times fp32 block scales, ``[..., K]`` float32 (no global scale; exact)."""
    packed = parts.packed
    K = packed.shape[-1] * 2
    vals = F.embedding(packed.long(), _byte_table(packed.device))  # [..., K/2, 2]
    vals = vals.view(*packed.shape[:-1], K // BLOCK_SIZE, BLOCK_SIZE)
    return (vals * parts.block_scale.float().unsqueeze(-1)).view(*packed.shape[:-1], K)


def _alpha(a: NVFP4Parts, b: NVFP4Parts) -> torch.Tensor:
    return a.global_decode_scale.float() * b.global_decode_scale.float()


def nvfp4_gemm(a: NVFP4Parts, b: NVFP4Parts, b_values: torch.Tensor | None = None) -> torch.Tensor:
    """``a [M, K] @ b [N, K]^T`` of two NVFP4 operands in float32 (what ``formats.gemm`` computes)."""
    bv = operand_values(b) if b_values is None else b_values
    return torch.mm(operand_values(a), bv.t()).mul_(_alpha(a, b))


@lru_cache(maxsize=None)
def _rht_matrix(sign: tuple[int, ...], size: int, device: torch.device) -> torch.Tensor:
    return rht_matrix(sign, size, torch.float32, device)


def wgrad_operands(dy: torch.Tensor, x: torch.Tensor, precision: LinearPrecision) -> tuple[NVFP4Parts, NVFP4Parts]:
    """Quantized ``dy^T`` ``[N, T_pad]`` and ``x^T`` ``[K, T_pad]`` of the wgrad GEMM (blocks along tokens).

    The RHT is :func:`nvfp4kit.formats.hadamard.rht` along the token dim, computed as one
    ``[rows * T / size, size] @ H`` product on the transposed operand (the same float32 numbers)."""
    multiple = BLOCK_SIZE
    if precision.rht:
        _check_rht_size(precision.rht_size)
        multiple = max(multiple, precision.rht_size)
    dy_t = _pad_rows(dy, multiple).t().float().contiguous()
    x_t = _pad_rows(x, multiple).t().float().contiguous()
    if precision.rht:
        size = precision.rht_size
        sign = precision.rht_sign if precision.rht_sign is not None else default_rht_sign(size)
        H = _rht_matrix(tuple(sign), size, dy.device)
        dy_t = torch.mm(dy_t.view(-1, size), H).view(dy_t.shape)
        x_t = torch.mm(x_t.view(-1, size), H).view(x_t.shape)
    sr = "stochastic" if precision.stochastic_rounding else "nearest"
    red = precision.amax_reduction
    q_dy = _q(dy_t, rounding=sr, name="grad_output^T", reduce=red)
    q_x = _q(x_t, name="input^T", reduce=red)
    return q_dy, q_x


class NVFP4RecipeLinear(torch.autograd.Function):
    """``x [T, K] @ W [N, K]^T + b`` with the NVFP4 pretraining recipe (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, precision: LinearPrecision, out_dtype):
        with _no_autocast(x.device.type):
            q_x = _q(x, name="input", reduce=precision.amax_reduction)
            q_w = quantize_weight(weight, precision)
            w_vals = operand_values(q_w)
            y = nvfp4_gemm(q_x, q_w, w_vals)
            if bias is not None:
                y = y + bias.float()
        ctx.precision = precision
        ctx.x_dtype = x.dtype
        ctx.w_dtype = weight.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        # dgrad reuses the 2D-quantized W: its 16x16 tiles serve W^T unchanged
        ctx.w_dgrad = (w_vals, q_w.global_decode_scale) if precision.weight_2d else None
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        p: LinearPrecision = ctx.precision
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        sr = "stochastic" if p.stochastic_rounding else "nearest"
        with _no_autocast(dy.device.type):
            if need_x:
                q_dy = _q(dy, rounding=sr, name="grad_output", reduce=p.amax_reduction)
                if p.weight_2d:
                    w_vals, w_decode = ctx.w_dgrad
                    dx = torch.mm(operand_values(q_dy), w_vals).mul_(q_dy.global_decode_scale.float() * w_decode.float())
                else:  # 1x16 weights: W^T re-quantized with its blocks along N
                    q_wt = quantize_parts(weight.detach().t(), block=BLOCK_1D, name="weight^T")
                    dx = nvfp4_gemm(q_dy, q_wt)
                dx = dx.to(ctx.x_dtype)
            if need_w:
                q_dy_t, q_x_t = wgrad_operands(dy, x, p)
                dw = nvfp4_gemm(q_dy_t, q_x_t).to(ctx.w_dtype)
            if need_b and ctx.has_bias:
                db = dy.float().sum(0)
        ctx.w_dgrad = None
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------- MXFP8 and FP8


def _mxfp8(t: torch.Tensor, name: str) -> torch.Tensor:
    """MXFP8 (E4M3, one E8M0 scale per 32 along the last dim) values in float32."""
    return mx_dequantize(mx_quantize(t, "e4m3", name=name))


class MXFP8Linear(torch.autograd.Function):
    """All three GEMMs with MXFP8 operands, each blocked along its own reduction dim."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype):
        with _no_autocast(x.device.type):
            y = _mxfp8(x, "input") @ _mxfp8(weight, "weight").t()
            if bias is not None:
                y = y + bias.float()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with _no_autocast(dy.device.type):
            if need_x:
                dx = (_mxfp8(dy, "grad_output") @ _mxfp8(weight.t(), "weight^T").t()).to(x.dtype)
            if need_w:
                dy_t = _pad_rows(dy, MX_BLOCK_SIZE).t()
                x_t = _pad_rows(x, MX_BLOCK_SIZE).t()
                dw = (_mxfp8(dy_t, "grad_output^T") @ _mxfp8(x_t, "input^T").t()).to(weight.dtype)
            if need_b and ctx.has_bias:
                db = dy.float().sum(0)
        return dx, dw, db, None


def fp8_tensor(t: torch.Tensor, amax: torch.Tensor | None = None, reduce: bool = True,
               name: str = "input") -> torch.Tensor:
    """Per-tensor E4M3 with current scaling (the :mod:`nvfp4kit.formats.fp8` formula), as float32 values."""
    if amax is None:
        amax = _global_amax(t, reduce)
    q, s = fp8_quantize(t, scale=fp8_scale(amax), name=name)
    return fp8_dequantize(q, s)


class FP8Linear(torch.autograd.Function):
    """All three GEMMs with per-tensor E4M3 operands (current scaling)."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype, reduce):
        with _no_autocast(x.device.type):
            w8 = fp8_tensor(weight, tensor_amax(weight), name="weight")
            y = fp8_tensor(x, reduce=reduce) @ w8.t()
            if bias is not None:
                y = y + bias.float()
        ctx.save_for_backward(x, w8)
        ctx.has_bias = bias is not None
        ctx.w_dtype = weight.dtype
        ctx.reduce = reduce
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w8 = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with _no_autocast(dy.device.type):
            dy8 = fp8_tensor(dy, reduce=ctx.reduce, name="grad_output")
            if need_x:
                dx = (dy8 @ w8).to(x.dtype)
            if need_w:
                dw = (dy8.t() @ fp8_tensor(x, reduce=ctx.reduce, name="input")).to(ctx.w_dtype)
            if need_b and ctx.has_bias:
                db = dy.float().sum(0)
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------- dispatch


def emulated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, precision) -> torch.Tensor:
    """``x @ weight.T + bias`` in ``precision`` (a LinearPrecision), emulated exactly in float32.

    ``x`` is ``[..., K]`` (float32 or bfloat16), ``weight`` ``[N, K]`` (float32 master weights).
    The output has ``x``'s dtype, or the autocast dtype inside ``torch.autocast``.
    """
    if not isinstance(precision, LinearPrecision):
        raise TypeError(f"emulated_linear: precision must be a LinearPrecision, got {type(precision).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"emulated_linear: weight must be [out_features, in_features], got {tuple(weight.shape)}")
    K = weight.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"emulated_linear: input last dim {x.shape[-1]} does not match weight in_features {K}")
    fmt = precision.format
    if fmt == "bf16":
        return F.linear(x, weight, bias)
    N = weight.shape[0]
    out_dtype = _out_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if fmt == "nvfp4":
        _check_features("nvfp4 linear", K, BLOCK_SIZE, "NVFP4", "in_features")
        _check_features("nvfp4 linear", N, BLOCK_SIZE, "NVFP4", "out_features")
        y = NVFP4RecipeLinear.apply(x2, weight, bias, precision, out_dtype)
    elif fmt == "mxfp8":
        _check_features("mxfp8 linear", K, MX_BLOCK_SIZE, "MXFP8", "in_features")
        _check_features("mxfp8 linear", N, MX_BLOCK_SIZE, "MXFP8", "out_features")
        y = MXFP8Linear.apply(x2, weight, bias, out_dtype)
    elif fmt == "fp8":
        y = FP8Linear.apply(x2, weight, bias, out_dtype, precision.amax_reduction)
    else:
        raise ValueError(f"emulated_linear: unknown format {fmt!r}")
    return y.reshape(*lead, N)


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, precision) -> torch.Tensor:
    """``x @ weight.T + bias`` in ``precision`` (a LinearPrecision or a format name; None is bf16)."""
    precision = as_precision(precision)
    if precision.format == "bf16":
        return F.linear(x, weight, bias)
    return emulated_linear(x, weight, bias, precision)
