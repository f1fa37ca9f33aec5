"""Which device a job runs on: ``--device auto|cpu|cuda|cuda:N`` resolved once, with a clear error
where the machine cannot honour it; how much memory that device has free; and handing freed memory
back to the system between the parts of a long job."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto``: the first CUDA device when torch has one, else the CPU. ``cuda`` / ``cuda:N`` must
    exist; anything else is refused with the choices."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
            raise ValueError(f"--device {spec}: this torch ({torch.__version__}) has no usable CUDA device ({build}); "
                             "use --device cpu (or auto)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise ValueError(f"--device must be one of {DEVICE_CHOICES}, got {spec!r}")


def resolve_dtype(spec: str | None, device: torch.device, source: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype: ``auto`` is float32 on the CPU (exact, as the CPU path always computed) and the
    checkpoint's own dtype (bf16 / fp16) on a GPU; else ``float32``, ``bfloat16`` or ``float16``."""
    spec = (spec or "auto").strip().lower()
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if spec == "auto":
        return torch.float32 if device.type == "cpu" or source is None else source
    if spec not in names:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {spec!r}")
    return names[spec]


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (host memory for the CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


__all__ = ["DEVICE_CHOICES", "available_memory", "resolve_device", "resolve_dtype"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_memory(device: torch.device | str = "cpu") -> None:
    """Return memory freed by the job to the system: on CUDA the caching allocator's unused blocks; on
    the CPU the free pages of the C heap (glibc keeps them otherwise, and a block-by-block run's
    resident memory would creep up block after block although nothing is kept)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
