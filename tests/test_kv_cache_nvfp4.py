"""NVFP4 KV cache (``--kv-cache nvfp4``): the scale rule and its names, the config fields and tensors both
checkpoint formats write, the emulation against a hand-written attention with keys/values quantized by
the format core's NVFP4 reference, reload equal bit for bit, and clear errors."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from nvfp4kit.calibrate.emulation import apply_kv_cache, apply_quantized
from nvfp4kit.calibrate.ptq import quantize_model
from nvfp4kit.checkpoint import kv_cache as kvc
from nvfp4kit.checkpoint.errors import CheckpointError
from nvfp4kit.formats.nvfp4 import dequantize_parts, quantize_parts
from nvfp4kit.model.lm import build_model
from nvfp4kit.pipelines.models import load_quantized_model
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

from test_ptq_pipeline import TEXT, char_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

ATTN = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def llama(seed=0, head_dim=16):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=4 * head_dim, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # spread keys/values so that blocks get different E4M3 scales
        for layer in m.model.layers:
            layer.self_attn.k_proj.weight.mul_(8)
            layer.self_attn.v_proj.weight[::3].mul_(5)
    return m


def ids(n=2, L=40, seed=5, vocab=128):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def reference_nvfp4(x, amax):
    """NVFP4 quantize-dequantize with the format core's torch reference: 1x16 blocks along the last
    dim, E4M3 block scales, the per-tensor scale of the calibrated amax."""
    p = quantize_parts(x, global_amax=amax)
    return dequantize_parts(p.packed, p.block_scale, p.global_decode_scale, x.dtype), p


def manual_llama_attention(attn, k_amax, v_amax, seen=None):
    """LlamaAttention's forward written out, the keys (after RoPE) and values quantized by hand with
    the reference before the attention kernel the model uses."""

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, *position_embeddings)
        k, pk = reference_nvfp4(k, k_amax)
        v, pv = reference_nvfp4(v, v_amax)
        if seen is not None:
            seen.append((pk, pv))
        fn = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                                    modeling_llama.eager_attention_forward)
        out, w = fn(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
        return attn.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), w

    return forward


def checkpoint_tensors(path):
    out = {}
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kv-nvfp4-llama")
    llama().save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    (d / "calib.txt").write_text(TEXT, encoding="utf-8")
    return d


# ----------------------------------------------------------------------------- the rule


def test_scale_rule_and_names():
    for a in (1e-3, 0.37, 3.0, 17.25, 5000.0):
        a32 = float(np.float32(a))
        assert float(kvc.kv_scale("nvfp4", a32)) == float(np.float32(a32 / 2688.0))
        assert float(kvc.kv_scale("fp8", a32)) == float(np.float32(a32 / 448.0))
        c = kvc.exact_kv_amax("nvfp4", a32)
        assert c >= a32 and (np.float32(c).view(np.int32) - np.float32(a32).view(np.int32)) <= 16
        s = kvc.kv_scale("nvfp4", c)
        # the stored scale is the format core's decode scale of that amax, and reads back to it
        assert torch.equal(quantize_parts(torch.ones(1, 16), global_amax=c).global_decode_scale, s)
        assert float(np.float32(kvc.kv_amax("nvfp4", s))) == c
    assert kvc.exact_kv_amax("fp8", 0.1) == 0.1
    # a scale another producer stored (modelopt's export: amax / 448) is emulated as the decode scale it is
    for s in (0.01, 0.0123, 3.7e-4):
        stored = torch.tensor(s, dtype=torch.float32)
        dec = quantize_parts(torch.ones(1, 16), global_amax=kvc.kv_amax("nvfp4", stored)).global_decode_scale
        assert abs(int(dec.view(torch.int32)) - int(stored.view(torch.int32))) <= 1
    for fmt in ("fp8", "nvfp4"):
        assert kvc.kv_scale_names("modelopt", "m.layers.3.attn", fmt) == ("m.layers.3.attn.k_proj.k_scale",
                                                                          "m.layers.3.attn.v_proj.v_scale")
        assert kvc.kv_scale_names("compressed-tensors", "m.layers.3.attn", fmt) == ("m.layers.3.attn.k_scale",
                                                                                    "m.layers.3.attn.v_scale")
    with pytest.raises(CheckpointError, match="KV-cache format must be one of fp8, nvfp4, got 'int4'"):
        kvc.kv_scale_names("modelopt", "a", "int4")
    # config fields, and what nvfp4kit cannot emulate
    assert kvc.kv_format_of_modelopt_algo("nvfp4", "x") == "nvfp4"
    assert kvc.kv_format_of_modelopt_scheme("NVFP4", "x") == "nvfp4"
    assert kvc.kv_format_of_ct_scheme({"num_bits": 4, "type": "float", "strategy": "tensor"}, "x") == "nvfp4"
    with pytest.raises(CheckpointError, match="kv_cache_quant_algo 'INT8' is not supported"):
        kvc.kv_format_of_modelopt_algo("INT8", "x")
    with pytest.raises(CheckpointError, match="kv_cache_scheme strategy 'tensor_group' is not supported"):
        kvc.kv_format_of_ct_scheme({"num_bits": 4, "type": "float", "strategy": "tensor_group"}, "x")


# ----------------------------------------------------------------------------- checkpoints and emulation


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_checkpoint_and_exact_emulation(llama_dir, tmp_path, fmt):
    job = QuantizeJob(model=str(llama_dir), out=str(tmp_path / "q"), format=fmt, scheme="w4a4", weight_scale="max",
                      calib=str(llama_dir / "calib.txt"), calib_samples=3, seq_len=32, kv_cache="nvfp4",
                      smooth="none")
    result, path = run_quantize(job)
    amax = result.qmodel.kv_cache_amax
    assert result.qmodel.kv_cache_format == "nvfp4" and list(amax) == ATTN
    tensors = checkpoint_tensors(path)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    for n, (k, v) in amax.items():
        names = (f"{n}.k_proj.k_scale", f"{n}.v_proj.v_scale") if fmt == "modelopt" else (f"{n}.k_scale", f"{n}.v_scale")
        for t_name, a in zip(names, (k, v)):
            t = tensors[t_name]
            assert t.dtype == torch.float32 and tuple(t.shape) == (() if fmt == "modelopt" else (1,)), t_name
            assert float(t.reshape(())) == float(np.float32(a / 2688.0)), t_name  # amax / (6 * 448)
    assert sorted(n for n in tensors if n.endswith(("k_scale", "v_scale"))) == sorted(
        kvc.kv_scale_names(fmt, n, "nvfp4")[i] for n in ATTN for i in (0, 1))
    if fmt == "modelopt":
        hf_quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
        assert hf_quant["kv_cache_quant_algo"] == "NVFP4"
        assert cfg["kv_cache_scheme"] == "NVFP4"
    else:
        assert cfg["kv_cache_scheme"] == {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor",
                                          "dynamic": False}

    loaded = load_quantized_model(path)
    assert loaded.quantized.kv_cache_format == "nvfp4"
    back = loaded.quantized.kv_cache_amax  # the calibrated float32 amax comes back exactly
    assert {n: tuple(float(np.float32(a)) for a in kv) for n, kv in back.items()} == amax
    # the reference: the source model, the same emulated Linears, attention written out by hand
    ref = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    apply_quantized(ref, result.qmodel)
    seen = []
    for n in ATTN:
        ref.get_submodule(n).forward = manual_llama_attention(ref.get_submodule(n), *amax[n], seen)
    # in memory, before writing: the same model with the emulated KV cache
    mem = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    apply_quantized(mem, result.qmodel)
    apply_kv_cache(mem, result.qmodel)
    x = ids()
    with torch.no_grad():
        got = loaded.model(input_ids=x).logits
        want = ref(input_ids=x).logits
        in_memory = mem(input_ids=x).logits
        off = load_quantized_model(path, kv_cache=False).model(input_ids=x).logits
    assert torch.equal(got, want)  # bit for bit
    assert torch.equal(in_memory, got)  # reloading changes nothing
    assert (got - off).abs().max() > 1e-3  # the NVFP4 KV cache is really emulated
    # the reference's scales are the stored ones, and its blocks really use several E4M3 scales
    for (pk, pv), n in zip(seen, ATTN):
        k_name, v_name = kvc.kv_scale_names(fmt, n, "nvfp4")
        assert torch.equal(pk.global_decode_scale, tensors[k_name].reshape(()))
        assert torch.equal(pv.global_decode_scale, tensors[v_name].reshape(()))
        assert pk.block_scale.float().unique().numel() > 10 and pk.block_scale.shape[-1] == 1  # head_dim 16


def test_hybrid_attention_emulation():
    """nvfp4kit's hybrid model (explicit kv_hook, no positional encoding): in-memory emulation against its
    attention written out with reference-quantized keys/values."""
    m = build_model("tiny", seed=0).eval()
    r = quantize_model(copy.deepcopy(m), ids(2, 32, 0, vocab=4096), "w4a4", "max", kv_cache="nvfp4")
    assert r.qmodel.kv_cache_format == "nvfp4" and list(r.qmodel.kv_cache_amax) == ["backbone.layers.1.mixer"]
    ka, va = r.qmodel.kv_cache_amax["backbone.layers.1.mixer"]
    emu, ref = copy.deepcopy(m), copy.deepcopy(m)
    for model in (emu, ref):
        apply_quantized(model, r.qmodel)
    apply_kv_cache(emu, r.qmodel)
    attn = ref.backbone.layers[1].mixer

    def manual(hidden, state=None):
        B, T, _ = hidden.shape
        D = attn.head_dim
        q = attn.q_proj(hidden).view(B, T, -1, D).transpose(1, 2)
        k = reference_nvfp4(attn.k_proj(hidden).view(B, T, -1, D).transpose(1, 2), ka)[0]
        v = reference_nvfp4(attn.v_proj(hidden).view(B, T, -1, D).transpose(1, 2), va)[0]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=attn.scale,
                                             enable_gqa=attn.num_kv_heads != attn.num_heads)
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    attn.forward = manual
    x = ids(1, 24, 7, vocab=4096)
    with torch.no_grad():
        got, want, plain = emu(x).logits, ref(x).logits, m(x).logits
    assert torch.equal(got, want)
    assert (got - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------- errors and the CLI


def test_clear_errors(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--kv-cache must be one of fp8, nvfp4 \(or left out\), got 'nvfp8'"):
        quantize_model(llama(), ids(), "w4a16", "max", kv_cache="nvfp8")
    with pytest.raises(ValueError, match=r"--kv-cache nvfp4: the keys of model\.layers\.0\.self_attn have head dim 8, "
                                         r"not a multiple of 16"):
        quantize_model(llama(head_dim=8), ids(), "w4a16", "max", kv_cache="nvfp4")

    from typer.testing import CliRunner

    import nvfp4kit.cli.eval_cmd  # noqa: F401
    import nvfp4kit.cli.quantize_cmd  # noqa: F401
    from nvfp4kit.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["quantize", "--model", str(llama_dir), "--out", str(tmp_path / "bad"),
                              "--kv-cache", "fp4"])
    assert res.exit_code != 0 and "--kv-cache must be one of fp8, nvfp4" in " ".join(res.output.split())
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "cli"
    res = runner.invoke(app, ["quantize", "--model", str(llama_dir), "--out", str(out), "--weight-scale", "max",
                              "--kv-cache", "nvfp4", "--calib", str(llama_dir / "calib.txt"), "--calib-samples", "2",
                              "--seq-len", "32", "--smooth", "none"])
    assert res.exit_code == 0, res.output
    assert "NVFP4 KV cache: static scales for 2 attention layers" in " ".join(res.output.split())
    res = runner.invoke(app, ["eval", "--model", str(out), "--text", str(llama_dir / "calib.txt"),
                              "--seq-len", "32", "--max-tokens", "64"])
    assert res.exit_code == 0 and "NVFP4 KV cache emulated" in " ".join(res.output.split()), res.output
