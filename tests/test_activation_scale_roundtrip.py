"""Static activation scales survive a checkpoint round trip bit for bit, in both formats."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from nvfp4kit.checkpoint import load_quantized, save_quantized
from nvfp4kit.checkpoint.layout import exact_input_amax
from nvfp4kit.checkpoint.types import QuantizedLinearWeight, QuantizedModel
from nvfp4kit.calibrate.emulation import apply_quantized
from nvfp4kit.formats.nvfp4 import quantize_parts
from nvfp4kit.calibrate.ptq import quantize_model


def encode_scale_np(amax: float, range_max: float) -> np.float32:
    """The format core's activation encode scale, written independently: float32 division in numpy."""
    return np.float32(range_max) / np.float32(amax)


@settings(max_examples=200, deadline=None)
@given(exponent=st.floats(-12, 12), range_max=st.sampled_from([2688.0, 448.0]))
def test_exact_amax_is_close_and_a_fixed_point_of_both_stored_directions(exponent, range_max):
    a = 10.0 ** exponent
    c = exact_input_amax(a, range_max)
    a32 = np.float32(a)
    assert np.float32(c) == c  # a float32 value
    assert abs(c - float(a32)) <= 4 * float(np.spacing(a32))  # moved by a few ulps at most
    # modelopt stores float32(amax / range) and reads amax = scale * range
    decode = np.float32(np.float64(c) / range_max)
    assert np.float32(np.float64(decode) * range_max) == np.float32(c)
    # compressed-tensors stores float32(range / amax) and reads amax = range / scale
    encode = np.float32(range_max / np.float64(c))
    back = np.float64(range_max) / np.float64(encode)
    assert encode_scale_np(back, range_max) == encode_scale_np(c, range_max)


def test_exact_amax_leaves_zero_and_inf_alone():
    assert exact_input_amax(0.0, 2688.0) == 0.0
    assert exact_input_amax(float("inf"), 2688.0) == float("inf")


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_records_read_back_with_the_same_activation_scale(tmp_path, fmt):
    g = torch.Generator().manual_seed(0)
    amaxes = [float(v) for v in torch.rand(200, generator=g, dtype=torch.float64) * 50 + 1e-3]
    w = torch.randn(16, 32, generator=g)
    parts = quantize_parts(w)
    model = QuantizedModel(config={"model_type": "llama"})
    for i, a in enumerate(amaxes):
        model.linears[f"l{i}.proj"] = QuantizedLinearWeight("nvfp4", (16, 32), nvfp4=parts,
                                                            input_amax=exact_input_amax(a, 2688.0))
    back = load_quantized(save_quantized(model, tmp_path / "ckpt", format=fmt))
    for name, rec in model.linears.items():
        got = back.linears[name].input_amax
        assert encode_scale_np(got, 2688.0) == encode_scale_np(rec.input_amax, 2688.0), name


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_quantized_model_computes_the_same_before_writing_and_after_loading(tmp_path, fmt):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    samples = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    q = quantize_model(model, samples, "w4a4", "max").qmodel
    back = load_quantized(save_quantized(q, tmp_path / "ckpt", format=fmt))
    for name, rec in q.linears.items():
        got = back.linears[name].input_amax
        assert encode_scale_np(got, 2688.0) == encode_scale_np(rec.input_amax, 2688.0), name
        if fmt == "modelopt":  # stores the decode direction: the amax itself comes back
            assert np.float32(got) == np.float32(rec.input_amax), name
    before, after = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    for m in (before, after):
        m.load_state_dict(model.state_dict())
    apply_quantized(before, q)
    apply_quantized(after, back)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(before(ids).logits, after(ids).logits)
