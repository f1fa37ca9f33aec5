"""Opt-in native backend: NVFP4 Linears delegated to Transformer Engine's NVFP4 recipe.

Only where ``transformer_engine`` imports and the GPU has NVFP4 tensor cores (sm100+, Blackwell).
Each model Linear whose precision is NVFP4 gets a ``transformer_engine.pytorch.Linear`` twin that
shares its weight (and bias) Parameter; its forward runs under TE's autocast with an
``NVFP4BlockScaling`` recipe whose switches follow the Linear's :class:`LinearPrecision` (2D weights,
RHT, stochastic rounding). Other precisions keep the emulated path. The emulation stays the
reference: TE's kernels are a faster implementation of the same recipe, not a different one.
"""

from __future__ import annotations

import dataclasses

import torch

from .precision import LinearPrecision


def te_status() -> tuple[bool, str]:
    """Whether the TE NVFP4 backend can run here, and why not."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from transformer_engine.common.recipe import NVFP4BlockScaling  # noqa: F401
    except Exception as e:  # noqa: BLE001 - TE raises various errors without CUDA
        return False, f"transformer_engine with NVFP4BlockScaling does not import: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 10:
        return False, f"NVFP4 tensor cores need sm100+ (Blackwell); this GPU is sm{major}{minor}"
    return True, ""


def te_recipe(precision: LinearPrecision):
    """TE's NVFP4BlockScaling with the switches of ``precision`` (those this TE version has)."""
    from transformer_engine.common.recipe import NVFP4BlockScaling

    wanted = {
        "disable_rht": not precision.rht,
        "disable_stochastic_rounding": not precision.stochastic_rounding,
        "disable_2d_quantization": not precision.weight_2d,
    }
    fields = {f.name for f in dataclasses.fields(NVFP4BlockScaling)} if dataclasses.is_dataclass(
        NVFP4BlockScaling) else set(wanted)
    missing = [k for k, v in wanted.items() if v and k not in fields]
    if missing:
        raise ValueError(f"this transformer_engine's NVFP4BlockScaling cannot switch off: {', '.join(missing)}")
    if precision.four_over_six or precision.rht_size != 16 or precision.rht_sign is not None:
        raise ValueError("the TE backend supports TE's own RHT (16 points, fixed sign) and max block scales only; "
                         "use the emulated backend for Four Over Six or other RHT settings")
    return NVFP4BlockScaling(**{k: v for k, v in wanted.items() if k in fields})


def _autocast(recipe):
    import transformer_engine.pytorch as te

    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


class TELinearForward:
    """Replaces a model Linear's forward with a TE Linear sharing its parameters."""

    def __init__(self, module: torch.nn.Linear):
        import transformer_engine.pytorch as te

        self.te_linear = te.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                   params_dtype=module.weight.dtype, device=module.weight.device)
        self.te_linear.weight = module.weight
        if module.bias is not None:
            self.te_linear.bias = module.bias
        self.recipe = te_recipe(module.precision)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(self.recipe):
            return self.te_linear(x)


def use_te_backend(model: torch.nn.Module) -> list[str]:
    """Delegate every NVFP4 Linear of ``model`` to TE; returns their names. Raises where TE cannot run."""
    ok, why = te_status()
    if not ok:
        raise RuntimeError(f"--backend te: {why}; use the emulated backend")
    from .linear import iter_linears

    names = []
    for name, mod in iter_linears(model):
        if mod.precision.format == "nvfp4":
            if mod.in_features % 16 or mod.out_features % 16:
                continue
            mod.forward = TELinearForward(mod)
            names.append(name)
    return names
