"""Offline residual / per-head rotations (nvfp4kit.calibrate.rotation).

References are independent of the code under test: the original model's logits (a rotation must not change
them), Sylvester's closed form ``H[i, j] = (-1)^popcount(i & j)`` for the Hadamard blocks, and the identity
for orthogonality. Transformers' RMSNorms compute in float32 internally, which would hide float64-level
agreement, so most tests swap their ``forward`` for the same formula kept in the input dtype
(``exact_rmsnorm``); one test checks the stock forward at float32 tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nvfp4kit.calibrate.rotation import (
    RotationInfo,
    check_rotatable,
    fold_norm,
    model_rotations,
    rotate_embedding,
    rotate_head,
    rotate_layer,
    rotate_model,
    rotation_block_size,
    rotation_matrix,
    untie_head,
)

transformers = pytest.importorskip("transformers")

VOCAB = 96
REL_TOL = 1e-9  # max |logit difference| / max |logit| in float64

_ARCHS = {
    # name: (config class, model class, config kwargs); all GQA or MQA
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM",  # biases on q/k/v/o and gate/up/down
                   dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                        mlp_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",  # q/k/v biases; hidden 96 -> Hadamard blocks of 32
              dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",  # q_norm/k_norm; head_dim 32 != hidden / heads; blocks of 16
              dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "mistral": ("MistralConfig", "MistralForCausalLM",  # one KV head (MQA)
                dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1)),
}
_RMSNORMS = {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "qwen2": "Qwen2RMSNorm", "qwen3": "Qwen3RMSNorm"}


def _classes(arch):
    cfg_name, model_name, _ = _ARCHS[arch]
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_name}")
    return getattr(transformers, cfg_name), getattr(transformers, model_name)


def make_config(arch: str, tie: bool = False, layers: int = 2, **over):
    cfg_cls, _ = _classes(arch)
    kw = dict(vocab_size=VOCAB, intermediate_size=80, num_hidden_layers=layers, max_position_embeddings=64,
              tie_word_embeddings=tie, initializer_range=0.1, rms_norm_eps=1e-6)
    kw.update(_ARCHS[arch][2])
    kw.update(over)
    return cfg_cls(**kw)


def make_model(arch: str, tie: bool = False, seed: int = 0, layers: int = 2, **over):
    """A tiny random float64 model with random norm weights (so folding matters) and random biases."""
    _, model_cls = _classes(arch)
    torch.manual_seed(seed)
    model = model_cls(make_config(arch, tie, layers, **over)).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture(autouse=True)
def exact_rmsnorm(monkeypatch):
    """RMSNorm forward in the input dtype (transformers' rounds to float32 inside)."""
    import importlib

    def forward(self, x):
        eps = getattr(self, "variance_epsilon", None)
        if eps is None:
            eps = self.eps
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    for arch, cls_name in _RMSNORMS.items():
        try:
            mod = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        except ImportError:
            continue
        if hasattr(mod, cls_name):
            monkeypatch.setattr(getattr(mod, cls_name), "forward", forward)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_logits(ref, out, rel=REL_TOL):
    scale = float(ref.abs().max())
    assert scale > 0.1
    err = float((out - ref).abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel:.0e} * {scale:.3e}"


@torch.no_grad()
def rel_change(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("dim", [16, 48, 576, 896, 1024])
def test_rotation_matrix_orthogonal(dim):
    q = rotation_matrix(dim, seed=3)
    assert q.dtype == torch.float64 and q.shape == (dim, dim)
    eye = torch.eye(dim, dtype=torch.float64)
    assert float((q @ q.T - eye).abs().max()) < 1e-12
    assert float((q.T @ q - eye).abs().max()) < 1e-12


@pytest.mark.parametrize("dim,block", [(16, 16), (48, 16), (576, 64), (896, 128), (1024, 1024), (4096, 4096)])
def test_block_size(dim, block):
    assert rotation_block_size(dim) == block


@pytest.mark.parametrize("dim", [48, 576])
def test_rotation_matrix_is_signed_block_hadamard(dim):
    """Entry by entry against Sylvester's closed form, one +-1 sign per row."""
    b = rotation_block_size(dim)
    q = rotation_matrix(dim, seed=5)
    i = torch.arange(dim).unsqueeze(1)
    j = torch.arange(dim).unsqueeze(0)
    bits = (i % b) & (j % b)
    parity = torch.zeros_like(bits)
    for k in range(12):
        parity ^= (bits >> k) & 1
    sylvester = (1 - 2 * parity).to(torch.float64)
    same_block = (i // b) == (j // b)
    signs = torch.sign(q[torch.arange(dim), (torch.arange(dim) // b) * b])  # column 0 of a block is all ones
    expected = torch.where(same_block, signs.unsqueeze(1) * sylvester / b**0.5, torch.zeros(()))
    assert torch.equal(signs.abs(), torch.ones(dim, dtype=torch.float64))
    assert torch.allclose(q, expected, rtol=0, atol=1e-15)
    assert (signs > 0).any() and (signs < 0).any()


def test_rotation_matrix_seeds():
    assert torch.equal(rotation_matrix(64, seed=11), rotation_matrix(64, seed=11))
    assert not torch.equal(rotation_matrix(64, seed=11), rotation_matrix(64, seed=12))
    assert rotation_matrix(32, seed=1, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("dim", [0, -16, 8, 20, 24, 100])
def test_rotation_matrix_bad_dims(dim):
    with pytest.raises(ValueError, match="multiple of 16"):
        rotation_matrix(dim)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_rotation_matrix_orthogonal_property(k, seed):
    dim = 16 * k
    q = rotation_matrix(dim, seed=seed)
    assert float((q @ q.T - torch.eye(dim, dtype=torch.float64)).abs().max()) < 1e-12
    b = rotation_block_size(dim)
    assert dim % b == 0 and (b & (b - 1)) == 0 and (dim // b) % 2 == 1  # the largest power of two
    assert torch.allclose(q.abs()[q != 0], torch.full((dim * b,), b**-0.5, dtype=torch.float64), atol=0, rtol=1e-15)


# ------------------------------------------------------------------------------------------- whole models


_CASES = [(a, t) for a in _ARCHS for t in (False, True)]


@pytest.mark.parametrize("arch,tie", _CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in _CASES])
def test_rotate_model_keeps_logits(arch, tie, ids):
    model = make_model(arch, tie=tie)
    orig = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    ref = logits(model, ids)
    info = rotate_model(model, seed=4)
    assert_same_logits(ref, logits(model, ids))

    hidden = model.config.hidden_size
    assert isinstance(info, RotationInfo)
    assert (info.seed, info.hidden_size, info.hidden_block) == (4, hidden, hidden & -hidden)
    assert info.heads and info.head_dim == model.model.layers[0].self_attn.head_dim
    assert info.untied_head is tie
    # the rotation is not the identity: every rotated weight moved a lot
    names = ["model.embed_tokens.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    params = dict(model.named_parameters())
    for n in names:
        assert rel_change(params[n], orig[n]) > 0.3, n
    # norms are folded away; Qwen3's q_norm / k_norm are untouched
    for n, p in params.items():
        if n.endswith(("layernorm.weight", "model.norm.weight")):
            assert torch.equal(p, torch.ones_like(p)), n
        elif "q_norm" in n or "k_norm" in n:
            assert torch.equal(p, orig[n]), n
    # the residual rule on the embedding, with the documented matrix
    q = rotation_matrix(hidden, seed=4)
    assert torch.allclose(params["model.embed_tokens.weight"], orig["model.embed_tokens.weight"] @ q,
                          rtol=0, atol=1e-13)


def test_stock_rmsnorm_float32_tolerance(ids, monkeypatch):
    """With transformers' own RMSNorm forward (float32 inside) logits agree to float32 rounding."""
    monkeypatch.undo()
    model = make_model("llama", tie=True)
    ref = logits(model, ids)
    rotate_model(model)
    assert_same_logits(ref, logits(model, ids), rel=1e-5)


def test_heads_false_and_head_rotation_changes_values(ids):
    base = make_model("qwen2")
    ref = logits(base, ids)
    with_h, without_h = copy.deepcopy(base), copy.deepcopy(base)
    info = rotate_model(without_h, seed=2, heads=False)
    assert not info.heads and info.head_seed is None and info.head_block is None
    rotate_model(with_h, seed=2, heads=True)
    assert_same_logits(ref, logits(without_h, ids))
    assert_same_logits(ref, logits(with_h, ids))
    a, b = with_h.model.layers[0].self_attn, without_h.model.layers[0].self_attn
    for n in ("v_proj", "o_proj"):
        assert rel_change(getattr(a, n).weight, getattr(b, n).weight) > 0.3
    assert rel_change(a.v_proj.bias, b.v_proj.bias) > 0.3
    for n in ("q_proj", "k_proj"):  # q / k are never rotated per head
        assert torch.equal(getattr(a, n).weight, getattr(b, n).weight)
        assert torch.equal(getattr(a, n).bias, getattr(b, n).bias)


def test_torch_rmsnorm_supported(ids):
    """Norms are recognised by behaviour, so torch.nn.RMSNorm works like the transformers classes."""
    model = make_model("llama")
    for layer in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            old = getattr(layer, name)
            new = nn.RMSNorm(old.weight.shape[0], eps=1e-6, dtype=torch.float64)
            with torch.no_grad():
                new.weight.copy_(old.weight)
            setattr(layer, name, new)
    ref = logits(model, ids)
    rotate_model(model, seed=9)
    assert_same_logits(ref, logits(model, ids))


def test_small_head_dim_needs_heads_false(ids):
    model = make_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2)  # head_dim 8
    with pytest.raises(ValueError, match="LlamaForCausalLM.*head_dim 8"):
        rotate_model(model)
    ref = logits(model, ids)
    rotate_model(model, heads=False)
    assert_same_logits(ref, logits(model, ids))


@settings(max_examples=6, deadline=None)
@given(arch=st.sampled_from(sorted(_ARCHS)), tie=st.booleans(), heads=st.booleans(),
       seed=st.integers(0, 2**31 - 2), model_seed=st.integers(0, 1000))
def test_rotate_model_property(arch, tie, heads, seed, model_seed):
    model = make_model(arch, tie=tie, seed=model_seed, layers=1)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(model_seed))
    ref = logits(model, ids)
    rotate_model(model, seed=seed, heads=heads)
    assert_same_logits(ref, logits(model, ids))


# ------------------------------------------------------------------------------------------- piece by piece


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen3", False), ("qwen2", True)])
def test_pieces_equal_whole(arch, tie, ids):
    model = make_model(arch, tie=tie)
    ref = logits(model, ids)
    whole, pieces = copy.deepcopy(model), copy.deepcopy(model)
    rotate_model(whole, seed=6)

    check_rotatable(pieces)
    assert untie_head(pieces) is tie
    q, h = model_rotations(pieces, seed=6)
    rotate_embedding(pieces.model.embed_tokens, q)
    for layer in pieces.model.layers:
        rotate_layer(layer, q, h, pieces.config)
    rotate_head(pieces.model.norm, pieces.lm_head, q)

    a, b = whole.state_dict(), pieces.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert_same_logits(ref, logits(pieces, ids))


@pytest.mark.parametrize("tie", [True, False])
def test_pieces_on_meta_skeleton(tie, ids):
    """The block-by-block shape: a meta skeleton, each piece loaded as a submodule, rotated, kept."""
    model = make_model("llama_bias", tie=tie)
    ref = logits(model, ids)
    source = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _, model_cls = _classes("llama")
    with torch.device("meta"):
        skeleton = model_cls(copy.deepcopy(model.config))
    check_rotatable(skeleton)  # works without weights
    assert untie_head(skeleton) is tie
    assert skeleton.lm_head.weight is not skeleton.model.embed_tokens.weight
    q, h = model_rotations(skeleton, seed=1)
    out: dict[str, torch.Tensor] = {}

    def load(prefix, module, names):
        module.load_state_dict({n: source[names.get(n, f"{prefix}.{n}")].clone() for n in module.state_dict()},
                               assign=True)

    load("model.embed_tokens", skeleton.model.embed_tokens, {})
    rotate_embedding(skeleton.model.embed_tokens, q)
    out["model.embed_tokens.weight"] = skeleton.model.embed_tokens.weight.detach()
    for i, layer in enumerate(skeleton.model.layers):
        load(f"model.layers.{i}", layer, {})
        rotate_layer(layer, q, h, skeleton.config)
        out.update({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    load("model.norm", skeleton.model.norm, {})
    # a tied checkpoint stores the head under the embedding's name
    load("lm_head", skeleton.lm_head, {"weight": "model.embed_tokens.weight"} if tie else {})
    rotate_head(skeleton.model.norm, skeleton.lm_head, q)
    out["model.norm.weight"] = skeleton.model.norm.weight.detach()
    out["lm_head.weight"] = skeleton.lm_head.weight.detach()

    assert skeleton.config.tie_word_embeddings is False
    rebuilt = model_cls(skeleton.config).to(torch.float64).eval()
    missing, unexpected = rebuilt.load_state_dict(out, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    assert_same_logits(ref, logits(rebuilt, ids))
    whole = copy.deepcopy(model)
    rotate_model(whole, seed=1)
    for k, v in whole.state_dict().items():
        assert torch.equal(v, out[k]), k


def test_fold_norm_alone(ids):
    model = make_model("mistral")
    ref = logits(model, ids)
    for layer in model.model.layers:
        a = layer.self_attn
        fold_norm(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        fold_norm(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj])
    assert_same_logits(ref, logits(model, ids))


def test_piece_errors():
    model = make_model("llama")
    q = rotation_matrix(64)
    with pytest.raises(ValueError, match=r"\[64, 64\]"):
        rotate_embedding(model.model.embed_tokens, rotation_matrix(32))
    with pytest.raises(ValueError, match="head_dim"):
        rotate_layer(model.model.layers[0], q, rotation_matrix(32))
    with torch.device("meta"):
        emb = nn.Embedding(10, 64)
    with pytest.raises(ValueError, match="meta"):
        rotate_embedding(emb, q)


# ------------------------------------------------------------------------------------------- unsupported


def _tiny(cfg_name, model_name, **kw):
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"no {cfg_name}")
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw)).eval()


def test_unsupported_bert():
    model = _tiny("BertConfig", "BertForMaskedLM", vocab_size=64, hidden_size=64, num_hidden_layers=1,
                  num_attention_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match="BertForMaskedLM"):
        check_rotatable(model)


def test_unsupported_gpt2_leaves_weights():
    model = _tiny("GPT2Config", "GPT2LMHeadModel", vocab_size=64, n_embd=64, n_layer=1, n_head=4, n_positions=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        rotate_model(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unsupported_gemma_offset_norm():
    """Same module layout as Llama, but (1 + weight) norms: caught by the behaviour probe."""
    model = _tiny("GemmaConfig", "GemmaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(ValueError, match=r"GemmaForCausalLM.*\(1 \+ weight\)"):
        check_rotatable(model)


def test_unsupported_moe():
    model = _tiny("MixtralConfig", "MixtralForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                  num_experts_per_tok=1)
    with pytest.raises(ValueError, match="MixtralForCausalLM.*(experts|mlp)"):
        check_rotatable(model)


@pytest.mark.parametrize("bias", [False, True])
def test_unsupported_layernorm(bias):
    model = make_model("llama")
    model.model.layers[1].post_attention_layernorm = nn.LayerNorm(64, bias=bias, dtype=torch.float64)
    match = "parameters besides" if bias else "commute"
    with pytest.raises(ValueError, match=f"LlamaForCausalLM.*layer 1.*{match}"):
        check_rotatable(model)


def test_unsupported_hidden_not_multiple_of_16():
    model = make_model("llama", hidden_size=40, num_attention_heads=5, num_key_value_heads=5)
    with pytest.raises(ValueError, match="LlamaForCausalLM.*hidden size 40"):
        check_rotatable(model)


def test_unsupported_missing_module():
    model = make_model("llama")
    del model.model.layers[0].self_attn.v_proj
    with pytest.raises(ValueError, match="LlamaForCausalLM.*layer 0.*v_proj"):
        check_rotatable(model)
    extra = make_model("llama")
    extra.model.layers[0].register_parameter("scale", nn.Parameter(torch.ones(64)))
    with pytest.raises(ValueError, match="unexpected parameter scale"):
        check_rotatable(extra)


# ------------------------------------------------------------------------------------------- tying, save / reload


def test_tied_head_untied_saved_and_reloaded(tmp_path, ids):
    from safetensors import safe_open

    from nvfp4kit.calibrate.records import other_tensors, tied_duplicates

    model = make_model("llama", tie=True)
    assert model.all_tied_weights_keys  # transformers 5 caches the tie map at construction
    ref = logits(model, ids)
    info = rotate_model(model, seed=3)
    assert info.untied_head
    head, emb = model.lm_head.weight, model.model.embed_tokens.weight
    assert head is not emb and head.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr()
    assert model.config.tie_word_embeddings is False
    assert model.all_tied_weights_keys == {}
    # neither transformers' tie paths nor our writer's tie detection bring the tie back
    model.tie_weights()
    model.tie_weights(recompute_mapping=False)
    assert model.lm_head.weight is head
    assert not tied_duplicates(model) and "lm_head.weight" in other_tensors(model, [])
    assert_same_logits(ref, logits(model, ids))

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= keys
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert reloaded.config.tie_word_embeddings is False
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, head) and torch.equal(reloaded.model.embed_tokens.weight, emb)
    assert_same_logits(ref, logits(reloaded, ids))


def test_untie_head_untied_model_is_noop():
    model = make_model("qwen3", tie=False)
    head = model.lm_head.weight
    assert untie_head(model) is False
    assert model.lm_head.weight is head and model.config.tie_word_embeddings is False


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_low_precision_keeps_dtype(dtype, rel, ids):
    """Computed in float64, cast back once to each parameter's dtype (float32 agrees to float32 rounding)."""
    model = make_model("qwen2", tie=True)
    ref = logits(model, ids)
    model = model.to(dtype)
    rotate_model(model)
    assert all(p.dtype == dtype for p in model.parameters())
    assert_same_logits(ref, logits(model, ids).to(torch.float64), rel=rel)
