"""Transforms before PTQ (calibrate/transforms.py) in the engine and the quantize job: where smoothing
applies, that it preserves the full-precision function, that it pays on outlier channels, that the
in-memory and block-by-block paths give the same bytes with it, and --method auto."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kit import progress
from nvfp4kit.calibrate import apply_quantized, quantize_model
from nvfp4kit.calibrate.ptq import plan_model
from nvfp4kit.calibrate.transforms import Transforms, foldable_norm, smooth_block, smoothing_groups

from test_ptq_pipeline import TEXT, char_tokenizer


def _with_outliers(model, scale=30.0, seed=0):
    """Give the residual stream a few outlier channels, as real LMs have (norm weights >> 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
                norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:3]] *= scale
    return model


def _ids(n=4, L=32, vocab=96, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def test_groups_of_a_llama_block_follow_the_plan(tiny_llama):
    model = tiny_llama()
    plan = plan_model(model, "w4a4")
    groups = smoothing_groups(model.model.layers[0], plan, "model.layers.0")
    assert [(g.producer, g.kind, g.consumers) for g in groups] == [
        ("input_layernorm", "norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("post_attention_layernorm", "norm", ["mlp.gate_proj", "mlp.up_proj"]),
        ("self_attn.v_proj", "v", ["self_attn.o_proj"]),
        ("mlp.up_proj", "linear", ["mlp.down_proj"]),
    ]
    assert groups[2].heads == (4, 2)
    # a group with a consumer kept in high precision is not smoothed
    plan = plan_model(model, "w4a4", exclude=["*layers.0.self_attn.k_proj"])
    assert "input_layernorm" not in [g.producer for g in smoothing_groups(model.model.layers[0], plan, "model.layers.0")]
    # FP8 consumers are not NVFP4: nothing to smooth
    assert smoothing_groups(model.model.layers[0], plan_model(model, "fp8"), "model.layers.0") == []


def test_only_plain_rmsnorms_are_folded():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert foldable_norm(LlamaRMSNorm(32)) and foldable_norm(torch.nn.RMSNorm(32))
    assert not foldable_norm(GemmaRMSNorm(32))  # x * (1 + w): dividing w by s is not exact
    assert not foldable_norm(torch.nn.LayerNorm(32))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 1000), method=st.sampled_from(["awq", "smoothquant"]))
def test_smoothing_a_block_keeps_its_function(tiny_llama, seed, method):
    model = _with_outliers(tiny_llama(seed=seed % 7).double(), seed=seed)
    block = model.model.layers[1]
    plan = plan_model(model, "w4a4")
    h = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pos = torch.arange(16).unsqueeze(0).expand(3, -1)
    emb = model.model.rotary_emb(h, pos)
    before = copy.deepcopy(block)

    def run():
        with torch.no_grad():
            block(h, position_embeddings=emb)

    alphas = smooth_block(block, plan, "model.layers.1", run, n_tokens=48, method=method, tokens=48, grid=8)
    assert set(alphas) == {"self_attn.q_proj", "mlp.gate_proj", "self_attn.o_proj", "mlp.down_proj"}
    with torch.no_grad():
        want = before(h, position_embeddings=emb)
        got = block(h, position_embeddings=emb)
    want, got = (w[0] if isinstance(w, tuple) else w for w in (want, got))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    changed = [n for n, p in block.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    if method == "smoothquant" or any(a > 0 for a in alphas.values()):
        assert changed  # the scales were folded somewhere


def _logit_error(model, ref, qmodel, ids):
    m = copy.deepcopy(model)
    apply_quantized(m, qmodel)
    with torch.no_grad():
        return float((m(input_ids=ids).logits - ref).pow(2).mean())


def test_awq_smoothing_lowers_the_w4a4_error_on_outlier_channels(tiny_llama):
    model = _with_outliers(tiny_llama(vocab=96, layers=2, init=0.05))
    ids = _ids(8, 32)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    errors = {}
    for smooth in ("none", "smoothquant", "awq"):
        m = copy.deepcopy(model)
        r = quantize_model(m, ids[:6], "w4a4", "max", transforms=Transforms(smooth=smooth))
        # the transformed model still computes the original function in full precision
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
        errors[smooth] = _logit_error(m, ref, r.qmodel, ids)
    assert errors["awq"] < 0.8 * errors["none"], errors
    assert errors["smoothquant"] < errors["none"], errors


def test_smoothing_does_not_apply_to_stats_given_up_front(tiny_llama):
    from nvfp4kit.calibrate import calibrate_model

    model = tiny_llama()
    stats = calibrate_model(model, _ids(2, 16), "w4a4")
    with pytest.raises(ValueError, match="pass samples instead of stats"):
        quantize_model(model, None, "w4a4", "max", stats=stats, transforms=Transforms(smooth="awq"))
    with pytest.raises(ValueError, match="--smooth must be one of"):
        Transforms(smooth="bogus")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    model = _with_outliers(LlamaForCausalLM(cfg).eval())
    d = tmp_path_factory.mktemp("outlier-llama")
    model.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    (d / "calib.txt").write_text(TEXT, encoding="utf-8")
    return d


def _bytes(folder):
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as r:
            for k in r.keys():
                out[k] = r.get_tensor(k)
    return out


@pytest.mark.parametrize("smooth", ["awq", "smoothquant"])
def test_smoothing_by_block_from_disk_gives_the_same_bytes_as_in_memory(model_dir, tmp_path, smooth):
    from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

    common = dict(model=str(model_dir), scheme="w4a4", weight_scale="gptq", calib=str(model_dir / "calib.txt"),
                  calib_samples=4, seq_len=32, smooth=smooth, sequential=True)
    run_quantize(QuantizeJob(out=str(tmp_path / "whole"), load="whole", **common))
    run_quantize(QuantizeJob(out=str(tmp_path / "blocks"), load="blocks", **common))
    a, b = _bytes(tmp_path / "whole"), _bytes(tmp_path / "blocks")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the folded norms were written (not the source's)
    from safetensors.torch import load_file

    src = load_file(str(next(model_dir.glob("*.safetensors"))))
    assert not torch.equal(a["model.layers.0.input_layernorm.weight"], src["model.layers.0.input_layernorm.weight"])


def test_rotation_and_auto_need_the_model_loaded_whole(model_dir, tmp_path):
    from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

    for extra, what in ((dict(rotate=True), "--rotate"), (dict(method="auto"), "--method auto")):
        with pytest.raises(ValueError, match=f"{what} works on a model loaded whole"):
            run_quantize(QuantizeJob(model=str(model_dir), out=str(tmp_path / "x"), load="blocks", calib_samples=2,
                                     seq_len=16, calib=str(model_dir / "calib.txt"), **extra))
    with pytest.raises(ValueError, match="--method must be one of"):
        run_quantize(QuantizeJob(model=str(model_dir), out=str(tmp_path / "y"), method="best"))


def test_method_auto_tries_the_candidates_and_keeps_the_best(model_dir, tmp_path, monkeypatch):
    from nvfp4kit.pipelines import quantize as qmod

    tried = []
    real = qmod.quantize_model
    monkeypatch.setattr(qmod, "quantize_model", lambda *a, **k: tried.append((a[1].shape[0], k["transforms"]))
                        or real(*a, **k))
    log = io.StringIO()
    monkeypatch.setattr(progress, "_reporter", progress._reporter)
    progress.use_lines(log)
    job = qmod.QuantizeJob(model=str(model_dir), out=str(tmp_path / "auto"), scheme="w4a4", weight_scale="max",
                           calib=str(model_dir / "calib.txt"), calib_samples=4, seq_len=32, method="auto")
    result, path = qmod.run_quantize(job)
    text = log.getvalue()
    losses = {}
    for line in text.splitlines():
        if "held-out loss" in line:
            name, loss = line.split("--method auto: ", 1)[1].rsplit(": held-out loss ", 1)
            losses[name] = float(loss)
    assert set(losses) == {c.describe() for c in qmod.AUTO_CANDIDATES}
    best = min(losses, key=losses.get)
    assert f"keeping {best} (calibrating on all 4 samples)" in text
    # candidates were fitted on 3 samples (1 held out); the final run on all 4 with the winner
    assert [n for n, _ in tried] == [3] * len(qmod.AUTO_CANDIDATES) + [4]
    assert tried[-1][1].describe() == best
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_method_auto_refuses_encoders_and_too_few_samples(tmp_path):
    from transformers import BertConfig, BertModel

    from nvfp4kit.pipelines.models import LoadedModel
    from nvfp4kit.pipelines.quantize import QuantizeJob, _auto_transforms

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    loaded = LoadedModel(bert, None, "bert-dir", "hf", task="encoder")
    with pytest.raises(ValueError, match="is an encoder"):
        _auto_transforms(QuantizeJob(method="auto"), loaded, _ids(4, 8), None)


def test_cli_options_reach_the_job(model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from nvfp4kit.cli.main import app
    from nvfp4kit.pipelines import quantize as qmod

    r = CliRunner().invoke(app, ["quantize", "--model", str(model_dir), "--out", str(tmp_path / "x"),
                                 "--smooth", "bogus"])
    assert r.exit_code != 0 and "--smooth must be one of none, awq, smoothquant" in r.output
    seen = []
    monkeypatch.setattr(qmod, "run_quantize", lambda job: seen.append(job) or (_ for _ in ()).throw(ValueError("stop")))
    CliRunner().invoke(app, ["quantize", "--model", str(model_dir), "--out", str(tmp_path / "y"), "--smooth",
                             "smoothquant", "--rotate", "--method", "auto"])
    assert (seen[0].smooth, seen[0].rotate, seen[0].method) == ("smoothquant", True, "auto")
    CliRunner().invoke(app, ["quantize", "--model", str(model_dir), "--out", str(tmp_path / "z")])
    assert (seen[1].smooth, seen[1].rotate, seen[1].method) == ("awq", False, "given")
