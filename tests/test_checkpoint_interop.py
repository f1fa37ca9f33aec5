"""Interop with the real libraries, on CPU: compressed-tensors reads what we write, modelopt's
NVFP4QTensor agrees with our dequantization, and modelopt's own HF export loads into nvfp4kit."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from nvfp4kit.checkpoint import (
    QuantizedLinearWeight,
    QuantizedModel,
    convert_checkpoint,
    dequantize_linear,
    dequantized_state_dict,
    detect_format,
    load_quantized,
    save_quantized,
)
from nvfp4kit.formats.nvfp4 import quantize_parts
from nvfp4kit.policy import fused_groups


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def quantize_tiny(model, input_amax=2.0) -> QuantizedModel:
    """Every Linear but lm_head to NVFP4; fused groups share the global amax."""
    sd = model.state_dict()
    qm = QuantizedModel(config=model.config.to_dict(), exclude_modules=["lm_head"])
    linears = [n[: -len(".weight")] for n, p in sd.items()
               if n.endswith(".weight") and p.ndim == 2 and "embed" not in n and not n.startswith("lm_head")]
    groups = {m: g for g in fused_groups(linears) for m in g}
    for m in linears:
        amax = max(float(sd[f"{x}.weight"].abs().max()) for x in groups.get(m, [m]))
        w = sd[f"{m}.weight"]
        qm.linears[m] = QuantizedLinearWeight("nvfp4", tuple(w.shape), nvfp4=quantize_parts(w, global_amax=amax),
                                              input_amax=input_amax)
    for n, p in sd.items():
        if n[: -len(".weight")] not in qm.linears:
            qm.tensors[n] = p.clone()
    return qm


def reference_ct_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_encode: float) -> torch.Tensor:
    """compressed-tensors' order, written out: e2m1 * float32(fp32(s_b) / S_enc), element by element."""
    n, half = packed.shape
    out = torch.empty(n, half * 2, dtype=torch.float32)
    g = torch.tensor(global_encode, dtype=torch.float32)
    for r in range(n):
        for c in range(half * 2):
            byte = int(packed[r, c // 2])
            code = (byte >> 4) if c % 2 else (byte & 0xF)
            v = E2M1[code & 7] * (-1.0 if code & 8 else 1.0)
            s = block_scale[r, c // 16].float() / g
            out[r, c] = torch.tensor(v, dtype=torch.float32) * s
    return out


# ============================================================================= compressed-tensors


def test_compressed_tensors_decompresses_our_checkpoint(tiny_llama, tmp_path):
    """transformers + compressed-tensors load our nvfp4-pack-quantized folder and decompress it to
    exactly e2m1 * (fp32(s_b) / weight_global_scale) of the bytes we wrote (compressed-tensors' order),
    which is within one bf16 rounding of our dequantization e2m1 * (fp32(s_b) * global_decode_scale):
    the two orders differ in the last float32 bit for some scales, so a small fraction of bf16
    values (~0.1% on a real model) land one bf16 ulp apart."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from nvfp4kit.formats.e2m1 import e2m1_decode, unpack_nibbles
    from nvfp4kit.formats.scales import encode_from_decode

    model = tiny_llama(vocab=128)
    qm = quantize_tiny(model)
    out = save_quantized(qm, tmp_path / "ct", "compressed-tensors")
    loaded = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    sd = loaded.state_dict()
    for m, lw in qm.linears.items():
        p = lw.nvfp4
        vals = e2m1_decode(unpack_nibbles(p.packed)).reshape(*p.block_scale.shape, 16)
        g_enc = encode_from_decode(p.global_decode_scale)
        ct_order = (vals * (p.block_scale.float() / g_enc).unsqueeze(-1)).reshape(lw.shape).bfloat16()
        theirs = sd[f"{m}.weight"].bfloat16()
        assert torch.equal(theirs, ct_order), m
        ours = dequantize_linear(lw, torch.bfloat16)
        ulp = torch.finfo(torch.bfloat16).eps * ours.float().abs()
        assert bool(((theirs.float() - ours.float()).abs() <= ulp).all()), m
    for n, t in qm.tensors.items():
        assert torch.equal(sd[n], t), n
    # decompressed weights come back in bf16; run the model (with CT's activation fake-quant) in fp32
    loaded.to(torch.float32)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()


@settings(max_examples=12)
@given(
    rows=st.integers(1, 4).map(lambda x: 16 * x),
    cols=st.integers(1, 4).map(lambda x: 16 * x),
    log2_scale=st.one_of(st.none(), st.integers(-12, 6)),
    mag=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_nvfp4_compressor_on_our_tensors(tmp_path_factory, rows, cols, log2_scale, mag, seed):
    """NVFP4PackedCompressor.decompress on the tensors of our file: CT's order applied to our bytes,
    exactly; equal to our dequantization when the global scale is a power of two (then both orders
    are exact), and within one bf16 rounding otherwise."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4A16

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * mag
    amax = None if log2_scale is None else 2688.0 * 2.0 ** (-log2_scale)  # S_enc = 2**log2_scale exactly
    lw = QuantizedLinearWeight("nvfp4", (rows, cols), nvfp4=quantize_parts(w, global_amax=amax))
    out = save_quantized(QuantizedModel(linears={"layer": lw}), tmp_path_factory.mktemp("c") / "q", "compressed-tensors")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        state = {k.removeprefix("layer."): f.get_tensor(k) for k in f.keys()}
    scheme = QuantizationScheme(targets=["Linear"], **NVFP4A16)
    theirs = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
    ref = reference_ct_dequantize(state["weight_packed"], state["weight_scale"], float(state["weight_global_scale"]))
    assert torch.equal(theirs, ref.to(theirs.dtype))
    ours = dequantize_linear(lw, theirs.dtype)
    if log2_scale is not None:
        assert torch.equal(theirs, ours)
    else:
        ulp = torch.finfo(torch.bfloat16).eps * ours.float().abs()
        assert bool(((theirs.float() - ours.float()).abs() <= ulp).all())


# ============================================================================= modelopt


@settings(max_examples=12)
@given(
    rows=st.integers(1, 4).map(lambda x: 16 * x),
    cols=st.integers(1, 6).map(lambda x: 16 * x),
    mag=st.floats(1e-4, 1e4),
    seed=st.integers(0, 2**16),
)
def test_modelopt_qtensor_dequantize_matches(rows, cols, mag, seed):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * mag
    lw = QuantizedLinearWeight("nvfp4", (rows, cols), nvfp4=quantize_parts(w))
    from nvfp4kit.checkpoint.modelopt_hf import linear_tensors

    t = linear_tensors("x", lw)  # exactly what goes on disk
    q = NVFP4QTensor(torch.Size((rows, cols)), torch.float32, t["x.weight"])
    theirs = q.dequantize(dtype=torch.float32, scale=t["x.weight_scale"], double_scale=t["x.weight_scale_2"],
                          block_sizes={-1: 16})
    assert torch.equal(theirs, dequantize_linear(lw, torch.float32))


@pytest.fixture(scope="module")
def modelopt_export(tiny_llama, tmp_path_factory):
    """A tiny random Llama quantized by modelopt (mtq.quantize, NVFP4_DEFAULT_CFG, CPU calibration)
    and written by modelopt's export_hf_checkpoint."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    model = tiny_llama(vocab=128, seed=3)
    original = tiny_llama(vocab=128, seed=3)  # the same weights, never quantized (export rewrites the module weights)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(ids))
    input_amax = {n: float(mod.input_quantizer.amax) for n, mod in model.named_modules()
                  if hasattr(mod, "input_quantizer") and mod.input_quantizer.amax is not None}
    out = tmp_path_factory.mktemp("mo") / "export"
    export_hf_checkpoint(model, export_dir=str(out))
    return original, input_amax, out, ids


def test_modelopt_export_loads(modelopt_export):
    model, input_amax, out, _ = modelopt_export
    info = detect_format(out)
    assert (info.format, info.scheme) == ("modelopt", "NVFP4")
    qm = load_quantized(out)
    expected = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    assert set(qm.linears) == expected
    assert "lm_head" in qm.exclude_modules
    # modelopt's export shares the weight global scale across q/k/v and gate/up
    for group in fused_groups(qm.linears):
        scales = {float(qm.linears[m].nvfp4.global_decode_scale) for m in group}
        assert len(scales) == 1, group
    groups = {m: g for g in fused_groups(qm.linears) for m in g}
    for m, lw in qm.linears.items():
        mod = model.get_submodule(m)
        # input_scale is the input amax / (6 * 448): the calibrated amax of modelopt's input quantizer
        assert lw.input_amax == pytest.approx(input_amax[m], rel=1e-6)
        # weight_scale_2 is the decode direction: group weight amax / 2688 (modelopt's float32 division)
        amax = max(float(model.get_submodule(x).weight.detach().abs().max()) for x in groups.get(m, [m]))
        expect = torch.tensor(amax, dtype=torch.float32) / torch.tensor(2688.0)
        assert float(lw.nvfp4.global_decode_scale) == pytest.approx(float(expect), rel=2**-22)
        # and the dequantized weight is the original within NVFP4's resolution: every element within
        # half a grid step of its block (<= max step 2 * s_b * g, so <= amax_b / 3 after rounding of s_b)
        w = mod.weight.detach().float()
        deq = dequantize_linear(lw, torch.float32)
        block_amax = w.abs().reshape(w.shape[0], -1, 16).amax(-1, keepdim=True)
        err = (deq - w).abs().reshape(w.shape[0], -1, 16)
        assert bool((err <= block_amax / 3 + 1e-12).all()), m


def test_modelopt_export_evaluates(tiny_llama, modelopt_export):
    """The export, loaded into nvfp4kit and dequantized into a plain Llama, evaluates close to the
    unquantized model (modelopt's own fake-quant forward needs CUDA, so the reference is the
    original weights)."""
    model, _, out, ids = modelopt_export
    qm = load_quantized(out)
    plain = tiny_llama(vocab=128, seed=99)
    missing, unexpected = plain.load_state_dict(dequantized_state_dict(qm, torch.float32), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    with torch.no_grad():
        ref = model(ids).logits
        got = plain(ids).logits
    assert torch.isfinite(got).all()
    assert not torch.equal(got, ref)  # the weights really are the quantized ones

    def nll(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    assert abs(float(nll(got)) - float(nll(ref))) < 0.05
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert float(cos) > 0.95


def test_modelopt_export_converts_exactly(modelopt_export, tmp_path):
    _, _, out, _ = modelopt_export
    ct_dir = convert_checkpoint(out, tmp_path / "ct", to="compressed-tensors")
    back = convert_checkpoint(ct_dir, tmp_path / "mo", to="modelopt")
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(ct_dir / "model.safetensors"), "pt") as b:
        for k in a.keys():
            if k.endswith(".weight_scale_2") or k.endswith(".input_scale"):
                m, leaf = k.rsplit(".", 1)
                new = {"weight_scale_2": "weight_global_scale", "input_scale": "input_global_scale"}[leaf]
                assert b.get_tensor(f"{m}.{new}").item() == (1 / a.get_tensor(k)).item()  # float32 reciprocal
            elif a.get_slice(k).get_dtype() == "U8":
                assert torch.equal(a.get_tensor(k), b.get_tensor(k.removesuffix(".weight") + ".weight_packed"))
            else:
                assert torch.equal(a.get_tensor(k).view(torch.uint8), b.get_tensor(k).view(torch.uint8)), k
    qa, qb = load_quantized(out), load_quantized(back)
    for m in qa.linears:
        assert torch.equal(qa.linears[m].nvfp4.packed, qb.linears[m].nvfp4.packed)
        ga = qa.linears[m].nvfp4.global_decode_scale.reshape(1).view(torch.int32)
        gb = qb.linears[m].nvfp4.global_decode_scale.reshape(1).view(torch.int32)
        assert abs(int(ga) - int(gb)) <= 1  # float32 reciprocal twice: within one ulp
    cfg = json.loads((back / "hf_quant_config.json").read_text())["quantization"]
    assert cfg["quant_algo"] == "NVFP4" and "lm_head" in cfg["exclude_modules"]
    assert (back / "generation_config.json").exists()


# ============================================================================= llm-compressor


def test_llmcompressor_model_free_output_loads(tiny_llama, tmp_path):
    """A compressed-tensors checkpoint written by llm-compressor's model_free_ptq (NVFP4A16) loads
    into nvfp4kit; our dequantization agrees with compressed-tensors' own decompression to within
    one bf16 rounding, and the folder converts to modelopt."""
    pytest.importorskip("llmcompressor")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    from llmcompressor import model_free_ptq

    model = tiny_llama(vocab=128, seed=5)
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    out = tmp_path / "lc"
    model_free_ptq(str(src), str(out), scheme="NVFP4A16", ignore=["lm_head", "re:.*embed_tokens"])
    info = detect_format(out)
    assert (info.format, info.scheme) == ("compressed-tensors", "nvfp4-pack-quantized")
    qm = load_quantized(out)
    expected = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    assert set(qm.linears) == expected
    scheme = QuantizationScheme(targets=["Linear"], **NVFP4A16)
    files = sorted(out.glob("*.safetensors"))
    for m, lw in qm.linears.items():
        assert lw.input_amax is None  # weight-only
        state = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                state.update({k.removeprefix(m + "."): h.get_tensor(k) for k in h.keys() if k.startswith(m + ".")})
        theirs = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
        ours = dequantize_linear(lw, theirs.dtype)
        ulp = torch.finfo(torch.bfloat16).eps * ours.float().abs()
        assert bool(((theirs.float() - ours.float()).abs() <= ulp).all()), m
        # and within NVFP4 resolution of the original weights
        w = model.get_submodule(m).weight.detach().float()
        block_amax = w.abs().reshape(w.shape[0], -1, 16).amax(-1, keepdim=True)
        assert bool(((ours.float() - w).abs().reshape(w.shape[0], -1, 16) <= block_amax / 3 + 1e-12).all()), m
    for group in fused_groups(qm.linears):
        assert len({float(qm.linears[g].nvfp4.global_decode_scale) for g in group}) == 1, group
    mo = convert_checkpoint(out, tmp_path / "mo", to="modelopt")
    assert json.loads((mo / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "W4A16_NVFP4"
    # the regex ignore entry is spelled out as module names for modelopt's fnmatch readers
    assert "model.embed_tokens" in json.loads((mo / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
