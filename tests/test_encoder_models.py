"""Encoders (BERT-style, sentence-transformers folders) through PTQ and eval, and the model-class choice."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from nvfp4kit.evaluate.embedding import (
    compare_embeddings,
    nearest_neighbours,
    pool,
    pooling_mode,
    split_sentences,
)
from nvfp4kit.checkpoint.layout import dequantize_linear
from nvfp4kit.pipelines.eval import run_eval
from nvfp4kit.pipelines.models import load_model
from nvfp4kit.pipelines.models import (
    CAUSAL_LM,
    ENCODER,
    check_sequence_length,
    hf_model_class,
    max_positions,
)
from nvfp4kit.pipelines.models import load_source_model
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

WORDS = ("the quick brown fox jumps over lazy dog pack my box with five dozen liquor jugs how vexingly "
         "daft zebras jump sphinx of black quartz judge vow").split()
TEXT = "\n\n".join(
    " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 9)).capitalize() + "."
    for i in range(120)
)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=48, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, architectures=["BertModel"])
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    (d / "calib.txt").write_text(TEXT, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def bert_w4a4(bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "bert-w4a4"
    job = QuantizeJob(model=str(bert_dir), out=str(out), scheme="w4a4", weight_scale="max",
                      calib=str(bert_dir / "calib.txt"), calib_samples=4, seq_len=32)
    result, path = run_quantize(job)
    return result, path


# ----------------------------------------------------------------------------- which class builds the model


def test_model_class_follows_config_architectures():
    assert hf_model_class(BertConfig(architectures=["BertModel"])).cls is BertModel
    assert hf_model_class(BertConfig(architectures=["BertModel"])).kind == ENCODER
    mc = hf_model_class(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert mc.cls is LlamaForCausalLM and mc.kind == CAUSAL_LM
    # no architectures: the causal-LM class of the model type, else the bare model
    assert hf_model_class(LlamaConfig()).cls is AutoModelForCausalLM
    # an architecture transformers does not have falls back on the model type
    assert hf_model_class(LlamaConfig(architectures=["NoSuchModelForCausalLM"])).kind == CAUSAL_LM
    from transformers import CLIPVisionConfig

    assert hf_model_class(CLIPVisionConfig()).cls is AutoModel


def test_bert_folder_loads_as_itself_not_a_language_model(bert_dir):
    loaded = load_source_model(bert_dir)
    assert type(loaded.model) is BertModel and loaded.task == ENCODER
    reference = BertModel.from_pretrained(str(bert_dir))
    ref_state = reference.state_dict()
    state = loaded.model.state_dict()
    assert set(state) == set(ref_state)
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), k


def test_max_positions_and_sequence_length_check():
    m = tiny_bert()
    assert max_positions(m) == 64
    check_sequence_length(m, 64)
    with pytest.raises(ValueError, match=r"--seq-len 65 .* 64 positions"):
        check_sequence_length(m, 65)
    assert max_positions(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32,
                                                      num_hidden_layers=1, num_attention_heads=2))) is None
    emb = torch.nn.Embedding(514, 8, padding_idx=1)  # RoBERTa-style table: rows 0..1 are never positions
    holder = torch.nn.Module()
    holder.position_embeddings = emb
    assert max_positions(holder) == 512


# ----------------------------------------------------------------------------- PTQ of an encoder


def test_quantized_encoder_checkpoint_keeps_the_source_names_and_files(bert_dir, bert_w4a4):
    result, path = bert_w4a4
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    with safe_open(str(bert_dir / "model.safetensors"), "pt") as f:
        source = set(f.keys())
    linears = set(result.qmodel.linears)
    assert linears and all(n.startswith(("encoder.", "pooler.")) for n in linears)
    # every source tensor is there: plain tensors by name, Linear weights as packed weights with scales
    for n in source:
        owner = n.rpartition(".")[0]
        if owner in linears and n.endswith(".weight"):
            assert n in names and f"{owner}.weight_scale" in names and f"{owner}.input_scale" in names
        else:
            assert n in names, n
    assert not any(n.startswith("cls.") for n in names)  # no language-model head was invented
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    for f in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "tokenizer.json"):
        assert (path / f).is_file(), f
    assert not (path / "calib.txt").exists()


def test_reloaded_encoder_computes_with_the_dequantized_weights(bert_dir, bert_w4a4):
    result, path = bert_w4a4
    loaded = load_model(str(path), quantize_inputs=False)
    assert type(loaded.model) is BertModel and loaded.task == ENCODER
    # reference: the source model with each quantized weight replaced by its dequantized value
    ref = BertModel.from_pretrained(str(bert_dir)).eval()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, q in result.qmodel.linears.items():
            modules[name].weight.copy_(dequantize_linear(q, torch.float32))
    ids = torch.randint(5, 48, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded.model(input_ids=ids).last_hidden_state
        want = ref(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eval_of_an_encoder_reports_embedding_similarity(bert_dir, bert_w4a4):
    _, path = bert_w4a4
    same = run_eval(str(bert_dir), str(bert_dir / "calib.txt"), seq_len=32, against=str(bert_dir),
                    max_sentences=40)
    assert same.task == ENCODER and same.result is None
    assert same.similarity.n_sentences == 40
    assert same.similarity.mean_cosine == pytest.approx(1.0, abs=1e-12)
    assert same.similarity.neighbour_agreement == 1.0
    q = run_eval(str(path), str(bert_dir / "calib.txt"), seq_len=32, against=str(bert_dir), max_sentences=40)
    assert 0.5 < q.similarity.min_cosine <= q.similarity.mean_cosine < 1.0
    with pytest.raises(ValueError, match="--against"):
        run_eval(str(path), str(bert_dir / "calib.txt"), seq_len=32)


def test_encoder_refuses_what_needs_next_token_logits(bert_dir, tmp_path):
    job = QuantizeJob(model=str(bert_dir), out=str(tmp_path / "m"), scheme="mixed", bits_budget=5.0,
                      weight_scale="max", calib=str(bert_dir / "calib.txt"), calib_samples=2, seq_len=16)
    with pytest.raises(ValueError, match="encoder"):
        run_quantize(job)
    job = QuantizeJob(model=str(bert_dir), out=str(tmp_path / "n"), weight_scale="max",
                      calib=str(bert_dir / "calib.txt"), calib_samples=2, seq_len=128)
    with pytest.raises(ValueError, match="--seq-len 128"):
        run_quantize(job)
    assert not (tmp_path / "m").exists() and not (tmp_path / "n").exists()


def test_cli_eval_encoder_against_source(bert_dir, bert_w4a4):
    from typer.testing import CliRunner

    from nvfp4kit.cli.main import app

    _, path = bert_w4a4
    r = CliRunner().invoke(app, ["eval", "--model", str(path), "--against", str(bert_dir), "--text",
                                 str(bert_dir / "calib.txt"), "--seq-len", "32", "--max-sentences", "20"])
    assert r.exit_code == 0, r.output
    assert "embedding cosine mean" in r.output and "20 sentences" in r.output
    r = CliRunner().invoke(app, ["eval", "--model", str(path), "--text", str(bert_dir / "calib.txt")])
    assert r.exit_code != 0 and "--against" in r.output


# ----------------------------------------------------------------------------- embedding helpers


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 4), length=st.integers(1, 7), h=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_pool_matches_per_sentence_loops(b, length, h, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, h, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    mean, cls, mx = (pool(hidden, mask, m) for m in ("mean", "cls", "max"))
    for i in range(b):
        n = int(lengths[i])
        real = [hidden[i, j] for j in range(n)]
        torch.testing.assert_close(mean[i], sum(real) / n)
        torch.testing.assert_close(cls[i], hidden[i, 0])
        torch.testing.assert_close(mx[i], torch.stack(real).max(dim=0).values)


def test_pooling_mode_and_sentence_split(tmp_path):
    assert pooling_mode(None) == "mean" and pooling_mode(tmp_path) == "mean"
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "pool", "type": "x.Pooling"}]))
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert pooling_mode(tmp_path) == "cls"
    with pytest.raises(ValueError, match="pooling"):
        pool(torch.zeros(1, 1, 1), torch.ones(1, 1), "sum")
    text = "One two three four. Too short! Five six seven eight nine?\n\nTen eleven twelve thirteen"
    assert split_sentences(text) == ["One two three four.", "Five six seven eight nine?",
                                     "Ten eleven twelve thirteen"]
    assert split_sentences(text, max_sentences=1) == ["One two three four."]


def test_compare_embeddings_against_direct_formulas():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(9, 6, generator=g)
    b = a + 0.3 * torch.randn(9, 6, generator=g)
    s = compare_embeddings(a, b)
    a64, b64 = a.double(), b.double()
    cos = [float(a64[i] @ b64[i]) / (float(a64[i].norm()) * float(b64[i].norm())) for i in range(9)]
    assert s.mean_cosine == pytest.approx(sum(cos) / 9, rel=1e-9)
    assert s.min_cosine == pytest.approx(min(cos), rel=1e-9)

    def nn_loop(e):
        out = []
        for i in range(e.shape[0]):
            sims = [(-math.inf if j == i else float(F.cosine_similarity(e[i], e[j], dim=0))) for j in
                    range(e.shape[0])]
            out.append(max(range(len(sims)), key=sims.__getitem__))
        return out

    assert nearest_neighbours(a).tolist() == nn_loop(a.double())
    agree = sum(x == y for x, y in zip(nn_loop(a.double()), nn_loop(b.double()))) / 9
    assert s.neighbour_agreement == pytest.approx(agree)
    with pytest.raises(ValueError, match="do not match"):
        compare_embeddings(a, b[:3])


# ----------------------------------------------------------------------------- causal LMs with a reference


def test_causal_lm_eval_against_a_reference_reports_the_gap(tmp_path):
    from nvfp4kit.evaluate.perplexity import perplexity

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, architectures=["LlamaForCausalLM"])
    src = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    (src / "t.txt").write_text(TEXT)
    _, q = run_quantize(QuantizeJob(model=str(src), out=str(tmp_path / "q"), scheme="w4a16", weight_scale="max"))
    r = run_eval(str(q), str(src / "t.txt"), seq_len=32, max_tokens=200, against=str(src))
    assert r.task == CAUSAL_LM and r.similarity is None
    ref = load_model(str(src))
    from nvfp4kit.calibrate.data import tokenize

    direct = perplexity(ref.model, tokenize(ref.tokenizer, TEXT), 32, 200)
    assert r.reference_result.ppl == pytest.approx(direct.ppl, rel=1e-12)
    assert r.ppl_gap == pytest.approx(r.result.ppl / direct.ppl - 1, rel=1e-12)
    same = run_eval(str(src), str(src / "t.txt"), seq_len=32, max_tokens=200, against=str(src))
    assert same.ppl_gap == 0.0
    bert = tmp_path / "bert"
    tiny_bert().save_pretrained(bert)
    word_tokenizer().save_pretrained(bert)
    with pytest.raises(ValueError, match="is an encoder but"):
        run_eval(str(src), str(src / "t.txt"), seq_len=32, max_tokens=200, against=str(bert))


def test_qat_refuses_an_encoder(bert_dir):
    from nvfp4kit.pipelines.models import load_causal_lm

    with pytest.raises(ValueError, match="causal LM"):
        load_causal_lm(bert_dir)


def test_conv1d_models_get_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from nvfp4kit.calibrate.ptq import quantize_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(ValueError, match="Conv1D"):
        quantize_model(model, None, "w4a16", "max")


def test_encoder_decoder_models_are_refused_clearly(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                        d_kv=16)).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        load_source_model(tmp_path / "t5")


def test_transformers_loads_the_compressed_tensors_encoder_export(bert_dir, tmp_path):
    """transformers (with compressed-tensors) reads our encoder export back as a BertModel whose Linear
    weights are our dequantized weights (in bfloat16, compressed-tensors' decompression dtype; transformers
    up to 5.17 hands them back in bfloat16, later releases cast them to the requested float32) and whose
    outputs match ours."""
    from transformers import AutoModel, CompressedTensorsConfig

    out = tmp_path / "bert-ct"
    result, path = run_quantize(QuantizeJob(model=str(bert_dir), out=str(out), format="compressed-tensors",
                                            scheme="w4a16", weight_scale="max"))
    hf = AutoModel.from_pretrained(str(path), dtype=torch.float32,
                                   quantization_config=CompressedTensorsConfig(run_compressed=False))
    assert type(hf) is BertModel
    ours = BertModel.from_pretrained(str(bert_dir), dtype=torch.float32).eval()
    assert result.qmodel.linears
    for name, rec in result.qmodel.linears.items():
        w_hf = hf.get_submodule(name).weight
        assert w_hf.dtype in (torch.bfloat16, torch.float32), name
        assert torch.equal(w_hf.float(), dequantize_linear(rec, torch.float32).to(torch.bfloat16).float()), name
        ours.get_submodule(name).weight.data = w_hf.detach().float()
    hf = hf.float().eval()
    ids = torch.randint(5, 48, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
