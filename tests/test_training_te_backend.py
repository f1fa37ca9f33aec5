"""The Transformer Engine backend: runs only where TE imports on an sm100+ GPU; the emulation is the
reference it is compared against."""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.training.precision import LinearPrecision
from nvfp4kit.training.qlinear import quantized_linear
from nvfp4kit.training.linear import Linear
from nvfp4kit.training.te_backend import te_recipe, te_status, use_te_backend

OK, WHY = te_status()


def _fake_te(monkeypatch, capability, cuda=True):
    """A stand-in transformer_engine (only what te_status and te_recipe touch) on a GPU of ``capability``."""
    import dataclasses
    import sys
    import types

    @dataclasses.dataclass
    class NVFP4BlockScaling:
        disable_rht: bool = False
        disable_stochastic_rounding: bool = False
        disable_2d_quantization: bool = False

    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    te.common = types.ModuleType("transformer_engine.common")
    te.common.recipe = types.ModuleType("transformer_engine.common.recipe")
    te.common.recipe.NVFP4BlockScaling = NVFP4BlockScaling
    for name, mod in (("transformer_engine", te), ("transformer_engine.pytorch", te.pytorch),
                      ("transformer_engine.common", te.common), ("transformer_engine.common.recipe", te.common.recipe)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    return NVFP4BlockScaling


def test_status_explains_itself_and_use_refuses_cleanly(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        assert OK is False and "transformer_engine" in WHY and "does not import" in WHY
    if not OK:
        m = torch.nn.Sequential(Linear(32, 32, precision=LinearPrecision("nvfp4")))
        with pytest.raises(RuntimeError, match="--backend te: .+; use the emulated backend"):
            use_te_backend(m)
    # with TE importable, the decision is the GPU's: none, Hopper (no FP4 tensor cores), Blackwell
    _fake_te(monkeypatch, (9, 0), cuda=False)
    assert te_status() == (False, "no CUDA device")
    _fake_te(monkeypatch, (9, 0))
    ok, why = te_status()
    assert not ok and "sm100+" in why and "sm90" in why
    recipe_cls = _fake_te(monkeypatch, (10, 0))
    assert te_status() == (True, "")
    # the recipe's switches follow the Linear's precision
    r = te_recipe(LinearPrecision("nvfp4", rht=False, stochastic_rounding=True, weight_2d=False))
    assert r == recipe_cls(disable_rht=True, disable_stochastic_rounding=False, disable_2d_quantization=True)
    with pytest.raises(ValueError, match="Four Over Six"):
        te_recipe(LinearPrecision("nvfp4", four_over_six=True))


@pytest.mark.skipif(not OK, reason=f"TE NVFP4 backend unavailable: {WHY}")
def test_te_forward_close_to_emulation():
    torch.manual_seed(0)
    lin = Linear(256, 128, precision=LinearPrecision("nvfp4", stochastic_rounding=False)).cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ref = quantized_linear(x.float(), lin.weight, None, lin.precision)
    m = torch.nn.Sequential(lin)
    assert use_te_backend(m) == ["0"]
    y = m(x).float()
    # same recipe, different kernels: agreement to bf16 output rounding and accumulation order
    assert float((y - ref).norm() / ref.norm()) < 2e-2
