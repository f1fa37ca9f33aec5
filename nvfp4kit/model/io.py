"""Loading and saving in the released HF layout: ``config.json`` plus safetensors (sharded with a
``model.safetensors.index.json`` weight map, or one ``model.safetensors``). Names are the module names
of the model.

Both directions go through the checkpoint package's machinery: :class:`~nvfp4kit.checkpoint.reader.CheckpointReader`
(headers checked before any data is read, one tensor at a time, errors naming the file and tensor) and
:class:`~nvfp4kit.checkpoint.writer.ShardedWriter` (sharded, written to a temporary folder and renamed
when complete). Errors are :class:`~nvfp4kit.checkpoint.CheckpointError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint.errors import CheckpointError
from ..checkpoint.reader import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, CheckpointReader
from ..checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from .config import NemotronConfig
from .lm import NemotronForCausalLM

# tensors kept in float32 whatever dtype the rest of the model is loaded or saved in
FP32_TENSORS = ("e_score_correction_bias",)

__all__ = ["CheckpointError", "FP32_TENSORS", "INDEX_NAME", "SINGLE_NAME", "check_names_and_shapes",
           "load_module_weights", "load_pretrained", "load_weights", "read_header_shapes", "save_pretrained"]


def read_header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint directory (headers only)."""
    with CheckpointReader(path) as reader:
        return {n: reader.shape(n) for n in reader.names()}


def check_names_and_shapes(expected: dict[str, tuple], found: dict[str, tuple], where: str = "checkpoint") -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped tensors by name."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if tuple(expected[n]) != tuple(found[n]))
    if not (missing or unexpected or wrong):
        return
    lines = []

    def show(title, names, fmt):
        if names:
            lines.append(f"{title} ({len(names)}): " + "; ".join(fmt(n) for n in names[:8])
                         + (" ..." if len(names) > 8 else ""))

    show("missing tensors", missing, lambda n: f"{n} {list(expected[n])}")
    show("unexpected tensors", unexpected, lambda n: f"{n} {list(found[n])}")
    show("shape mismatches", wrong, lambda n: f"{n}: model expects {list(expected[n])}, {where} has {list(found[n])}")
    raise CheckpointError(f"{where} does not match the model: " + " | ".join(lines))


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise CheckpointError(f"{name}: not a parameter or buffer of the model")


def _dtype_for(name: str, stored: torch.dtype, model_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if name.endswith(FP32_TENSORS):
        return torch.float32
    if not model_dtype.is_floating_point:
        return stored
    return dtype or model_dtype


def load_weights(model: NemotronForCausalLM, path: str | os.PathLike, *, device="cpu", dtype=None) -> NemotronForCausalLM:
    """Read a checkpoint directory's tensors into ``model`` (which may live on the meta device)."""
    from .. import progress

    path = Path(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model_dtype = {k: v.dtype for k, v in model.state_dict().items()}
    with CheckpointReader(path) as reader:
        found = {n: reader.shape(n) for n in reader.names()}
        check_names_and_shapes(expected, found, where=str(path))
        with progress.task(f"loading {path.name}", total=len(found)) as task:
            for n in reader.names():
                t = reader.get(n)
                _set_tensor(model, n, t.to(device=device, dtype=_dtype_for(n, t.dtype, model_dtype[n], dtype)))
                task.advance(1)
    return model


def load_module_weights(model: torch.nn.Module, prefix: str, reader: CheckpointReader, *, device="cpu",
                        dtype=None, skip=()) -> None:
    """Read the tensors of the submodule ``prefix`` of ``model`` (which may live on the meta device) from
    an open checkpoint; names and shapes are checked against the model first. ``skip``: state names
    not to read (tied duplicates)."""
    module = model.get_submodule(prefix) if prefix else model
    wanted = {f"{prefix}.{k}" if prefix else k: v for k, v in module.state_dict().items()}
    wanted = {k: v for k, v in wanted.items() if k not in set(skip)}
    found = {k: reader.shape(k) for k in wanted if k in reader}
    check_names_and_shapes({k: tuple(v.shape) for k, v in wanted.items()}, found, where=str(reader.dir))
    for n, ref in wanted.items():
        t = reader.get(n)
        _set_tensor(model, n, t.to(device=device, dtype=_dtype_for(n, t.dtype, ref.dtype, dtype)))


def load_pretrained(path: str | os.PathLike, *, device="cpu", dtype=None) -> NemotronForCausalLM:
    """Model from a directory in the released layout (config.json + safetensors shards)."""
    path = Path(path)
    config = NemotronConfig.from_json(path / CONFIG_NAME)
    with torch.device("meta"):
        model = NemotronForCausalLM(config, dtype=dtype)
    return load_weights(model, path, device=device, dtype=dtype)


def save_pretrained(model: NemotronForCausalLM, path: str | os.PathLike, *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype=None, overwrite: bool = False) -> Path:
    """Write ``config.json`` and the safetensors shards (``model-0000i-of-0000n.safetensors`` and the
    index, or one ``model.safetensors``). The directory appears only when complete; an existing
    non-empty one is refused unless ``overwrite``."""
    path = Path(path)
    state = model.state_dict()
    for k, v in state.items():
        if v.device.type == "meta":
            raise CheckpointError(f"{k}: tensor is on the meta device (weights were never loaded)")
    empty_dir = path.is_dir() and not any(path.iterdir())
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    with ShardedWriter(path, max_shard_bytes, overwrite or empty_dir) as w:
        for k, v in state.items():
            if dtype is not None and v.is_floating_point() and not k.endswith(FP32_TENSORS):
                v = v.to(dtype)
            w.add(k, v)
        w.write_json(CONFIG_NAME, model.config.to_dict())
    return w.out
