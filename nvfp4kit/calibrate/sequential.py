"""Sequential (block-by-block) calibration: each block is calibrated on the inputs that the already
quantized blocks before it produce.

One-shot calibration observes every Linear in the full-precision model; but at inference the
input of block ``i`` comes from quantized blocks ``0..i-1``, so its statistics (the GPTQ Hessian
above all, and the activation amax) differ from those it was quantized for. Sequential
calibration follows the order of the model's repeated blocks (the ``ModuleList`` holding most of
its Linears, e.g. ``model.layers``):

    for block i:   run the calibration samples through the model, stopping after block i
                   (blocks 0..i-1 already compute with their quantized weights and activations);
                   observe block i's Linears; quantize them; swap them for their quantized form.
    finally:       the Linears outside the blocks (if any) the same way, then every swap is undone.

Each pass stops at the block it calibrates, so the cost is about half a full forward per block.
The callbacks keep this module independent of how records are computed or emulated.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import progress
from ..losses import run_causal_lm
from ..policy import EXPERTS_LIST
from .surgery import restore_modules


class _StopForward(Exception):
    """Raised by a hook after the block being calibrated: the rest of the model is not needed."""


def _stop(module, args, output):
    raise _StopForward()


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``ModuleList`` of the model's repeated blocks: the one holding the most Linears, not an
    ``experts`` list; None when the model has no such list with two or more members."""
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or name.rsplit(".", 1)[-1] == EXPERTS_LIST:
            continue
        n_linear = sum(isinstance(c, nn.Linear) for c in m.modules())
        if n_linear and (best is None or n_linear > best[2]):
            best = (name, m, n_linear)
    return None if best is None else (best[0], best[1])


def block_members(names: list[str], blocks_name: str, n_blocks: int) -> tuple[list[list[str]], list[str]]:
    """Split Linear names into per-block lists (in model order) and the rest."""
    per_block: list[list[str]] = [[] for _ in range(n_blocks)]
    rest = []
    prefix = f"{blocks_name}." if blocks_name else ""
    for n in names:
        head, _, tail = n[len(prefix):].partition(".") if n.startswith(prefix) else ("", "", "")
        if head.isdigit() and tail and int(head) < n_blocks:
            per_block[int(head)].append(n)
        else:
            rest.append(n)
    return per_block, rest


def sequential_quantize(
    model: nn.Module,
    names: list[str],
    calibrate_names: Callable[[list[str], Callable], dict],
    quantize_names: Callable[[list[str], dict], dict],
    emulate: Callable[[dict], dict[str, nn.Module]],
    forward=None,
) -> tuple[dict, dict]:
    """Calibrate and quantize ``names`` block by block; returns ``(records, stats)`` by name.

    ``calibrate_names(names, forward)``: statistics of those Linears over the calibration samples,
    running the model with ``forward``; ``quantize_names(names, stats)``: their records;
    ``emulate(records)``: swaps those Linears for modules computing with the records and returns
    the original modules by name (put back before this function returns, also on error).
    """
    found = repeated_blocks(model)
    if found is None:
        raise ValueError(f"sequential calibration needs repeated blocks (a ModuleList of layers); "
                         f"{type(model).__name__} has none")
    blocks_name, blocks = found
    per_block, rest = block_members(names, blocks_name, len(blocks))
    forward = forward or run_causal_lm
    records: dict = {}
    stats: dict = {}
    originals: dict[str, nn.Module] = {}

    def stopping_after(block: nn.Module):
        def run(m, batch):
            handle = block.register_forward_hook(_stop)
            try:
                with torch.no_grad():
                    return forward(m, batch)
            except _StopForward:
                return None
            finally:
                handle.remove()

        return run

    try:
        with progress.task("sequential calibration", total=sum(1 for b in per_block if b) + bool(rest)) as t:
            steps = [(b_names, stopping_after(blocks[i])) for i, b_names in enumerate(per_block) if b_names]
            if rest:
                steps.append((rest, forward))
            for step_names, fwd in steps:
                step_stats = calibrate_names(step_names, fwd)
                stats.update(step_stats)
                step_records = quantize_names(step_names, step_stats)
                records.update(step_records)
                originals.update(emulate(step_records))
                t.advance(1)
    finally:
        restore_modules(model, originals)
    return records, stats
