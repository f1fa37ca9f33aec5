"""NVFP4Tensors in a safetensors file: each tensor's three parts plus its logical dtype, block and
transpose flag in the file metadata. Written atomically (temporary file renamed into place), read
with safetensors only (never pickle)."""

from __future__ import annotations

import json
import os
import tempfile

import torch

from .. import scratch
from ..formats.nvfp4 import check_parts
from ..formats.tensor import NVFP4Tensor
from .errors import CheckpointError

_PART_NAMES = ("packed", "block_scale", "global_decode_scale")
_META_KEY = "nvfp4kit.nvfp4_tensors"


def to_safetensors_dict(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten a name -> tensor dict (NVFP4Tensor or plain) into plain tensors plus metadata."""
    flat: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    for name, t in tensors.items():
        if isinstance(t, NVFP4Tensor):
            for part in _PART_NAMES:
                flat[f"{name}.{part}"] = getattr(t, part).contiguous()
            info[name] = {"dtype": str(t.dtype).removeprefix("torch."), "block": list(t.block), "transposed": t.transposed}
        else:
            flat[name] = t.contiguous()
    return flat, {_META_KEY: json.dumps(info)}


def _tensor_from_parts(name: str, meta, parts: list[torch.Tensor], where: str) -> NVFP4Tensor:
    """One NVFP4Tensor from its stored parts and layout, each checked (:func:`~nvfp4kit.formats.nvfp4.check_parts`)."""
    what = f"NVFP4 tensor {name!r} in {where}"
    if not isinstance(meta, dict) or not {"dtype", "block", "transposed"} <= set(meta):
        raise CheckpointError(f"{what}: its layout metadata must give dtype, block and transposed, got {meta!r}")
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{what}: dtype {meta['dtype']!r} is not a floating torch dtype")
    block = meta["block"]
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise CheckpointError(f"{what}: block must be [1, 16] or [16, 16], got {block!r}")
    if not isinstance(meta["transposed"], bool) or (meta["transposed"] and parts[0].ndim != 2):
        raise CheckpointError(f"{what}: transposed must be true (2-dim tensors only) or false, got "
                              f"{meta['transposed']!r} for packed shape {tuple(parts[0].shape)}")
    try:
        check_parts(*parts, tuple(block), what)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    return NVFP4Tensor(*parts, dtype=dtype, block=tuple(block), transposed=meta["transposed"])


def from_safetensors_dict(flat: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                          where: str = "the file") -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_safetensors_dict`; ``where`` names the source in errors."""
    try:
        info = json.loads((metadata or {}).get(_META_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: the {_META_KEY!r} metadata is not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: the {_META_KEY!r} metadata must map tensor names to their layout")
    out: dict[str, torch.Tensor] = {}
    for name, meta in info.items():
        missing = [p for p in _PART_NAMES if f"{name}.{p}" not in flat]
        if missing:
            raise CheckpointError(f"NVFP4 tensor {name!r}: parts {missing} are missing from {where}")
        out[name] = _tensor_from_parts(name, meta, [flat[f"{name}.{p}"] for p in _PART_NAMES], where)
    taken = {f"{n}.{p}" for n in info for p in _PART_NAMES}
    out.update({k: v for k, v in flat.items() if k not in taken})
    return out


def save_nvfp4(tensors: dict[str, torch.Tensor], path) -> None:
    """Save NVFP4Tensors (and plain tensors) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    flat, metadata = to_safetensors_dict(tensors)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=metadata)
        scratch.publish(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_nvfp4(path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a file written by :func:`save_nvfp4` (safetensors, never pickle)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata()
        flat = {k: f.get_tensor(k) for k in f.keys()}
    return from_safetensors_dict(flat, metadata, str(path))

