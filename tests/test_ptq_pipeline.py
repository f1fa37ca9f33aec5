"""PTQ end to end on tiny random HF models: quantize in memory, emulate, write, reload, evaluate, inspect."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import nvfp4kit
from nvfp4kit.checkpoint.layout import exact_input_amax
from nvfp4kit.checkpoint.types import QuantizedLinearWeight
from nvfp4kit.calibrate.emulation import EmulatedLinear, apply_quantized
from nvfp4kit.checkpoint.layout import dequantize_linear
from nvfp4kit.evaluate.perplexity import perplexity
from nvfp4kit.evaluate.report import layer_rows, plot_layer_errors
from nvfp4kit.formats.nvfp4 import quantize_parts
from nvfp4kit.formats.scales import global_encode_scale
from nvfp4kit.pipelines.models import load_quantized_model
from nvfp4kit.calibrate.ptq import calibrate_model, quantize_model
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs!\n") * 40


def char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=128)
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab=128, tie=True, max_positions=128).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    (d / "calib.txt").write_text(TEXT, encoding="utf-8")
    return d


def _samples(n=4, L=32, seed=0):
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- emulation


def test_emulated_linear_nvfp4_w4a4_matches_independent_computation():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    b = torch.randn(48, generator=g)
    x = torch.randn(3, 5, 64, generator=g)
    amax = float(x.abs().max()) * 0.7  # calibrated amax below the data: the excess saturates
    q = QuantizedLinearWeight("nvfp4", (48, 64), nvfp4=quantize_parts(w), input_amax=amax, bias=b)
    lin = EmulatedLinear(q)
    w_hat = nvfp4kit.quantize(w).dequantize()
    x_hat = nvfp4kit.quantize(x, global_amax=amax).dequantize()
    torch.testing.assert_close(lin(x), x_hat @ w_hat.T + b, rtol=1e-6, atol=1e-6)
    # weight-only emulation ignores the input scale
    torch.testing.assert_close(EmulatedLinear(q, quantize_input=False)(x), x @ w_hat.T + b, rtol=1e-6, atol=1e-6)


def test_emulated_linear_fp8_matches_independent_computation():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, generator=g)
    x = torch.randn(7, 16, generator=g) * 3
    ws = float(w.abs().max()) / 448
    wq = (w / ws).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = QuantizedLinearWeight("fp8", (32, 16), fp8_weight=wq, fp8_weight_scale=torch.tensor(ws), input_amax=5.0)
    xs = 5.0 / 448
    x_hat = (x / xs).clamp(-448, 448).to(torch.float8_e4m3fn).float() * xs
    torch.testing.assert_close(EmulatedLinear(q)(x), x_hat @ (wq.float() * ws).T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- quantize in memory


def test_quantize_model_w4a4_fused_groups_share_scales(tiny_llama):
    m = tiny_llama(vocab=128, tie=True, max_positions=128)
    ref = copy.deepcopy(m)
    samples = _samples()
    r = quantize_model(m, samples, "w4a4", "max")
    qm = r.qmodel
    # the model itself is untouched
    for (n, p), (_, p0) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, p0), n
    assert "lm_head" not in qm.linears and "lm_head" in qm.exclude_modules
    assert "model.embed_tokens.weight" in qm.tensors and "lm_head.weight" not in qm.tensors  # tied: kept once
    assert "model.norm.weight" in qm.tensors
    assert len(qm.linears) == 14
    for layer in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            mods = [f"model.layers.{layer}.{'self_attn' if 'q_proj' in group else 'mlp'}.{n}" for n in group]
            amax = max(float(m.get_submodule(n).weight.detach().abs().max()) for n in mods)
            in_amax = max(r.stats[n].input_amax for n in mods)
            for n in mods:
                rec = qm.linears[n]
                expect = quantize_parts(m.get_submodule(n).weight, global_amax=amax)
                assert torch.equal(rec.nvfp4.packed, expect.packed)
                assert torch.equal(rec.nvfp4.block_scale.view(torch.uint8), expect.block_scale.view(torch.uint8))
                assert float(rec.nvfp4.global_decode_scale) == float(1.0 / global_encode_scale(torch.tensor(amax)))
                # the shared input amax, moved (by at most ~1 ulp) to a value both formats store exactly
                assert rec.input_amax == exact_input_amax(in_amax, 2688.0) > 0
                assert rec.input_amax == pytest.approx(in_amax, rel=2**-22)
        down = f"model.layers.{layer}.mlp.down_proj"
        assert qm.linears[down].input_amax == exact_input_amax(r.stats[down].input_amax, 2688.0)


def test_w4a16_needs_no_calibration_and_fp8_scheme(tiny_llama):
    m = tiny_llama(vocab=128, tie=True, max_positions=128)
    r = quantize_model(m, None, "w4a16", "mse")
    assert all(q.input_amax is None and q.format == "nvfp4" for q in r.qmodel.linears.values())
    with pytest.raises(ValueError, match="needs calibration samples"):
        quantize_model(tiny_llama(vocab=128, tie=True, max_positions=128), None, "w4a4", "max")
    r8 = quantize_model(tiny_llama(vocab=128, tie=True, max_positions=128), _samples(), "fp8", "max")
    rec = r8.qmodel.linears["model.layers.0.self_attn.k_proj"]
    assert rec.format == "fp8" and rec.fp8_weight.dtype == torch.float8_e4m3fn and rec.input_amax > 0


def test_one_calibration_serves_every_method(tiny_llama):
    m = tiny_llama(vocab=128, tie=True, max_positions=128)
    stats = calibrate_model(m, _samples(), "w4a4")
    direct = quantize_model(tiny_llama(vocab=128, tie=True, max_positions=128), _samples(), "w4a4", "gptq")
    reused = quantize_model(m, None, "w4a4", "gptq", stats=stats)
    for n, rec in direct.qmodel.linears.items():
        assert torch.equal(rec.nvfp4.packed, reused.qmodel.linears[n].nvfp4.packed), n
        assert rec.input_amax == reused.qmodel.linears[n].input_amax


def test_gptq_factors_each_shared_hessian_once_with_the_bits_of_one_factor_per_linear(tiny_llama, monkeypatch):
    from nvfp4kit.calibrate import records
    from nvfp4kit.calibrate.weight_scales import gptq_weight_parts

    m = tiny_llama(vocab=128, layers=2, max_positions=128)
    stats = calibrate_model(m, _samples(), "w4a4")
    calls = []
    real = records.gptq_factor
    monkeypatch.setattr(records, "gptq_factor", lambda h, **kw: calls.append(h) or real(h, **kw))
    q = quantize_model(m, None, "w4a4", "gptq", stats=stats).qmodel
    # per block: q/k/v share one Hessian, gate/up one, o and down their own
    assert len(calls) == 2 * 4 and len({id(h) for h in calls}) == 8
    modules = dict(m.named_modules())
    siblings = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]
    for n, rec in q.linears.items():  # the same bits as factoring the Hessian for every Linear
        w = modules[n].weight.detach()
        prefix, leaf = n.rsplit(".", 1)
        group = next((g for g in siblings if leaf in g), (leaf,))
        amax = max(float(modules[f"{prefix}.{s}"].weight.detach().abs().max()) for s in group)  # fused groups share it
        alone = gptq_weight_parts(w, stats[n].hessian, global_amax=amax, group_scale="mse", name=n)
        assert torch.equal(alone.packed, rec.nvfp4.packed), n


def test_weight_scale_methods_lower_the_output_error_of_the_model(tiny_llama):
    m = tiny_llama(vocab=128, tie=True, max_positions=128, seed=2)
    samples = _samples(6, 48, 3)
    stats = calibrate_model(m, samples, "w4a16")
    ids = _samples(2, 48, 9)
    with torch.no_grad():
        base = m(input_ids=ids).logits
    errs = {}
    for method in ("max", "mse", "gptq"):
        mm = copy.deepcopy(m)
        r = quantize_model(mm, None, "w4a16", method, stats=stats)
        apply_quantized(mm, r.qmodel)
        with torch.no_grad():
            errs[method] = float((mm(input_ids=ids).logits - base).norm())
    assert errs["mse"] < errs["max"] and errs["gptq"] < errs["max"]


def test_every_moe_expert_gets_a_scale():
    m = tiny_mixtral()
    r = quantize_model(m, _samples(2, 16), "w4a4", "max")
    experts = [n for n in r.qmodel.linears if ".experts." in n]
    assert len(experts) == 2 * 8 * 3
    for n in experts:
        rec = r.qmodel.linears[n]
        assert rec.input_amax is not None and math.isfinite(rec.input_amax) and rec.input_amax > 0, n
        assert float(rec.nvfp4.global_decode_scale) > 0
    assert not any(n.endswith("mlp.gate") for n in r.qmodel.linears)  # router kept in high precision
    g0 = r.qmodel.linears["model.layers.0.mlp.experts.3.gate_proj"].nvfp4.global_decode_scale
    u0 = r.qmodel.linears["model.layers.0.mlp.experts.3.up_proj"].nvfp4.global_decode_scale
    assert torch.equal(g0, u0)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("smooth,rotate", [("none", False), ("awq", False), ("awq", True)])
def test_written_checkpoint_reloads_to_the_same_emulated_model(model_dir, tmp_path, fmt, smooth, rotate):
    # transforms change the weights in place (same full-precision function): the checkpoint must hold
    # exactly the model that was quantized, folded norms and an untied rotated head included
    from nvfp4kit.pipelines.models import load_source_model

    job = QuantizeJob(model=str(model_dir), out=str(tmp_path / "q"), format=fmt, scheme="w4a4",
                      weight_scale="mse", calib=str(model_dir / "calib.txt"), calib_samples=4, seq_len=32,
                      smooth=smooth, rotate=rotate)
    source = load_source_model(str(model_dir))
    result, path = run_quantize(job, source)
    assert result.n_calib_tokens == 128
    loaded = load_quantized_model(path)
    fresh = source.model.eval()
    apply_quantized(fresh, result.qmodel)
    ids = _samples(1, 40, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, fresh(input_ids=ids).logits,
                                   rtol=0, atol=0)
    assert loaded.tokenizer("abc")["input_ids"] == char_tokenizer()("abc")["input_ids"]
    with pytest.raises(FileExistsError, match="already exists"):
        run_quantize(job)


def test_transformers_loads_compressed_tensors_export_like_weight_only_emulation(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    job = QuantizeJob(model=str(model_dir), out=str(tmp_path / "ct"), format="compressed-tensors", scheme="w4a16",
                      weight_scale="max", smooth="none")  # compared below with the unsmoothed source
    result, path = run_quantize(job)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(run_compressed=False))
    ours = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # compressed-tensors decompresses to bfloat16 (transformers up to 5.17 keeps that dtype, later releases
    # cast to the requested float32): compare with our dequantized weights in bfloat16
    for name, rec in result.qmodel.linears.items():
        w_hf = hf.get_submodule(name).weight
        assert w_hf.dtype in (torch.bfloat16, torch.float32), name
        assert torch.equal(w_hf.float(), dequantize_linear(rec, torch.float32).to(torch.bfloat16).float()), name
        ours.get_submodule(name).weight.data = dequantize_linear(rec, torch.float32).to(torch.bfloat16).float()
    hf = hf.float().eval()
    ids = _samples(1, 40, 6)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_moe_checkpoint_roundtrip(tmp_path):
    m = tiny_mixtral(1)
    r = quantize_model(copy.deepcopy(m), _samples(2, 16), "w4a4", "max")
    from nvfp4kit.checkpoint import save_quantized

    char_tokenizer().save_pretrained(tmp_path / "src")
    r.qmodel.source_dir = str(tmp_path / "src")
    path = save_quantized(r.qmodel, tmp_path / "moe")
    loaded = load_quantized_model(path)
    mm = copy.deepcopy(m)
    from nvfp4kit.calibrate.moe import unfuse_experts

    unfuse_experts(mm)
    apply_quantized(mm, r.qmodel)
    ids = _samples(1, 24, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, mm(input_ids=ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- evaluation and reports


def test_perplexity_matches_a_plain_loop(tiny_llama):
    m = tiny_llama(vocab=128, tie=True, max_positions=128, seed=4)
    ids = torch.randint(0, 128, (45,), generator=torch.Generator().manual_seed(2))
    got = perplexity(m, ids, seq_len=16)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in (0, 16, 32):  # windows of 16, 16, 13 tokens
            w = ids[s:s + 16]
            logp = torch.log_softmax(m(input_ids=w[None]).logits[0].double(), -1)
            for t in range(1, len(w)):
                total -= float(logp[t - 1, w[t]])
                count += 1
    assert got.n_tokens == count == 42
    assert got.nll == pytest.approx(total / count, rel=1e-6)
    assert got.ppl == pytest.approx(math.exp(total / count), rel=1e-6)
    assert perplexity(m, ids, 16, max_tokens=20).n_tokens == 15 + 3
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(m, ids[:1], 16)


def test_layer_report_and_plot(tiny_llama, tmp_path):
    m = tiny_llama(vocab=128, tie=True, max_positions=128)
    r = quantize_model(m, None, "w4a16", "max")
    ref = {n: mod.weight for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    rows = layer_rows(r.qmodel, ref)
    assert len(rows) == 14
    for row in rows:
        w = ref[row.name].double()
        w_hat = nvfp4kit.quantize(ref[row.name], global_amax=r.qmodel.linears[row.name].nvfp4.global_decode_scale
                                  * 2688).dequantize().double()
        assert row.rel_error == pytest.approx(float((w_hat - w).norm() / w.norm()), rel=1e-3)
        assert 0 < row.rel_error < 0.2
        assert row.block_scale_min <= row.block_scale_mean <= row.block_scale_max <= 448
    png = plot_layer_errors(rows, tmp_path / "err.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="--against"):
        plot_layer_errors(layer_rows(r.qmodel), tmp_path / "none.png")


def test_cli_quantize_eval_inspect(model_dir, tmp_path):
    from typer.testing import CliRunner

    import nvfp4kit.cli.eval_cmd  # noqa: F401
    import nvfp4kit.cli.inspect_cmd  # noqa: F401
    import nvfp4kit.cli.quantize_cmd  # noqa: F401
    from nvfp4kit.cli.app import app

    runner = CliRunner()
    out = tmp_path / "cli-q"
    res = runner.invoke(app, ["quantize", "--model", str(model_dir), "--out", str(out), "--weight-scale", "gptq",
                              "--calib", str(model_dir / "calib.txt"), "--calib-samples", "3", "--seq-len", "32",
                              "--exclude", "model.layers.1.mlp.*"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    res = runner.invoke(app, ["eval", "--model", str(out), "--text", str(model_dir / "calib.txt"),
                              "--seq-len", "32", "--max-tokens", "96"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output and "93 tokens" in res.output  # 3 windows of 32 predict 31 each
    png = tmp_path / "e.png"
    res = runner.invoke(app, ["inspect", str(out), "--against", str(model_dir), "--plot", str(png)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "11 quantized Linears" in res.output  # 14 minus the excluded layer-1 MLP
    assert "model.layers.1.mlp.up_proj" in res.output.split("kept in high precision")[1]
    assert png.is_file()
    res = runner.invoke(app, ["quantize", "--model", str(model_dir), "--out", str(tmp_path / "x"),
                              "--scheme", "int3"])
    assert res.exit_code != 0 and "--scheme must be one of" in res.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_demo_on_the_embedded_smollm2(tmp_path):
    from nvfp4kit.pipelines.demo import DemoJob, run_demo

    r = run_demo(DemoJob(str(tmp_path / "demo"), "w4a4", "max", calib_samples=4, seq_len=64, eval_tokens=256,
                         eval_seq_len=128))
    assert r.fp32.n_tokens == r.quantized.n_tokens == 254
    assert 1.0 < r.fp32.ppl < 100
    # NVFP4 W4A4 costs a little perplexity, not a collapse
    assert r.fp32.ppl * 0.95 < r.quantized.ppl < r.fp32.ppl * 1.7
    assert (r.path / "hf_quant_config.json").is_file()
    assert len(r.quantize.qmodel.linears) == 30 * 7


def test_weights_only_streaming_mode(model_dir, tmp_path):
    from nvfp4kit.pipelines.quantize import run_streaming

    path = run_streaming(QuantizeJob(model=str(model_dir), out=str(tmp_path / "s"), scheme="w4a16",
                                     weight_scale="max"))
    loaded = load_quantized_model(path)
    src = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert len(loaded.quantized.linears) == 14
    for name, rec in loaded.quantized.linears.items():
        assert rec.format == "nvfp4" and rec.input_amax is None
        w = src.get_submodule(name).weight.detach()
        assert float((dequantize_linear(rec, torch.float32) - w).norm() / w.norm()) < 0.2
    with pytest.raises(ValueError, match="weight-only"):
        run_streaming(QuantizeJob(model=str(model_dir), out=str(tmp_path / "s2"), scheme="w4a4"))


@pytest.mark.parametrize("budget", [4.5, 6.0])
def test_cli_mixed_precision_under_a_bits_budget(model_dir, tmp_path, budget):
    """--scheme mixed --bits-budget: the written checkpoint's formats are the searched ones, and the
    weights they cover average at most the budget (counted here from the shapes: 4.5 / 8 / 16 bits)."""
    import json

    from typer.testing import CliRunner

    import nvfp4kit.cli.quantize_cmd  # noqa: F401
    from nvfp4kit.cli.app import app

    out = tmp_path / f"mixed-{budget}"
    res = CliRunner().invoke(app, ["quantize", "--model", str(model_dir), "--out", str(out), "--scheme", "mixed",
                                   "--bits-budget", str(budget), "--weight-scale", "max",
                                   "--calib", str(model_dir / "calib.txt"), "--calib-samples", "2", "--seq-len", "32"])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "mixed_precision.json").read_text())
    bits = {"nvfp4": 4.5, "fp8": 8.0, "bf16": 16.0}
    weights = {n: s[0] * s[1] for n, s in plan["shapes"].items()}
    avg = sum(weights[n] * bits[f] for n, f in plan["formats"].items()) / sum(weights[n] for n in plan["formats"])
    assert avg <= budget + 1e-9
    if budget == 4.5:
        assert set(plan["formats"].values()) == {"nvfp4"}
    else:
        assert avg > 4.5  # room to spend: the search gives some layers more bits
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    algo = {"nvfp4": "NVFP4", "fp8": "FP8"}
    used = {f for f in plan["formats"].values() if f != "bf16"}
    if len(used) == 1:  # one quantized format: a plain NVFP4 (or FP8) checkpoint with exclusions
        assert quant["quant_algo"] == algo[used.pop()]
    else:
        assert quant["quant_algo"] == "MIXED_PRECISION"
        for name, fmt in plan["formats"].items():
            if fmt == "bf16":
                assert name not in quant["quantized_layers"]
            else:
                assert quant["quantized_layers"][name]["quant_algo"] == algo[fmt]
    bad = CliRunner().invoke(app, ["quantize", "--model", str(model_dir), "--out", str(tmp_path / "y"),
                                   "--scheme", "w4a4", "--bits-budget", "5", "--weight-scale", "max",
                                   "--calib", str(model_dir / "calib.txt"), "--calib-samples", "2", "--seq-len", "32"])
    assert bad.exit_code != 0 and "--scheme mixed" in bad.output
    assert not (tmp_path / "y").exists()


def test_output_folder_checked_before_work_and_parents_created(model_dir, tmp_path, monkeypatch):
    """`--out a/b/c` works when a/b does not exist yet (as the demo's default path needs); an existing
    output is refused before the model is even loaded."""
    import nvfp4kit.pipelines.quantize as qp

    job = qp.QuantizeJob(model=str(model_dir), out=str(tmp_path / "new" / "deeper" / "ckpt"), scheme="w4a16",
                         weight_scale="max")
    _, path = qp.run_quantize(job)
    assert path == tmp_path / "new" / "deeper" / "ckpt" and (path / "hf_quant_config.json").is_file()
    loads = []
    monkeypatch.setattr(qp, "load_source_model", lambda *a, **k: loads.append(a))
    with pytest.raises(FileExistsError, match="already exists"):
        qp.run_quantize(job)
    assert loads == []
