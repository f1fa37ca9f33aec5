"""A few seeded training steps of the nemotron3 recipe on CPU: the compiled kernels give the same losses
and weights, bit for bit, as the plain torch reference of ``formats/`` (quantize, block values, MXFP8,
torch.rand for stochastic rounding)."""

from __future__ import annotations

import pytest
import torch

from nvfp4kit.kernels import cpu
from nvfp4kit.model.lm import build_model
from nvfp4kit.training import qlinear
from nvfp4kit.training.loop import TrainConfig, make_optimizer
from nvfp4kit.training.recipes import apply_recipe

if cpu._compiler() is None:
    pytest.skip("no C compiler on this machine: only the reference runs", allow_module_level=True)

# a small hybrid (Mamba with an MXFP8 out_proj, attention, LatentMoE, MLP, MTP)
MINI = dict(
    hidden_size=64, hybrid_override_pattern="M*E-E", num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16, chunk_size=16,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, moe_latent_size=32,
    moe_shared_expert_intermediate_size=64, vocab_size=320,
)


def _train(recipe: str, flags=(), steps: int = 2):
    torch.manual_seed(0)
    model = build_model("tiny", seed=0, **MINI)
    apply_recipe(model, recipe, flags, show=False)
    fmts = {m.precision.format for m in model.modules() if hasattr(m, "precision")}
    opt = make_optimizer(model, TrainConfig(steps=steps, lr=3e-3))
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # stochastic rounding draws from the default generator
    losses = []
    for _ in range(steps):
        batch = torch.randint(3, 320, (2, 48), generator=g)
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}, fmts


@pytest.mark.parametrize("recipe,flags", [("nemotron3", ()), ("nemotron3", ("no-2d",))])
def test_compiled_kernels_train_bit_identically_to_the_torch_reference(recipe, flags, monkeypatch):
    assert qlinear._backend_for("cpu") == "compiled"
    calls = []
    orig = cpu._quantize
    monkeypatch.setattr(cpu, "_quantize", lambda *a: calls.append(1) or orig(*a))
    fast_losses, fast_w, fmts = _train(recipe, flags)
    assert calls and {"nvfp4", "mxfp8", "bf16"} <= fmts  # the kernels ran, on every quantized format
    monkeypatch.setattr(cpu, "_quantize", orig)

    monkeypatch.setattr(qlinear, "_backend_for", lambda device_type: "torch")
    monkeypatch.setattr(cpu, "_quantize", lambda *a: pytest.fail("the reference run reached the kernel"))
    monkeypatch.setattr(cpu, "mxfp8_fake_quantize", lambda *a, **k: pytest.fail("the reference run reached the kernel"))
    ref_losses, ref_w, _ = _train(recipe, flags)

    assert torch.isfinite(ref_losses).all()
    assert torch.equal(fast_losses, ref_losses), (fast_losses, ref_losses)
    assert fast_w.keys() == ref_w.keys()
    differ = [k for k in ref_w if not torch.equal(fast_w[k], ref_w[k])]
    assert not differ, differ
