"""The module policy has one owner: in-memory PTQ and the streaming weight-only conversion choose the
same modules and write the same bytes for each, on every model family; the rules themselves."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertModel

from nvfp4kit.calibrate.ptq import quantize_model
from nvfp4kit.checkpoint import load_quantized, quantize_checkpoint, save_quantized
from nvfp4kit.model import build_model, save_pretrained
from nvfp4kit.policy import (
    DEFAULT_EXCLUDE,
    expert_family,
    fused_groups,
    fused_partition,
    is_expert,
    matches,
    plan_precision,
)


def _hybrid(tmp_path):
    m = build_model("micro", seed=1).eval()
    save_pretrained(m, tmp_path / "src")
    return m


def _llama(tmp_path, tiny_llama):
    m = tiny_llama(vocab=128)
    m.save_pretrained(tmp_path / "src")
    return m


def _bert(tmp_path, tiny_llama):
    torch.manual_seed(2)
    m = BertModel(BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64)).eval()
    m.save_pretrained(tmp_path / "src")
    return m


FAMILIES = {"hybrid": lambda tmp, tl: _hybrid(tmp), "llama": _llama, "bert": _bert}


def _module_tensors(folder, module: str) -> dict[str, bytes]:
    """The on-disk tensors of one module (``module.*``) of a checkpoint folder, as raw bytes."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k.rpartition(".")[0] == module:
                    t = h.get_tensor(k)
                    out[k] = (str(t.dtype), tuple(t.shape), t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("scheme", ["nvfp4", "fp8"])
def test_streaming_and_in_memory_ptq_choose_the_same_modules_and_bytes(family, scheme, tmp_path, tiny_llama):
    model = FAMILIES[family](tmp_path, tiny_llama)
    vocab = model.config.vocab_size
    samples = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    # weight-only NVFP4 needs no calibration; FP8 PTQ is W8A8, whose weights do not depend on it
    mem = quantize_model(model, None if scheme == "nvfp4" else samples, "w4a16" if scheme == "nvfp4" else "fp8",
                         "max").qmodel
    # weight-only FP8 is served from compressed-tensors only (checkpoint.serving): both paths write that
    fmt = "modelopt" if scheme == "nvfp4" else "compressed-tensors"
    streamed = quantize_checkpoint(tmp_path / "src", tmp_path / "streamed", scheme, format=fmt)
    st = load_quantized(streamed)
    assert set(st.linears) == set(mem.linears) and mem.linears
    # the policy's high-precision modules stay so on both paths
    for name in st.linears:
        assert not any(matches(name, p) for p in DEFAULT_EXCLUDE), name
    if family == "hybrid":
        assert not any(n.startswith("mtp.") for n in st.linears)  # the bug: MTP was quantized by convert
        assert any(".experts." in n for n in st.linears)
    save_quantized(mem, tmp_path / "memory", format=fmt)
    for name in mem.linears:
        a, b = _module_tensors(tmp_path / "memory", name), _module_tensors(streamed, name)
        weights = {k: v for k, v in a.items() if not k.endswith("input_scale")}  # W8A8 only: its static scale
        assert weights == b, name


def test_plan_rules_first_match_and_typos():
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 40),
              "model.layers.0.mlp.gate": (8, 64), "lm_head": (100, 64)}
    plan = plan_precision(shapes, "w4a4")
    assert plan.layers["model.layers.0.self_attn.q_proj"].format == "nvfp4"
    assert plan.layers["model.layers.0.mlp.down_proj"].reason == "in_features 40 is not a multiple of 16"
    assert plan.layers["model.layers.0.mlp.gate"].reason == "default exclusion *.gate"
    assert plan.layers["lm_head"].format == "bf16"
    # a user pattern first; one that matches nothing is a typo and refused
    assert plan_precision(shapes, "w4a4", ["*.q_proj"]).layers["model.layers.0.self_attn.q_proj"].format == "bf16"
    with pytest.raises(ValueError, match=r"\['*\*.qproj'\] match no Linear"):
        plan_precision(shapes, "w4a4", ["*.qproj"])
    assert plan_precision(shapes, "w4a4", ["re:model\\.layers\\.0\\.self"]).excluded()[0].endswith("q_proj")


def test_fused_groups_partition_and_experts():
    names = ["a.k_proj", "a.q_proj", "a.o_proj", "b.q_proj", "c.up_proj", "c.gate_proj", "d.query", "d.value",
             "e.w3", "e.w1.weight"]
    assert fused_groups(names) == [["a.q_proj", "a.k_proj"], ["c.gate_proj", "c.up_proj"], ["d.query", "d.value"],
                                   ["e.w1.weight", "e.w3"]]
    assert fused_partition(names) == [("a.q_proj", "a.k_proj"), ("a.o_proj",), ("b.q_proj",),
                                      ("c.gate_proj", "c.up_proj"), ("d.query", "d.value"), ("e.w1.weight", "e.w3")]
    assert is_expert("backbone.layers.2.mixer.experts.11.up_proj") and is_expert("m.experts.3")
    assert not is_expert("backbone.layers.2.mixer.shared_experts.up_proj")
    assert expert_family("x.experts.7.down_proj") == expert_family("x.experts.0.down_proj") == "x.experts.*.down_proj"
