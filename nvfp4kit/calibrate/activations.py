"""The calibration activations between blocks: one tensor per calibration batch, kept on the compute
device (or in CPU memory) up to a byte budget and spilled to disk beyond it.

Block-by-block calibration holds the inputs of the block being calibrated and writes the outputs
that feed the next one, so two stores live at a time; each spills on its own. A spilled tensor is a
safetensors file of its own in the spill folder, read back (to the compute device) when it is used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .. import scratch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ActivationStore:
    """An append-only list of tensors, in memory up to ``budget_bytes`` (None: no limit), on disk after.

    ``device``: where tensors are kept in memory and returned (None: as given). ``spill_dir``: where
    spilled tensors go (a temporary folder, removed by :meth:`close`, when None).
    """

    def __init__(self, budget_bytes: int | None = None, spill_dir: str | os.PathLike | None = None,
                 device: torch.device | str | None = None, name: str = "activations"):
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"activation memory budget must be >= 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self.device = None if device is None else torch.device(device)
        self.name = name
        self._spill_root = None if spill_dir is None else Path(spill_dir)
        self._spill_dir: Path | None = None
        self._items: list[torch.Tensor | Path] = []
        self.memory_bytes = 0
        self.disk_bytes = 0

    def _dir(self) -> Path:
        if self._spill_dir is None:
            if self._spill_root is not None:
                self._spill_root.mkdir(parents=True, exist_ok=True)
                self._spill_dir = scratch.make_dir(f"{self.name}-", self._spill_root)
            else:
                self._spill_dir = scratch.system_temp_dir(self.name)
        return self._spill_dir

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        n = _nbytes(t)
        if self.budget is None or self.memory_bytes + n <= self.budget:
            self._items.append(t if self.device is None else t.to(self.device))
            self.memory_bytes += n
            return
        from safetensors.torch import save_file

        path = self._dir() / f"{len(self._items):06d}.safetensors"
        save_file({"t": t.contiguous().cpu()}, str(path))
        self._items.append(path)
        self.disk_bytes += n

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if isinstance(item, torch.Tensor):
            return item
        from safetensors.torch import load_file

        t = load_file(str(item))["t"]
        return t if self.device is None else t.to(self.device)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def spilled(self) -> int:
        """How many of the tensors live on disk."""
        return sum(1 for x in self._items if not isinstance(x, torch.Tensor))

    def save(self, path: str | os.PathLike) -> None:
        """Write every tensor to one safetensors file (for resuming), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(scratch.owned(f".{path.name}.tmp-"))
        save_file({f"{i:06d}": self[i].contiguous().cpu() for i in range(len(self))}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, **kw) -> "ActivationStore":
        """The tensors :meth:`save` wrote, into a new store (the budget applies as they are appended)."""
        from safetensors import safe_open

        store = cls(**kw)
        with safe_open(str(path), framework="pt") as f:
            for k in sorted(f.keys()):
                store.append(f.get_tensor(k))
        return store

    def close(self) -> None:
        """Free the memory and remove the spilled files."""
        self._items.clear()
        self.memory_bytes = self.disk_bytes = 0
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ActivationStore"]
