"""The causal LM: MTP loss and shapes, caches (prefill-then-decode), greedy generation,
self-speculative decoding with MTP drafts, layer bookkeeping, overfitting a real text."""

import pytest
import torch
import torch.nn.functional as F

from nvfp4kit.model import build_model
from nvfp4kit.model.lm import NemotronForCausalLM


pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.fixture(scope="module")
def model():
    return build_model("micro", seed=0).eval()


def test_shapes_and_names(model):
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    out = model(ids)
    assert out.logits.shape == (2, 19, cfg.vocab_size)
    assert out.hidden.shape == (2, 19, cfg.hidden_size)
    assert out.loss is None and out.mtp_logits == []
    names = dict(model.named_modules())
    for n in ("backbone.layers.0.mixer.in_proj", "backbone.layers.2.mixer.experts.0.up_proj",
              "backbone.layers.2.mixer.fc1_latent_proj", "backbone.layers.1.mixer.q_proj", "mtp.layers.0.eh_proj",
              "mtp.layers.0.mixer.k_proj", "mtp.layers.1.mixer.experts.3.down_proj", "lm_head"):
        assert n in names, n
    assert set(model.state_dict()) >= {"mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight",
                                       "mtp.layers.1.final_layernorm.weight", "backbone.norm_f.weight"}


def test_layer_of(model):
    assert model.layer_types == ["mamba", "attention", "moe", "mamba", "mlp", "moe"]
    assert model.layer_of("backbone.layers.3.mixer.in_proj") == ("backbone", 3, "mamba")
    assert model.layer_of("backbone.layers.2.mixer.experts.1.up_proj.weight") == ("backbone", 2, "moe")
    assert model.layer_of("mtp.layers.1.mixer.gate") == ("mtp", 1, "moe")
    assert model.layer_of("lm_head") == ("head", None, None)
    with pytest.raises(ValueError, match="layers.9"):
        model.layer_of("backbone.layers.9.mixer")


def test_mtp_loss_definition(model):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels, mtp_depths=2)
    assert len(out.mtp_logits) == 2 and len(out.mtp_losses) == 2
    for lg in out.mtp_logits:
        assert lg.shape == (2, 24, cfg.vocab_size)

    # independent recomputation: depth d predicts the token d+1 ahead from the recursive MTP stream
    emb = model.backbone.embeddings
    h = model.backbone(ids)

    def ce(logits, shift):
        lg = logits[:, :24 - shift].reshape(-1, cfg.vocab_size)
        return F.cross_entropy(lg, labels[:, shift:].reshape(-1), ignore_index=-100)

    main = ce(model.lm_head(h), 1)
    torch.testing.assert_close(out.main_loss, main)
    prev, total = h, main
    for d in (1, 2):
        e = torch.zeros_like(h)
        e[:, :24 - d] = emb(ids[:, d:])
        blocks = model.mtp.layers
        u = blocks[0].eh_proj(torch.cat([blocks[0].enorm(e), blocks[0].hnorm(prev)], -1))
        u = blocks[0](u)
        u = blocks[1](u)
        prev = blocks[1].final_layernorm(u)
        cd = ce(model.lm_head(prev), d + 1)
        torch.testing.assert_close(out.mtp_losses[d - 1], cd)
        total = total + 0.3 / 2 * cd
    torch.testing.assert_close(out.loss, total)
    # MTP is causal: logits at t do not depend on tokens beyond t + depth
    ids2 = ids.clone()
    ids2[:, 20:] = (ids2[:, 20:] + 1) % cfg.vocab_size
    out2 = model(ids2, labels=ids2, mtp_depths=2)
    torch.testing.assert_close(out2.mtp_logits[0][:, :19], out.mtp_logits[0][:, :19])
    torch.testing.assert_close(out2.mtp_logits[1][:, :18], out.mtp_logits[1][:, :18])


def test_loss_backward_reaches_every_parameter(model):
    m = build_model("micro", seed=1)
    ids = torch.randint(0, m.config.vocab_size, (2, 40))
    m(ids, labels=ids).loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None and ".experts." not in n]
    assert no_grad == []


def test_prefill_then_decode_equals_full_forward():
    m = build_model("micro", seed=2, chunk_size=8).double().eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 30))
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache(2)
        parts = [m(ids[:, :11], cache=cache).logits]
        for t in range(11, 25):
            parts.append(m(ids[:, t:t + 1], cache=cache).logits)
        parts.append(m(ids[:, 25:], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)


def test_generate_equals_uncached_greedy(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    out = model.generate(ids, 12)
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


def test_generate_eos_and_sampling(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    greedy = model.generate(ids, 6)
    eos = int(greedy[0, 7])
    stopped = model.generate(ids, 6, eos_token_id=eos)
    assert stopped.shape[1] <= 8 and int(stopped[0, -1]) == eos
    a = model.generate(ids, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    b = model.generate(ids, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (1, 11)


@pytest.mark.parametrize("num_draft", [1, 2, 3])
def test_speculative_equals_greedy(model, num_draft):
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    ref = model.generate(ids, 25)
    out, stats = model.speculative_generate(ids, 25, num_draft=num_draft)
    assert torch.equal(out, ref)
    assert stats.drafted == stats.rounds * num_draft
    assert 0 <= stats.accepted <= stats.drafted
    assert 1 + stats.rounds + stats.accepted >= 25  # the first token comes from the prefill


def test_speculative_accepts_every_draft_when_mtp_agrees():
    # zero final norms: every hidden state is 0, all logits tie, argmax is token 0 for the main model
    # and for every MTP depth, so every draft must be accepted
    m = build_model("micro", seed=3).eval()
    with torch.no_grad():
        m.backbone.norm_f.weight.zero_()
        m.mtp.layers[1].final_layernorm.weight.zero_()
    ids = torch.randint(1, m.config.vocab_size, (1, 6))
    ref = m.generate(ids, 12)
    assert (ref[0, 6:] == 0).all()
    out, stats = m.speculative_generate(ids, 12, num_draft=2)
    assert torch.equal(out, ref)
    assert stats.accepted == stats.drafted == 2 * stats.rounds
    assert stats.acceptance == 1.0 and stats.tokens_per_round == 3.0


def test_speculative_errors(model):
    with pytest.raises(ValueError, match="batch 1"):
        model.speculative_generate(torch.zeros(2, 3, dtype=torch.long), 4)
    m = build_model("micro", num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="MTP"):
        m.speculative_generate(torch.zeros(1, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        m(torch.zeros(1, 3, dtype=torch.long), mtp_depths=1)


def test_meta_device_build_allocates_nothing():
    from nvfp4kit.model.presets import get_preset

    m = NemotronForCausalLM(get_preset("micro"), device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())


@pytest.mark.slow
def test_overfits_real_text_and_drafts_get_accepted():
    from pydoc_data.topics import topics

    torch.manual_seed(0)
    text = topics["if"][:400].encode()
    ids = torch.tensor([list(text)])
    m = build_model("micro", seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(100):
        starts = torch.randint(0, ids.shape[1] - 96, (4,))
        batch = torch.stack([ids[0, s:s + 96] for s in starts])
        out = m(batch, labels=batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.main_loss.item()
    m.eval()
    with torch.no_grad():
        full = m(ids, labels=ids, mtp_depths=1)
    assert first > 5.0
    assert full.main_loss.item() < 0.5, full.main_loss.item()
    assert full.mtp_losses[0].item() < 2.0
    prompt = ids[:, :24]
    ref = m.generate(prompt, 48)
    spec, stats = m.speculative_generate(prompt, 48, num_draft=2)
    assert torch.equal(spec, ref)
    assert stats.acceptance > 0.3, stats


def test_bfloat16_model_runs_and_tracks_fp32():
    m32 = build_model("micro", seed=4).eval()
    mb = build_model("micro", seed=4, dtype=torch.bfloat16).eval()
    mb.load_state_dict(m32.state_dict())
    assert mb.backbone.layers[2].mixer.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, m32.config.vocab_size, (2, 40))
    with torch.no_grad():
        a = m32(ids).logits
        b = mb(ids).logits
        cache = mb.new_cache(2)
        assert cache.layers[0].ssm_state.dtype == torch.float32  # SSM state stays fp32
        inc = torch.cat([mb(ids[:, :30], cache=cache).logits] + [mb(ids[:, t:t + 1], cache=cache).logits
                                                                  for t in range(30, 40)], 1)
    assert b.dtype == torch.bfloat16
    assert ((b.float() - a).norm() / a.norm()) < 0.03
    assert ((inc.float() - b.float()).norm() / b.float().norm()) < 0.03


def test_seeded_build_is_independent_of_the_global_rng():
    """Every parameter, the Mamba conv included, comes from the seed alone."""
    from nvfp4kit.model import build_model

    a = build_model("micro", seed=3)
    torch.rand(7)  # move the global generator
    b = build_model("micro", seed=3)
    c = build_model("micro", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    conv = [k for k in sa if k.endswith("conv1d.weight")]
    assert conv and all(not torch.equal(sa[k], sc[k]) for k in conv)
