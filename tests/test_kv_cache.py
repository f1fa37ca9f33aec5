"""Static FP8 KV cache: calibration of the keys/values as cached (post-RoPE), checkpoint scales in
both formats, evaluation emulation, restoring the attention functions, the CLI end to end."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nvfp4kit.calibrate.kv_cache import attention_modules, kv_hooks
from nvfp4kit.checkpoint import save_quantized
from nvfp4kit.calibrate.emulation import apply_quantized
from nvfp4kit.model.lm import build_model
from nvfp4kit.pipelines.models import load_quantized_model
from nvfp4kit.calibrate.ptq import quantize_model
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

from test_ptq_pipeline import TEXT, char_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


def llama(impl="sdpa", seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    cfg._attn_implementation = impl
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger keys than the init gives, so RoPE visibly moves their amax
        for layer in m.model.layers:
            layer.self_attn.k_proj.weight.mul_(8)
    return m


def hybrid():
    return build_model("tiny", seed=0).eval()


def ids(n=4, L=24, seed=0, vocab=128):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def interface_entries():
    return {k: ALL_ATTENTION_FUNCTIONS[k] for k in ALL_ATTENTION_FUNCTIONS}


def no_module_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- references


def attention_inputs(model, names, samples):
    """The hidden states entering each named attention module, per sample batch (captured by hooks)."""
    seen = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, kwargs, n=n: seen[n].append((args[0] if args else kwargs["hidden_states"]).detach()),
        with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            for i in range(samples.shape[0]):
                model(samples[i:i + 1])
    finally:
        for h in handles:
            h.remove()
    return seen


def rope_reference(k, theta):
    """Llama rotary embedding in float64: k [B, H, T, D], positions 0..T-1, halves rotated."""
    T, D = k.shape[-2], k.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    k1, k2 = k[..., : D // 2], k[..., D // 2:]
    return torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)


def llama_reference_amax(model, samples):
    """(post-RoPE k amax, v amax, pre-RoPE k_proj amax) per attention, from the attention inputs."""
    cfg = model.config
    theta = cfg.rope_parameters["rope_theta"]
    names = [f"model.layers.{i}.self_attn" for i in range(cfg.num_hidden_layers)]
    out = {}
    for n, xs in attention_inputs(model, names, samples).items():
        xs = [x.detach() for x in xs]
        attn = model.get_submodule(n)
        k_amax = v_amax = k_pre = 0.0
        for x in xs:
            x = x.double()
            k = x @ attn.k_proj.weight.detach().double().T
            v = x @ attn.v_proj.weight.detach().double().T
            B, T, _ = x.shape
            k = k.view(B, T, cfg.num_key_value_heads, -1).transpose(1, 2)
            k_amax = max(k_amax, float(rope_reference(k, theta).abs().max()))
            v_amax = max(v_amax, float(v.abs().max()))
            k_pre = max(k_pre, float(k.abs().max()))
        out[n] = (k_amax, v_amax, k_pre)
    return out


def fq_fp8(x, amax):
    """FP8 E4M3 quantize-dequantize, written out: scale = float32(amax / 448), saturate, round."""
    s = float(np.float32(amax / 448.0))
    q = torch.clamp(x.double() / s, -448, 448).to(torch.float32).to(torch.float8_e4m3fn)
    return (q.double() * s).to(x.dtype)


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llama_kv_amax_is_post_rope_and_functions_restored(impl):
    m = llama(impl)
    samples = ids()
    before = interface_entries()
    with torch.no_grad():
        logits0 = m(samples[:1]).logits
    r = quantize_model(m, samples, "w4a16", "max", kv_cache="fp8", batch_size=2)
    assert r.qmodel.kv_cache_format == "fp8"
    assert interface_entries() == before and no_module_hooks(m)
    with torch.no_grad():
        assert torch.equal(m(samples[:1]).logits, logits0)  # nothing left behind in the model
    ref = llama_reference_amax(m, samples)
    assert list(r.qmodel.kv_cache_amax) == list(ref) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for n, (k_ref, v_ref, k_pre) in ref.items():
        k_amax, v_amax = r.qmodel.kv_cache_amax[n]
        assert k_amax == pytest.approx(k_ref, rel=2e-6), n
        assert v_amax == pytest.approx(v_ref, rel=2e-6), n
        # the rotary embedding moves the key amax: a k_proj-output scale would be off
        assert abs(k_amax - k_pre) > 1e-3 * k_pre, n


def test_kv_calibration_shares_the_linear_calibration_pass():
    m = llama()
    samples = ids()
    r = quantize_model(m, samples, "w4a4", "max", kv_cache="fp8")
    plain = quantize_model(copy.deepcopy(m), samples, "w4a4", "max")
    assert r.n_calib_tokens == samples.numel()
    for n, rec in plain.qmodel.linears.items():
        assert r.qmodel.linears[n].input_amax == rec.input_amax, n
    ref = llama_reference_amax(m, samples)
    for n, (k, v) in r.qmodel.kv_cache_amax.items():
        assert (k, v) == pytest.approx(ref[n][:2], rel=2e-6)
    assert plain.qmodel.kv_cache_format is None and plain.qmodel.kv_cache_amax == {}
    # with precomputed statistics the samples run once more, for the KV cache alone
    again = quantize_model(copy.deepcopy(m), samples, "w4a4", "max", stats=r.stats, kv_cache="fp8")
    assert again.qmodel.kv_cache_amax == r.qmodel.kv_cache_amax


def test_hybrid_attention_kv_amax_and_names():
    m = hybrid()
    samples = ids(2, 32, vocab=4096)
    r = quantize_model(m, samples, "w4a16", "max", kv_cache="fp8")
    assert all(m.get_submodule(n).kv_hook is None for n in attention_modules(m))
    # pattern "M*EM-E": layer 1 is the backbone's attention; the MTP attention does not run
    assert list(r.qmodel.kv_cache_amax) == ["backbone.layers.1.mixer"]
    attn = m.get_submodule("backbone.layers.1.mixer")
    k_ref = v_ref = 0.0
    for x in attention_inputs(m, ["backbone.layers.1.mixer"], samples)["backbone.layers.1.mixer"]:
        k_ref = max(k_ref, float((x.double() @ attn.k_proj.weight.detach().double().T).abs().max()))
        v_ref = max(v_ref, float((x.double() @ attn.v_proj.weight.detach().double().T).abs().max()))
    k_amax, v_amax = r.qmodel.kv_cache_amax["backbone.layers.1.mixer"]
    assert k_amax == pytest.approx(k_ref, rel=2e-6) and v_amax == pytest.approx(v_ref, rel=2e-6)


def test_hooks_restored_after_an_exception():
    m = llama()
    h = hybrid()
    before = interface_entries()
    with torch.no_grad():
        # finite weights (weights with NaN/inf are refused before calibration) whose outputs overflow
        m.model.layers[1].self_attn.v_proj.weight[0] = 3e38
        h.backbone.layers[1].mixer.k_proj.weight[3] = 3e38
    with pytest.raises(ValueError, match=r"values of model\.layers\.1\.self_attn have NaN"):
        quantize_model(m, ids(), "w4a16", "max", kv_cache="fp8")
    assert interface_entries() == before and no_module_hooks(m)
    with pytest.raises(ValueError, match=r"keys of backbone\.layers\.1\.mixer have NaN"):
        quantize_model(h, ids(1, 16, vocab=4096), "w4a16", "max", kv_cache="fp8")
    assert h.backbone.layers[1].mixer.kv_hook is None
    # an error raised by the code inside the block also restores everything
    calls = []
    with pytest.raises(RuntimeError, match="boom"):
        with kv_hooks(llama(), lambda n, k, v: (calls.append(n), (k, v))[1]) as handle:
            assert handle.interface_hooks
            raise RuntimeError("boom")
    assert interface_entries() == before and calls == []


def test_nested_hooks_apply_in_order_and_unwind():
    m = llama()
    before = interface_entries()
    order = []
    x = ids(1, 12)
    with torch.no_grad():
        ref = m(x).logits
        with kv_hooks(m, lambda n, k, v: (order.append(("outer", n)), (k, v))[1]):
            with kv_hooks(m, lambda n, k, v: (order.append(("inner", n)), (k * 1, v))[1]):
                out = m(x).logits
    assert torch.equal(out, ref)
    assert order == [("inner", "model.layers.0.self_attn"), ("outer", "model.layers.0.self_attn"),
                     ("inner", "model.layers.1.self_attn"), ("outer", "model.layers.1.self_attn")]
    assert interface_entries() == before and no_module_hooks(m)


def test_clear_errors():
    with pytest.raises(ValueError, match="--kv-cache must be one of fp8"):
        quantize_model(llama(), ids(), "w4a16", "max", kv_cache="int8")

    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(128, 32)
            self.up = nn.Linear(32, 64)
            self.down = nn.Linear(64, 128)

        def forward(self, input_ids):
            return self.down(torch.relu(self.up(self.emb(input_ids))))

    with pytest.raises(ValueError, match="--kv-cache fp8: found no attention module"):
        quantize_model(NoAttention(), ids(), "w4a16", "max", kv_cache="fp8")
    with pytest.raises(ValueError, match="--kv-cache fp8 needs calibration samples"):
        quantize_model(llama(), None, "w4a16", "max", kv_cache="fp8")

    class HandWrittenAttention(nn.Module):  # has k_proj/v_proj but computes attention itself
        def __init__(self):
            super().__init__()
            self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            w = torch.softmax(x @ self.k_proj(x).transpose(-1, -2), -1)
            return w @ self.v_proj(x)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig()
            self.emb = nn.Embedding(128, 16)
            self.attn = HandWrittenAttention()
            self.head = nn.Linear(16, 128)

        def forward(self, input_ids):
            return self.head(self.attn(self.emb(input_ids)))

    before = interface_entries()
    t = Tiny()
    with pytest.raises(ValueError, match="attn: HandWrittenAttention did not call transformers' attention interface"):
        quantize_model(t, ids(1, 8), "w4a16", "max", kv_cache="fp8")
    assert interface_entries() == before and no_module_hooks(t)


# ----------------------------------------------------------------------------- checkpoints and emulation


def manual_llama_attention(attn, qm_amax, name):
    """A replacement forward of one Llama attention: projections, RoPE from the given cos/sin, keys and
    values fake-quantized to FP8 by hand, grouped-query causal softmax attention, output projection."""
    k_amax, v_amax = qm_amax[name]

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        D = attn.head_dim
        q = attn.q_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)
        cos, sin = (t[:, None] for t in position_embeddings)

        def rot(t):
            return torch.cat([-t[..., D // 2:], t[..., : D // 2]], dim=-1)

        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = fq_fp8(k, k_amax), fq_fp8(v, v_amax)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * D ** -0.5
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out = (p @ v).transpose(1, 2).reshape(B, T, -1)
        return attn.o_proj(out), None

    return forward


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kv-llama")
    llama().save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    (d / "calib.txt").write_text(TEXT, encoding="utf-8")
    return d


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_checkpoint_scales_and_emulated_eval(llama_dir, tmp_path, fmt):
    job = QuantizeJob(model=str(llama_dir), out=str(tmp_path / "q"), format=fmt, scheme="w4a4", weight_scale="max",
                      calib=str(llama_dir / "calib.txt"), calib_samples=3, seq_len=32, kv_cache="fp8",
                      smooth="none")  # compared below with the source model's own computation
    result, path = run_quantize(job)
    amax = result.qmodel.kv_cache_amax
    assert list(amax) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    tensors = {}
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    for n, (k, v) in amax.items():
        if fmt == "modelopt":
            names = (f"{n}.k_proj.k_scale", f"{n}.v_proj.v_scale")
        else:
            names = (f"{n}.k_scale", f"{n}.v_scale")
        for t_name, a in zip(names, (k, v)):
            t = tensors[t_name]
            assert t.dtype == torch.float32 and t.numel() == 1
            assert float(t.reshape(())) == float(np.float32(a / 448.0)), t_name
    assert sum(name.endswith(("k_scale", "v_scale")) for name in tensors) == 4
    if fmt == "modelopt":
        hf_quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
        assert hf_quant["kv_cache_quant_algo"] == "FP8"
    else:
        assert cfg["kv_cache_scheme"]["num_bits"] == 8 and cfg["kv_cache_scheme"]["type"] == "float"
        assert cfg["kv_cache_scheme"]["dynamic"] is False

    # reload: the emulated model == an independent forward with hand-quantized K/V
    loaded = load_quantized_model(path)
    assert loaded.quantized.kv_cache_format == "fp8"
    ref = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    apply_quantized(ref, result.qmodel)
    for n in amax:
        ref.get_submodule(n).forward = manual_llama_attention(ref.get_submodule(n), loaded.quantized.kv_cache_amax, n)
    x = ids(2, 40, 5)
    with torch.no_grad():
        got = loaded.model(input_ids=x).logits
        want = ref(input_ids=x).logits
        off = load_quantized_model(path, kv_cache=False).model(input_ids=x).logits
        # decoding with transformers' cache: the attention sees the whole (already quantized) cache again
        prefix = loaded.model(input_ids=x[:, :30], use_cache=True)
        step = loaded.model(input_ids=x[:, 30:], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, got[:, 30:], rtol=1e-4, atol=1e-4)
    assert (got - off).abs().max() > 1e-4  # the FP8 KV cache is really emulated
    assert interface_entries() == {k: ALL_ATTENTION_FUNCTIONS[k] for k in ALL_ATTENTION_FUNCTIONS}


def test_hybrid_checkpoint_names_and_emulation(tmp_path):
    m = hybrid()
    r = quantize_model(copy.deepcopy(m), ids(2, 32, vocab=4096), "w4a4", "max", kv_cache="fp8")
    char_tokenizer().save_pretrained(tmp_path / "src")
    r.qmodel.source_dir = str(tmp_path / "src")
    path = save_quantized(r.qmodel, tmp_path / "h")
    k_amax, v_amax = r.qmodel.kv_cache_amax["backbone.layers.1.mixer"]
    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            keys |= set(sf.keys())
    scales = sorted(k for k in keys if k.endswith(("k_scale", "v_scale")))
    # Nemotron-H modelopt layout: backbone.layers.{i}.mixer.k_proj.k_scale / v_proj.v_scale
    assert scales == ["backbone.layers.1.mixer.k_proj.k_scale", "backbone.layers.1.mixer.v_proj.v_scale"]
    loaded = load_quantized_model(path)
    assert loaded.quantized.kv_cache_amax["backbone.layers.1.mixer"] == pytest.approx((k_amax, v_amax), rel=1e-7)

    ref = copy.deepcopy(m)
    apply_quantized(ref, r.qmodel)
    attn = ref.backbone.layers[1].mixer
    ka, va = loaded.quantized.kv_cache_amax["backbone.layers.1.mixer"]

    def manual(hidden, state=None):
        B, T, _ = hidden.shape
        D = attn.head_dim
        q = attn.q_proj(hidden).view(B, T, -1, D).transpose(1, 2)
        k = fq_fp8(attn.k_proj(hidden).view(B, T, -1, D).transpose(1, 2), ka)
        v = fq_fp8(attn.v_proj(hidden).view(B, T, -1, D).transpose(1, 2), va)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        return attn.o_proj((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, -1))

    attn.forward = manual
    x = ids(1, 24, 7, vocab=4096)
    with torch.no_grad():
        got = loaded.model(x).logits
        want = ref(x).logits
        off = load_quantized_model(path, kv_cache=False).model(x).logits
        # decoding through the cache quantizes the same keys/values: the same last-token logits
        cache = loaded.model.new_cache(1)
        loaded.model(x[:, :20], cache=cache)
        step = loaded.model(x[:, 20:], cache=cache).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, got[:, 20:], rtol=1e-4, atol=1e-4)
    assert (got - off).abs().max() > 1e-4


# ----------------------------------------------------------------------------- CLI


def test_cli_kv_cache_end_to_end(llama_dir, tmp_path):
    from typer.testing import CliRunner

    import nvfp4kit.cli.eval_cmd  # noqa: F401
    import nvfp4kit.cli.quantize_cmd  # noqa: F401
    from nvfp4kit.cli.app import app

    runner = CliRunner()

    def text(res):  # the console may wrap long lines
        return " ".join(res.output.split())

    out = tmp_path / "cli-kv"
    res = runner.invoke(app, ["quantize", "--model", str(llama_dir), "--out", str(out), "--weight-scale", "max",
                              "--kv-cache", "fp8", "--calib", str(llama_dir / "calib.txt"), "--calib-samples", "2",
                              "--seq-len", "32"])
    assert res.exit_code == 0, res.output
    assert "FP8 KV cache: static scales for 2 attention layers" in text(res)
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    import nvfp4kit.cli.inspect_cmd  # noqa: F401
    from nvfp4kit.checkpoint import load_quantized

    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    kv = load_quantized(out).kv_cache_amax
    ks = [k for k, _ in kv.values()]
    assert f"FP8 KV cache: static scales for 2 attention layers (key amax {min(ks):.4g}..{max(ks):.4g}" in text(res)
    res = runner.invoke(app, ["eval", "--model", str(out), "--text", str(llama_dir / "calib.txt"),
                              "--seq-len", "32", "--max-tokens", "64"])
    assert res.exit_code == 0, res.output
    assert "FP8 KV cache emulated" in text(res)
    on = float(text(res).split("perplexity ")[1].split()[0])
    res = runner.invoke(app, ["eval", "--model", str(out), "--text", str(llama_dir / "calib.txt"),
                              "--seq-len", "32", "--max-tokens", "64", "--no-kv-cache"])
    assert res.exit_code == 0 and "KV cache emulated" not in text(res)
    off = float(text(res).split("perplexity ")[1].split()[0])
    assert math.isfinite(on) and math.isfinite(off) and on != off
    res = runner.invoke(app, ["quantize", "--model", str(llama_dir), "--out", str(tmp_path / "bad"),
                              "--kv-cache", "int8"])
    assert res.exit_code != 0 and "--kv-cache must be one of fp8" in text(res)
    assert not (tmp_path / "bad").exists()
