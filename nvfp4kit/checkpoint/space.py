"""Can an output be written at all: a writable location with room for it, checked before any work.

Every writer (``quantize`` in memory and block by block, ``convert``, ``qat``, the streaming quantizer)
asks these two questions here, before it loads a model or calibrates, so a read-only or full output
location is one clear error naming the path and the sizes, never a ``PermissionError`` /
``No space left on device`` traceback at the end of a long run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError


def format_bytes(n: float) -> str:
    """``n`` bytes for messages: ``3.2 GiB``, ``41.0 MiB``, ``512 B``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def existing_ancestor(path) -> Path:
    """The nearest existing folder above ``path``: where it, or its first missing parent, is created."""
    p = Path(path).expanduser().absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(out, option: str = "--out") -> Path:
    """Refuse an output this process cannot create (read-only folder or file system, a file where a
    folder should be): a file is created and removed where the output, or its first missing parent,
    would go. Returns that folder."""
    out = Path(out).expanduser().absolute()
    base = existing_ancestor(out)
    if not base.is_dir():
        raise CheckpointError(f"{option} {str(out)!r}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nvfp4kit-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"{option} {str(out)!r}: cannot write in {base} ({e.strerror or e}); choose another "
                              "location or make it writable (nothing was written)") from None
    return base


def check_free_space(out, need_bytes: int, what: str = "the checkpoint", option: str = "--out") -> None:
    """Refuse an output whose file system has less free space than ``need_bytes`` (the estimated
    size of ``what``)."""
    out = Path(out).expanduser().absolute()
    base = existing_ancestor(out)
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise CheckpointError(f"{option} {str(out)!r}: {format_bytes(free)} free on the file system of {base}, but "
                              f"{what} needs about {format_bytes(need_bytes)}; free some space or choose another "
                              f"{option} (nothing was written)")


def write_error(out, e: OSError, note: str = "the partial output was removed") -> CheckpointError:
    """A write that failed anyway (the disk filled up during the run, permissions changed): the path and
    the cause, as the one error type of the package."""
    return CheckpointError(f"writing {out} failed: {e.strerror or e} ({getattr(e, 'filename', None) or out}); "
                           f"{note}")


__all__ = ["check_free_space", "check_writable", "existing_ancestor", "format_bytes", "write_error"]
