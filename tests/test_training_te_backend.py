"""The Transformer Engine backend: runs only where TE imports on an sm100+ GPU; the emulation is the
reference it is compared against."""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.training.precision import LinearPrecision
from nvfp4kit.training.qlinear import quantized_linear
from nvfp4kit.training.linear import Linear
from nvfp4kit.training.te_backend import te_status, use_te_backend

OK, WHY = te_status()


def test_status_explains_itself_and_use_refuses_cleanly():
    assert isinstance(OK, bool)
    if not OK:
        assert WHY
        m = torch.nn.Sequential(Linear(32, 32, precision=LinearPrecision("nvfp4")))
        with pytest.raises(RuntimeError, match="--backend te"):
            use_te_backend(m)


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
