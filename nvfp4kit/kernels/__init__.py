"""Fast paths of the format core's math, selected through :mod:`nvfp4kit.kernels.dispatch`."""

from .dispatch import BACKENDS, BackendUnavailable, backend_available, fake_quantize, quantize_parts, resolve_backend

__all__ = ["BACKENDS", "BackendUnavailable", "backend_available", "fake_quantize", "quantize_parts", "resolve_backend"]
