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
