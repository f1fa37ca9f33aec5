"""Block-by-block PTQ: each repeated block of the model is calibrated, quantized and written in turn,
on the calibration activations that the blocks before it produce.

One engine serves two cases:

* a model in memory (``quantize_model(sequential=True)``): nothing is loaded or freed;
* a model built on the meta device whose weights stay on disk: a :class:`BlockSource` materializes
  the embeddings for the first pass, each block when its turn comes, and the modules after the
  blocks at the end, and frees each one after it is done, so the memory peak is one block plus the
  calibration activations (:class:`~nvfp4kit.calibrate.activations.ActivationStore`, spilled to disk
  past a budget) plus one output shard, whatever the depth.

The steps, for calibration batches ``b``:

1. **Capture**: one forward with every block replaced by a stand-in that records what the block is
   called with (the hidden states for block 0; masks, rotary embeddings and the like for every
   block, de-duplicated) and passes the hidden states through; it stops after the last block, so the
   output head is never computed.
2. **Per block** ``i``: run ``block_i(h_b, ...)`` for every batch with observers (input amax, GPTQ
   Hessians, every MoE expert on every token of its layer, and with ``kv_cache`` the post-RoPE key and
   value amax); quantize its Linears (:func:`~nvfp4kit.calibrate.ptq.quantize_linears`); hand its
   records and other tensors to the sink; then the next block's inputs: the outputs of the quantized
   block (sequential semantics: ``h`` through the emulated records) or of the full-precision block
   from the observed pass (one-shot semantics).
3. **Rest**: quantized Linears outside the blocks (rare: the head and embeddings are excluded by
   default) are calibrated by replaying the cached outputs of the last block through the rest of the
   model; the tensors of the modules after the blocks are handed to the sink.

On a model that fits in memory this computes exactly what calibrating the whole model does: the
one-shot result equals :func:`~nvfp4kit.calibrate.ptq.quantize_model` one-shot, the sequential one
equals passes that stop after each block with the blocks before it emulated; the statistics, the
records and the order in which they are written are the same.

Under ``torchrun`` each rank calibrates a slice of the batches; statistics are reduced before a
block is quantized (:func:`~nvfp4kit.calibrate.observers.reduce_statistics`), every rank quantizes
the same block, and only rank 0's sink writes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .. import progress
from ..checkpoint.types import QuantizedLinearWeight, QuantizedModel
from ..losses import run_causal_lm
from ..policy import PrecisionPlan
from .activations import ActivationStore
from .emulation import apply_quantized
from .kv_cache import attention_modules, observe_kv_cache
from .observers import Calibrator, LinearStats, reduce_statistics
from .records import check_weights, kv_after, needed_statistics, quantize_linears, state_entries, tied_duplicates
from .sequential import BlockLayout, StopForward, block_layout
from .surgery import release_weights, restore_modules
from .transforms import smooth_block
from .weight_scales import DEFAULT_WEIGHT_SCALE


# ----------------------------------------------------------------------------- collaborators


class BlockSource(Protocol):
    """Brings the weights of a part of a meta-device model into memory and frees them again."""

    def load(self, model: nn.Module, names: list[str]) -> None:
        """Materialize the named modules of ``model`` (block or unit names) with their weights."""

    def free(self, model: nn.Module, names: list[str]) -> None:
        """Put the named modules back on the meta device."""


class RecordSink(Protocol):
    """Receives what the engine produces, in checkpoint order."""

    def tensor(self, name: str, t: torch.Tensor) -> None: ...

    def linear(self, name: str, record: QuantizedLinearWeight) -> None: ...

    def kv(self, attention: str, k_amax: float, v_amax: float) -> None: ...

    def end_unit(self, unit: int, state: dict) -> None:
        """Everything of unit ``unit`` (0: before the blocks, ``1 + i``: block i) has been handed over;
        ``state`` is what resuming after it needs."""


class MemorySink:
    """Collects the entries into a :class:`QuantizedModel` (in the order they came)."""

    def __init__(self):
        self.qmodel = QuantizedModel()

    def tensor(self, name, t):
        self.qmodel.tensors[name] = t
        self.qmodel.order.append(("tensor", name))

    def linear(self, name, record):
        self.qmodel.linears[name] = record
        self.qmodel.order.append(("linear", name))

    def kv(self, attention, k_amax, v_amax):
        self.qmodel.kv_cache_amax[attention] = (k_amax, v_amax)
        self.qmodel.order.append(("kv", attention))

    def end_unit(self, unit, state):
        pass


@dataclass
class BlockwiseResult:
    """What :func:`quantize_by_block` returns."""

    records: dict[str, QuantizedLinearWeight]
    stats: dict[str, LinearStats]
    kv_amax: dict[str, tuple[float, float]]
    n_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ResumeState:
    """Where an interrupted run stopped: the next block and that block's input activations."""

    next_block: int
    inputs: ActivationStore
    kv_amax: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_tokens: int = 0


# ----------------------------------------------------------------------------- capture


class _Stand(nn.Module):
    """Stands in for one block during the capture pass: records its call, passes the hidden states on."""

    def __init__(self, block: nn.Module, index: int, capture: "_Capture"):
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: the stand-in owns nothing
        self.index = index
        self.capture = capture

    def __getattr__(self, name):  # what a model reads off its layers (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, hidden, *args, **kwargs):
        self.capture.record(self.index, hidden, args, kwargs)
        if self.index == self.capture.last:
            raise StopForward()
        return hidden


class _Capture:
    """The calls of every block for one batch; tensors equal to one seen before are kept once."""

    def __init__(self, n_blocks: int):
        self.last = n_blocks - 1
        self.hidden: torch.Tensor | None = None
        self.calls: list[tuple[tuple, dict]] = [((), {})] * n_blocks
        self._pool: list[torch.Tensor] = []

    def _intern(self, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            for seen in self._pool:
                if seen is t or (seen.shape == t.shape and seen.dtype == t.dtype and seen.device == t.device
                                 and torch.equal(seen, t)):
                    return seen
            self._pool.append(t)
            return t
        if isinstance(obj, tuple):
            return tuple(self._intern(x) for x in obj)
        if isinstance(obj, list):
            return [self._intern(x) for x in obj]
        if isinstance(obj, dict):
            return {k: self._intern(v) for k, v in obj.items()}
        return obj

    def record(self, index: int, hidden, args, kwargs) -> None:
        if index == 0:
            self.hidden = hidden.detach()
        self.calls[index] = (self._intern(tuple(args)), self._intern(dict(kwargs)))


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layout: BlockLayout, batches: list[torch.Tensor], forward,
                         store: ActivationStore | None) -> list[list[tuple[tuple, dict]]]:
    """Run every batch up to the last block (blocks stood in for); the block-0 hidden states go into
    ``store`` (None: dropped), and the return value is each batch's calls: ``calls[b][i] = (args,
    kwargs)`` of block i."""
    stands = [_Stand(b, i, None) for i, b in enumerate(layout.blocks)]
    originals = list(layout.blocks)
    calls = []
    try:
        for b in batches:
            cap = _Capture(len(originals))
            for i, s in enumerate(stands):
                s.capture = cap
                layout.blocks[i] = s
            try:
                forward(model, b)
            except StopForward:
                pass
            if cap.hidden is None:
                raise ValueError(f"block-by-block calibration: the forward of {type(model).__name__} never "
                                 f"reached its first block ({layout.block_name(0)})")
            if store is not None:
                store.append(cap.hidden)
            calls.append(cap.calls)
    finally:
        for i, blk in enumerate(originals):
            layout.blocks[i] = blk
    return calls


# ----------------------------------------------------------------------------- plans and names


def sub_plan(plan: PrecisionPlan, prefix: str) -> PrecisionPlan:
    """The part of ``plan`` under ``prefix`` (``model.layers.3``), with names relative to it."""
    cut = len(prefix) + 1
    layers = {n[cut:]: lp for n, lp in plan.layers.items() if n.startswith(prefix + ".")}
    return PrecisionPlan(layers, plan.scheme, plan.recipe)


# a module after the blocks bigger than this is loaded a submodule at a time to be written
COPY_PIECE_BYTES = 1 << 30


def copy_pieces(model: nn.Module, unit: str, budget: int = COPY_PIECE_BYTES) -> list[str]:
    """The submodules of ``unit`` to load one at a time when its tensors are only handed to the sink, in
    state-dict order: the unit itself when it holds at most ``budget`` bytes (or tensors of its own beside
    its children), else its children's pieces (e.g. the MTP layers after a Nemotron 3 model's blocks, and
    their experts one by one)."""
    module = model.get_submodule(unit)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    children = list(module.named_children())
    if size <= budget or own or not children:
        return [unit]
    return [p for n, _ in children for p in copy_pieces(model, f"{unit}.{n}", budget)]


def _relative(names, prefix: str) -> list[str]:
    return [n[len(prefix) + 1:] for n in names]


def _emit(sink: RecordSink, entries) -> None:
    for kind, name, value in entries:
        if kind == "linear":
            sink.linear(name, value)
        elif kind == "kv":
            sink.kv(name, *value)
        else:
            sink.tensor(name, value)


# ----------------------------------------------------------------------------- the engine


def _rank_world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_kv(kv: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not kv:
        return kv
    names = sorted(kv)
    t = torch.tensor([v for n in names for v in kv[n]], dtype=torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {n: (float(t[2 * i]), float(t[2 * i + 1])) for i, n in enumerate(names)}


def _oom_message(block: str, err: BaseException) -> str:
    return (f"out of device memory in {block} ({type(err).__name__}): reduce --calib-samples or --seq-len, lower "
            "--activation-memory so more activations stay on disk, or use --device cpu")


class _BlockRunner:
    """Runs one block over the stored batches."""

    def __init__(self, calls: list[list[tuple[tuple, dict]]]):
        self.calls = calls

    @torch.no_grad()
    def run(self, block: nn.Module, index: int, inputs: ActivationStore, outputs: ActivationStore | None,
            cal: Calibrator | None = None) -> None:
        for b in range(len(inputs)):
            h = inputs[b]
            args, kwargs = self.calls[b][index]
            if cal is not None:
                out = cal.observe(block, h, *args, **kwargs)
            else:
                out = block(h, *args, **kwargs)
            if outputs is not None:
                outputs.append(_block_output(out))


def quantize_by_block(
    model: nn.Module,
    samples: torch.Tensor,
    plan: PrecisionPlan,
    weight_scale: str = DEFAULT_WEIGHT_SCALE,
    *,
    sequential: bool = True,
    kv_cache: str | None = None,
    source: BlockSource | None = None,
    sink: RecordSink | None = None,
    batch_size: int = 1,
    forward=None,
    activation_memory: int | None = None,
    spill_dir=None,
    device: torch.device | str | None = None,
    resume: ResumeState | None = None,
    keep: bool = True,
    smooth: str = "none",
) -> BlockwiseResult:
    """Calibrate and quantize ``model`` block by block (see the module docs); returns the records and
    the statistics. ``samples``: ``[n, L]`` token ids. ``source``: materializes and frees the parts of
    a meta-device model (None: the model is in memory). ``sink``: receives the entries in checkpoint
    order (None: nothing is handed over). ``activation_memory``: bytes of activations kept in memory
    per store (the rest spills to ``spill_dir``). ``resume``: continue after an interrupted run.
    ``keep``: return every record and Hessian (False when a sink writes them: memory stays flat in depth;
    the result then holds the statistics without Hessians and no records). ``smooth``: a smoothing method
    of :mod:`~nvfp4kit.calibrate.transforms`, applied to each block on its inputs before it is calibrated."""
    layout = block_layout(model)
    if layout is None:
        raise ValueError(f"block-by-block calibration needs repeated blocks (a ModuleList of layers); "
                         f"{type(model).__name__} has none")
    forward = forward or run_causal_lm
    quantized = plan.quantized()
    per_block = [[] for _ in range(len(layout))]
    rest = []
    for n in quantized:
        i = layout.block_of(n)
        (per_block[i] if i is not None else rest).append(n)
    if kv_cache is not None and not attention_modules(model):
        raise ValueError(f"--kv-cache {kv_cache}: found no attention module (a module with k_proj and v_proj "
                         "children) in the model")
    rank, world = _rank_world()
    batches = [samples[i:i + batch_size] for i in range(0, samples.shape[0], batch_size)]
    if world > 1:
        per = -(-len(batches) // world)
        batches = batches[rank * per:(rank + 1) * per]
        if not batches:
            raise ValueError(f"data-parallel calibration: {samples.shape[0]} samples are too few for {world} ranks")
    dtype = next((p.dtype for p in model.parameters() if p.device.type != "meta"), None)
    skip = tied_duplicates(model)
    records: dict[str, QuantizedLinearWeight] = {}
    stats: dict[str, LinearStats] = {}
    kv_amax: dict[str, tuple[float, float]] = dict(resume.kv_amax) if resume else {}
    seconds: dict[str, float] = {}
    n_tokens = resume.n_tokens if resume else int(samples.numel())

    def store(name):
        return ActivationStore(activation_memory, spill_dir, device, name=name)

    # ---------------------------------------------------------------- 1. capture
    t0 = time.perf_counter()
    if source is not None:
        source.load(model, layout.before)
    inputs = store("inputs") if resume is None else resume.inputs
    calls = capture_block_inputs(model, layout, batches, forward, inputs if resume is None else None)
    start = 0 if resume is None else resume.next_block
    # the modules before the blocks are written first, unless a quantized Linear lives there (then last)
    before_late = any(layout.unit_of(n)[0] == 0 for n in rest)
    if resume is None and sink is not None and not before_late:
        _emit(sink, [e for u in layout.before for e in state_entries(model.get_submodule(u), u, {}, skip)])
    if resume is None and sink is not None:
        sink.end_unit(0, {})
    if source is not None and not rest:
        source.free(model, layout.before)
    seconds["capture"] = time.perf_counter() - t0
    runner = _BlockRunner(calls)
    tokens_per_block = sum(int(b.numel()) for b in batches)

    # ---------------------------------------------------------------- 2. blocks
    t0 = time.perf_counter()
    with progress.task("quantizing blocks", total=len(layout)) as task:
        task.advance(start)
        for i in range(start, len(layout)):
            name = layout.block_name(i)
            tb = time.perf_counter()
            if source is not None:
                source.load(model, [name])
            block = layout.blocks[i]
            block.eval()
            names = _relative(per_block[i], name)
            bplan = sub_plan(plan, name)
            need = needed_statistics(bplan, names, weight_scale)
            last = i == len(layout) - 1
            want_outputs = not last or bool(rest)
            outputs = store("outputs") if want_outputs else None
            check_weights(block, plan, names, name)
            try:
                if smooth != "none":
                    alphas = smooth_block(block, plan, name, lambda: runner.run(block, i, inputs, None),
                                          tokens_per_block, smooth)
                    if alphas:
                        progress.log(f"{name}: {smooth} smoothing, alpha " + ", ".join(
                            f"{n.rsplit('.', 1)[-1]} {a:.2f}" for n, a in alphas.items()))
                kv_ctx = (observe_kv_cache(block, kv_cache) if kv_cache is not None and attention_modules(block)
                          else nullcontext({}))
                with kv_ctx as block_kv:
                    with Calibrator(block, need.observe, need.hessian_for) as cal:
                        runner.run(block, i, inputs, None if sequential else outputs, cal)
                        block_stats = reduce_statistics(cal.stats())
                    recs = quantize_linears(block, bplan, block_stats, names, weight_scale) if names else {}
                    if source is not None:
                        # streamed from disk: the records replace the source weights of the quantized Linears
                        # (the block is freed after it is written), so the emulated copies below do not come
                        # on top of them (a 512-expert block would otherwise hold both in memory)
                        release_weights(block, recs)
                    if sequential and outputs is not None:
                        originals = apply_quantized(block, QuantizedModel(linears=recs), dtype or torch.float32)
                        try:
                            runner.run(block, i, inputs, outputs)
                        finally:
                            restore_modules(block, originals)
            except torch.cuda.OutOfMemoryError as e:
                raise RuntimeError(_oom_message(name, e)) from e
            full = {f"{name}.{n}": r for n, r in recs.items()}
            if keep:
                records.update(full)
                stats.update({f"{name}.{n}": s for n, s in block_stats.items()})
            else:
                stats.update({f"{name}.{n}": LinearStats(s.input_amax, s.n_tokens) for n, s in block_stats.items()})
            block_kv = _reduce_kv({f"{name}.{a}" if a else name: v for a, v in dict(block_kv).items()})
            kv_amax.update(block_kv)
            if sink is not None:
                _emit(sink, kv_after(list(state_entries(block, name, full, skip)), block_kv))
            inputs.close()
            inputs = outputs if outputs is not None else store("inputs")
            if sink is not None:
                sink.end_unit(1 + i, {"inputs": inputs, "kv_amax": dict(kv_amax), "n_tokens": n_tokens})
            if source is not None:
                source.free(model, [name])
            secs = time.perf_counter() - tb
            task.advance(1, block=i, tok_s=round(tokens_per_block * world / max(secs, 1e-9)))
    seconds["blocks"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- 3. rest
    t0 = time.perf_counter()
    rest_records = {}
    if rest:
        rest_records = _quantize_rest(model, layout, rest, plan, weight_scale, batches, inputs, forward, source,
                                      stats)
        records.update(rest_records)
    inputs.close()
    if sink is not None:
        for unit in (layout.before if before_late else []) + layout.after:
            for piece in ([unit] if source is None else copy_pieces(model, unit)):
                if source is not None:
                    source.load(model, [piece])
                _emit(sink, list(state_entries(model.get_submodule(piece), piece, rest_records, skip)))
                if source is not None:
                    source.free(model, [piece])
        sink.end_unit(1 + len(layout), {})
    seconds["rest"] = time.perf_counter() - t0
    return BlockwiseResult(records, stats, kv_amax, n_tokens, seconds)


class _Replay(nn.Module):
    """Stands in for block 0 in the rest pass: returns the last block's cached outputs."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = outputs
        self.batch = 0

    def forward(self, hidden, *args, **kwargs):
        out = self.outputs[self.batch]
        self.batch += 1
        return out


class _Pass(nn.Module):
    def forward(self, hidden, *args, **kwargs):
        return hidden


def _quantize_rest(model, layout: BlockLayout, rest: list[str], plan: PrecisionPlan, weight_scale: str,
                   batches, last_outputs: ActivationStore, forward, source, stats) -> dict:
    """Calibrate and quantize the Linears outside the blocks on the last block's cached outputs."""
    units = sorted({layout.unit_of(n)[1] for n in rest} | set(layout.before))
    if source is not None:
        source.load(model, units)
    check_weights(model, plan, rest)
    originals = list(layout.blocks)
    replay = _Replay([last_outputs[b] for b in range(len(last_outputs))])
    try:
        layout.blocks[0] = replay
        for i in range(1, len(originals)):
            layout.blocks[i] = _Pass()
        need = needed_statistics(plan, rest, weight_scale)
        with Calibrator(model, need.observe, need.hessian_for) as cal:
            for b in batches:
                cal.observe(forward, model, b)
            rest_stats = reduce_statistics(cal.stats())
    finally:
        for i, blk in enumerate(originals):
            layout.blocks[i] = blk
    stats.update(rest_stats)
    recs = quantize_linears(model, plan, rest_stats, rest, weight_scale)
    if source is not None:
        source.free(model, [u for u in units if u not in layout.after])
    return recs


__all__ = ["BlockSource", "BlockwiseResult", "MemorySink", "RecordSink", "ResumeState", "capture_block_inputs",
           "copy_pieces", "quantize_by_block", "sub_plan"]
