"""Block-by-block calibration: the block structure, the engine's passes, equality with one-shot and with
a manual composition, the output head never computed."""

import copy

import pytest
import torch

from nvfp4kit.calibrate.transforms import Transforms
from torch import nn
from transformers import LlamaForCausalLM

from nvfp4kit.calibrate import blockwise
from nvfp4kit.calibrate.blockwise import quantize_by_block
from nvfp4kit.calibrate.emulation import EmulatedLinear, apply_quantized
from nvfp4kit.calibrate.ptq import plan_model, quantize_model
from nvfp4kit.calibrate.sequential import block_layout, block_members, repeated_blocks
from nvfp4kit.checkpoint.types import QuantizedModel


def samples(n=4, length=24, seed=1):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def same_record(a, b):
    if a.format != b.format or a.input_amax != b.input_amax:
        return False
    return (torch.equal(a.nvfp4.packed, b.nvfp4.packed)
            and torch.equal(a.nvfp4.block_scale.view(torch.uint8), b.nvfp4.block_scale.view(torch.uint8))
            and torch.equal(a.nvfp4.global_decode_scale, b.nvfp4.global_decode_scale))


def test_repeated_blocks_and_members(tiny_llama):
    m = tiny_llama(layers=3)
    name, blocks = repeated_blocks(m)
    assert name == "model.layers" and blocks is m.model.layers
    assert repeated_blocks(nn.Sequential(nn.Linear(4, 4))) is None
    experts = nn.Module()
    experts.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(8)])
    experts.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    assert repeated_blocks(experts)[0] == "layers"  # an experts list is never the block list
    one = tiny_llama(layers=1)
    assert repeated_blocks(one) == ("model.layers", one.model.layers)  # a one-block model has its block list
    lone = nn.Module()
    lone.single = nn.ModuleList([nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])])
    lone.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    assert repeated_blocks(lone)[0] == "layers"  # a list of two or more wins over a one-member list
    per_block, rest = block_members(["a.0.x", "a.1.y", "a.0.z", "a.10.q", "head", "a.b"], "a", 2)
    assert per_block == [["a.0.x", "a.0.z"], ["a.1.y"]] and rest == ["a.10.q", "head", "a.b"]


@pytest.mark.parametrize("scheme,method", [("w4a4", "gptq"), ("w4a4", "max"), ("w4a16", "gptq")])
def test_sequential_equals_one_shot_on_the_partially_quantized_model(tiny_llama, scheme, method):
    """Block i's records equal a one-shot quantization of the model whose blocks < i already compute
    with the records of the sequential run (built here by hand with apply_quantized)."""
    m = tiny_llama(layers=3)
    x = samples()
    seq = quantize_model(m, x, scheme, method, sequential=True).qmodel
    oneshot = quantize_model(m, x, scheme, method).qmodel
    layer = lambda n: int(n.split(".")[2])  # noqa: E731  model.layers.<i>.
    for n in seq.linears:
        if layer(n) == 0:  # nothing quantized upstream: the same as one shot
            assert same_record(seq.linears[n], oneshot.linears[n]), n
    for i in (1, 2):
        partial = copy.deepcopy(m)
        upstream = QuantizedModel(linears={n: r for n, r in seq.linears.items() if layer(n) < i})
        apply_quantized(partial, upstream)
        ref = quantize_model(partial, x, scheme, method).qmodel  # quantizes the Linears still nn.Linear
        for n, r in seq.linears.items():
            if layer(n) == i:
                assert same_record(r, ref.linears[n]), n
    assert any(not same_record(seq.linears[n], oneshot.linears[n]) for n in seq.linears if layer(n) == 2)


def test_block_layout(tiny_llama):
    m = tiny_llama(layers=3, tie=True)
    lay = block_layout(m)
    assert lay.name == "model.layers" and len(lay) == 3
    assert lay.before == ["model.embed_tokens"] and lay.after == ["model.norm", "model.rotary_emb", "lm_head"]
    assert lay.unit_of("model.layers.2.mlp.up_proj.weight") == (3, "model.layers.2")
    assert lay.unit_of("model.embed_tokens.weight") == (0, "model.embed_tokens")
    assert lay.unit_of("lm_head.weight") == (4, "lm_head")
    assert lay.order(["lm_head.weight", "model.layers.1.x", "model.embed_tokens.weight", "model.layers.0.y"]) == [
        "model.embed_tokens.weight", "model.layers.0.y", "model.layers.1.x", "lm_head.weight"]
    assert block_layout(nn.Sequential(nn.Linear(4, 4))) is None


def test_model_is_left_unchanged_even_when_a_step_fails(tiny_llama, monkeypatch):
    m = tiny_llama(layers=3)
    ref = copy.deepcopy(m)
    x = samples()
    quantize_model(m, x, "w4a4", "gptq", sequential=True)
    assert all(type(mod) is not EmulatedLinear for mod in m.modules())
    for (n, p), (_, q) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    calls = []
    real = blockwise.quantize_linears

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(blockwise, "quantize_linears", failing)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_by_block(m, x, plan_model(m, "w4a4"), "max")
    assert all(type(mod) not in (EmulatedLinear, blockwise._Stand) for mod in m.modules())
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in m.model.layers)
    for (n, p), (_, q) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("sequential", [True, False])
def test_each_block_runs_on_cached_inputs_and_the_head_never_runs(tiny_llama, sequential):
    m = tiny_llama(layers=3)
    x = samples()  # 4 batches of one sample
    runs = {i: 0 for i in range(3)}
    handles = [blk.register_forward_pre_hook(lambda mod, a, i=i: runs.__setitem__(i, runs[i] + 1))
               for i, blk in enumerate(m.model.layers)]
    head = []
    handles.append(m.lm_head.register_forward_pre_hook(lambda mod, a: head.append(1)))
    handles.append(m.model.norm.register_forward_pre_hook(lambda mod, a: head.append(1)))
    try:
        quantize_model(m, x, "w4a4", "max", sequential=sequential)
        # each block: one observed pass per batch (+ one emulated pass that makes the next block's inputs,
        # for every block but the last); the blocks before it are never run again
        assert runs == ({0: 8, 1: 8, 2: 4} if sequential else {0: 4, 1: 4, 2: 4})
        assert head == []  # calibration never computes the final norm or the output head
        runs.update({i: 0 for i in range(3)})
        quantize_model(m, None, "w4a16", "max")  # nothing to observe: no pass at all
        assert runs == {0: 0, 1: 0, 2: 0}
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method", ["max", "gptq"])
def test_one_shot_by_block_equals_the_whole_model_pass(tiny_llama, method):
    m = tiny_llama(layers=3)
    x = samples()
    whole = quantize_model(m, x, "w4a4", method)
    by_block = quantize_by_block(m, x, plan_model(m, "w4a4"), method, sequential=False)
    assert set(by_block.records) == set(whole.qmodel.linears)
    for n, r in whole.qmodel.linears.items():
        assert same_record(by_block.records[n], r), n


def test_sequential_errors(tiny_llama):
    m = tiny_llama(layers=3)
    with pytest.raises(ValueError, match="needs samples"):
        quantize_model(m, None, "w4a4", "gptq", sequential=True)
    flat = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="repeated blocks"):
        quantize_by_block(flat, samples(), plan_model(flat, "w4a4", exclude=()), "max")


def test_sequential_with_kv_cache_scales_every_attention(tiny_llama):
    m = tiny_llama(layers=3)
    x = samples()
    seq = quantize_model(m, x, "w4a4", "max", sequential=True, kv_cache="fp8").qmodel
    one = quantize_model(m, x, "w4a4", "max", kv_cache="fp8").qmodel
    assert seq.kv_cache_format == "fp8" and set(seq.kv_cache_amax) == set(one.kv_cache_amax) == {
        f"model.layers.{i}.self_attn" for i in range(3)}
    # block 0 sees the same keys/values in every pass: equal to the one-shot amax
    assert seq.kv_cache_amax["model.layers.0.self_attn"] == one.kv_cache_amax["model.layers.0.self_attn"]
    assert all(k > 0 and v > 0 for k, v in seq.kv_cache_amax.values())


def test_cli_sequential_writes_the_sequential_records(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from nvfp4kit.calibrate.data import calibration_samples
    from nvfp4kit.cli.main import app

    chars = ["<unk>"] + [chr(i) for i in range(32, 127)]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(
        vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>")), unk_token="<unk>")
    src = tmp_path / "src"
    tiny_llama(layers=3).save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 30)
    out = {}
    for flag in ("--sequential", "--one-shot"):
        out[flag] = tmp_path / flag.strip("-")
        r = CliRunner().invoke(app, ["quantize", "--model", str(src), "--out", str(out[flag]), "--calib", str(text),
                                     "--calib-samples", "4", "--seq-len", "24", "--weight-scale", "gptq", flag])
        assert r.exit_code == 0, r.output
    seq = load_file(str(out["--sequential"] / "model.safetensors"))
    one = load_file(str(out["--one-shot"] / "model.safetensors"))
    # the same records as the library call on the same calibration samples
    model = LlamaForCausalLM.from_pretrained(str(src)).eval()
    ids = calibration_samples(tok, str(text), 4, 24)
    ref = quantize_model(model, ids, "w4a4", "gptq", sequential=True, transforms=Transforms()).qmodel  # CLI defaults
    for name, rec in ref.linears.items():
        assert torch.equal(seq[f"{name}.weight"], rec.nvfp4.packed), name
    assert torch.equal(seq["model.layers.0.mlp.down_proj.weight"], one["model.layers.0.mlp.down_proj.weight"])
    assert not torch.equal(seq["model.layers.2.mlp.down_proj.weight"], one["model.layers.2.mlp.down_proj.weight"])
