"""Activation-aware per-input-channel scaling (SmoothQuant / AWQ), folded offline into the model.

A group of Linears that read one input ``x [T, K]`` (q/k/v after a norm, gate/up after a norm,
o_proj after v_proj, a Linear after a Linear) computes ``x W_i^T``. For any ``s [K] > 0``::

    x W_i^T = (x / s) (W_i * s)^T          (W_i * s scales column k of W_i by s[k])

so the consumers' columns are multiplied by ``s`` and the ``1 / s`` is folded into whatever produces
``x``: an RMSNorm/LayerNorm weight (``g <- g / s``, bias too) or the producing Linear's output rows
(``W_prev[rows] <- W_prev[rows] / s[:, None]``, bias too). The folded model computes the same function
in full precision and remains a standard checkpoint; what changes is how well ``x / s`` and ``W_i * s``
quantize: ``s`` moves quantization difficulty between activation outliers and the weights.

* :func:`smoothquant_scales` - SmoothQuant's closed form ``amax|x|^alpha / amax|W|^(1-alpha)``.
* :func:`awq_scales` - AWQ's statistic ``mean|x|^alpha / mean|W|^(1-alpha)`` for one alpha;
  :func:`awq_search` - grid search of alpha by the group's NVFP4 output error
  (:func:`smoothing_error`), W4A16 or W4A4.
* :func:`fold_into_norm`, :func:`fold_into_linear`, :func:`fold_into_v_proj` - apply ``s`` in place.
* Grouped-query attention: :func:`tie_gqa_scales`, :func:`expand_kv_scales`, :func:`kv_scales`.

Conventions shared by every function here:

* **Normalisation.** Every computed ``s`` is divided by its geometric mean, so ``sum(log s) = 0``:
  the folded norm weights and Linears keep their overall magnitude (neither drifts towards bf16's
  range limits). A uniform factor on ``s`` cancels in ``(x / s)(W * s)^T``, and NVFP4's per-tensor
  scale (from the tensor's amax) absorbs it in ``Q(x / s)`` and ``Q(W * s)``, so normalising changes
  the conditioning only, not what is being chosen.
* **Clamping.** A per-channel statistic (amax or mean magnitude of x or of W) is floored at
  ``floor`` (default ``1e-5``) times its largest entry before it enters a power, so a dead channel
  (all-zero activations, or an all-zero weight column) gives neither 0 nor inf; a statistic that is
  zero everywhere counts as constant. Hence ``max(s) / min(s) <= 1 / floor`` and, after the
  normalisation, ``floor <= s <= 1 / floor``.
* **dtype.** Scales and errors are computed in float32, or float64 when an input is float64;
  squared errors are accumulated in float64. Nothing records autograd history; nothing prints.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from ..formats.nvfp4 import BLOCK_SIZE
from ..formats.scales import tensor_amax
from ..kernels.dispatch import fake_quantize

DEFAULT_FLOOR = 1e-5
DEFAULT_CHUNK_TOKENS = 2048

__all__ = [
    "AWQResult",
    "awq_scales",
    "awq_search",
    "expand_kv_scales",
    "fold_into_linear",
    "fold_into_norm",
    "fold_into_v_proj",
    "kv_scales",
    "smoothing_error",
    "smoothquant_scales",
    "tie_gqa_scales",
    "weight_block_mean",
]


# --------------------------------------------------------------------------------------------- checks


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf (shape {tuple(t.shape)})")


def _check_vector(t, k: int | None, name: str, nonnegative: bool = False) -> torch.Tensor:
    t = _check_tensor(t, name)
    if t.ndim != 1 or (k is not None and t.shape[0] != k):
        want = f"[{k}]" if k is not None else "[K]"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    _check_finite(t, name)
    if nonnegative and t.numel() and bool((t < 0).any()):
        raise ValueError(f"{name}: expected non-negative entries (an amax or mean magnitude), got min {float(t.min())}")
    return t


def _check_scales(s, k: int | None, name: str = "s") -> torch.Tensor:
    s = _check_vector(s, k, name)
    if bool((s <= 0).any()):
        bad = int((s <= 0).nonzero()[0, 0])
        raise ValueError(f"{name}: scales must be > 0, got {float(s[bad])} at channel {bad}")
    return s


def _check_weights(weights, k: int | None, name: str = "weights") -> list[torch.Tensor]:
    """The group's weights [N_i, K] (tensors, or modules with a ``.weight``); all the same K."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise ValueError(f"{name}: expected a non-empty list of [N_i, K] weights (or Linears)")
    out = []
    for i, w in enumerate(weights):
        w = _check_tensor(getattr(w, "weight", w), f"{name}[{i}]")
        if w.ndim != 2:
            raise ValueError(f"{name}[{i}]: expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
        if k is None:
            k = w.shape[1]
        if w.shape[1] != k:
            raise ValueError(f"{name}[{i}]: K mismatch, weight has shape {tuple(w.shape)} but the group's K is {k}")
        _check_finite(w, f"{name}[{i}]")
        out.append(w)
    return out


def _check_floor(floor: float) -> None:
    if not (0.0 < floor < 1.0):
        raise ValueError(f"floor must be in (0, 1), got {floor}")


def _check_alpha(alpha: float) -> None:
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


# ----------------------------------------------------------------------------------- the scale formulas


def _log_stat(stat: torch.Tensor, floor: float) -> torch.Tensor:
    """log of a non-negative per-channel statistic, floored at ``floor * max`` (0 where all zero)."""
    top = stat.max()
    if float(top) == 0.0:
        return torch.zeros_like(stat)
    return stat.clamp_min(top * floor).log()


def _scales_from_stats(x_stat: torch.Tensor, w_stat: torch.Tensor, alpha: float, floor: float) -> torch.Tensor:
    """``x_stat^alpha / w_stat^(1-alpha)`` (clamped statistics), divided by its geometric mean."""
    log_s = alpha * _log_stat(x_stat, floor) - (1.0 - alpha) * _log_stat(w_stat, floor)
    return (log_s - log_s.mean()).exp()


def smoothquant_scales(x_amax: torch.Tensor, weights, alpha: float = 0.5, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """SmoothQuant's migration scales ``s = x_amax^alpha / w_amax^(1-alpha)``, normalised (geometric mean 1).

    ``x_amax [K]`` is the per-input-channel max |x| over the calibration tokens; ``w_amax [K]`` the
    per-input-channel max |W| over every weight of the group (``weights``: [N_i, K] tensors or
    Linears). Statistics are floored at ``floor * max`` first (see the module notes). Returns a
    float32 ``[K]`` tensor (float64 when an input is float64)."""
    _check_alpha(alpha)
    _check_floor(floor)
    ws = _check_weights(weights, None)
    k = ws[0].shape[1]
    x_amax = _check_vector(x_amax, k, "x_amax", nonnegative=True)
    dt = torch.float64  # the scale arithmetic is cheap; do it wide, return the inputs' precision
    with torch.no_grad():
        w_amax = torch.stack([w.detach().abs().amax(0).to(dt) for w in ws]).amax(0)
        s = _scales_from_stats(x_amax.detach().to(dt), w_amax, alpha, floor)
    return s.to(_compute_dtype(x_amax, *ws))


def weight_block_mean(weights, block: int = BLOCK_SIZE) -> torch.Tensor:
    """AWQ's weight statistic: per input channel, the mean over all rows of all the group's weights of
    ``|W| / amax|W|`` of its quantization block (1 x ``block`` along K; NVFP4: 16). Float64 ``[K]``.

    Normalising by the block amax makes each weight's contribution relative to how it is quantized,
    so a weight of larger magnitude (q next to v) does not dominate the group's statistic."""
    ws = _check_weights(weights, None)
    k = ws[0].shape[1]
    if k % block:
        raise ValueError(f"weights: K = {k} is not a multiple of the block size {block}")
    total = torch.zeros(k, dtype=torch.float64, device=ws[0].device)
    rows = 0
    with torch.no_grad():
        for w in ws:
            a = w.detach().to(torch.float64).abs().reshape(w.shape[0], k // block, block)
            bmax = a.amax(-1, keepdim=True)
            rel = torch.where(bmax > 0, a / torch.where(bmax > 0, bmax, torch.ones_like(bmax)), torch.zeros_like(a))
            total += rel.reshape(w.shape[0], k).sum(0)
            rows += w.shape[0]
    return total / rows


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """AWQ's scales for one migration strength: ``s = x_mean^alpha / w_mean^(1-alpha)``, normalised.

    ``x_mean [K]``: mean |x| per input channel over the calibration tokens; ``w_mean [K]``: the weight
    statistic (:func:`weight_block_mean`). This is the formula only; :func:`awq_search` replaces its
    ``alpha = 0`` point (which would flatten the weights' columns) by the unscaled baseline ``s = 1``."""
    _check_alpha(alpha)
    _check_floor(floor)
    x_mean = _check_vector(x_mean, None, "x_mean", nonnegative=True)
    w_mean = _check_vector(w_mean, x_mean.shape[0], "w_mean", nonnegative=True)
    with torch.no_grad():
        s = _scales_from_stats(x_mean.detach().double(), w_mean.detach().double(), alpha, floor)
    return s.to(_compute_dtype(x_mean, w_mean))


# ------------------------------------------------------------------------------- grouped-query attention


def _check_head_counts(num_heads: int, num_kv_heads: int) -> int:
    """``n_rep``, the query heads per kv head."""
    if not (isinstance(num_heads, int) and isinstance(num_kv_heads, int)) or num_heads <= 0 or num_kv_heads <= 0 \
            or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    return num_heads // num_kv_heads


def _check_heads(k: int, num_heads: int, num_kv_heads: int, name: str) -> tuple[int, int]:
    """``(n_rep, head_dim)`` of a ``[num_heads * head_dim]`` channel axis of size ``k``."""
    _check_head_counts(num_heads, num_kv_heads)
    if k % num_heads:
        raise ValueError(f"{name}: size {k} is not divisible by num_heads = {num_heads}")
    return num_heads // num_kv_heads, k // num_heads


def expand_kv_scales(s_kv: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """o_proj's input scales ``[num_heads * head_dim]`` from per-kv-head scales ``[num_kv_heads * head_dim]``.

    The attention output channel ``h * head_dim + d`` is a mix of value channel ``(h // n_rep) * head_dim + d``
    (``n_rep = num_heads // num_kv_heads``; the kv-head repeat of ``repeat_interleave``, SDPA's
    ``enable_gqa`` and Hugging Face's ``repeat_kv``), so it is divided by that channel's scale."""
    s_kv = _check_vector(s_kv, None, "s_kv")
    _check_head_counts(num_heads, num_kv_heads)
    if s_kv.shape[0] % num_kv_heads:
        raise ValueError(f"s_kv: size {s_kv.shape[0]} is not divisible by num_kv_heads = {num_kv_heads}")
    n_rep, head_dim = _check_heads(s_kv.shape[0] // num_kv_heads * num_heads, num_heads, num_kv_heads, "s_kv")
    return s_kv.reshape(num_kv_heads, 1, head_dim).expand(num_kv_heads, n_rep, head_dim).reshape(-1)


def kv_scales(s: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The per-kv-head scales ``[num_kv_heads * head_dim]`` of tied o_proj input scales ``s``
    ``[num_heads * head_dim]`` (the inverse of :func:`expand_kv_scales`). Raises ValueError when ``s``
    differs between query heads that share a kv head: such an ``s`` cannot be folded into v_proj."""
    s = _check_vector(s, None, "s")
    n_rep, head_dim = _check_heads(s.shape[0], num_heads, num_kv_heads, "s")
    grouped = s.reshape(num_kv_heads, n_rep, head_dim)
    first = grouped[:, :1]
    if not bool((grouped == first).all()):
        raise ValueError(
            "s: scales differ between query heads that share a kv head; tie them first (tie_gqa_scales)"
        )
    return first.reshape(-1)


def tie_gqa_scales(s: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Make o_proj input scales foldable into v_proj: replace each channel's scale by the geometric mean
    over the query heads that share its kv head (``n_rep`` values), exactly equal within a group.

    The geometric mean keeps the normalisation (``sum(log s)`` is unchanged) and is the same as tying
    the statistics of the power formulas before taking the powers."""
    s = _check_scales(s, None)
    n_rep, head_dim = _check_heads(s.shape[0], num_heads, num_kv_heads, "s")
    with torch.no_grad():
        log_kv = s.detach().double().log().reshape(num_kv_heads, n_rep, head_dim).mean(1)
        s_kv = log_kv.exp().to(s.dtype).reshape(-1)
    return expand_kv_scales(s_kv, num_heads, num_kv_heads)


# ----------------------------------------------------------------------------------------- the search


def _flatten_tokens(x, k: int | None, name: str = "x") -> torch.Tensor:
    x = _check_tensor(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name}: expected calibration inputs [T, K] (or [..., K]), got shape {tuple(x.shape)}")
    if k is not None and x.shape[-1] != k:
        raise ValueError(f"{name}: K mismatch, inputs have shape {tuple(x.shape)} but the weights' K is {k}")
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no calibration tokens (shape {tuple(x.shape)})")
    _check_finite(x, name)
    return x


def _check_nvfp4_k(k: int) -> None:
    if k % BLOCK_SIZE:
        raise ValueError(f"weights: K = {k} is not a multiple of the NVFP4 block size {BLOCK_SIZE}")


def _check_group(x, weights, chunk_tokens: int):
    """The checked weights, their K and the inputs as ``[T, K]`` tokens of one group."""
    ws = _check_weights(weights, None)
    k = ws[0].shape[1]
    _check_nvfp4_k(k)
    x = _flatten_tokens(x, k)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return ws, k, x


def smoothing_error(x: torch.Tensor, weights, s: torch.Tensor | None = None, w4a4: bool = False,
                    x_amax: torch.Tensor | None = None, shared_weight_amax: bool = False,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> float:
    """The group's NVFP4 output error ``sum_i || x W_i^T - Q_a(x / s) Q_w(W_i * s)^T ||^2`` (a float64 sum).

    ``Q_w`` is the NVFP4 quantize-dequantize (max block scales, round to nearest) of the scaled weight,
    with its own per-tensor amax, or, with ``shared_weight_amax``, the group's one amax (fused q/k/v,
    gate/up). ``Q_a`` is the identity unless ``w4a4``; then it is NVFP4 of ``x / s`` with a static
    per-tensor amax: ``max_k(x_amax[k] / s[k])`` when the calibration set's per-channel amax ``x_amax [K]``
    is given (it may exceed the sample ``x``'s), else ``tensor_amax(x / s)``. Block scales are per token
    and 16 channels, so chunking over tokens (``chunk_tokens`` at a time) does not change the result.
    ``s = None`` means no scaling. Computed in float32 (float64 when an input is float64)."""
    ws, k, x = _check_group(x, weights, chunk_tokens)
    dt = _compute_dtype(x, *ws)
    if s is not None:
        s = _check_scales(s, k)
    if x_amax is not None:
        x_amax = _check_vector(x_amax, k, "x_amax", nonnegative=True)
    with torch.no_grad():
        return _error(x.detach().to(dt), [w.detach().to(dt) for w in ws], None if s is None else s.detach().to(dt),
                      w4a4, None if x_amax is None else x_amax.detach(), shared_weight_amax, chunk_tokens)


def _error(x, ws, s, w4a4, x_amax, shared_weight_amax, chunk_tokens, refs=None) -> float:
    """:func:`smoothing_error` on checked tensors of one dtype (no autograd); ``refs``: the unquantized
    outputs ``x W_i^T`` per chunk when the caller already has them (they do not depend on ``s``)."""
    scaled = ws if s is None else [w * s for w in ws]
    w_amax = torch.stack([tensor_amax(w) for w in scaled]).amax() if shared_weight_amax else None
    wq = [fake_quantize(w, global_amax=w_amax, name=f"weights[{i}] * s") for i, w in enumerate(scaled)]
    a_amax = None
    if w4a4:
        if x_amax is not None:
            a_amax = (x_amax.to(x.dtype) if s is None else x_amax.to(x.dtype) / s).amax().float()
        else:
            a_amax = tensor_amax(x if s is None else x / s)
    total = 0.0
    for c, start in enumerate(range(0, x.shape[0], chunk_tokens)):
        xc = x[start:start + chunk_tokens]
        xs = xc if s is None else xc / s
        xq = fake_quantize(xs, global_amax=a_amax, name="x / s") if w4a4 else xs
        for i, (w, q) in enumerate(zip(ws, wq)):
            d = (xc @ w.T if refs is None else refs[c][i]) - xq @ q.T
            total += float(torch.sum(d.square(), dtype=torch.float64))
    return total


class AWQResult(NamedTuple):
    """The outcome of :func:`awq_search`: the best scales, their alpha, and the loss of every candidate
    (``losses[i]`` belongs to ``alphas[i] = i / grid``; ``losses[0]`` is the unscaled baseline)."""

    s: torch.Tensor
    alpha: float
    losses: list[float]

    @property
    def alphas(self) -> list[float]:
        return [i / len(self.losses) for i in range(len(self.losses))]


def awq_search(x: torch.Tensor, weights, w4a4: bool, grid: int = 20, x_amax: torch.Tensor | None = None,
               gqa: tuple[int, int] | None = None, shared_weight_amax: bool = False,
               floor: float = DEFAULT_FLOOR, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> AWQResult:
    """AWQ-style grid search of the migration strength for one group of Linears sharing the input ``x``.

    Candidates are ``alpha = i / grid`` for ``i = 0 .. grid - 1``: ``alpha = 0`` is the unscaled
    baseline ``s = 1`` (exactly), every other alpha gives ``s = awq_scales(mean|x|, weight_block_mean(W),
    alpha)``. Each candidate is scored by :func:`smoothing_error` (W4A4 or W4A16, ``x_amax`` and
    ``shared_weight_amax`` as there) and the first one with the smallest error wins, so the result is never
    worse on ``x`` than no scaling. ``x``: a sample of calibration tokens ``[T, K]`` (or ``[..., K]``);
    ``weights``: the group's ``[N_i, K]`` weights or Linears, K a multiple of 16.

    ``gqa = (num_heads, num_kv_heads)`` marks o_proj fed by v_proj under grouped-query attention: every
    candidate is tied with :func:`tie_gqa_scales` before it is scored, so the search only considers
    scales :func:`fold_into_v_proj` can fold, and returns such a tied ``s``.

    Returns :class:`AWQResult` ``(s, alpha, losses)``; ``s`` is float32 ``[K]`` (float64 for float64
    inputs), to be folded with :func:`fold_into_norm` / :func:`fold_into_linear` / :func:`fold_into_v_proj`."""
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    _check_floor(floor)
    ws, k, x = _check_group(x, weights, chunk_tokens)
    if x_amax is not None:
        x_amax = _check_vector(x_amax, k, "x_amax", nonnegative=True).detach()
    if gqa is not None:
        _check_heads(k, gqa[0], gqa[1], "x")
    dt = _compute_dtype(x, *ws)
    with torch.no_grad():
        x = x.detach().to(dt)
        wd = [w.detach().to(dt) for w in ws]
        x_mean = sum(x[i:i + chunk_tokens].abs().double().sum(0) for i in range(0, x.shape[0], chunk_tokens))
        x_mean = x_mean / x.shape[0]
        w_mean = weight_block_mean(wd)
        refs = [[x[i:i + chunk_tokens] @ w.T for w in wd] for i in range(0, x.shape[0], chunk_tokens)]
        best_s, best_alpha, best_loss, losses = None, 0.0, math.inf, []
        for i in range(grid):
            alpha = i / grid
            if i == 0:
                s = torch.ones(k, dtype=dt, device=x.device)
            else:
                s = _scales_from_stats(x_mean, w_mean, alpha, floor).to(dt)
                if gqa is not None:
                    s = tie_gqa_scales(s, *gqa)
            loss = _error(x, wd, s, w4a4, x_amax, shared_weight_amax, chunk_tokens, refs)
            losses.append(loss)
            if loss < best_loss:
                best_s, best_alpha, best_loss = s, alpha, loss
    if best_s is None:
        raise ValueError(f"awq_search: every candidate's error is non-finite ({losses}); the inputs overflow {dt}")
    return AWQResult(best_s, best_alpha, losses)


# ---------------------------------------------------------------------------------------------- folding


def _consumer_weights(linears, k: int) -> list[torch.Tensor]:
    return _check_weights(linears, k, "linears")


def _wide(t: torch.Tensor, s: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (t.dtype, s.dtype) else torch.float32


def _mul_columns_(w: torch.Tensor, s: torch.Tensor) -> None:
    dt = _wide(w, s)
    w.copy_(w.to(dt) * s.to(dt, copy=False).to(w.device))


def _div_(t: torch.Tensor, s: torch.Tensor) -> None:
    """``t /= s`` broadcast over t's trailing dims (s indexes dim 0), computed wide, stored in t's dtype."""
    dt = _wide(t, s)
    d = s.to(dt).to(t.device).reshape(-1, *([1] * (t.ndim - 1)))
    t.copy_(t.to(dt) / d)


def fold_into_norm(norm, linears, s: torch.Tensor) -> None:
    """Fold ``s`` in place into a norm and the Linears that read its output: ``g <- g / s`` (and a
    LayerNorm's bias ``b <- b / s``), each consumer's columns ``W <- W * s``.

    ``norm``: the norm module (``.weight``, optional ``.bias``) or its weight tensor; the norm must
    multiply by its weight directly (``y = g * normalized(x) [+ b]``, Llama/Nemotron RMSNorm, LayerNorm),
    not by ``1 + g`` (Gemma's form would need ``g <- (1 + g) / s - 1``). ``linears``: the consumers
    (modules with ``.weight [N_i, K]`` or weight tensors). Exact in full precision; everything is
    validated before anything is modified."""
    g = _check_tensor(getattr(norm, "weight", norm), "norm.weight")
    if g.ndim != 1:
        raise ValueError(f"norm.weight: expected shape [K], got {tuple(g.shape)}")
    k = g.shape[0]
    s = _check_scales(s, k)
    ws = _consumer_weights(linears, k)
    b = getattr(norm, "bias", None) if not isinstance(norm, torch.Tensor) else None
    if b is not None and tuple(b.shape) != (k,):
        raise ValueError(f"norm.bias: expected shape [{k}], got {tuple(b.shape)}")
    with torch.no_grad():
        _div_(g, s)
        if b is not None:
            _div_(b, s)
        for w in ws:
            _mul_columns_(w, s)


def _row_index(rows, n_out: int, k: int, name: str):
    """``rows`` of the producer as a slice or index tensor selecting exactly K rows."""
    if rows is None:
        if n_out != k:
            raise ValueError(f"{name}: has {n_out} output rows but the consumers' K is {k}; pass rows= to select {k}")
        return slice(None)
    if isinstance(rows, slice):
        n = len(range(*rows.indices(n_out)))
        if n != k:
            raise ValueError(f"rows: the slice {rows} selects {n} of {name}'s {n_out} rows, "
                             f"but the consumers' K is {k}")
        return rows
    idx = torch.as_tensor(list(rows) if isinstance(rows, range) else rows, dtype=torch.long)
    if idx.ndim != 1 or idx.shape[0] != k:
        raise ValueError(f"rows: expected {k} row indices, got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_out):
        raise ValueError(f"rows: indices must lie in [0, {n_out}) for {name}, got [{int(idx.min())}, {int(idx.max())}]")
    if idx.unique().numel() != k:
        raise ValueError("rows: row indices must be distinct")
    return idx


def _producer(prev_linear, k: int, rows, name: str):
    """Check a producing Linear for rows scaled by a [k] vector: its (weight, bias, row index)."""
    w_prev = _check_tensor(getattr(prev_linear, "weight", prev_linear), f"{name}.weight")
    if w_prev.ndim != 2:
        raise ValueError(f"{name}.weight: expected a 2-D weight [N, K], got shape {tuple(w_prev.shape)}")
    idx = _row_index(rows, w_prev.shape[0], k, f"{name}.weight")
    b_prev = getattr(prev_linear, "bias", None) if not isinstance(prev_linear, torch.Tensor) else None
    if b_prev is not None and tuple(b_prev.shape) != (w_prev.shape[0],):
        raise ValueError(f"{name}.bias: expected shape [{w_prev.shape[0]}], got {tuple(b_prev.shape)}")
    return w_prev, b_prev, idx


def _div_rows_(w_prev, b_prev, idx, s: torch.Tensor) -> None:
    for t in (w_prev, b_prev):
        if t is None:
            continue
        if isinstance(idx, slice):
            _div_(t[idx], s)  # a view: divided in place
        else:
            part = t[idx]
            _div_(part, s)
            t[idx] = part


def fold_into_linear(prev_linear, linears, s: torch.Tensor, rows=None) -> None:
    """Fold ``s`` in place into a producing Linear and its consumers: the producer's output rows
    ``W_prev[rows] <- W_prev[rows] / s[:, None]`` (and ``bias[rows] <- bias[rows] / s``), each consumer's
    columns ``W <- W * s``.

    Exact when the consumers' input is the producer's output (selected by ``rows``: None for all of them,
    a slice, or K row indices, e.g. the v part of a fused qkv) through maps linear in it: a reshape, or
    attention's mixing of values (v_proj -> o_proj without GQA; :func:`fold_into_v_proj` with it). Not
    through an elementwise nonlinearity (up_proj -> act -> down_proj is not foldable, except gated
    ``act(gate) * up``, which is linear in up). ``prev_linear``: a module with ``.weight [N_prev, K_prev]``
    (optional ``.bias``) or a weight tensor; ``linears``: modules or weight tensors ``[N_i, K]``.
    Everything is validated before anything is modified."""
    ws = _consumer_weights(linears, None)
    k = ws[0].shape[1]
    s = _check_scales(s, k)
    w_prev, b_prev, idx = _producer(prev_linear, k, rows, "prev_linear")
    with torch.no_grad():
        _div_rows_(w_prev, b_prev, idx, s)
        for w in ws:
            _mul_columns_(w, s)


def fold_into_v_proj(v_proj, o_proj, s: torch.Tensor, num_heads: int, num_kv_heads: int, rows=None) -> None:
    """Fold o_proj's input scales ``s [num_heads * head_dim]`` in place under grouped-query attention:
    v_proj's rows ``/ kv_scales(s)`` (``[num_kv_heads * head_dim]``), o_proj's columns ``* s``.

    ``s`` must be tied (equal across the query heads sharing a kv head: :func:`tie_gqa_scales`, or
    ``awq_search(..., gqa=(num_heads, num_kv_heads))``); ValueError otherwise. ``rows`` selects v's rows
    in a fused qkv producer as in :func:`fold_into_linear`. Exact: RoPE and the attention probabilities
    do not touch the values. (An FP8 KV cache stores the folded values: calibrate it after folding.)"""
    w_o = _check_tensor(getattr(o_proj, "weight", o_proj), "o_proj.weight")
    if w_o.ndim != 2:
        raise ValueError(f"o_proj.weight: expected a 2-D weight [N, K], got shape {tuple(w_o.shape)}")
    s = _check_scales(s, w_o.shape[1])
    s_kv = kv_scales(s, num_heads, num_kv_heads)
    w_v, b_v, idx = _producer(v_proj, s_kv.shape[0], rows, "v_proj")
    with torch.no_grad():
        _div_rows_(w_v, b_v, idx, s_kv)
        _mul_columns_(w_o, s)
