"""Offline rotations of a pre-norm decoder LM (QuaRot / SpinQuant without learning), fused into the weights.

A rotated model computes the same function in exact arithmetic and is still a standard checkpoint: only
weights change, so a serving engine needs nothing new. Rotating spreads outliers of the residual stream and
of the attention values across many channels, which makes them easier to quantize.

Supported: Hugging Face Llama / Mistral / Qwen2 / Qwen3 style causal LMs (``model.model.embed_tokens``,
``model.model.layers[i]`` with ``input_layernorm``, ``self_attn.{q,k,v,o}_proj`` (biases allowed; Qwen3's
``q_norm``/``k_norm`` act on q/k only and are untouched), ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``, ``model.model.norm``, ``model.lm_head``). :func:`check_rotatable` says why
any other model is refused.

The rules, with ``Q`` [hidden, hidden] and ``H`` [head_dim, head_dim] orthogonal (``x`` a row vector):

* **RMSNorm folding.** ``rms(x Q) == rms(x)``, so an RMSNorm with weight one commutes with ``Q``; each norm's
  weight ``g`` is folded into the Linears reading its output (``W <- W diag(g)``) and set to ones.
* **Residual stream.** ``embed_tokens.weight <- E Q``; every Linear reading the residual (q, k, v, gate,
  up, lm_head) ``W <- W Q``; every Linear writing to it (o_proj, down_proj) ``W <- Q^T W`` and
  ``bias <- bias Q``.
* **Values per head.** Each head's value output is rotated by ``H`` (``W_v <- blockdiag(H)^T W_v``,
  ``b_v <- b_v blockdiag(H)``, over the KV heads) and o_proj undoes it on its input columns
  (``W_o <- W_o blockdiag(H)``, over the query heads; a GQA group shares its KV head, so the rotation
  passes through attention unchanged). q and k are not rotated (RoPE does not commute with ``H``).

Folding and rotating a weight happen in one float64 pass, cast back once to the weight's own dtype.
Big weights (embeddings, heads, MLPs) are transformed in place chunk by chunk, so the float64 copy of a
weight is never whole in memory.

Tied embeddings: after rotation the head is ``E diag(g) Q`` while the embedding is ``E Q``, so they can no
longer share a tensor. :func:`untie_head` gives ``lm_head`` its own Parameter, sets
``config.tie_word_embeddings = False`` and refreshes transformers 5's cached tie map
(``model.all_tied_weights_keys``, which ``init_weights`` / ``tie_weights(recompute_mapping=False)`` read),
so neither ``save_pretrained`` + ``from_pretrained`` nor our writer (which drops only tensors that are
really shared, :func:`nvfp4kit.calibrate.records.tied_duplicates`) ties them again.

Whole model: :func:`rotate_model`. Block by block (the embedding, then one decoder layer at a time, then the
final norm + head): :func:`check_rotatable` and :func:`untie_head` on the skeleton (they work on meta
models), :func:`model_rotations` for ``Q`` / ``H``, then :func:`rotate_embedding`, :func:`rotate_layer` per
layer and :func:`rotate_head` as each piece is loaded. :func:`rotate_model` is exactly that sequence.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..formats.hadamard import hadamard_matrix

#: Every rotated dimension must be a multiple of this (NVFP4's block size).
ROTATION_MULTIPLE = 16
#: float64 elements per chunk when transforming a big weight in place (128 MiB).
_CHUNK_ELEMENTS = 1 << 24

_ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
# modules of a layer that hold parameters the rotations leave alone (per-head norms of q / k)
_LAYER_UNTOUCHED = ("self_attn.q_norm", "self_attn.k_norm")


# --------------------------------------------------------------------------------------------- matrices


def rotation_block_size(dim: int) -> int:
    """The block size of :func:`rotation_matrix`: the largest power of two dividing ``dim``."""
    _check_dim(dim)
    return dim & -dim


def _check_dim(dim) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"rotation: dimension must be an int, got {type(dim).__name__}")
    if dim < 1 or dim % ROTATION_MULTIPLE:
        raise ValueError(f"rotation: dimension must be a positive multiple of {ROTATION_MULTIPLE}, got {dim}")


def rotation_matrix(dim: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Randomized block Hadamard rotation ``diag(s) @ blockdiag(Hb, ..., Hb) / sqrt(b)`` [dim, dim], orthonormal.

    ``b`` is :func:`rotation_block_size` (576 -> 64, 896 -> 128, 4096 -> 4096), ``Hb`` the Sylvester Hadamard
    matrix of order ``b`` and ``s`` a +-1 sign per row drawn from a ``torch.Generator`` seeded with ``seed``
    (so one seed gives one matrix on every machine). Built in float64, returned in ``dtype`` on the CPU.
    """
    _check_dim(dim)
    b = dim & -dim
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    block = hadamard_matrix(b, torch.float64) / (b**0.5)
    q = torch.block_diag(*([block] * (dim // b)))
    return (signs.unsqueeze(1) * q).to(dtype)


@dataclass(frozen=True)
class RotationInfo:
    """What :func:`rotate_model` did (enough to rebuild the same matrices with :func:`rotation_matrix`).

    Attributes:
        seed: seed of the residual-stream rotation ``Q = rotation_matrix(hidden_size, seed)``.
        hidden_size: size of the residual stream; ``hidden_block`` the Hadamard block size of ``Q``.
        heads: whether the per-head value rotation ``H`` was applied.
        head_seed, head_dim, head_block: ``H = rotation_matrix(head_dim, head_seed)`` and its block size
            (``head_seed`` / ``head_block`` are None when ``heads`` is False).
        untied_head: True when the head was tied to the embedding (shared tensor or declared in the
            config) and is now a separate weight with ``config.tie_word_embeddings = False``.
    """

    seed: int
    hidden_size: int
    hidden_block: int
    heads: bool
    head_seed: int | None
    head_dim: int
    head_block: int | None
    untied_head: bool


def head_seed_for(seed: int) -> int:
    """Seed of the per-head rotation ``H`` derived from the residual seed (``seed + 1``)."""
    return int(seed) + 1


# --------------------------------------------------------------------------------------------- checks


def _fail(model: nn.Module, reason: str):
    raise ValueError(f"rotation: {type(model).__name__} is not supported: {reason}")


def _norm_weight(norm: nn.Module) -> nn.Parameter | None:
    w = getattr(norm, "weight", None)
    return w if isinstance(w, nn.Parameter) else None


def _probe_norm(norm: nn.Module, hidden: int) -> str | None:
    """Why ``norm`` cannot be folded and rotated through (None when it can).

    Checked by behaviour on a float64 copy, with the class's own ``forward`` (works on meta modules too):
    (a) the output is ``weight * f(x)`` (no bias, no ``1 + weight`` offset) and (b) with weight one it
    commutes with an orthogonal map (a random reflection): no mean subtraction, nothing per channel.
    """
    name = type(norm).__name__
    w = _norm_weight(norm)
    if w is None or w.ndim != 1 or w.shape[0] != hidden:
        return f"{name} has no weight of shape [{hidden}]"
    extra = [n for n, _ in norm.named_parameters() if n != "weight"]
    if extra or getattr(norm, "bias", None) is not None:
        return f"{name} has parameters besides its weight ({', '.join(extra) or 'bias'})"
    probe = copy.deepcopy(norm)
    if any(p.is_meta for p in probe.parameters()) or any(b.is_meta for b in probe.buffers()):
        probe = probe.to_empty(device="cpu")
    probe = probe.to(device="cpu", dtype=torch.float64)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(4, hidden, generator=gen, dtype=torch.float64)
    g = torch.rand(hidden, generator=gen, dtype=torch.float64) + 0.5
    v = torch.randn(hidden, generator=gen, dtype=torch.float64)
    v = v / v.norm()

    def reflect(t):
        return t - 2 * (t @ v).unsqueeze(-1) * v

    def run(weight, inp):
        with torch.no_grad():
            probe.weight.copy_(weight)
            return type(probe).forward(probe, inp)

    try:
        ones = run(torch.ones(hidden, dtype=torch.float64), x)
        scaled = run(g, x)
        turned = run(torch.ones(hidden, dtype=torch.float64), reflect(x))
    except Exception as e:  # noqa: BLE001 - any failure means we cannot vouch for the norm
        return f"{name} could not be probed ({type(e).__name__}: {e})"
    tol = 1e-5 * max(1.0, float(ones.abs().max()))
    if not isinstance(ones, torch.Tensor) or ones.shape != x.shape:
        return f"{name} does not map [*, {hidden}] to [*, {hidden}]"
    if float((scaled - g * ones).abs().max()) > tol:
        return f"{name} is not weight * f(x) (a bias or a (1 + weight) offset cannot be folded)"
    if float((turned - reflect(ones)).abs().max()) > tol:
        return f"{name} does not commute with rotations (mean subtraction, as in LayerNorm?)"
    return None


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _layer_problem(layer: nn.Module, hidden: int, head_dim: int, heads: bool) -> str | None:
    """Why a decoder layer is not a supported pre-norm block (None when it is)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and (hasattr(mlp, "experts") or hasattr(mlp, "router")):
        return "mixture-of-experts MLP (experts / fused experts are not rotated)"
    modules = {}
    for path in [f"self_attn.{n}" for n in _ATTN_LINEARS] + [f"mlp.{n}" for n in _MLP_LINEARS]:
        m = _submodule(layer, path)
        if not isinstance(m, nn.Linear):
            return f"missing nn.Linear {path} (fused or renamed projections are not supported)"
        if not m.weight.dtype.is_floating_point:
            return f"{path} has {m.weight.dtype} weights (already quantized?)"
        modules[path] = m
    for path in _LAYER_NORMS:
        m = getattr(layer, path, None)
        if m is None:
            return f"missing {path} (not a pre-norm Llama-style block)"
        why = _probe_norm(m, hidden)
        if why:
            return f"{path}: {why}"
    allowed = set(modules) | set(_LAYER_NORMS) | set(_LAYER_UNTOUCHED)
    for name, _ in layer.named_parameters():
        owner = name.rpartition(".")[0]
        if owner not in allowed:
            return f"unexpected parameter {name} (the block has more than the supported modules)"
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        if modules[path].in_features != hidden:
            return f"{path} reads {modules[path].in_features} features, expected the hidden size {hidden}"
    for path in ("self_attn.o_proj", "mlp.down_proj"):
        if modules[path].out_features != hidden:
            return f"{path} writes {modules[path].out_features} features, expected the hidden size {hidden}"
    if modules["mlp.gate_proj"].out_features != modules["mlp.down_proj"].in_features:
        return "mlp.gate_proj and mlp.down_proj disagree on the intermediate size"
    v, o = modules["self_attn.v_proj"], modules["self_attn.o_proj"]
    if v.out_features % head_dim or o.in_features % head_dim:
        return f"v_proj ({v.out_features}) / o_proj ({o.in_features}) are not whole heads of {head_dim}"
    kv, nh = v.out_features // head_dim, o.in_features // head_dim
    if nh % kv:
        return f"{nh} attention heads are not a multiple of {kv} key/value heads"
    if heads and head_dim % ROTATION_MULTIPLE:
        return f"head_dim {head_dim} is not a multiple of {ROTATION_MULTIPLE} (use heads=False)"
    return None


def _head_dim(config, layer: nn.Module | None = None) -> int:
    attn = getattr(layer, "self_attn", None) if layer is not None else None
    hd = getattr(attn, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    if config is None:
        raise ValueError("rotation: head_dim unknown (pass config=, or use a layer whose self_attn has head_dim)")
    hd = getattr(config, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    return int(config.hidden_size) // int(config.num_attention_heads)


def check_rotatable(model: nn.Module, heads: bool = True) -> None:
    """Raise ValueError (naming the model class and the reason) unless :func:`rotate_model` is exact for it.

    Checks the module layout (embedding, pre-norm decoder layers with separate q/k/v/o and gate/up/down
    Linears, final norm, head; no other parameters, no mixture of experts), that every norm is an RMSNorm
    that can be folded (probed by behaviour: no bias, no ``1 + weight`` offset, no mean subtraction), and
    that the hidden size (and, with ``heads``, head_dim) is a multiple of 16. Touches no weight; works on
    meta-device models.
    """
    base = getattr(model, "model", None)
    if base is None:
        _fail(model, "no decoder at model.model (expected a *ForCausalLM)")
    emb, layers, norm = (getattr(base, n, None) for n in ("embed_tokens", "layers", "norm"))
    head = getattr(model, "lm_head", None)
    if not isinstance(emb, nn.Embedding):
        _fail(model, "model.model.embed_tokens is missing or not an nn.Embedding")
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        _fail(model, "model.model.layers is missing or empty")
    if norm is None:
        _fail(model, "model.model.norm is missing")
    if not isinstance(head, nn.Linear):
        _fail(model, "model.lm_head is missing or not an nn.Linear")
    hidden = emb.weight.shape[1]
    if hidden % ROTATION_MULTIPLE:
        _fail(model, f"hidden size {hidden} is not a multiple of {ROTATION_MULTIPLE}")
    if head.in_features != hidden:
        _fail(model, f"lm_head reads {head.in_features} features, the embedding has {hidden}")
    if not (emb.weight.dtype.is_floating_point and head.weight.dtype.is_floating_point):
        _fail(model, "embedding / head weights are not floating point")
    for name, _ in model.named_parameters():
        if not name.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")):
            _fail(model, f"unexpected parameter {name} (only embed_tokens, layers, norm and lm_head are rotated)")
    why = _probe_norm(norm, hidden)
    if why:
        _fail(model, f"model.model.norm: {why}")
    config = getattr(model, "config", None)
    for i, layer in enumerate(layers):
        try:
            hd = _head_dim(config, layer)
        except (AttributeError, TypeError, ValueError):
            _fail(model, f"layer {i}: head_dim unknown")
        why = _layer_problem(layer, hidden, hd, heads)
        if why:
            _fail(model, f"layer {i}: {why}")


# --------------------------------------------------------------------------------------------- in-place updates


def _matrix(m: torch.Tensor, n: int, like: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor) or m.shape != (n, n):
        raise ValueError(f"rotation: {what} must be a [{n}, {n}] tensor, got "
                         f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
    return m.to(device=like.device, dtype=torch.float64)


def _check_loaded(t: torch.Tensor, what: str) -> None:
    if t.is_meta:
        raise ValueError(f"rotation: {what} is on the meta device; load the weights first")


@torch.no_grad()
def _update(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], dim: int = 0, align: int = 1) -> None:
    """``t <- fn(t)`` in place, computed in float64 and cast back once. ``fn`` must act independently on
    chunks of ``t`` along ``dim`` whose size is a multiple of ``align`` (chunks hold ~2^24 elements)."""
    if t.ndim == 1:
        t.copy_(fn(t.to(torch.float64)).to(t.dtype))
        return
    size, other = t.shape[dim], t.numel() // max(1, t.shape[dim])
    step = max(align, (_CHUNK_ELEMENTS // max(1, other)) // align * align)
    for a in range(0, size, step):
        part = t.narrow(dim, a, min(step, size - a))
        part.copy_(fn(part.to(torch.float64)).to(t.dtype))


def _heads_left(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``blockdiag(H)^T @ w`` for ``w`` [k * d, n] (rows grouped by head)."""
    d = h.shape[0]
    return torch.einsum("dj,kdn->kjn", h, w.reshape(-1, d, w.shape[-1])).reshape(w.shape)


def _heads_right(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``w @ blockdiag(H)`` for ``w`` [..., k * d] (columns grouped by head)."""
    d = h.shape[0]
    return (w.reshape(*w.shape[:-1], -1, d) @ h).reshape(w.shape)


def _read_residual(linear: nn.Linear, q: torch.Tensor | None, gain: torch.Tensor | None,
                   h: torch.Tensor | None = None):
    """A Linear reading the (normalised) residual: ``W <- [blockdiag(H)^T] (W diag(gain)) Q`` and, with
    ``h``, ``bias <- bias blockdiag(H)`` (the values per head); ``q`` None: no rotation (folding only).
    One owner for every residual reader."""
    w = linear.weight
    _check_loaded(w, "a reader's weight")
    qd = None if q is None else _matrix(q, w.shape[1], w, "Q")
    g = None if gain is None else gain.detach().to(device=w.device, dtype=torch.float64)
    hd = None if h is None else _matrix(h, h.shape[0], w, "H")
    if hd is not None and w.shape[0] % hd.shape[0]:
        raise ValueError(f"rotation: {w.shape[0]} output features are not whole heads of {hd.shape[0]}")

    def fn(x):
        if g is not None:
            x = x * g
        if qd is not None:
            x = x @ qd
        return x if hd is None else _heads_left(x, hd)
    _update(w, fn, dim=0, align=1 if hd is None else hd.shape[0])
    if hd is not None and linear.bias is not None:
        _update(linear.bias, lambda b: _heads_right(b, hd))


def _write_residual(linear: nn.Linear, q: torch.Tensor, h: torch.Tensor | None = None):
    """A Linear writing to the residual: ``W <- Q^T W [blockdiag(H)]``, ``bias <- bias Q`` (``h``: undo the
    per-head value rotation on the input columns). One owner for every residual writer."""
    w = linear.weight
    _check_loaded(w, "a writer's weight")
    qd = _matrix(q, w.shape[0], w, "Q")
    hd = None if h is None else _matrix(h, h.shape[0], w, "H")
    if hd is not None and w.shape[1] % hd.shape[0]:
        raise ValueError(f"rotation: {w.shape[1]} input features are not whole heads of {hd.shape[0]}")

    def fn(x):
        y = qd.t() @ x
        return y if hd is None else _heads_right(y, hd)
    _update(w, fn, dim=1, align=1 if hd is None else hd.shape[0])
    if linear.bias is not None:
        _update(linear.bias, lambda b: b @ qd)


def _absorb_norm(norm: nn.Module, readers: Sequence[nn.Linear], q: torch.Tensor | None,
                 h_for: dict[int, torch.Tensor] | None = None) -> None:
    """Fold ``norm``'s weight into the Linears reading it (rotating their inputs by ``q`` in the same pass)
    and set the norm weight to ones. ``h_for``: id(reader) -> per-head rotation of that reader's output."""
    g = _norm_weight(norm)
    if g is None:
        raise ValueError(f"rotation: {type(norm).__name__} has no weight to fold")
    _check_loaded(g, "a norm weight")
    gain = g.detach().to(torch.float64).clone()
    for lin in readers:
        _read_residual(lin, q, gain, (h_for or {}).get(id(lin)))
    with torch.no_grad():
        g.fill_(1)


# --------------------------------------------------------------------------------------------- pieces


def fold_norm(norm: nn.Module, linears: Sequence[nn.Linear]) -> None:
    """Fold an RMSNorm's weight ``g`` into the Linears reading its output (``W <- W diag(g)``); ``g <- 1``."""
    _absorb_norm(norm, linears, None)


def rotate_embedding(embedding: nn.Module, q: torch.Tensor) -> None:
    """``embedding.weight <- E @ Q`` in place. A head tied to this embedding must be untied first
    (:func:`untie_head`), or it would be rotated with it."""
    w = embedding.weight
    _check_loaded(w, "the embedding")
    qd = _matrix(q, w.shape[1], w, "Q")
    _update(w, lambda x: x @ qd, dim=0)


def _layer_modules(layer: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for path in [f"self_attn.{n}" for n in _ATTN_LINEARS] + [f"mlp.{n}" for n in _MLP_LINEARS] + list(_LAYER_NORMS):
        m = _submodule(layer, path)
        if m is None:
            raise ValueError(f"rotation: {type(layer).__name__} has no {path}")
        out[path] = m
    return out


def rotate_layer(layer: nn.Module, q: torch.Tensor, h: torch.Tensor | None = None, config=None) -> None:
    """Rotate one decoder layer in place: fold its two RMSNorms, rotate the residual readers (q, k, v, gate,
    up) by ``Q`` and writers (o, down) by ``Q^T``; with ``h`` also the values per head (v_proj / o_proj).
    ``config`` gives head_dim when ``layer.self_attn`` has none."""
    m = _layer_modules(layer)
    if not isinstance(q, torch.Tensor) or (h is not None and not isinstance(h, torch.Tensor)):
        raise ValueError("rotation: Q and H must be tensors")
    device = m["self_attn.q_proj"].weight.device
    q = q.to(device=device, dtype=torch.float64)  # once per layer, not once per Linear
    if h is not None:
        hd = _head_dim(config, layer)
        if h.shape != (hd, hd):
            raise ValueError(f"rotation: H must be [{hd}, {hd}] (head_dim), got {tuple(h.shape)}")
        h = h.to(device=device, dtype=torch.float64)
    v = m["self_attn.v_proj"]
    attn_readers = [m["self_attn.q_proj"], m["self_attn.k_proj"], v]
    _absorb_norm(m["input_layernorm"], attn_readers, q, None if h is None else {id(v): h})
    _write_residual(m["self_attn.o_proj"], q, h)
    _absorb_norm(m["post_attention_layernorm"], [m["mlp.gate_proj"], m["mlp.up_proj"]], q)
    _write_residual(m["mlp.down_proj"], q)


def rotate_head(norm: nn.Module, lm_head: nn.Linear, q: torch.Tensor) -> None:
    """Fold the final norm into the head and rotate its input: ``W <- W diag(g) Q``, ``g <- 1``.
    The head must not share its weight with the embedding (:func:`untie_head`)."""
    _absorb_norm(norm, [lm_head], q)


def _configs(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    out = [cfg]
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text()
        except Exception:  # noqa: BLE001 - an unusual config without a text part
            text = None
        if text is not None and text is not cfg:
            out.append(text)
    return out


def untie_head(model: nn.Module) -> bool:
    """Give ``lm_head`` its own weight if it shares the embedding's, and make the untying stick.

    Sets ``tie_word_embeddings = False`` on the config (and its text config) and recomputes
    transformers 5's cached ``all_tied_weights_keys`` of every PreTrainedModel inside ``model`` (the class
    attribute ``_tied_weights_keys`` stays: it only declares what *may* be tied, and transformers applies it
    only while the config says to tie). Works on meta skeletons. Returns True when the head was tied
    (shared tensor, or declared tied in the config).
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    shared = head is not None and head.weight is emb.weight
    if head is not None and not shared and not head.weight.is_meta and not emb.weight.is_meta:
        shared = (head.weight.untyped_storage().data_ptr() == emb.weight.untyped_storage().data_ptr()
                  and head.weight.storage_offset() == emb.weight.storage_offset())
    declared = any(getattr(c, "tie_word_embeddings", False) for c in _configs(model))
    if shared:
        w = emb.weight
        head.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    for c in _configs(model):
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    for m in model.modules():
        expand = getattr(m, "get_expanded_tied_weights_keys", None)
        if callable(expand) and hasattr(m, "all_tied_weights_keys"):
            m.all_tied_weights_keys = expand(all_submodels=True)
    return bool(shared or declared)


def model_rotations(model: nn.Module, seed: int = 0, heads: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The matrices :func:`rotate_model` uses: ``Q = rotation_matrix(hidden, seed)`` and, with ``heads``,
    ``H = rotation_matrix(head_dim, head_seed_for(seed))`` (else None); float64 on the CPU."""
    hidden = model.get_input_embeddings().weight.shape[1]
    q = rotation_matrix(hidden, seed)
    if not heads:
        return q, None
    return q, rotation_matrix(_head_dim(getattr(model, "config", None), model.model.layers[0]), head_seed_for(seed))


def rotate_model(model: nn.Module, seed: int = 0, heads: bool = True) -> RotationInfo:
    """Rotate a whole in-memory model in place (same logits in exact arithmetic); see the module docstring.

    Runs :func:`check_rotatable` first (nothing changes if it raises), unties a tied head, then
    :func:`rotate_embedding`, :func:`rotate_layer` per layer and :func:`rotate_head`.
    """
    check_rotatable(model, heads=heads)
    untied = untie_head(model)
    q, h = model_rotations(model, seed, heads)
    rotate_embedding(model.model.embed_tokens, q)
    config = getattr(model, "config", None)
    for layer in model.model.layers:
        rotate_layer(layer, q, h, config)
    rotate_head(model.model.norm, model.lm_head, q)
    hd = _head_dim(config, model.model.layers[0])
    return RotationInfo(seed=int(seed), hidden_size=q.shape[0], hidden_block=rotation_block_size(q.shape[0]),
                        heads=bool(heads), head_seed=head_seed_for(seed) if heads else None, head_dim=hd,
                        head_block=rotation_block_size(hd) if heads else None, untied_head=untied)


__all__ = [
    "ROTATION_MULTIPLE",
    "RotationInfo",
    "check_rotatable",
    "fold_norm",
    "head_seed_for",
    "model_rotations",
    "rotate_embedding",
    "rotate_head",
    "rotate_layer",
    "rotate_model",
    "rotation_block_size",
    "rotation_matrix",
    "untie_head",
]
