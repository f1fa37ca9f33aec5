"""The one dispatch point between the reference numerics (``formats/``) and their fast twins.

Backends:

* ``"torch"``: the plain reference in ``nvfp4kit.formats.nvfp4`` (any device; the ground truth).
* ``"compiled"``: the same math as one fused C kernel for CPUs, built once per machine with the
  system compiler (``kernels/cpu.py``).
* ``"triton"``: Triton kernels for CUDA GPUs (``kernels/triton_nvfp4.py``).
* ``"auto"``: Triton on CUDA when it imports; the compiled path on CPU when it builds; the
  reference otherwise. Every fast path is tested bit for bit against the reference.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Literal

import torch

from ..formats.nvfp4 import Block, NVFP4Parts, dequantize_parts
from ..formats.nvfp4 import quantize_parts as reference_quantize_parts

Backend = Literal["auto", "torch", "compiled", "triton"]
BACKENDS = ("auto", "torch", "compiled", "triton")
# The compiled CPU path was measured faster than the reference at every size down to one block.
COMPILED_MIN_NUMEL = 0

_MODULES = {"compiled": "nvfp4kit.kernels.cpu", "triton": "nvfp4kit.kernels.triton_nvfp4"}


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


def _backend_module(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:  # the module or its dependency (triton) is missing
        raise BackendUnavailable(f"backend {name!r} is unavailable: {e}") from e


def backend_available(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether ``name`` can quantize tensors on ``device``, and why not."""
    if name == "torch":
        return True, ""
    if name not in _MODULES:
        return False, f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
    try:
        mod = _backend_module(name)
    except BackendUnavailable as e:
        return False, str(e)
    return mod.available(torch.device(device))


def resolve_backend(backend: str, x: torch.Tensor, rounding: str = "nearest") -> str:
    """The concrete backend that ``backend`` means for this input."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        ok, why = backend_available(backend, x.device)
        if not ok:
            raise BackendUnavailable(why)
        return backend
    if x.device.type == "cuda" and backend_available("triton", x.device)[0]:
        return "triton"
    if x.device.type == "cpu" and x.numel() >= COMPILED_MIN_NUMEL and backend_available("compiled", x.device)[0]:
        return "compiled"
    return "torch"


def quantize_parts(
    x: torch.Tensor,
    block: Block = (1, 16),
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    global_amax=None,
    scale_rule: str = "max",
    backend: Backend = "auto",
    name: str = "input",
) -> NVFP4Parts:
    """Quantize with the chosen backend; all backends return identical parts for ``rounding="nearest"``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    chosen = resolve_backend(backend, x, rounding)
    if chosen == "torch":
        return reference_quantize_parts(x, tuple(block), rounding, generator, global_amax, scale_rule, name)
    mod = _backend_module(chosen)
    return mod.quantize_parts(
        x, block=tuple(block), rounding=rounding, generator=generator, global_amax=global_amax,
        scale_rule=scale_rule, name=name,
    )


def quantize_values(
    x: torch.Tensor,
    block: Block = (1, 16),
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    global_amax=None,
    scale_rule: str = "max",
    backend: Backend = "auto",
    name: str = "input",
) -> tuple[NVFP4Parts, torch.Tensor]:
    """:func:`quantize_parts` and the parts' float32 block values (``formats.nvfp4.block_values``: E2M1
    value times E4M3 block scale, no global scale; exact), in one kernel call on the compiled CPU
    backend; the same numbers from every backend."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    chosen = resolve_backend(backend, x, rounding)
    if chosen == "compiled":
        return _backend_module("compiled").quantize_values(
            x, block=tuple(block), rounding=rounding, generator=generator, global_amax=global_amax,
            scale_rule=scale_rule, name=name,
        )
    from ..formats.nvfp4 import block_values as reference_block_values

    parts = quantize_parts(x, block, rounding, generator, global_amax, scale_rule, chosen, name)
    return parts, reference_block_values(parts)


def mxfp8_fake_quantize(x: torch.Tensor, backend: Backend = "auto", name: str = "input") -> torch.Tensor:
    """MXFP8 (E4M3, the ``rceil`` scale rule) quantize-dequantize of ``x`` as float32: the numbers of
    ``formats.mx.mx_dequantize(mx_quantize(x, "e4m3"))``, in one pass of the compiled CPU kernel
    where it runs (``"compiled"``, or ``"auto"`` on CPU), the reference elsewhere."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("compiled", "auto") and x.device.type == "cpu" and backend_available("compiled", "cpu")[0]:
        return _backend_module("compiled").mxfp8_fake_quantize(x, name=name)
    if backend == "compiled":
        raise BackendUnavailable(backend_available("compiled", x.device)[1])
    from ..formats.mx import mx_dequantize, mx_quantize

    return mx_dequantize(mx_quantize(x, "e4m3", name=name))


def transpose_padded(t: torch.Tensor, multiple: int, backend: Backend = "auto") -> torch.Tensor:
    """``t [T, C]`` as a contiguous float32 ``t^T [C, T_pad]``, zero past T (T rounded up to ``multiple``):
    the columnwise operand of a wgrad GEMM, copied once (by the compiled kernel on CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("compiled", "auto") and t.device.type == "cpu" and backend_available("compiled", "cpu")[0]:
        out = _backend_module("compiled").transpose_padded(t, multiple)
        if out is not None:
            return out
    T, C = t.shape
    out = torch.empty((C, T + (-T % multiple)), dtype=torch.float32, device=t.device)
    out[:, T:].zero_()
    out[:, :T].copy_(t.t())
    return out


def search_kernel(x: torch.Tensor, backend: Backend = "auto"):
    """The compiled CPU module (``kernels.cpu``: ``mse_encode``, ``gptq_lazy_block``) for the mse
    scale search and GPTQ's per-column loop on ``x``, or None where the torch reference runs them
    (``backend="torch"``, other devices or dtypes, no compiler). Both give identical bits;
    ``backend="compiled"`` raises when it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("torch", "triton"):
        return None
    mod = _backend_module("compiled")
    if mod.search_available(x):
        return mod
    if backend == "compiled":
        raise BackendUnavailable(f"the compiled scale search runs float32 CPU tensors only, not {x.dtype} on {x.device}")
    return None


def fake_quantize(
    x: torch.Tensor,
    global_amax=None,
    block: Block = (1, 16),
    scale_rule: str = "max",
    backend: Backend = "auto",
    name: str = "input",
) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``x`` (round to nearest, no autograd), in ``x``'s dtype: the values
    ``nvfp4kit.quantize(x, ...).dequantize()`` represents, through the chosen backend."""
    parts = quantize_parts(x.detach(), tuple(block), "nearest", None, global_amax, scale_rule, backend, name)
    return dequantize_parts(parts.packed, parts.block_scale, parts.global_decode_scale, x.dtype)


# ----------------------------------------------------------------------------- the training recipe's fused path
#
# The NVFP4 training Linear (``NVFP4FusedLinear`` in ``nvfp4kit.training.qlinear``) calls these on CUDA: the fused Triton kernels
# (rowwise + columnwise in one launch, RHT fused with the quantize, device-side amax, NaN/inf checks deferred
# to one per step) and an exact GEMM over decoded block values. ``"torch"`` runs the same operations with the
# reference of ``formats/`` (the butterfly RHT, ``quantize_parts``): bit-identical for round-to-nearest.

FUSED_BACKENDS = ("torch", "triton")
_FORCED_FUSED: list[str] = []


@contextlib.contextmanager
def force_fused(backend: str = "triton"):
    """Inside this block the NVFP4 training Linear takes its fused path on every device, with ``backend``
    (``"triton"``: the kernels, under the Triton interpreter on CPU tensors; ``"torch"``: their reference).
    For tests and the dry run of ``bench/gpu_check.sh``; on CUDA the fused path is the default."""
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"force_fused: backend must be one of {', '.join(FUSED_BACKENDS)}, got {backend!r}")
    if backend == "triton":
        ok, why = backend_available("triton", "cpu")
        if not ok and not torch.cuda.is_available():
            raise BackendUnavailable(why)
    _FORCED_FUSED.append(backend)
    try:
        yield
    finally:
        _FORCED_FUSED.pop()


def fused_backend(device: torch.device | str) -> str | None:
    """The backend of the training recipe's fused path for tensors on ``device``: the forced one inside
    :func:`force_fused`; ``"triton"`` on CUDA when it imports; None elsewhere (the per-operation path, whose
    CPU numerics the compiled kernels keep)."""
    if _FORCED_FUSED:
        return _FORCED_FUSED[-1]
    device = torch.device(device)
    if device.type == "cuda" and backend_available("triton", device)[0]:
        return "triton"
    return None


def _fused_module(backend: str, x: torch.Tensor):
    """The Triton module for ``backend="triton"`` (raising where it cannot run on ``x``), None for the reference."""
    if backend == "torch":
        return None
    if backend == "auto":
        return _backend_module("triton") if x.device.type == "cuda" and backend_available("triton", x.device)[0] else None
    if backend != "triton":
        raise ValueError(f"backend must be one of auto, {', '.join(FUSED_BACKENDS)}, got {backend!r}")
    ok, why = backend_available("triton", x.device)
    if not ok:
        raise BackendUnavailable(why)
    return _backend_module("triton")


_NONFINITE: dict[torch.device, torch.Tensor] = {}


def nonfinite_counter(device: torch.device | str) -> torch.Tensor:
    """The int32 device counter the fused path adds NaN/inf counts to (no host sync per Linear)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _NONFINITE:
        _NONFINITE[device] = torch.zeros((), dtype=torch.int32, device=device)
    return _NONFINITE[device]


def raise_if_nonfinite() -> None:
    """Raise a ValueError if an operand of the fused path held NaN or inf since the last call (one host sync
    per device; the training loop calls it once per step); the counters restart at zero."""
    bad = {dev: int(count) for dev, count in _NONFINITE.items()}
    bad = {dev: n for dev, n in bad.items() if n}
    for dev in bad:
        _NONFINITE[dev].zero_()
    if bad:
        where = ", ".join(f"{n} on {dev}" for dev, n in bad.items())
        raise ValueError(
            f"an NVFP4 Linear operand (activation, weight or gradient) contained NaN or inf values ({where}), "
            "which NVFP4 cannot encode; lower the learning rate or check the inputs")


def fused_quantize(x: torch.Tensor, block: Block = (1, 16), rounding: str = "nearest", global_amax=None,
                   scale_rule: str = "max", backend: str = "auto", name: str = "input",
                   nonfinite: torch.Tensor | None = None) -> NVFP4Parts:
    """:func:`quantize_parts` with the NaN/inf check deferred to ``nonfinite`` on the Triton backend."""
    mod = _fused_module(backend, x)
    if mod is None:
        return reference_quantize_parts(x, tuple(block), rounding, None, global_amax, scale_rule, name)
    return mod.quantize_parts(x, block=tuple(block), rounding=rounding, global_amax=global_amax,
                              scale_rule=scale_rule, name=name, nonfinite=nonfinite)


def quantize_rowwise_columnwise(x: torch.Tensor, rounding: str = "nearest", global_amax=None,
                                columnwise_rht: bool = False, rht_sign=None, columnwise_global_amax=None,
                                backend: str = "auto", name: str = "input",
                                nonfinite: torch.Tensor | None = None) -> tuple[NVFP4Parts, NVFP4Parts]:
    """1x16 parts of ``x2 = x.reshape(-1, K)`` and of ``x2^T`` (optionally ``rht_butterfly(x2^T)``, amax after
    the transform), from one launch on Triton. Rows must be a multiple of 16."""
    mod = _fused_module(backend, x)
    if mod is not None:
        return mod.quantize_rowwise_columnwise(
            x, rounding=rounding, global_amax=global_amax, columnwise_rht=columnwise_rht, rht_sign=rht_sign,
            columnwise_global_amax=columnwise_global_amax, name=name, nonfinite=nonfinite)
    from ..formats.hadamard import rht_butterfly

    x2 = x.reshape(-1, x.shape[-1]) if x.ndim else x
    if x2.ndim == 2 and x2.shape[0] % 16:
        raise ValueError(f"{name}: the columnwise (transposed) operand blocks run along the {x2.shape[0]} rows of "
                         f"shape {tuple(x.shape)}; that count must be a multiple of 16 (pad the tokens)")
    rw = reference_quantize_parts(x, (1, 16), rounding, None, global_amax, "max", name)
    if columnwise_rht:
        cw = reference_quantize_parts(rht_butterfly(x2.t(), rht_sign), (1, 16), rounding, None,
                                      columnwise_global_amax, "max", name)
    else:
        cw = reference_quantize_parts(x2.t(), (1, 16), rounding, None, global_amax, "max", name)
    return rw, cw


def rht_quantize(x: torch.Tensor, rounding: str = "nearest", global_amax=None, rht_sign=None,
                 backend: str = "auto", name: str = "input", nonfinite: torch.Tensor | None = None) -> NVFP4Parts:
    """1x16 parts of ``rht_butterfly(x)`` (16-point RHT along the last dim, amax after it), fused on Triton."""
    mod = _fused_module(backend, x)
    if mod is not None:
        return mod.rht_quantize(x, rounding=rounding, global_amax=global_amax, rht_sign=rht_sign, name=name,
                                nonfinite=nonfinite)
    from ..formats.hadamard import rht_butterfly

    return reference_quantize_parts(rht_butterfly(x, rht_sign), (1, 16), rounding, None, global_amax, "max", name)


def global_amax(x: torch.Tensor, rht: bool = False, rht_sign=None, backend: str = "auto", name: str = "input",
                nonfinite: torch.Tensor | None = None) -> torch.Tensor:
    """max |x| (or max |rht_butterfly(x)|) as a float32 0-dim device tensor."""
    mod = _fused_module(backend, x)
    if mod is not None:
        return mod.global_amax(x, rht=rht, rht_sign=rht_sign, name=name, nonfinite=nonfinite)
    from ..formats.hadamard import rht_butterfly
    from ..formats.scales import tensor_amax

    return tensor_amax(rht_butterfly(x, rht_sign) if rht else x)


_ONES: dict[torch.device, torch.Tensor] = {}


def block_values(parts: NVFP4Parts, dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """E2M1 value times E4M3 block scale per element, no global scale: at most 6 significant bits and
    within [2^-10, 2688], so exact in bfloat16 (and float32)."""
    mod = _fused_module(backend, parts.packed)
    if mod is None:
        from ..formats.nvfp4 import block_values as reference_block_values

        return reference_block_values(parts).to(dtype)
    dev = parts.packed.device
    if dev not in _ONES:
        _ONES[dev] = torch.ones((), dtype=torch.float32, device=dev)
    return mod.dequantize(NVFP4Parts(parts.packed, parts.block_scale, _ONES[dev], parts.block), dtype)


def values_gemm(a_values: torch.Tensor, b_values: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``(a [M, K] @ b [N, K]^T) * alpha`` in float32 over exact block values (:func:`block_values`).

    On CUDA, bf16 operands go through cuBLAS with float32 accumulation and a float32 output
    (``torch.mm(..., out_dtype=float32)``): every product is exact, as in ``formats.gemm``, and the sums
    differ from it only by float32 reassociation. Elsewhere (or without that op) the same values are
    multiplied in float32. The global scales ``alpha`` are applied once, to the output."""
    if a_values.is_cuda and a_values.dtype == torch.bfloat16 == b_values.dtype:
        try:
            out = torch.mm(a_values, b_values.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm(out_dtype=)
            out = torch.mm(a_values.float(), b_values.float().t())
    else:
        out = torch.mm(a_values.float(), b_values.float().t())
    return out.mul_(alpha)
