"""Training checkpoints: model, optimizer, RNG states and data position, written atomically.

Layout of ``DIR/checkpoints/step_00000100/``::

    model.safetensors       full (unsharded) model state, float32 master weights
    optimizer.safetensors   optimizer state tensors, named ``{parameter name}/{key}``
    rng.safetensors         torch RNG state of every data-parallel rank (``cpu.rank{r}``, ``cuda.rank{r}``)
    state.json              step, optimizer param groups, data position, run configuration, metrics so far

A checkpoint is written into a temporary sibling directory and renamed into place when complete;
``DIR/checkpoints/latest`` (itself replaced atomically) names the newest one. Tensors are read back
with safetensors only (no pickle). Under data parallelism every rank joins the state-dict collectives
and rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIRNAME = "checkpoints"
LATEST = "latest"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=_dist() is not None, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state on CPU; tensors tied to an earlier one (a shared embedding and head) are
    copied, as safetensors stores no shared memory."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options())
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def full_optimizer_state(model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=_options())
    tensors = {}
    if "state" not in sd:  # ranks other than 0 under cpu_offload receive nothing
        return {}, []
    for fqn, st in sd["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"{fqn}/{key}"] = t.detach().cpu().contiguous()
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, groups


def gather_rng_states() -> dict[str, torch.Tensor]:
    """This process's RNG states, gathered from every rank under data parallelism."""
    dist = _dist()
    cpu = torch.get_rng_state()
    states = {}
    if dist is None:
        states["cpu.rank0"] = cpu
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda.rank0"] = torch.cuda.get_rng_state()
        return states
    world = dist.get_world_size()
    gathered = [torch.empty_like(cpu) for _ in range(world)]
    dist.all_gather(gathered, cpu)  # gloo: CPU tensors
    for r, s in enumerate(gathered):
        states[f"cpu.rank{r}"] = s
    return states


def restore_rng_states(states: dict[str, torch.Tensor]) -> bool:
    """Set this rank's RNG state from a checkpoint; False if the checkpoint has none for this rank."""
    dist = _dist()
    rank = dist.get_rank() if dist is not None else 0
    key = f"cpu.rank{rank}"
    if key not in states:
        return False
    torch.set_rng_state(states[key])
    if f"cuda.rank{rank}" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[f"cuda.rank{rank}"])
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_root(out_dir) -> Path:
    return Path(out_dir) / CHECKPOINT_DIRNAME


def save_checkpoint(out_dir, step: int, model, optimizer, state: dict, keep: int = 2) -> Path | None:
    """Write the checkpoint of ``step`` (collective under data parallelism; rank 0 writes).

    Returns the checkpoint directory on rank 0, None elsewhere."""
    dist = _dist()
    model_sd = full_model_state(model)
    opt_tensors, groups = full_optimizer_state(model, optimizer)
    rng = gather_rng_states()
    rank = dist.get_rank() if dist is not None else 0
    final = None
    if rank == 0:
        root = checkpoint_root(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:08d}"
        final = root / name
        tmp = root / f".{name}.tmp{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(model_sd, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = dict(state, step=step, param_groups=groups)
        _write_json(tmp / "state.json", meta)
        _fsync_dir(tmp)
        if final.exists():
            old = root / f".{name}.old{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        (root / LATEST).parent.mkdir(exist_ok=True)
        tmp_latest = root / f".{LATEST}.tmp{os.getpid()}"
        tmp_latest.write_text(name + "\n")
        os.replace(tmp_latest, root / LATEST)
        if keep > 0:
            done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
            for p in done[:-keep]:
                shutil.rmtree(p, ignore_errors=True)
    if dist is not None:
        dist.barrier()
    return final


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint under ``out_dir`` (None if there is none)."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if (p / "state.json").is_file():
            return p
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def read_state(path) -> dict:
    """The ``state.json`` of a checkpoint directory (step, data position, run configuration)."""
    return json.loads((Path(path) / "state.json").read_text())


def load_checkpoint(path, model, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load model and optimizer state from ``path`` (every rank); returns (state.json, rng states)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"checkpoint {path}: missing {f} (an incomplete or foreign directory)")
    state = read_state(path)
    model_sd = load_file(str(path / "model.safetensors"))
    own = {k for k in full_model_state_keys(model)}
    missing, unexpected = own - set(model_sd), set(model_sd) - own
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path}: model tensors do not match this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); same --preset?"
        )
    set_model_state_dict(model, model_sd, options=_options(strict=True))
    flat = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[str, dict] = {}
    for key, t in flat.items():
        fqn, k = key.rsplit("/", 1)
        opt_state.setdefault(fqn, {})[k] = t
    groups = []
    for g in state["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    set_optimizer_state_dict(model, optimizer, {"state": opt_state, "param_groups": groups}, options=_options())
    rng = load_file(str(path / "rng.safetensors"))
    return state, rng


def full_model_state_keys(model) -> list[str]:
    """The model's state-dict names, the same on every rank. (Sharded, not gathered: a full state
    dict with CPU offload reaches rank 0 only, so other ranks would see no names at all.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return list(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)).keys())
