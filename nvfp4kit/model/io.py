"""Loading and saving in the released HF layout: ``config.json`` plus sharded safetensors with a
``model.safetensors.index.json`` weight map. Names are the module names of the model.

Loading builds the model on the meta device, checks every tensor name and shape against the
checkpoint headers before reading any data, then reads tensors one at a time.
Saving writes into a temporary directory and renames it when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import NemotronConfig
from .lm import NemotronForCausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP32_TENSORS = ("e_score_correction_bias",)


class CheckpointError(ValueError):
    pass


def _shards(path: Path) -> dict[str, Path]:
    """tensor name -> shard file."""
    idx = path / INDEX_NAME
    if idx.exists():
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{idx}: not a safetensors index ({e})") from None
        out = {}
        for name, f in weight_map.items():
            fp = path / f
            if not fp.exists():
                raise CheckpointError(f"{idx}: tensor {name!r} is mapped to missing shard {f}")
            out[name] = fp
        return out
    single = path / SINGLE_NAME
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(f"{path}: neither {INDEX_NAME} nor {SINGLE_NAME} found")


def read_header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint directory (headers only)."""
    from safetensors import safe_open

    path = Path(path)
    by_file: dict[Path, list[str]] = {}
    for name, fp in _shards(path).items():
        by_file.setdefault(fp, []).append(name)
    shapes = {}
    for fp, names in by_file.items():
        with safe_open(str(fp), framework="pt") as f:
            keys = set(f.keys())
            for n in names:
                if n not in keys:
                    raise CheckpointError(f"{fp.name}: index maps tensor {n!r} to this shard, which lacks it")
                shapes[n] = tuple(f.get_slice(n).get_shape())
    return shapes


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


def load_weights(model: NemotronForCausalLM, path: str | os.PathLike, *, device="cpu", dtype=None) -> NemotronForCausalLM:
    """Read a checkpoint directory's tensors into ``model`` (which may live on the meta device)."""
    from safetensors import safe_open

    from .. import progress

    path = Path(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = read_header_shapes(path)
    check_names_and_shapes(expected, found, where=str(path))
    by_file: dict[Path, list[str]] = {}
    for name, fp in _shards(path).items():
        by_file.setdefault(fp, []).append(name)
    model_dtype = {k: v.dtype for k, v in model.state_dict().items()}
    with progress.task(f"loading {path.name}", total=len(found)) as task:
        for fp, names in sorted(by_file.items()):
            with safe_open(str(fp), framework="pt", device=str(device)) as f:
                for n in names:
                    t = f.get_tensor(n)
                    if n.endswith(FP32_TENSORS):
                        want = torch.float32
                    else:
                        want = dtype or (model_dtype[n] if model_dtype[n].is_floating_point else t.dtype)
                    _set_tensor(model, n, t.to(want))
                    task.advance(1)
    return model


def load_pretrained(path: str | os.PathLike, *, device="cpu", dtype=None) -> NemotronForCausalLM:
    """Model from a directory in the released layout (config.json + safetensors shards)."""
    path = Path(path)
    config = NemotronConfig.from_json(path / "config.json")
    with torch.device("meta"):
        model = NemotronForCausalLM(config, dtype=dtype)
    return load_weights(model, path, device=device, dtype=dtype)


def save_pretrained(model: NemotronForCausalLM, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2 ** 30,
                    dtype=None, overwrite: bool = False) -> Path:
    """Write config.json, ``model-0000i-of-0000n.safetensors`` shards and the index.
    The directory appears only when complete."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
    state = model.state_dict()
    for k, v in state.items():
        if v.device.type == "meta":
            raise CheckpointError(f"{k}: tensor is on the meta device (weights were never loaded)")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        if dtype is not None and v.is_floating_point() and not k.endswith(FP32_TENSORS):
            v = v.to(dtype)
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.detach().contiguous().cpu()
        size += nbytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        model.config.save_json(tmp / "config.json")
        weight_map = {}
        total = 0
        n = len(shards)
        for i, sh in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(sh, str(tmp / fname), metadata={"format": "pt"})
            for k, v in sh.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2, sort_keys=True) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
