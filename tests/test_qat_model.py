"""QAT / QAD on tiny random HF causal LMs: surgery, calibration, losses, training, export."""

import math

import pytest
import torch
import torch.nn as nn

import nvfp4kit
from nvfp4kit.calibrate.qat import (FakeQuantLinear, QATLoss, calibrate_input_amax, export_quantized_model,
                                    fake_quant_modules, frozen_teacher, prepare_qat, strip_qat)
from nvfp4kit.losses import distillation_loss, next_token_loss
from nvfp4kit.policy import fused_partition
from nvfp4kit.formats.nvfp4 import dequantize_parts



def batches(n=2, seed=1, b=2, t=24, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------- losses


def test_next_token_loss_matches_float64_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            row = [float(v) for v in logits[b, t]]
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            total += lse - row[int(ids[b, t + 1])]
            count += 1
    assert float(next_token_loss(logits, ids)) == pytest.approx(total / count, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_distillation_loss_matches_float64_loop(temperature):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 6, generator=g) * 3
    t = torch.randn(2, 3, 6, generator=g) * 3
    total = 0.0
    for b in range(2):
        for i in range(3):
            ps = [math.exp(float(v) / temperature) for v in s[b, i]]
            pt = [math.exp(float(v) / temperature) for v in t[b, i]]
            zs, zt = sum(ps), sum(pt)
            total += sum((q / zt) * math.log((q / zt) / (p / zs)) for p, q in zip(ps, pt))
    expected = total / 6 * temperature**2
    assert float(distillation_loss(s, t, temperature)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    kl_all = torch.stack([distillation_loss(s[b:b + 1, i:i + 1], t[b:b + 1, i:i + 1], temperature)
                          for b in range(2) for i in range(3)]).reshape(2, 3)
    assert float(distillation_loss(s, t, temperature, mask)) == pytest.approx(float(kl_all[mask].mean()), rel=1e-5)


def test_qat_loss_modes():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 4, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    ids = torch.randint(0, 5, (1, 4), generator=g)
    assert torch.equal(QATLoss()(s, ids), next_token_loss(s, ids))
    assert torch.equal(QATLoss(distill=True)(s, ids, t), distillation_loss(s, t))
    mixed = QATLoss(distill=True, ce_weight=0.5)(s, ids, t)
    assert float(mixed) == pytest.approx(float(distillation_loss(s, t) + 0.5 * next_token_loss(s, ids)), rel=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        QATLoss(distill=True)(s, ids)


# ----------------------------------------------------------------------------- model surgery


def test_prepare_wraps_linears_and_groups_siblings(tiny_llama):
    model = tiny_llama()
    mods = prepare_qat(model)
    linears = [n for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear)]
    assert sorted(mods) == sorted(n for n in linears if n != "lm_head")
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, FakeQuantLinear)
    q = mods["model.layers.0.self_attn.q_proj"]
    assert [m.name for m in q.group] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert [m.name for m in mods["model.layers.1.mlp.up_proj"].group] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert fused_partition(["a.q_proj", "a.o_proj", "a.k_proj", "b.q_proj"]) == [
        ("a.q_proj", "a.k_proj"), ("a.o_proj",), ("b.q_proj",)]


def test_calibration_records_max_input_and_restores_model(tiny_llama):
    ref = tiny_llama()
    seen = {}

    def hook(name):
        def f(_m, args, _out):
            seen[name] = max(seen.get(name, 0.0), float(args[0].abs().max()))
        return f

    for n, m in ref.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(hook(n))
    data = batches(3)
    with torch.no_grad():
        ref_logits = [ref(b).logits for b in data]
    model = tiny_llama()
    prepare_qat(model)
    amax = calibrate_input_amax(model, data)
    for n, v in amax.items():
        parent, _, leaf = n.rpartition(".")
        sibs = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv"}
        if leaf in sibs:
            expected = max(seen[f"{parent}.{p}_proj"] for p in "qkv")
        elif leaf in ("gate_proj", "up_proj"):
            expected = max(seen[f"{parent}.gate_proj"], seen[f"{parent}.up_proj"])
        else:
            expected = seen[n]
        assert v == pytest.approx(expected, rel=0, abs=0)
    # bf16 pass-through modules reproduce the original model exactly
    model2 = tiny_llama()
    prepare_qat(model2, "bf16")
    with torch.no_grad():
        assert torch.equal(model2(data[0]).logits, ref_logits[0])
    strip_qat(model2)
    assert not fake_quant_modules(model2)
    with torch.no_grad():
        assert torch.equal(model2(data[0]).logits, ref_logits[0])


@pytest.mark.parametrize("distill,lr,init", [(False, 3e-3, 0.02), (True, 3e-4, 0.1)])
def test_training_reduces_loss(tiny_llama, distill, lr, init):
    model = tiny_llama(seed=3, init=init)  # larger init for QAD: peaked logits, a visible quantization gap
    teacher = frozen_teacher(model) if distill else None
    prepare_qat(model)
    data = batches(2, seed=5)
    calibrate_input_amax(model, data)
    loss_fn = QATLoss(distill=distill)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def evaluate():
        with torch.no_grad():
            return sum(float(loss_fn(model(b).logits, b, teacher(b).logits if distill else None)) for b in data)

    before = evaluate()
    model.train()
    for step in range(12):
        b = data[step % 2]
        opt.zero_grad()
        loss = loss_fn(model(b).logits, b, teacher(b).logits if distill else None)
        loss.backward()
        opt.step()
    model.eval()
    after = evaluate()
    assert after < before * 0.9
    if distill:
        for p in teacher.parameters():
            assert not p.requires_grad and p.grad is None


@pytest.mark.parametrize("tie", [False, True])
def test_export_records_are_bit_identical_to_forward(tiny_llama, tie):
    model = tiny_llama(tie=tie, seed=4)
    mods = prepare_qat(model)
    data = batches(1)
    calibrate_input_amax(model, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    next_token_loss(model(data[0]).logits, data[0]).backward()
    opt.step()
    qm = export_quantized_model(model)
    assert sorted(qm.linears) == sorted(mods)
    for n, rec in qm.linears.items():
        p = rec.nvfp4
        assert torch.equal(dequantize_parts(p.packed, p.block_scale, p.global_decode_scale), mods[n].quantized_weight_value())
        assert rec.input_amax == float(mods[n].input_amax)
    assert qm.exclude_modules == ["lm_head"]
    assert "model.embed_tokens.weight" in qm.tensors
    assert ("lm_head.weight" in qm.tensors) == (not tie)
    assert not any(k.endswith(("input_amax", "fixed_weight_amax")) for k in qm.tensors)
    assert not any(k.startswith(tuple(mods)) for k in qm.tensors)
    assert qm.config["hidden_size"] == 64


def test_init_from_ptq_records(tiny_llama):
    src = tiny_llama(seed=6)
    prepare_qat(src, {"model.layers.0.mlp.down_proj": "fp8", **{
        n: "nvfp4" for n, m in tiny_llama(seed=6).named_modules() if isinstance(m, nn.Linear)
        and n not in ("lm_head", "model.layers.0.mlp.down_proj")}})
    data = batches(1)
    calibrate_input_amax(src, data)
    ptq = export_quantized_model(src)
    model = tiny_llama(seed=7)  # other weights: weights_from_ptq must overwrite them
    mods = prepare_qat(model, ptq=ptq, weights_from_ptq=True)
    assert mods["model.layers.0.mlp.down_proj"].format == "fp8"
    assert mods["model.layers.0.self_attn.o_proj"].format == "nvfp4"
    for n, rec in ptq.linears.items():
        assert float(mods[n].input_amax) == rec.input_amax
        if rec.format == "nvfp4":
            p = rec.nvfp4
            w = dequantize_parts(p.packed, p.block_scale, p.global_decode_scale)
            # re-quantizing the dequantized PTQ weight reproduces it (idempotence of the format)
            assert torch.equal(mods[n].quantized_weight_value(), w)
    bad = tiny_llama()
    ptq.linears["model.layers.9.mlp.up_proj"] = ptq.linears["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="layers.9"):
        prepare_qat(bad, ptq=ptq)


def test_teacher_must_be_copied_before_prepare(tiny_llama):
    model = tiny_llama()
    prepare_qat(model)
    with pytest.raises(ValueError, match="before prepare_qat"):
        frozen_teacher(model)
    assert nvfp4kit.__version__


def test_hybrid_model_qad_and_unrouted_experts():
    """The nvfp4kit hybrid model (Mamba, attention, LatentMoE, MTP): experts without calibration tokens
    borrow their siblings' amax; a QAD step trains; the export matches the forward."""
    from nvfp4kit.model.lm import build_model

    model = build_model("micro", seed=1)
    teacher = frozen_teacher(model)
    mods = prepare_qat(model)
    assert "lm_head" not in mods and not any(n.startswith("mtp.") for n in mods)
    ids = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(0))  # few tokens: idle experts
    observed = {}

    def hook(name):
        def f(_m, args, _out):
            observed[name] = True
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    amax = calibrate_input_amax(model, [ids])
    for h in handles:
        h.remove()
    idle = [n for n in mods if n not in observed]
    assert idle, "expected experts that received no calibration token"
    for n in idle:
        layer = n.split(".experts.")[0]
        proj = n.rsplit(".", 1)[1]
        sib = [v for k, v in amax.items() if k.startswith(layer + ".experts.") and k.endswith(proj) and k in observed]
        assert amax[n] == max(sib)
    assert all(math.isfinite(v) for v in amax.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = QATLoss(distill=True)(model(ids).logits, ids, teacher(ids).logits)
    loss.backward()
    opt.step()
    qm = export_quantized_model(model)
    for n, rec in qm.linears.items():
        p = rec.nvfp4
        assert torch.equal(dequantize_parts(p.packed, p.block_scale, p.global_decode_scale),
                           mods[n].quantized_weight_value())
    assert "lm_head" in qm.exclude_modules and "lm_head.weight" in qm.tensors
