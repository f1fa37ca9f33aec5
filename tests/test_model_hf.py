"""Equivalence with transformers' NemotronHForCausalLM on tiny random configs.

transformers loads our checkpoint directory with its own released-layout conversion
(``backbone.`` -> ``model.``, per-expert ``experts.{e}.up_proj.weight`` stacked into one 3-D
``experts.up_proj``), so the test also checks the names and shapes of our layout.

Where they differ (transformers 5.17, pure-torch path):
* its Mamba mixer clamps dt at ``time_step_min`` (``time_step_limit = (time_step_min, inf)``), the
  released models use no clamp. Positions where ``softplus(dt + dt_bias) < time_step_min`` differ;
  with the clamp reproduced in our config the outputs agree again.
* its chunked scan carries states across chunks correctly in 5.17 (the older inter-chunk bug is
  gone), so the outputs also agree beyond one chunk; this is asserted below on a Mamba mixer with
  slowly decaying heads, where the carried state visibly matters.
"""

import pytest
import torch


from nvfp4kit.model import build_model, save_pretrained  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread")


def _hf_from_dir(path):
    from transformers import NemotronHForCausalLM

    hf = NemotronHForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    return hf.eval()


def _pair(tmp_path, dt_bias=None, **over):
    m = build_model("micro", seed=7, chunk_size=16, **over).eval()
    if dt_bias is not None:
        with torch.no_grad():
            for blk in m.backbone.layers:
                if blk.block_type == "mamba":
                    blk.mixer.dt_bias.fill_(dt_bias)
    save_pretrained(m, tmp_path / "ck")
    return m, _hf_from_dir(tmp_path / "ck")


def test_hf_loads_our_checkpoint_by_name(tmp_path):
    m, hf = _pair(tmp_path)
    hsd = hf.state_dict()
    sd = m.state_dict()
    assert torch.equal(hsd["model.layers.0.mixer.in_proj.weight"], sd["backbone.layers.0.mixer.in_proj.weight"])
    stacked = torch.stack([sd[f"backbone.layers.2.mixer.experts.{e}.up_proj.weight"] for e in range(16)])
    assert torch.equal(hsd["model.layers.2.mixer.experts.up_proj"], stacked)
    assert torch.equal(hsd["model.layers.2.mixer.fc1_latent_proj.weight"],
                       sd["backbone.layers.2.mixer.fc1_latent_proj.weight"])
    assert torch.equal(hsd["model.layers.2.mixer.gate.e_score_correction_bias"],
                       sd["backbone.layers.2.mixer.gate.e_score_correction_bias"])


@pytest.mark.parametrize("length", [12, 16, 40, 70])
def test_logits_match_hf_when_dt_above_clamp(tmp_path, length):
    # dt_bias = 1 keeps softplus(dt + dt_bias) far above time_step_min: no clamping anywhere
    m, hf = _pair(tmp_path, dt_bias=1.0)
    ids = torch.randint(0, m.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ours = m(ids).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("length", [16, 50, 97])
def test_mamba_mixer_matches_hf_across_chunks(tmp_path, length):
    m, hf = _pair(tmp_path, dt_bias=0.5)
    ours = m.backbone.layers[0].mixer
    theirs = hf.model.layers[0].mixer
    with torch.no_grad():
        # slow decay: exp(dt * A) ~ 0.99 per step, the state lives across many 16-token chunks
        ours.A_log.fill_(-4.5)
        theirs.A_log.fill_(-4.5)
    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, m.config.hidden_size, generator=g)
    with torch.no_grad():
        a = ours(x)
        b = theirs(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        if length > 32:
            x2 = x.clone()
            x2[:, :4] += 1.0  # first chunk only
            late = (ours(x2) - a)[:, 32:].abs().max()
            assert late > 1e-3  # the carried state reaches later chunks


def test_difference_is_the_dt_clamp(tmp_path):
    # dt_bias = -8: softplus ~ 3e-4 < time_step_min = 1e-3, so transformers clamps and we do not
    m, hf = _pair(tmp_path, dt_bias=-8.0)
    ids = torch.randint(0, m.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = m(ids).logits
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() > 1e-4
    clamped = build_model("micro", seed=7, chunk_size=16, time_step_limit=(m.config.time_step_min, float("inf")))
    clamped.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clamped.eval()(ids).logits, theirs, rtol=1e-4, atol=2e-5)


def test_our_loader_reads_hf_saved_checkpoint(tmp_path):
    # transformers saves back in the released layout: we load it by name
    from nvfp4kit.model import load_pretrained

    m, hf = _pair(tmp_path, dt_bias=1.0, num_nextn_predict_layers=0)
    hf.save_pretrained(tmp_path / "hf")
    back = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, m.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=0, atol=0)
