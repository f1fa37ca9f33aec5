"""Temporary files and folders owned by a process, and the removal of those a dead process left behind.

Every temporary path nvfp4kit makes (the ``.OUT.partial-*`` folder a checkpoint is written into, the
``.step_*.tmp-*`` folder of a training checkpoint, the ``nvfp4kit-src-*`` staging folder under the system
temporary folder, spilled activations, ``.NAME.tmp-*`` files replaced atomically) carries its owner in its
name: ``pid<PID>-<HOST>``, HOST being 8 hex digits of a hash of the host name. A process killed with
``kill -9`` cannot remove them; the next run removes, at its start, those whose owner ran on this host and
is no longer running (:func:`remove_stale`). Paths of a live process, of another host (a shared file
system) or without an owner tag (a resumable staging folder such as ``.OUT.partial``) are never touched.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from . import progress

# the owner tag inside a name, delimited by the start or end of the name, a dot or a dash
_TAG = re.compile(r"(?:^|[.-])pid(\d+)-([0-9a-f]{8})(?=$|[.-])")
# the prefix of nvfp4kit's folders under the system temporary folder
SYSTEM_PREFIX = "nvfp4kit-"


def host_id() -> str:
    """8 hex digits naming this host (a hash of its host name)."""
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def owner_tag(pid: int | None = None) -> str:
    """``pid<PID>-<HOST>`` of this process (or of ``pid`` on this host)."""
    return f"pid{os.getpid() if pid is None else int(pid)}-{host_id()}"


def owned(prefix: str, suffix: str = "") -> str:
    """A file or folder name carrying this process's owner tag: ``PREFIX pid<PID>-<HOST> SUFFIX``."""
    return f"{prefix}{owner_tag()}{suffix}"


def make_dir(prefix: str, parent=None) -> Path:
    """A new empty folder ``PREFIX pid<PID>-<HOST>-<random>`` in ``parent`` (the system temporary folder
    when None)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-", dir=None if parent is None else str(parent)))


def umask() -> int:
    """The process's file-mode creation mask (read from ``/proc`` where the system has it, so no other
    thread ever runs under a changed mask; else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(path) -> None:
    """Give a folder made by :func:`make_dir` / ``mkdtemp`` (mode 0700) or a file made by ``mkstemp`` or
    safetensors' ``save_file`` (0600) the mode a plain ``mkdir`` / ``open`` gives under the user's umask
    (0755 / 0644 for the usual 022), as other tools leave their outputs; called on an output before it is
    renamed into place."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())


def system_temp_dir(kind: str) -> Path:
    """A new folder ``nvfp4kit-KIND-pid<PID>-<HOST>-<random>`` under the system temporary folder, after
    removing the stale ones of every kind there."""
    remove_stale(tempfile.gettempdir(), f"{SYSTEM_PREFIX}*")
    return make_dir(f"{SYSTEM_PREFIX}{kind}-")


def owner(name: str) -> tuple[int, str] | None:
    """The (PID, HOST) a name's owner tag gives, None when it has none."""
    m = _TAG.search(name)
    return (int(m.group(1)), m.group(2)) if m else None


def process_running(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (True when that cannot be told)."""
    if pid == os.getpid():
        return True
    if pid <= 0 or os.name == "nt":  # on Windows os.kill would end the process: never guess there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def is_stale(name: str) -> bool:
    """Whether ``name`` carries the owner tag of a process of this host that no longer runs."""
    o = owner(name)
    return o is not None and o[1] == host_id() and not process_running(o[0])


def remove_stale(folder, pattern: str = "*") -> list[Path]:
    """Remove the entries of ``folder`` matching the fnmatch ``pattern`` whose owner is a dead process of
    this host (see the module docs); reports each one through :mod:`nvfp4kit.progress`, returns them."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:  # no such folder, or not readable: nothing of ours to remove
        return []
    removed = []
    for p in sorted(entries):
        if not fnmatch.fnmatchcase(p.name, pattern) or not is_stale(p.name):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as e:
            progress.log(f"warning: could not remove {p}, left by process {owner(p.name)[0]} which is no longer "
                         f"running: {e}")
            continue
        progress.log(f"removed {p}, left by process {owner(p.name)[0]} which is no longer running")
        removed.append(p)
    return removed


__all__ = ["host_id", "is_stale", "make_dir", "owned", "owner", "owner_tag", "process_running", "publish",
           "remove_stale", "system_temp_dir", "umask"]
