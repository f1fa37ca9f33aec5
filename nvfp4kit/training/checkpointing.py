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

Resuming takes the newest *complete* checkpoint (:func:`latest_checkpoint`): one whose files are missing,
cut short or unreadable is skipped with a warning naming the file, and none complete is an error. A new run
(no resume) never starts where an earlier one left its files unless told to remove them
(:func:`prepare_run_dir`), so two runs are never mixed; what a killed run left (temporary folders and
files of a dead process) is removed at the start of the next (:mod:`nvfp4kit.scratch`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import progress, scratch

CHECKPOINT_DIRNAME = "checkpoints"
LATEST = "latest"
STEP_PREFIX = "step_"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
# what a run writes in its folder (the training loop and the train pipeline): removed together by
# prepare_run_dir(overwrite=True), nothing else in the folder is touched
RUN_FILES = (CHECKPOINT_DIRNAME, "metrics.csv", "metrics.json", "loss.png", "run.json")


class TrainingCheckpointError(ValueError):
    """A training checkpoint is incomplete or unreadable: the message names the file."""


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
    tmp = path.with_name(scratch.owned(f".{path.name}.tmp-"))
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
        name = f"{STEP_PREFIX}{step:08d}"
        final = root / name
        tmp = root / scratch.owned(f".{name}.tmp-")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(model_sd, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
            scratch.publish(tmp / f)  # safetensors writes 0600: the user's umask instead
        meta = dict(state, step=step, param_groups=groups)
        _write_json(tmp / "state.json", meta)
        _fsync_dir(tmp)
        if final.exists():
            old = root / scratch.owned(f".{name}.old-")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        (root / LATEST).parent.mkdir(exist_ok=True)
        tmp_latest = root / scratch.owned(f".{LATEST}.tmp-")
        tmp_latest.write_text(name + "\n")
        os.replace(tmp_latest, root / LATEST)
        prune_checkpoints(root, step, keep)
    if dist is not None:
        dist.barrier()
    return final


def _step_of(path: Path) -> int | None:
    digits = path.name[len(STEP_PREFIX):]
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def _step_dirs(root: Path) -> list[Path]:
    """The ``step_*`` folders of ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def prune_checkpoints(root, step: int, keep: int) -> None:
    """After writing the checkpoint of ``step``: keep it and the ``keep - 1`` newest before it; remove the
    older ones and any of a later step (left by the run's own history before it resumed from an earlier
    checkpoint: ``step`` supersedes them). ``keep <= 0`` keeps every one."""
    if keep <= 0:
        return
    dirs = _step_dirs(Path(root))
    before = [p for p in dirs if _step_of(p) < step]
    after = [p for p in dirs if _step_of(p) > step]
    for p in before[:max(0, len(before) - (keep - 1))] + after:
        shutil.rmtree(p, ignore_errors=True)


def check_complete(path) -> None:
    """Raise :class:`TrainingCheckpointError` naming the file when a checkpoint folder lacks one of its
    files, or one is cut short or unreadable (safetensors headers and ``state.json`` are read)."""
    path = Path(path)
    for f in CHECKPOINT_FILES:
        file = path / f
        if not file.is_file():
            raise TrainingCheckpointError(f"checkpoint file {file} is missing")
        try:
            if f.endswith(".safetensors"):
                with safe_open(str(file), framework="pt"):
                    pass
            else:
                state = json.loads(file.read_text())
                if not isinstance(state, dict) or "step" not in state or "param_groups" not in state:
                    raise ValueError("no step or param_groups")
        except (SafetensorError, OSError, ValueError) as e:
            raise TrainingCheckpointError(f"checkpoint file {file} is corrupt or truncated ({e})") from None


def latest_checkpoint(out_dir, warn: bool = False) -> Path | None:
    """The newest complete checkpoint under ``out_dir``: the one ``latest`` names, else the newest step.
    One that is incomplete or unreadable (:func:`check_complete`) is skipped for the one before it, with a
    warning through :mod:`nvfp4kit.progress` when ``warn``. None when there is no checkpoint at all;
    :class:`TrainingCheckpointError` when there are some but none is complete."""
    root = checkpoint_root(out_dir)
    candidates = list(reversed(_step_dirs(root)))
    pointer = root / LATEST
    if pointer.is_file():
        try:
            named = root / pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named is not None and named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    problems = []
    for p in candidates:
        try:
            check_complete(p)
        except TrainingCheckpointError as e:
            problems.append(str(e))
            if warn:
                progress.log(f"warning: {e}; resuming from the checkpoint before it")
            continue
        return p
    if problems:
        raise TrainingCheckpointError(
            f"no complete checkpoint in {root} to resume from: {'; '.join(problems)}. Start again with "
            "--no-resume --overwrite (removes this run), or choose another --out")
    return None


def read_state(path) -> dict:
    """The ``state.json`` of a checkpoint directory (step, data position, run configuration)."""
    return json.loads((Path(path) / "state.json").read_text())


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise TrainingCheckpointError(f"checkpoint file {file} is corrupt or truncated ({e})") from None


def load_checkpoint(path, model, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load model and optimizer state from ``path`` (every rank); returns (state.json, rng states). Every
    file is read before the model or the optimizer is changed: an unreadable one (named in the
    :class:`TrainingCheckpointError`) leaves both as they were."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    check_complete(path)
    state = read_state(path)
    model_sd = _load_tensors(path / "model.safetensors")
    flat = _load_tensors(path / "optimizer.safetensors")
    rng = _load_tensors(path / "rng.safetensors")
    own = {k for k in full_model_state_keys(model)}
    missing, unexpected = own - set(model_sd), set(model_sd) - own
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path}: model tensors do not match this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); same --preset?"
        )
    set_model_state_dict(model, model_sd, options=_options(strict=True))
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
    return state, rng


def earlier_run(out_dir) -> list[str]:
    """The files of :data:`RUN_FILES` an earlier run left in ``out_dir`` (an empty folder is none)."""
    out = Path(out_dir)
    found = []
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            if any(p.iterdir()):
                found.append(name)
        elif p.exists() or p.is_symlink():
            found.append(name)
    return found


def clean_stale_run_files(out_dir) -> list[Path]:
    """Remove the temporary files and checkpoint folders a killed run left in ``out_dir`` and its
    ``checkpoints/`` (``.NAME.tmp-pid<PID>-*``, ``.step_*.tmp-*`` / ``.old-*`` of dead processes)."""
    out, root = Path(out_dir), checkpoint_root(out_dir)
    return (scratch.remove_stale(out, ".*.tmp-pid*") + scratch.remove_stale(root, ".*.tmp-pid*")
            + scratch.remove_stale(root, ".*.old-pid*"))


def prepare_run_dir(out_dir, *, resume: bool, overwrite: bool = False, remove: bool = True) -> None:
    """Before a run writes anything in ``out_dir``: remove what killed runs left (see
    :func:`clean_stale_run_files`); a new run (``resume`` False, or ``overwrite``) where an earlier run left
    its files (:func:`earlier_run`) is refused unless ``overwrite``, which removes those files first (and
    nothing else of the folder). ``remove=False`` (the ranks other than 0) checks without removing."""
    out = Path(out_dir)
    if remove:
        clean_stale_run_files(out)
    if resume and not overwrite:
        return
    found = earlier_run(out)
    if not found:
        return
    if not overwrite:
        raise FileExistsError(
            f"--out {str(out)!r} holds an earlier run ({', '.join(found)}): a new run there would mix the two. "
            "Resume it (the default, without --no-resume), pass --overwrite to remove it and start again, or "
            "choose another --out")
    if not remove:
        return
    for name in RUN_FILES:
        p = out / name
        if not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    progress.log(f"--overwrite: removed the earlier run in {out} ({', '.join(found)})")


def full_model_state_keys(model) -> list[str]:
    """The model's state-dict names, the same on every rank. (Sharded, not gathered: a full state
    dict with CPU offload reaches rank 0 only, so other ranks would see no names at all.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return list(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)).keys())
