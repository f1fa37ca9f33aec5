"""Data-parallel training through torch.distributed: process-group set-up from the ``torchrun``
environment, FSDP2 (``fully_shard``) where it runs (CPU with gloo included), DDP otherwise, and the
global amax reduction of the quantized linears.

Under FSDP2 every Linear's weight is all-gathered before its forward, so weight quantization sees
the whole tensor; activations and gradients are shards of the global batch, so their global amax is
reduced (MAX) across ranks: every rank then quantizes with the amax of the whole global batch, as one
process would. Routed experts are the exception: whether an expert runs on a rank depends on the
routing of that rank's tokens, so they cannot join a collective and keep a per-rank amax.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import progress
from . import qlinear


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    wrapper: str = "none"  # "none", "fsdp2" or "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the process group described by the torchrun environment (gloo on CPU, nccl on CUDA).
    Without that environment: a single process."""
    import torch.distributed as dist

    if not launched_by_torchrun():
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device is not None and torch.device(device).type == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if use_cuda:
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local, backend)


def wrap_data_parallel(model: torch.nn.Module, info: DistInfo, strategy: str = "auto",
                       reduce_amax: bool = True) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 (each backbone/MTP layer, then the root) or wrap it in DDP.

    ``strategy``: "auto" (FSDP2, falling back to DDP if it cannot be applied), "fsdp2" or "ddp".
    Sets the quantized linears' amax reduction across the group when ``reduce_amax``."""
    if info.world == 1:
        info.wrapper = "none"
        return model
    if strategy not in ("auto", "fsdp2", "ddp"):
        raise ValueError(f"--parallel must be auto, fsdp2 or ddp, got {strategy!r}")
    qlinear.set_amax_reduction(None, enabled=reduce_amax)
    if reduce_amax:
        exclude_data_dependent_linears(model)
    if strategy in ("auto", "fsdp2"):
        try:
            wrapped = _fully_shard(model)
            info.wrapper = "fsdp2"
            return wrapped
        except Exception as e:  # noqa: BLE001 - any failure to shard falls back to DDP under "auto"
            if strategy == "fsdp2":
                raise RuntimeError(f"FSDP2 fully_shard failed on this platform: {e}") from e
            progress.log(f"FSDP2 unavailable here ({type(e).__name__}: {e}); using DDP")
    from torch.nn.parallel import DistributedDataParallel as DDP

    info.wrapper = "ddp"
    # MoE experts that receive no token in a step have no gradient: let DDP find them
    return DDP(model, find_unused_parameters=True)


def exclude_data_dependent_linears(model: torch.nn.Module) -> list[str]:
    """Switch the amax reduction off for routed experts (:func:`nvfp4kit.policy.is_expert`): whether
    one runs on a rank depends on the routing of that rank's tokens, so it cannot join a collective
    and keeps a per-rank amax. Returns their names."""
    from dataclasses import replace

    from ..policy import is_expert
    from .linear import iter_linears

    names = []
    for name, mod in iter_linears(model):
        if is_expert(name) and mod.precision.amax_reduction:
            mod.precision = replace(mod.precision, amax_reduction=False)
            names.append(name)
    return names


def _fully_shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    backbone = getattr(model, "backbone", None)
    for layer in getattr(backbone, "layers", None) or ():
        fully_shard(layer)
    # MTP reads its first block's norms and projection outside that block's forward: one unit
    if getattr(model, "mtp", None) is not None:
        fully_shard(model.mtp)
    fully_shard(model)
    return model


def shutdown() -> None:
    import torch.distributed as dist

    qlinear.set_amax_reduction(None, enabled=False)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
