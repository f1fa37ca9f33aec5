"""Forward hooks that collect what PTQ needs from calibration data, per Linear:

* ``input_amax``: the max |x| over every calibration input of the Linear (static activation scale);
* ``hessian`` (optional, for GPTQ): ``sum x^T x`` over the calibration tokens, float32 ``[K, K]``.
  Linears that receive the very same input tensor (q/k/v, gate/up) share one Hessian.

Experts of mixture-of-experts layers (every ``ModuleList`` named ``experts`` whose members hold
Linears) follow one documented rule: **every expert is calibrated on every token that reached its
MoE layer**, not only on the tokens the router sent it. During the routed forward the experts'
inputs are collected (their union is the layer's dispatched token set); after the MoE layer
returns, each expert runs once more on that whole set, and only this pass is observed. So no expert
is left with a zero or missing scale, whatever the router did, and the routed output of the model
is unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .. import progress
from ..formats.scales import tensor_amax
from ..losses import run_causal_lm
from .moe import expert_lists
from .sequential import StopForward, block_layout


@dataclass
class LinearStats:
    """Calibration statistics of one Linear."""

    input_amax: float
    n_tokens: int
    hessian: torch.Tensor | None = None


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    return None


class Calibrator:
    """Attach observers to the named Linears of ``model``; run batches; read :meth:`stats`.

    ``hessian_for``: names that also accumulate a Hessian (GPTQ); ``None`` for none.
    """

    def __init__(self, model: nn.Module, names, hessian_for=None):
        self.model = model
        modules = dict(model.named_modules())
        self.names = list(names)
        missing = [n for n in self.names if not isinstance(modules.get(n), nn.Linear)]
        if missing:
            raise ValueError(f"calibration: not Linear modules of the model: {', '.join(missing[:5])}")
        self.hessian_for = set(hessian_for or ())
        self._amax: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._hessians: dict[str, torch.Tensor] = {}
        self._hessian_key: dict[str, str] = {}
        self._batch_inputs: list[tuple[torch.Tensor, str]] = []  # keeps inputs alive so ids stay unique
        self._deferred: set[str] = set()  # expert Linears: observed only in the all-token pass
        self._all_token_pass = False
        self._handles = []
        self._stash: dict[str, list[torch.Tensor]] = {}
        for n in self.names:
            self._handles.append(modules[n].register_forward_pre_hook(self._linear_hook(n), with_kwargs=True))
        self._attach_experts(modules)

    # ------------------------------------------------------------------ hooks
    def _linear_hook(self, name: str):
        def hook(module, args, kwargs):
            if name in self._deferred and not self._all_token_pass:
                return None
            x = _first_tensor(args, kwargs)
            if x is None:
                return None
            self._observe(name, x)  # not detached here: identity tells shared inputs apart
            return None

        return hook

    def _observe(self, name: str, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.numel():
            a = tensor_amax(x2)
            if not bool(torch.isfinite(a)):
                raise ValueError(f"calibration: the input of {name} has NaN/inf values")
            prev = self._amax.get(name)
            self._amax[name] = a if prev is None else torch.maximum(prev, a)
        self._tokens[name] = self._tokens.get(name, 0) + x2.shape[0]
        if name not in self.hessian_for or not x2.numel():
            return
        for seen, key in self._batch_inputs:
            if seen is x and self._hessian_key.get(name, key) == key:
                self._hessian_key[name] = key  # same input tensor as an earlier Linear: share its Hessian
                return
        key = self._hessian_key.setdefault(name, name)
        xf = x2.float()
        if key in self._hessians:
            self._hessians[key].addmm_(xf.T, xf)  # in place: no K x K temporary per batch
        else:
            self._hessians[key] = xf.T @ xf
        self._batch_inputs.append((x, key))

    def _attach_experts(self, modules) -> None:
        for list_name, experts in expert_lists(self.model):
            linear_names = {f"{list_name}.{e}.{sub}" for e, m in enumerate(experts)
                            for sub, c in m.named_modules() if isinstance(c, nn.Linear)}
            observed = linear_names & set(self.names)
            if not observed:
                continue
            self._deferred |= observed
            self._stash[list_name] = []
            for e, m in enumerate(experts):
                self._handles.append(m.register_forward_pre_hook(self._stash_hook(list_name), with_kwargs=True))
            parent_name = list_name.rpartition(".")[0]
            parent = modules[parent_name] if parent_name else self.model
            self._handles.append(parent.register_forward_hook(self._all_token_hook(list_name, experts)))

    def _stash_hook(self, list_name: str):
        def hook(module, args, kwargs):
            if self._all_token_pass:
                return None
            x = _first_tensor(args, kwargs)
            if x is not None:
                self._stash[list_name].append(x.detach().reshape(-1, x.shape[-1]))
            return None

        return hook

    def _all_token_hook(self, list_name: str, experts: nn.ModuleList):
        def hook(module, args, output):
            stash = self._stash[list_name]
            if not stash or self._all_token_pass:
                return None
            tokens = torch.unique(torch.cat(stash), dim=0)
            stash.clear()
            self._all_token_pass = True
            try:
                with torch.no_grad():
                    for expert in experts:
                        expert(tokens)
            finally:
                self._all_token_pass = False
            return None

        return hook

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def observe(self, fn, *args, **kwargs):
        """One observed call: ``fn(*args, **kwargs)`` (a forward of the model, or of a part of it,
        on one batch), its inputs forgotten afterwards; returns what ``fn`` returns."""
        try:
            return fn(*args, **kwargs)
        except StopForward:  # the pass ended early on purpose (see stop_after_blocks)
            return None
        finally:
            self._batch_inputs.clear()

    @torch.no_grad()
    def run(self, samples: torch.Tensor, batch_size: int = 1, forward=None) -> None:
        """Run ``samples`` ``[n, L]`` token ids through the model in batches (observers record)."""
        forward = forward or run_causal_lm
        self.model.eval()
        n = samples.shape[0]
        with progress.task("calibrating", total=n) as t:
            for i in range(0, n, batch_size):
                batch = samples[i:i + batch_size]
                self.observe(forward, self.model, batch)
                t.advance(batch.shape[0])

    def stats(self) -> dict[str, LinearStats]:
        """Statistics of every observed Linear (a Linear that saw no input gets amax 0 and 0 tokens;
        with a Hessian requested, a zero one, so data-parallel ranks reduce the same tensors)."""
        out = {}
        modules = dict(self.model.named_modules())
        for n in self.names:
            amax = self._amax.get(n)
            key = self._hessian_key.get(n)
            h = self._hessians.get(key) if key is not None else None
            if h is None and n in self.hessian_for:
                w = modules[n].weight
                h = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float32, device=w.device)
            out[n] = LinearStats(
                input_amax=float(amax) if amax is not None else 0.0,
                n_tokens=self._tokens.get(n, 0),
                hessian=h,
            )
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@contextmanager
def stop_after_blocks(model: nn.Module, observed):
    """While active, a forward of ``model`` stops after its last repeated block, unless one of the
    ``observed`` Linears comes after the blocks: calibration never computes the output head (or a
    final norm) that no statistic needs. The calibrator ends such a pass quietly."""
    layout = block_layout(model)
    after = 1 + len(layout) if layout is not None else None
    if layout is None or any(layout.unit_of(n)[0] == after for n in observed):
        yield
        return

    def stop(module, args, output):
        raise StopForward()

    handle = layout.blocks[len(layout) - 1].register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def reduce_statistics(stats: dict[str, LinearStats], group=None) -> dict[str, LinearStats]:
    """Combine the statistics of data-parallel ranks in place (every rank saw its own slice of the
    calibration samples): input amax MAX-reduced, token counts and Hessians SUM-reduced (a Hessian
    that Linears share, e.g. q/k/v, once). A no-op outside ``torch.distributed``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not stats:
        return stats
    names = sorted(stats)
    ref = next((s.hessian for s in stats.values() if s.hessian is not None), None)
    device = ref.device if ref is not None else torch.device("cpu")
    amax = torch.tensor([stats[n].input_amax for n in names], dtype=torch.float32, device=device)
    tokens = torch.tensor([stats[n].n_tokens for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM, group=group)
    done: set[int] = set()
    for i, n in enumerate(names):
        s = stats[n]
        s.input_amax, s.n_tokens = float(amax[i]), int(tokens[i])
        if s.hessian is not None and id(s.hessian) not in done:
            dist.all_reduce(s.hessian, op=dist.ReduceOp.SUM, group=group)
            done.add(id(s.hessian))
    return stats


def calibrate(model: nn.Module, names, samples: torch.Tensor, hessian_for=None, batch_size: int = 1,
              forward=None) -> dict[str, LinearStats]:
    """Observe the named Linears of ``model`` on ``samples``; returns their :class:`LinearStats`."""
    with Calibrator(model, names, hessian_for) as cal:
        cal.run(samples, batch_size, forward)
        return cal.stats()
