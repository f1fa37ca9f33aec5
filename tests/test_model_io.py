"""Released-layout checkpoints (sharded safetensors + index) and the Linear precision factory."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4kit.training.precision import LinearPrecision
from nvfp4kit.model import (CheckpointError, Linear, build_model, iter_linears, load_pretrained, make_linear,
                            save_pretrained, set_precision)
from nvfp4kit.model.io import INDEX_NAME, read_header_shapes


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = build_model("micro", seed=5)
    path = tmp_path_factory.mktemp("ck") / "micro"
    save_pretrained(m, path, max_shard_bytes=300_000)
    return m, path


def test_sharded_layout(saved):
    m, path = saved
    index = json.loads((path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-") and s.endswith(f"-of-{len(shards):05d}.safetensors")
                                   for s in shards)
    assert set(index["weight_map"]) == set(m.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in m.state_dict().values())
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_round_trip_logits(saved):
    m, path = saved
    m2 = load_pretrained(path)
    ids = torch.randint(0, m.config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m(ids).logits, rtol=0, atol=0)
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


def test_load_bf16_keeps_router_bias_fp32(saved):
    _, path = saved
    m = load_pretrained(path, dtype=torch.bfloat16)
    sd = m.state_dict()
    assert sd["backbone.layers.2.mixer.gate.e_score_correction_bias"].dtype == torch.float32
    assert sd["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16


def _copy_ckpt(src, dst, edit):
    """Copy a checkpoint into one shard after ``edit(state_dict)``."""
    sd = {}
    for f in src.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    edit(sd)
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_named(saved, tmp_path):
    _, path = saved
    d = _copy_ckpt(path, tmp_path / "c", lambda sd: sd.pop("backbone.layers.3.mixer.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): backbone\.layers\.3\.mixer\.A_log \[16\]"):
        load_pretrained(d)


def test_unexpected_tensor_named(saved, tmp_path):
    _, path = saved
    d = _copy_ckpt(path, tmp_path / "c", lambda sd: sd.__setitem__("backbone.layers.0.mixer.rope.freq", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): backbone\.layers\.0\.mixer\.rope\.freq"):
        load_pretrained(d)


def test_shape_mismatch_named(saved, tmp_path):
    _, path = saved
    d = _copy_ckpt(path, tmp_path / "c", lambda sd: sd.__setitem__(
        "backbone.layers.1.mixer.k_proj.weight", torch.zeros(32, 128)))
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.1\.mixer\.k_proj\.weight: model expects \[64, 128\], "
                                              r".* has \[32, 128\]"):
        load_pretrained(d)


def test_index_pointing_to_missing_shard(saved, tmp_path):
    _, path = saved
    import shutil

    d = tmp_path / "c"
    shutil.copytree(path, d)
    victim = sorted(d.glob("model-*.safetensors"))[0]
    os.remove(victim)
    with pytest.raises(CheckpointError, match=f"shard.*do not exist.*{victim.name}"):
        read_header_shapes(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)  # no config.json here
    # a config.json but no weights
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_pretrained(tmp_path / "e")


def test_save_refuses_nonempty_and_meta(tmp_path):
    m = build_model("micro")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(CheckpointError, match="already exists"):
        save_pretrained(m, tmp_path / "x")
    assert (tmp_path / "x" / "f").read_text() == "keep"
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert (save_pretrained(m, tmp_path / "empty") / "config.json").is_file()
    meta = build_model("micro", device="meta")
    with pytest.raises(CheckpointError, match="meta device"):
        save_pretrained(meta, tmp_path / "y")
    assert not (tmp_path / "y").exists()


# ---- Linear factory ------------------------------------------------------------------------------
def test_every_projection_is_a_factory_linear():
    m = build_model("micro")
    plain = [n for n, mod in m.named_modules() if type(mod) is torch.nn.Linear]
    assert plain == []
    names = dict(iter_linears(m))
    assert "backbone.layers.0.mixer.in_proj" in names and "mtp.layers.0.eh_proj" in names
    assert all(isinstance(x, Linear) and x.precision.format == "bf16" for x in names.values())
    assert "backbone.layers.2.mixer.gate" not in names  # the router stays fp32


def test_linear_forward_is_quantized_linear_in_bf16():
    lin = make_linear(32, 16, bias=True)
    x = torch.randn(3, 32)
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)


def test_set_precision_by_name():
    m = build_model("micro")
    set_precision(m, {"backbone.layers.2.mixer.experts.3.up_proj": "nvfp4",
                      "backbone.layers.0.mixer.out_proj": LinearPrecision("fp8")})
    p = {n: mod.precision.format for n, mod in iter_linears(m)}
    assert p["backbone.layers.2.mixer.experts.3.up_proj"] == "nvfp4"
    assert p["backbone.layers.0.mixer.out_proj"] == "fp8"
    assert sum(v != "bf16" for v in p.values()) == 2
    with pytest.raises(ValueError, match="no Linear named 'backbone.layers.0.mixer.bogus'"):
        set_precision(m, {"backbone.layers.0.mixer.bogus": "nvfp4"})
    with pytest.raises(ValueError, match="format must be one of"):
        set_precision(m, {"lm_head": "int3"})


def test_nvfp4_needs_multiples_of_16():
    m = build_model("micro", moe_latent_size=40)
    with pytest.raises(ValueError, match=r"backbone\.layers\.2\.mixer\.experts\.0\.up_proj: in_features=40 .* 16"):
        set_precision(m, {"backbone.layers.2.mixer.experts.0.up_proj": "nvfp4",
                          "lm_head": "nvfp4"})
    assert m.lm_head.precision.format == "bf16"  # nothing changed when one entry is invalid
    with pytest.raises(ValueError, match="in_features=24"):
        make_linear(24, 16, precision="nvfp4")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "fp8"])
def test_low_precision_smoke(fmt):
    m = build_model("micro").eval()
    ids = torch.randint(0, m.config.vocab_size, (1, 32))
    with torch.no_grad():
        ref = m(ids).logits
    # every Linear whose shape the format can hold; the rest stays bf16
    block = {"nvfp4": 16, "mxfp8": 32, "fp8": 1}[fmt]
    chosen = {n: fmt for n, lin in iter_linears(m) if lin.in_features % block == 0 and lin.out_features % block == 0}
    assert len(chosen) > 20
    set_precision(m, chosen)
    with torch.no_grad():
        q = m(ids).logits
    assert torch.isfinite(q).all()
    rel = ((q - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5
    out = m(ids, labels=ids)  # the training path runs through the same modules
    out.loss.backward()
    assert m.lm_head.weight.grad is not None and torch.isfinite(m.lm_head.weight.grad).all()
