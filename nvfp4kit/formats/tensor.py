"""NVFP4Tensor: a torch wrapper subclass holding NVFP4 parts with a logical shape and dtype.

The stored parts are always in *row layout* (blocks run along the last stored dim). A 1x16-block
matrix that is transposed keeps its parts and sets ``transposed=True`` (its blocks then run along
the logical second-to-last dim, which is what ``x @ W.t()`` needs); a 16x16-block matrix transposes
exactly, into the parts of ``quantize(W.t(), block=(16, 16))``.

Supported ops are the table ``_OPS`` at the bottom: one small function each.
"""

from __future__ import annotations

from typing import Callable

import torch

from .gemm import nvfp4_gemm
from .nvfp4 import (
    BLOCK_1D,
    BLOCK_2D,
    BLOCK_SIZE,
    Block,
    NVFP4Parts,
    check_parts,
    dequantize_parts,
    transpose_2d_parts,
)

aten = torch.ops.aten


class NVFP4Tensor(torch.Tensor):
    """A tensor quantized to NVFP4 (E2M1 values, E4M3 block scales, FP32 global decode scale)."""

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_decode_scale: torch.Tensor
    block: Block
    transposed: bool

    @staticmethod
    def __new__(cls, packed, block_scale, global_decode_scale, dtype=torch.float32, block=BLOCK_1D, transposed=False):
        rows_shape = (*packed.shape[:-1], packed.shape[-1] * 2)
        shape = rows_shape if not transposed else (*rows_shape[:-2], rows_shape[-1], rows_shape[-2])
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(self, packed, block_scale, global_decode_scale, dtype=torch.float32, block=BLOCK_1D, transposed=False):
        check_parts(packed, block_scale, global_decode_scale, block, "NVFP4Tensor", values=False)
        if transposed and packed.ndim != 2:
            raise ValueError("NVFP4Tensor: only 2-dim tensors can carry the transposed flag")
        self.packed = packed
        self.block_scale = block_scale
        self.global_decode_scale = global_decode_scale.float().reshape(())
        self.block = tuple(block)
        self.transposed = bool(transposed)

    # ------------------------------------------------------------------ construction and views

    @classmethod
    def from_parts(cls, parts: NVFP4Parts, dtype=torch.float32, transposed=False) -> "NVFP4Tensor":
        return cls(parts.packed, parts.block_scale, parts.global_decode_scale, dtype, parts.block, transposed)

    @property
    def parts(self) -> NVFP4Parts:
        return NVFP4Parts(self.packed, self.block_scale, self.global_decode_scale, self.block)

    @property
    def global_scale(self) -> torch.Tensor:
        """The FP32 per-tensor scale in the decode direction (amax / 2688)."""
        return self.global_decode_scale

    @property
    def global_encode_scale(self) -> torch.Tensor:
        """The FP32 per-tensor scale in the encode direction (2688 / amax), as compressed-tensors stores it."""
        return torch.ones_like(self.global_decode_scale) / self.global_decode_scale

    def _with(self, parts: NVFP4Parts | None = None, **kw) -> "NVFP4Tensor":
        parts = parts or self.parts
        return NVFP4Tensor.from_parts(parts, kw.get("dtype", self.dtype), kw.get("transposed", self.transposed))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The represented values as a plain tensor (``self.dtype`` unless ``dtype`` is given)."""
        out = dequantize_parts(self.packed, self.block_scale, self.global_decode_scale, dtype or self.dtype)
        return out.t() if self.transposed else out

    def __repr__(self) -> str:
        return (
            f"NVFP4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, block={self.block}, "
            f"transposed={self.transposed}, global_decode_scale={float(self.global_decode_scale):.6g})"
        )

    # ------------------------------------------------------------------ torch.compile support

    def __tensor_flatten__(self):
        ctx = {"dtype": self.dtype, "block": self.block, "transposed": self.transposed}
        return ["packed", "block_scale", "global_decode_scale"], ctx

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return NVFP4Tensor(
            inner["packed"], inner["block_scale"], inner["global_decode_scale"], ctx["dtype"], ctx["block"], ctx["transposed"]
        )

    # ------------------------------------------------------------------ dispatch

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            raise TypeError(
                f"NVFP4Tensor does not support {func}; call .dequantize() to get a plain tensor first"
            )
        return handler(func, *args, **kwargs)


# ============================================================================= op table

_OPS: dict[Callable, Callable] = {}


def _implements(*ops):
    def deco(fn):
        for op in ops:
            _OPS[op] = fn
        return fn

    return deco


def _map_parts(t: NVFP4Tensor, fn) -> NVFP4Tensor:
    return t._with(NVFP4Parts(fn(t.packed), fn(t.block_scale), fn(t.global_decode_scale), t.block))


@_implements(aten.detach.default, aten.alias.default)
def _detach(func, t):
    return _map_parts(t, func)


@_implements(aten.clone.default)
def _clone(func, t, memory_format=None):
    return _map_parts(t, lambda p: p.clone())


@_implements(aten._to_copy.default)
def _to_copy(func, t, dtype=None, device=None, layout=None, pin_memory=None, non_blocking=False, memory_format=None):
    moved = _map_parts(t, lambda p: p.to(device=device, non_blocking=non_blocking)) if device is not None else t
    if dtype is not None and dtype != t.dtype:
        if not dtype.is_floating_point:
            raise TypeError(f"NVFP4Tensor: cannot change the logical dtype to {dtype}; use .dequantize()")
        moved = moved._with(dtype=dtype)
    return moved


def _transpose_matrix(t: NVFP4Tensor) -> NVFP4Tensor:
    if t.ndim != 2:
        raise ValueError(f"NVFP4Tensor: transpose of a {t.ndim}-dim tensor is not supported; only matrices")
    if t.block == BLOCK_2D and not t.transposed and t.shape[0] % BLOCK_SIZE == 0:
        # whole tiles: the exact transpose, i.e. the parts of quantize(W.t(), block=(16, 16))
        return NVFP4Tensor.from_parts(transpose_2d_parts(t.parts), t.dtype)
    # 1x16 blocks, or a partial last row tile: keep the row parts and flag the transpose
    return t._with(transposed=not t.transposed)


@_implements(aten.t.default)
def _t(func, t):
    return _transpose_matrix(t)


@_implements(aten.transpose.int)
def _transpose(func, t, dim0, dim1):
    d0, d1 = sorted((dim0 % t.ndim, dim1 % t.ndim))
    if d0 == d1:
        return t._with()
    if t.ndim == 2 and (d0, d1) == (0, 1):
        return _transpose_matrix(t)
    raise ValueError(f"NVFP4Tensor: transpose({dim0}, {dim1}) of shape {tuple(t.shape)}: only the two dims of a matrix")


@_implements(aten.permute.default)
def _permute(func, t, dims):
    dims = [d % t.ndim for d in dims]
    if dims == list(range(t.ndim)):
        return t._with()
    if t.ndim == 2 and dims == [1, 0]:
        return _transpose_matrix(t)
    raise ValueError(f"NVFP4Tensor: permute{tuple(dims)} of shape {tuple(t.shape)}: only the transpose of a matrix")


@_implements(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func, t, size):
    size = list(size)
    if -1 in size:
        known = 1
        for s in size:
            if s != -1:
                known *= s
        size[size.index(-1)] = t.numel() // max(known, 1)
    if t.transposed:
        if tuple(size) == tuple(t.shape):
            return t._with()
        raise ValueError("NVFP4Tensor: cannot reshape a transposed NVFP4 matrix; transpose it back first")
    if not size or size[-1] != t.shape[-1]:
        raise ValueError(
            f"NVFP4Tensor: view {tuple(t.shape)} -> {tuple(size)} must keep the last (blocked) dim {t.shape[-1]}"
        )
    lead = size[:-1]
    if t.block == BLOCK_2D and (len(lead) == 0 or lead[-1] != t.shape[-2]):
        raise ValueError("NVFP4Tensor: a 16x16-block tensor can only reshape its dims before the last two")
    K = t.shape[-1]
    return t._with(
        NVFP4Parts(
            t.packed.reshape(*lead, K // 2),
            t.block_scale.reshape(*lead, K // BLOCK_SIZE),
            t.global_decode_scale,
            t.block,
        )
    )


@_implements(aten.slice.Tensor)
def _slice(func, t, dim=0, start=None, end=None, step=1):
    if t.transposed:
        raise ValueError("NVFP4Tensor: slice a transposed NVFP4 matrix by transposing it back first")
    dim = dim % t.ndim
    size = t.shape[dim]
    start = 0 if start is None else max(min(start if start >= 0 else start + size, size), 0)
    end = size if end is None else max(min(end if end >= 0 else end + size, size), start)
    if dim == t.ndim - 1:
        if step != 1 or start % BLOCK_SIZE or (end % BLOCK_SIZE and end != size):
            raise ValueError(
                f"NVFP4Tensor: slicing the last dim must take whole blocks of {BLOCK_SIZE} with step 1, "
                f"got [{start}:{end}:{step}]"
            )
        parts = NVFP4Parts(
            t.packed[..., start // 2 : end // 2],
            t.block_scale[..., start // BLOCK_SIZE : end // BLOCK_SIZE],
            t.global_decode_scale,
            t.block,
        )
        return t._with(parts)
    if t.block == BLOCK_2D and dim == t.ndim - 2 and (step != 1 or start % BLOCK_SIZE or (end % BLOCK_SIZE and end != size)):
        raise ValueError("NVFP4Tensor: slicing the rows of a 16x16-block tensor must take whole tiles of 16")
    index = [slice(None)] * t.ndim
    index[dim] = slice(start, end, step)
    index = tuple(index)
    return t._with(NVFP4Parts(t.packed[index], t.block_scale[index], t.global_decode_scale, t.block))


@_implements(aten.select.int)
def _select(func, t, dim, index):
    dim = dim % t.ndim
    if t.transposed or dim >= t.ndim - (2 if t.block == BLOCK_2D else 1):
        raise ValueError(f"NVFP4Tensor: select along dim {dim} would split blocks; dequantize first")
    return t._with(
        NVFP4Parts(t.packed.select(dim, index), t.block_scale.select(dim, index), t.global_decode_scale, t.block)
    )


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.dequantize(torch.float32) if isinstance(x, NVFP4Tensor) else x.float()


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b [K, N]. Both NVFP4 with blocks along K: the emulated NVFP4 GEMM; otherwise the
    NVFP4 operand(s) are dequantized and the product is taken in float32."""
    if (
        isinstance(a, NVFP4Tensor)
        and isinstance(b, NVFP4Tensor)
        and not a.transposed
        and (b.transposed or b.block == BLOCK_2D)
    ):
        b_rows = b.parts if b.transposed else transpose_2d_parts(b.parts)
        return nvfp4_gemm(a.parts, b_rows, out_dtype)
    return (_as_float(a) @ _as_float(b)).to(out_dtype)


def _result_dtype(*xs) -> torch.dtype:
    for x in xs:
        if not isinstance(x, NVFP4Tensor):
            return x.dtype
    return xs[0].dtype


@_implements(aten.mm.default)
def _mm(func, a, b):
    return _matmul(a, b, _result_dtype(a, b))


@_implements(aten.addmm.default)
def _addmm(func, bias, a, b, beta=1, alpha=1):
    dtype = _result_dtype(a, b)
    out = _matmul(a, b, torch.float32)
    out = alpha * out + beta * _as_float(bias)
    return out.to(dtype)


@_implements(aten.bmm.default)
def _bmm(func, a, b):
    return (_as_float(a) @ _as_float(b)).to(_result_dtype(a, b))


@_implements(aten.dequantize.self)
def _dequantize_op(func, t):
    return t.dequantize(torch.float32)
