"""Calibration observers on tiny random HF models: exact amax/Hessians, every MoE expert calibrated."""

import copy

import pytest
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from nvfp4kit.calibrate.moe import UnfusedExperts, unfuse_experts
from nvfp4kit.calibrate.observers import calibrate


def tiny_mixtral(seed=0, experts=16, top_k=2):
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=64)
    m = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            # the last expert's router row is zero and the others large: it is (almost) never routed to
            layer.mlp.gate.weight.mul_(100.0)
            layer.mlp.gate.weight[experts - 1].zero_()
    return m


def _capture_inputs(model, names):
    got = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
          for n in names]
    return got, hs


def test_amax_and_hessians_match_captured_inputs(tiny_llama):
    m = tiny_llama()
    names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n != "lm_head"]
    samples = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    stats = calibrate(m, names, samples, hessian_for=names)
    ref = copy.deepcopy(m)
    got, hs = _capture_inputs(ref, names)
    with torch.no_grad():
        for row in samples:
            ref(input_ids=row[None], use_cache=False)
    for h in hs:
        h.remove()
    for n in names:
        x = torch.cat(got[n]).double()
        assert stats[n].input_amax == pytest.approx(float(x.abs().max()), rel=0, abs=0)
        assert stats[n].n_tokens == 60
        torch.testing.assert_close(stats[n].hessian.double(), x.T @ x, rtol=1e-5, atol=1e-4)
    # q/k/v and gate/up receive one tensor: one shared Hessian object
    pre = "model.layers.0."
    assert stats[pre + "self_attn.q_proj"].hessian is stats[pre + "self_attn.k_proj"].hessian
    assert stats[pre + "mlp.gate_proj"].hessian is stats[pre + "mlp.up_proj"].hessian
    assert stats[pre + "mlp.down_proj"].hessian is not stats[pre + "mlp.up_proj"].hessian
    # hooks are gone afterwards
    assert not any(mod._forward_pre_hooks for mod in m.modules())


def test_unfused_experts_compute_the_same_function():
    m = tiny_mixtral(3)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m(input_ids=ids).logits
    names = unfuse_experts(m)
    assert len(names) == 2 and all(isinstance(m.get_submodule(n), UnfusedExperts) for n in names)
    assert isinstance(m.get_submodule("model.layers.1.mlp.experts.15.down_proj"), nn.Linear)
    with torch.no_grad():
        after = m(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_every_expert_is_calibrated_on_all_tokens_of_its_layer():
    m = tiny_mixtral(5)
    unfuse_experts(m)
    E = 16
    samples = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(2))
    # independent record: what the router did, and the MoE layers' inputs
    routed = {}
    layer_in = {i: [] for i in range(2)}
    hs = []
    for i, layer in enumerate(m.model.layers):
        hs.append(layer.mlp.register_forward_hook(
            lambda mod, a, o, i=i: layer_in[i].append(a[0].detach().reshape(-1, a[0].shape[-1]))))
        for e in range(E):
            routed[(i, e)] = 0
            hs.append(layer.mlp.experts[e].register_forward_pre_hook(
                lambda mod, a, i=i, e=e: routed.__setitem__((i, e), routed[(i, e)] + a[0].shape[0])))
    with torch.no_grad():
        base_logits = [m(input_ids=row[None], use_cache=False).logits for row in samples]
    for h in hs:
        h.remove()
    assert routed[(0, E - 1)] == 0 and routed[(1, E - 1)] == 0, "precondition: some expert saw no routed tokens"

    names = [n for n, mod in m.named_modules() if ".experts." in n and isinstance(mod, nn.Linear)]
    stats = calibrate(m, names, samples, hessian_for=names)
    for i, layer in enumerate(m.model.layers):
        x = torch.unique(torch.cat(layer_in[i]), dim=0)
        for e in range(E):
            ex = layer.mlp.experts[e]
            pre = f"model.layers.{i}.mlp.experts.{e}."
            with torch.no_grad():
                mid = ex.act_fn(ex.gate_proj(x)) * ex.up_proj(x)
            for sub, inp in (("gate_proj", x), ("up_proj", x), ("down_proj", mid)):
                s = stats[pre + sub]
                assert s.n_tokens == x.shape[0]
                assert s.input_amax == float(inp.abs().max()) and s.input_amax > 0
                torch.testing.assert_close(s.hessian.double(), inp.double().T @ inp.double(), rtol=1e-5, atol=1e-4)
    # calibration does not change what the model computes
    with torch.no_grad():
        again = [m(input_ids=row[None], use_cache=False).logits for row in samples]
    for a, b in zip(again, base_logits):
        torch.testing.assert_close(a, b)


def test_calibrate_rejects_non_linear_names(tiny_llama):
    m = tiny_llama()
    with pytest.raises(ValueError, match="not Linear modules"):
        calibrate(m, ["model.layers.0.input_layernorm"], torch.zeros(1, 4, dtype=torch.long))
