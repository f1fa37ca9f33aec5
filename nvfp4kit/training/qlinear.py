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

On CUDA (or inside ``kernels.dispatch.force_fused``) the NVFP4 recipe runs as :class:`NVFP4FusedLinear`:
the same recipe on the fused Triton kernels with exact bf16 GEMMs and no host sync per Linear (its section
below); on the CPU as :class:`NVFP4RecipeLinear`, whose numerics the compiled CPU kernels keep.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..formats.e2m1 import e2m1_value_table
from ..formats.fp8 import fp8_dequantize, fp8_quantize, fp8_scale
from ..formats.hadamard import DEFAULT_RHT_SIGN, RHT_SIZE, rht_matrix
from ..formats.mx import MX_BLOCK_SIZE
from ..formats.nvfp4 import BLOCK_1D, BLOCK_2D, BLOCK_SIZE, NVFP4Parts
from ..formats.scales import tensor_amax
from ..kernels import dispatch
from ..kernels.dispatch import backend_available
from ..kernels.dispatch import quantize_parts as dispatch_quantize_parts
from ..kernels.dispatch import mxfp8_fake_quantize as dispatch_mxfp8_fake_quantize
from ..kernels.dispatch import quantize_values as dispatch_quantize_values
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


def amax_reduction_enabled() -> bool:
    """Whether :func:`set_amax_reduction` switched the cross-rank amax reduction on."""
    return _AMAX_REDUCE


def reduce_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax`` all-reduced (MAX) over the amax group when one is initialised (on the device, no host sync)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        amax = amax.clone()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=_AMAX_GROUP)
    return amax


def _global_amax(t: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    amax = tensor_amax(t)
    if _AMAX_REDUCE and reduce:
        amax = reduce_amax(amax)
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


def _qv(t: torch.Tensor, block=BLOCK_1D, rounding="nearest", scale_rule="max", name="input",
        reduce: bool = True) -> tuple[NVFP4Parts, torch.Tensor]:
    """:func:`_q` and the parts' :func:`operand_values`, from one call of the quantize kernel on CPU."""
    return dispatch_quantize_values(t, block=block, rounding=rounding, scale_rule=scale_rule, name=name,
                                    global_amax=_global_amax(t) if (_AMAX_REDUCE and reduce) else None,
                                    backend=_backend_for(t.device.type))


def _weight_format(precision: LinearPrecision) -> dict:
    return dict(block=BLOCK_2D if precision.weight_2d else BLOCK_1D,
                scale_rule="4over6" if precision.four_over_six else "max", name="weight")


def quantize_weight(weight: torch.Tensor, precision: LinearPrecision) -> NVFP4Parts:
    """The fprop weight operand: 16x16 blocks (or 1x16), Four Over Six scales if switched on."""
    return quantize_parts(weight.detach(), **_weight_format(precision))


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
    (q_dy, _), (q_x, _) = _wgrad_operands(dy, x, precision, values=False)
    return q_dy, q_x


def _transpose_padded(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """``t [T, C]`` as float32 ``t^T [C, T_pad]``, contiguous, zero past T: one copy."""
    return dispatch.transpose_padded(t, multiple, backend=_backend_for(t.device.type))


def _wgrad_operands(dy, x, precision: LinearPrecision, values: bool):
    """:func:`wgrad_operands` as ``(parts, values)`` pairs (values None unless ``values``)."""
    quantize = _qv if values else (lambda t, **kw: (_q(t, **kw), None))
    multiple = BLOCK_SIZE
    if precision.rht:
        _check_rht_size(precision.rht_size)
        multiple = max(multiple, precision.rht_size)
    dy_t = _transpose_padded(dy, multiple)
    x_t = _transpose_padded(x, multiple)
    if precision.rht:
        size = precision.rht_size
        sign = precision.rht_sign if precision.rht_sign is not None else default_rht_sign(size)
        H = _rht_matrix(tuple(sign), size, dy.device)
        dy_t = torch.mm(dy_t.view(-1, size), H).view(dy_t.shape)
        x_t = torch.mm(x_t.view(-1, size), H).view(x_t.shape)
    sr = "stochastic" if precision.stochastic_rounding else "nearest"
    red = precision.amax_reduction
    q_dy = quantize(dy_t, rounding=sr, name="grad_output^T", reduce=red)
    q_x = quantize(x_t, name="input^T", reduce=red)
    return q_dy, q_x


class NVFP4RecipeLinear(torch.autograd.Function):
    """``x [T, K] @ W [N, K]^T + b`` with the NVFP4 pretraining recipe (module docstring). Every
    operand is quantized together with its values (``_qv``: one kernel call on CPU); the GEMMs are
    those of :func:`nvfp4_gemm`."""

    @staticmethod
    def forward(ctx, x, weight, bias, precision: LinearPrecision, out_dtype):
        with _no_autocast(x.device.type):
            q_x, x_vals = _qv(x, name="input", reduce=precision.amax_reduction)
            q_w, w_vals = _qv(weight.detach(), reduce=False, **_weight_format(precision))
            y = torch.mm(x_vals, w_vals.t()).mul_(_alpha(q_x, q_w))
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
                q_dy, dy_vals = _qv(dy, rounding=sr, name="grad_output", reduce=p.amax_reduction)
                if p.weight_2d:
                    w_vals, w_decode = ctx.w_dgrad
                    dx = torch.mm(dy_vals, w_vals).mul_(q_dy.global_decode_scale.float() * w_decode.float())
                else:  # 1x16 weights: W^T re-quantized with its blocks along N
                    q_wt, wt_vals = _qv(weight.detach().t(), block=BLOCK_1D, name="weight^T", reduce=False)
                    dx = torch.mm(dy_vals, wt_vals.t()).mul_(_alpha(q_dy, q_wt))
                dx = dx.to(ctx.x_dtype)
            if need_w:
                (q_dy_t, dy_t_vals), (q_x_t, x_t_vals) = _wgrad_operands(dy, x, p, values=True)
                dw = torch.mm(dy_t_vals, x_t_vals.t()).mul_(_alpha(q_dy_t, q_x_t)).to(ctx.w_dtype)
            if need_b and ctx.has_bias:
                db = dy.float().sum(0)
        ctx.w_dgrad = None
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------- NVFP4 recipe, fused kernels
#
# The path CUDA tensors take (``kernels.dispatch.fused_backend``): the recipe of NVFP4RecipeLinear (module
# docstring), computed with the Triton kernels through ``nvfp4kit.kernels.dispatch``:
#
# * fprop: one launch quantizes ``x`` rowwise (1x16, for fprop) and ``RHT(x^T)`` (1x16 along tokens, for wgrad;
#   only when the weight needs a gradient), and ``W`` is quantized in 16x16 tiles;
# * dgrad: the same 16x16 ``W`` (its tiles serve ``W^T`` unchanged); ``dy`` quantized with stochastic rounding,
#   in the same launch as ``RHT(dy^T)`` when both gradients are needed (``rht_quantize`` when only wgrad is);
# * every GEMM multiplies the exact bf16 block values (E2M1 x E4M3, :func:`~nvfp4kit.kernels.dispatch.block_values`)
#   with float32 accumulation and applies the two global scales once (``dispatch.values_gemm``);
# * global amaxes stay on the device (two-phase reductions inside the kernels; all-reduced on the device when
#   data parallelism asks for it), and NaN/inf checks are counted on the device and raised once per step
#   (``dispatch.raise_if_nonfinite``, called by the training loop): no host sync per Linear.
#
# Numerics against the CPU path: every quantized operand is bit-identical to the torch reference for
# round-to-nearest (the RHT is the butterfly of ``formats.hadamard.rht_butterfly``, which the CPU path computes
# as a matrix product: equal up to float32 rounding of its sums); the GEMM sums differ only by float32
# reassociation; stochastic rounding draws from the device's default generator through Philox (reproducible
# per seed, unbiased, other draws than ``torch.rand``). ``dispatch.force_fused`` runs this path on CPU tensors
# (Triton interpreter, or the torch reference of the same steps), which is how the tests prove it bit for bit.
# RHT sizes other than 16 take the per-operation wgrad (``wgrad_operands``).


def _first_rows(parts: NVFP4Parts, n: int) -> NVFP4Parts:
    """The first ``n`` rows of rowwise parts (drops the zero rows a token pad added)."""
    if parts.packed.shape[0] == n:
        return parts
    return NVFP4Parts(parts.packed[:n], parts.block_scale[:n], parts.global_decode_scale, parts.block)


def _pad16(t: torch.Tensor) -> torch.Tensor:
    pad = -t.shape[0] % BLOCK_SIZE
    return F.pad(t, (0, 0, 0, pad)) if pad else t


class _FusedOps:
    """The dispatch calls of one Linear call: its backend, the NaN/inf counter, the amax reduction."""

    def __init__(self, backend: str, device: torch.device, reduce: bool, precision: LinearPrecision):
        self.backend = backend
        self.nonfinite = dispatch.nonfinite_counter(device) if backend == "triton" else None
        self.reduce = reduce and amax_reduction_enabled()
        self.sign = None
        if precision.rht:
            self.sign = precision.rht_sign if precision.rht_sign is not None else default_rht_sign(RHT_SIZE)

    def amax(self, t: torch.Tensor, rht: bool = False, name: str = "input"):
        """The all-reduced global amax where data parallelism asks for it, else None (the kernel's own)."""
        if not self.reduce:
            return None
        a = dispatch.global_amax(t, rht=rht, rht_sign=self.sign, backend=self.backend, name=name,
                                 nonfinite=self.nonfinite)
        return reduce_amax(a)

    def quantize(self, t, block=BLOCK_1D, rounding="nearest", scale_rule="max", name="input", amax=None):
        return dispatch.fused_quantize(t, block, rounding, amax, scale_rule, self.backend, name, self.nonfinite)

    def rowcol(self, t: torch.Tensor, rounding: str, rht: bool, name: str):
        """Rowwise parts of ``t`` [T, C] and parts of ``RHT(t_pad^T)`` [C, T_pad] from one launch."""
        tp = _pad16(t)
        rw, cw = dispatch.quantize_rowwise_columnwise(
            tp, rounding, self.amax(t, name=name), rht, self.sign, self.amax(tp.t(), rht=True, name=name) if rht
            else None, self.backend, name, self.nonfinite)
        return _first_rows(rw, t.shape[0]), cw

    def columnwise(self, t: torch.Tensor, rounding: str, rht: bool, name: str) -> NVFP4Parts:
        """Parts of ``RHT(t_pad^T)`` (or ``t_pad^T``) alone, read in place through the transposed view."""
        tt = _pad16(t).t()
        if rht:
            return dispatch.rht_quantize(tt, rounding, self.amax(tt, rht=True, name=name), self.sign, self.backend,
                                         name, self.nonfinite)
        return self.quantize(tt, rounding=rounding, name=name, amax=self.amax(tt, name=name))

    def values(self, parts: NVFP4Parts) -> torch.Tensor:
        return dispatch.block_values(parts, torch.bfloat16, self.backend)

    def gemm(self, a: NVFP4Parts, b: NVFP4Parts, b_values: torch.Tensor | None = None) -> torch.Tensor:
        bv = self.values(b) if b_values is None else b_values
        return dispatch.values_gemm(self.values(a), bv, _alpha(a, b))


def fused_wgrad_supported(precision: LinearPrecision) -> bool:
    """The fused kernels compute the 16-point RHT; other sizes take the per-operation wgrad."""
    return not precision.rht or precision.rht_size == RHT_SIZE


class NVFP4FusedLinear(torch.autograd.Function):
    """``x [T, K] @ W [N, K]^T + b`` with the NVFP4 recipe on the fused kernels (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, precision: LinearPrecision, out_dtype, backend: str, grad_enabled: bool):
        p = precision
        ops = _FusedOps(backend, x.device, p.amax_reduction, p)
        need_w = grad_enabled and ctx.needs_input_grad[1]  # no columnwise x for inference (no_grad)
        fast_wgrad = need_w and fused_wgrad_supported(p)
        with _no_autocast(x.device.type):
            if fast_wgrad:
                q_x, q_xt = ops.rowcol(x, "nearest", p.rht, "input")
            else:
                q_x, q_xt = ops.quantize(x, name="input", amax=ops.amax(x, name="input")), None
            q_w = ops.quantize(weight.detach(), BLOCK_2D if p.weight_2d else BLOCK_1D,
                               scale_rule="4over6" if p.four_over_six else "max", name="weight")
            w_vals = ops.values(q_w)
            y = ops.gemm(q_x, q_w, w_vals)
            if bias is not None:
                y = y + bias.float()
        ctx.precision, ctx.backend = p, backend
        ctx.x_dtype, ctx.w_dtype, ctx.has_bias = x.dtype, weight.dtype, bias is not None
        ctx.save_for_backward(None if fast_wgrad else x, weight)
        ctx.q_xt = q_xt
        # dgrad reuses the 2D-quantized W: its 16x16 tiles serve W^T unchanged
        ctx.w_dgrad = (w_vals, q_w.global_decode_scale) if p.weight_2d else None
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        p: LinearPrecision = ctx.precision
        ops = _FusedOps(ctx.backend, dy.device, p.amax_reduction, p)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        sr = "stochastic" if p.stochastic_rounding else "nearest"
        q_xt = ctx.q_xt
        with _no_autocast(dy.device.type):
            q_dy = q_dyt = None
            if need_w and q_xt is not None:
                if need_x:  # dy rowwise (dgrad) and RHT(dy^T) (wgrad) from one read of dy
                    q_dy, q_dyt = ops.rowcol(dy, sr, p.rht, "grad_output")
                else:
                    q_dyt = ops.columnwise(dy, sr, p.rht, "grad_output^T")
            elif need_x:
                q_dy = ops.quantize(dy, rounding=sr, name="grad_output", amax=ops.amax(dy, name="grad_output"))
            if need_x:
                if p.weight_2d:
                    w_vals, w_decode = ctx.w_dgrad
                    # dy [T, N] @ W [N, K]: the rhs is given as [K, N], i.e. W^T, a view of the same values
                    dx = dispatch.values_gemm(ops.values(q_dy), w_vals.t(),
                                              q_dy.global_decode_scale.float() * w_decode.float())
                else:  # 1x16 weights: W^T re-quantized with its blocks along N
                    q_wt = ops.quantize(weight.detach().t(), name="weight^T")
                    dx = ops.gemm(q_dy, q_wt)
                dx = dx.to(ctx.x_dtype)
            if need_w:
                if q_xt is not None:
                    dw = ops.gemm(q_dyt, q_xt)
                else:  # an RHT size the fused kernels do not compute
                    q_dyt, q_xt = wgrad_operands(dy, x, p)
                    dw = nvfp4_gemm(q_dyt, q_xt)
                dw = dw.to(ctx.w_dtype)
            if need_b and ctx.has_bias:
                db = dy.float().sum(0)
        ctx.w_dgrad = ctx.q_xt = None
        return dx, dw, db, None, None, None, None


# ----------------------------------------------------------------------------- MXFP8 and FP8


def _mxfp8(t: torch.Tensor, name: str) -> torch.Tensor:
    """MXFP8 (E4M3, one E8M0 scale per 32 along the last dim) values in float32 (``formats.mx``; one
    kernel pass on CPU)."""
    return dispatch_mxfp8_fake_quantize(t, backend=_backend_for(t.device.type), name=name)


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
                dy_t = _transpose_padded(dy, MX_BLOCK_SIZE)
                x_t = _transpose_padded(x, MX_BLOCK_SIZE)
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
        fused = dispatch.fused_backend(x.device)
        if fused is not None:  # CUDA (or dispatch.force_fused): the fused kernels
            y = NVFP4FusedLinear.apply(x2, weight, bias, precision, out_dtype, fused, torch.is_grad_enabled())
        else:
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
