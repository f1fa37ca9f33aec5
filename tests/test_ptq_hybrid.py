"""PTQ of the nvfp4kit Nemotron 3 hybrid model: default exclusions, the nemotron3-super preset,
every routed expert calibrated, MIXED_PRECISION checkpoint written and reloaded."""

import copy
import json
import math

import torch

from nvfp4kit.calibrate.emulation import apply_quantized
from nvfp4kit.training.linear import iter_linears
from nvfp4kit.model.lm import build_model
from nvfp4kit.pipelines.models import load_quantized_model
from nvfp4kit.calibrate.ptq import quantize_model
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

from test_ptq_pipeline import TEXT, char_tokenizer


def micro():
    return build_model("micro", seed=0).eval()


def test_default_w4a4_on_the_hybrid_model():
    m = micro()
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    r = quantize_model(copy.deepcopy(m), ids, "w4a4", "max")
    names = [n for n, _ in iter_linears(m)]
    for n in names:
        excluded = n == "lm_head" or n.startswith("mtp.")
        assert (n not in r.qmodel.linears) == excluded, n
    experts = [n for n in r.qmodel.linears if ".experts." in n]
    assert experts
    for n in experts:  # every routed expert has a real activation scale
        amax = r.qmodel.linears[n].input_amax
        assert amax is not None and math.isfinite(amax) and amax > 0, n
    # routed experts of one layer see the same latent input: the same up_proj input amax
    ups = {r.qmodel.linears[n].input_amax for n in experts if n.startswith("backbone.layers.2.") and
           n.endswith("up_proj")}
    assert len(ups) == 1


def test_nemotron3_super_mixed_checkpoint_roundtrip(tmp_path):
    from nvfp4kit.model.io import save_pretrained

    src = tmp_path / "src"
    m = micro()
    save_pretrained(m, src)
    char_tokenizer().save_pretrained(src)
    (tmp_path / "calib.txt").write_text(TEXT, encoding="utf-8")
    job = QuantizeJob(model=str(src), out=str(tmp_path / "q"), scheme="mixed", recipe="nemotron3-super",
                      weight_scale="mse", calib=str(tmp_path / "calib.txt"), calib_samples=2, seq_len=32)
    result, path = run_quantize(job)
    hf_quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "MIXED_PRECISION"
    layers = hf_quant["quantized_layers"]
    assert layers["backbone.layers.2.mixer.experts.0.up_proj"]["quant_algo"] == "NVFP4"
    assert layers["backbone.layers.2.mixer.shared_experts.up_proj"]["quant_algo"] == "FP8"
    assert layers["backbone.layers.0.mixer.in_proj"]["quant_algo"] == "FP8"
    assert "backbone.layers.1.mixer.q_proj" not in layers
    assert "backbone.layers.2.mixer.fc1_latent_proj" not in layers
    loaded = load_quantized_model(path)
    ref = copy.deepcopy(m)
    apply_quantized(ref, result.qmodel)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # same quantized numbers; only float summation order may differ between the two module trees
        torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-6)
