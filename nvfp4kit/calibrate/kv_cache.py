"""Static FP8 / NVFP4 KV cache: reach the key and value states of every attention as they are cached.

Serving engines (vLLM, TensorRT-LLM) quantize what they write into the KV cache, i.e. the keys
**after** the rotary embedding (and any key norm) and the values, per attention layer, with one
static scale each (FP8: ``k_scale = k_amax / 448``; NVFP4: ``k_amax / (6 * 448)``, the second-level
scale of 1x16 blocks along the head dim: :mod:`nvfp4kit.checkpoint.kv_cache`). Calibrating the
``k_proj`` outputs instead would give a wrong key scale for RoPE models, so this module hooks the
point where the keys and values enter the attention computation:

* Hugging Face models: transformers' attention interface. While an attention module runs, the
  entry of ``transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS`` named by its
  ``config._attn_implementation`` is replaced by a function that passes ``(key, value)`` through
  the hook and then calls the model's original implementation (``eager``: the model's own
  ``eager_attention_forward``); the entry is restored when the module returns, also on error. The
  keys reach it after RoPE and before any grouped-query repeat.
* nvfp4kit's Nemotron 3 hybrid model: its ``Attention`` has an explicit ``kv_hook`` attribute,
  applied to the new keys/values just before they enter the cache (no positional encoding there).

The attention module of a layer is the module whose children include ``k_proj`` and ``v_proj``
(e.g. ``model.layers.3.self_attn``, ``backbone.layers.1.mixer``): the checkpoint writers store its
scales as ``<attn>.k_proj.k_scale`` / ``<attn>.v_proj.v_scale`` (modelopt) or ``<attn>.k_scale`` /
``<attn>.v_scale`` (compressed-tensors).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .. import progress
from ..checkpoint.kv_cache import KV_CACHE_FORMATS, check_kv_cache_format, exact_kv_amax
from ..formats.nvfp4 import BLOCK_SIZE

# hook(name, key, value) -> (key, value); name is the attention module's name
KVHook = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` with ``k_proj`` and ``v_proj`` children, by name, in model order."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "k_proj", None), nn.Module) and isinstance(getattr(m, "v_proj", None), nn.Module):
            out[name] = m
    return out


def _has_own_hook(module: nn.Module) -> bool:
    return "kv_hook" in vars(module)


def _eager_attention_of(module: nn.Module, name: str):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{name}: {type(module).__name__} uses eager attention but its module defines no "
                         "eager_attention_forward to delegate to")
    return fn


class _InterfaceHook:
    """Forward pre/post hooks of one HF attention module that swap its attention function for the
    duration of its forward; records whether the attention function was reached."""

    def __init__(self, name: str, module: nn.Module, hook: KVHook, fallback_config):
        self.name = name
        self.module = module
        self.hook = hook
        self.config = getattr(module, "config", None) or fallback_config
        self._saved: list[tuple[str, object, int]] = []
        self.calls = 0

    def before(self, module, args, kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

        impl = getattr(self.config, "_attn_implementation", None)  # the key the module looks up
        prev = fns[impl] if impl in fns else None  # not registered ("eager"): the model's own function

        def attention(mod, query, key, value, *a, **kw):
            if mod is self.module:
                self.calls += 1
                key, value = self.hook(self.name, key, value)
            original = prev if prev is not None else _eager_attention_of(mod, self.name)
            return original(mod, query, key, value, *a, **kw)

        self._saved.append((impl, prev, self.calls))
        fns[impl] = attention
        return None

    def after(self, module, args, kwargs, output):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

        if not self._saved:
            return None
        impl, prev, calls_before = self._saved.pop()
        try:
            del fns[impl]  # drop the override; the library's own entry (if any) shows again
        except KeyError:
            pass
        if prev is not None and fns.get(impl) is not prev:
            fns[impl] = prev  # an override that was there before (e.g. another handle's)
        if output is not None and self.calls == calls_before:
            raise ValueError(f"{self.name}: {type(module).__name__} did not call transformers' attention interface "
                             f"({impl!r}), so its cached keys/values cannot be reached (KV cache)")
        return None


class KVHookHandle:
    """Installed KV hooks of one model; :meth:`remove` restores every module."""

    def __init__(self):
        self._own: list[tuple[nn.Module, object]] = []
        self._handles = []
        self.interface_hooks: dict[str, _InterfaceHook] = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m, prev in reversed(self._own):
            m.kv_hook = prev
        self._own.clear()


def add_kv_hooks(model: nn.Module, hook: KVHook, names=None) -> KVHookHandle:
    """Route the keys and values of the attention modules of ``model`` (all, or ``names``) through
    ``hook(name, key, value) -> (key, value)`` as they are cached, until the handle is removed."""
    attn = attention_modules(model)
    if not attn:
        raise ValueError("found no attention module (a module with k_proj and v_proj children) in the model")
    if names is not None:
        missing = [n for n in names if n not in attn]
        if missing:
            raise ValueError(f"not attention modules of the model: {', '.join(missing[:5])}")
        attn = {n: attn[n] for n in names}
    handle = KVHookHandle()
    try:
        for name, m in attn.items():
            if _has_own_hook(m):
                handle._own.append((m, m.kv_hook))
                m.kv_hook = _bind(hook, name)
                continue
            ih = _InterfaceHook(name, m, hook, getattr(model, "config", None))
            handle._handles.append(m.register_forward_pre_hook(ih.before, with_kwargs=True))
            # post hooks run last-registered first, so nested handles restore in reverse order
            handle._handles.append(m.register_forward_hook(ih.after, with_kwargs=True, always_call=True,
                                                           prepend=True))
            handle.interface_hooks[name] = ih
    except BaseException:
        handle.remove()
        raise
    return handle


def _bind(hook: KVHook, name: str):
    def kv_hook(k, v):
        return hook(name, k, v)

    return kv_hook


@contextmanager
def kv_hooks(model: nn.Module, hook: KVHook, names=None):
    """:func:`add_kv_hooks` for the duration of a ``with`` block (removed also on error)."""
    handle = add_kv_hooks(model, hook, names)
    try:
        yield handle
    finally:
        handle.remove()


class KVCacheObserver:
    """A :data:`KVHook` recording the amax of the keys and of the values of each attention module.

    With ``kv_cache="nvfp4"`` it also checks that the head dim (the last dim of the cached keys and
    values) splits into NVFP4's 16-element blocks."""

    def __init__(self, kv_cache: str = "fp8"):
        check_kv_cache_format(kv_cache)
        self.kv_cache = kv_cache
        self._amax: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, name: str, key: torch.Tensor, value: torch.Tensor):
        amaxes = []
        for what, t in (("keys", key), ("values", value)):
            if self.kv_cache == "nvfp4" and t.shape[-1] % BLOCK_SIZE:
                raise ValueError(f"--kv-cache nvfp4: the {what} of {name} have head dim {t.shape[-1]}, not a multiple "
                                 f"of {BLOCK_SIZE} (NVFP4 caches 1x{BLOCK_SIZE} blocks along the head dim; use --kv-cache "
                                 "fp8 for this model)")
            a = t.detach().abs().amax().float() if t.numel() else torch.zeros(())
            if not bool(torch.isfinite(a)):
                raise ValueError(f"KV-cache calibration: the {what} of {name} have NaN/inf values")
            amaxes.append(a)
        prev = self._amax.get(name)
        self._amax[name] = tuple(amaxes) if prev is None else tuple(torch.maximum(p, a) for p, a in zip(prev, amaxes))
        return key, value

    def amax(self) -> dict[str, tuple[float, float]]:
        """``{attention: (k_amax, v_amax)}``, each moved to a value the checkpoint's scale stores exactly
        (:func:`~nvfp4kit.checkpoint.kv_cache.exact_kv_amax`)."""
        return {n: (exact_kv_amax(self.kv_cache, float(k)), exact_kv_amax(self.kv_cache, float(v)))
                for n, (k, v) in self._amax.items()}


@contextmanager
def observe_kv_cache(model: nn.Module, kv_cache: str = "fp8"):
    """Observe the cached keys/values of every attention of ``model`` during the ``with`` block;
    yields a dict filled on exit with ``{attention module: (k_amax, v_amax)}``.

    Raises ``ValueError`` if the model has no attention, or if none of them was reached (an
    attention that does not go through transformers' attention interface). Attention modules the
    forward passes never ran (e.g. multi-token-prediction layers) are left out, with a log line.
    """
    check_kv_cache_format(kv_cache)
    if not attention_modules(model):
        raise ValueError(f"--kv-cache {kv_cache}: found no attention module (a module with k_proj and v_proj "
                         "children) in the model")
    observer = KVCacheObserver(kv_cache)
    result: dict[str, tuple[float, float]] = {}
    with kv_hooks(model, observer) as handle:
        yield result
    amax = observer.amax()
    bypassed = [n for n, ih in handle.interface_hooks.items() if ih.calls == 0 and n not in amax]
    if not amax:
        raise ValueError(f"--kv-cache {kv_cache}: no keys/values reached the observers; the attention of "
                         f"{', '.join(bypassed[:3]) or 'the model'} does not go through transformers' attention "
                         "interface")
    skipped = [n for n in attention_modules(model) if n not in amax]
    if skipped:
        progress.log(f"KV-cache calibration: {len(skipped)} attention module(s) never ran and get no scales: "
                     f"{', '.join(skipped[:5])}")
    result.update(amax)
