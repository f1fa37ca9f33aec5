"""PTQ block by block from disk: the same checkpoint bytes as the whole model in memory on every family,
resume after an interruption, bad input caught before or named when met, devices, data parallelism."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models
from transformers import BertConfig, BertModel, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from nvfp4kit.checkpoint import CheckpointError, load_quantized
from nvfp4kit.checkpoint.staged import staging_dir
from nvfp4kit.model import build_model, save_pretrained
from nvfp4kit.pipelines import quantize as qjob
from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs!\n") * 60


def char_tokenizer():
    chars = ["<unk>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _folder(root: Path, name: str, model, hybrid=False) -> Path:
    d = root / name
    if hybrid:
        save_pretrained(model, d)
    else:
        model.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("sources")
    (root / "calib.txt").write_text(TEXT)
    torch.manual_seed(1)
    mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               num_local_experts=4, num_experts_per_tok=2,
                                               max_position_embeddings=128)).eval()
    torch.manual_seed(2)
    bert = BertModel(BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128)).eval()
    return {
        "calib": root / "calib.txt",
        "llama": _folder(root, "llama", tiny_llama(vocab=128, layers=3, tie=True, max_positions=128)),
        "mixtral": _folder(root, "mixtral", mixtral),
        "bert": _folder(root, "bert", bert),
        "hybrid": _folder(root, "hybrid", build_model("micro", seed=3), hybrid=True),
    }


def _job(sources, family, out, **kw):
    base = dict(model=str(sources[family]), out=str(out), calib=str(sources["calib"]), calib_samples=3, seq_len=24,
                scheme="w4a4", weight_scale="gptq")
    base.update(kw)
    return QuantizeJob(**base)


def _same_folders(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


@pytest.mark.parametrize("family", ["llama", "mixtral", "hybrid", "bert"])
@pytest.mark.parametrize("sequential", [True, False])
def test_by_block_from_disk_writes_the_bytes_of_the_whole_model(sources, tmp_path, family, sequential):
    kv = "fp8" if family != "bert" else None
    whole, _ = run_quantize(_job(sources, family, tmp_path / "whole", load="whole", sequential=sequential,
                                 kv_cache=kv))
    blocks, path = run_quantize(_job(sources, family, tmp_path / "blocks", load="blocks", sequential=sequential,
                                     kv_cache=kv))
    assert _same_folders(tmp_path / "whole", path)
    assert blocks.plan.counts() == whole.plan.counts()
    assert blocks.qmodel.kv_cache_amax == whole.qmodel.kv_cache_amax
    assert not staging_dir(path).exists()  # the staging folder is gone once the checkpoint is complete


def test_a_multi_shard_checkpoint_is_the_same_too(sources, tmp_path):
    run_quantize(_job(sources, "llama", tmp_path / "whole", load="whole", max_shard_size="20000"))
    run_quantize(_job(sources, "llama", tmp_path / "blocks", load="blocks", sequential=False,
                      max_shard_size="20000"))
    assert len(list((tmp_path / "whole").glob("model-*.safetensors"))) > 3
    assert _same_folders(tmp_path / "whole", tmp_path / "blocks")


def test_interrupted_run_resumes_after_its_last_block_with_the_same_bytes(sources, tmp_path, monkeypatch):
    full_out = tmp_path / "full"
    run_quantize(_job(sources, "llama", full_out, load="blocks"))
    out = tmp_path / "cut"
    from nvfp4kit.checkpoint import staged

    real = staged.StagedCheckpoint.end_unit
    seen = []

    def stop_after_block_1(self, unit, state):
        real(self, unit, state)
        seen.append(unit)
        if unit == 2:  # unit 0: before the blocks, 1 + i: block i
            raise KeyboardInterrupt

    monkeypatch.setattr(staged.StagedCheckpoint, "end_unit", stop_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        run_quantize(_job(sources, "llama", out, load="blocks"))
    monkeypatch.setattr(staged.StagedCheckpoint, "end_unit", real)
    assert not out.exists()  # nothing final before the end
    manifest = json.loads((staging_dir(out) / "manifest.json").read_text())
    assert manifest["units"] == 3 and len(manifest["pieces"]) == 3
    ran = []
    monkeypatch.setattr(staged.StagedCheckpoint, "end_unit", lambda self, u, s: (ran.append(u), real(self, u, s)))
    run_quantize(_job(sources, "llama", out, load="blocks"))
    assert ran == [3, 4]  # blocks 0 and 1 were not computed again
    assert _same_folders(full_out, out)
    # another job's staging folder is refused, not mixed in
    monkeypatch.setattr(staged.StagedCheckpoint, "end_unit", stop_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        run_quantize(_job(sources, "llama", tmp_path / "other", load="blocks"))
    monkeypatch.setattr(staged.StagedCheckpoint, "end_unit", real)
    with pytest.raises(CheckpointError, match="another job"):
        run_quantize(_job(sources, "llama", tmp_path / "other", load="blocks", weight_scale="max"))
    run_quantize(_job(sources, "llama", tmp_path / "other", load="blocks", weight_scale="max", overwrite=True))
    assert (tmp_path / "other" / "config.json").is_file()


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_corrupt_or_missing_tensor_met_at_a_block_is_named_and_nothing_is_written(sources, tmp_path):
    bad = _copy_model(sources["llama"], tmp_path / "bad")
    sd = load_file(str(bad / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        run_quantize(_job({**sources, "llama": bad}, "llama", tmp_path / "out", load="blocks"))
    assert not (tmp_path / "out").exists()
    # a shard cut short: the file is named
    trunc = _copy_model(sources["llama"], tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        run_quantize(_job({**sources, "llama": trunc}, "llama", tmp_path / "out2", load="blocks"))
    assert not (tmp_path / "out2").exists()


def test_not_enough_disk_is_refused_before_any_work(sources, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(ValueError, match=r"1000 B free on the file system of .*, but quantizing block by block "
                                         r"\(.*\) needs about"):
        run_quantize(_job(sources, "llama", tmp_path / "out", load="blocks"))
    assert not (tmp_path / "out").exists() and not staging_dir(tmp_path / "out").exists()


def test_device_errors_and_out_of_memory_message(sources, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device cuda: this torch .* has no usable CUDA device"):
            run_quantize(_job(sources, "llama", tmp_path / "o", device="cuda"))
    with pytest.raises(ValueError, match="--device must be one of"):
        run_quantize(_job(sources, "llama", tmp_path / "o", device="tpu"))
    from nvfp4kit.calibrate import blockwise

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(blockwise, "quantize_linears", oom)
    with pytest.raises(RuntimeError, match=r"out of device memory in model\.layers\.0 .* --calib-samples"):
        run_quantize(_job(sources, "llama", tmp_path / "o", load="blocks"))
    assert not (tmp_path / "o").exists()


def test_auto_loads_whole_when_it_fits_and_by_block_when_not(sources, tmp_path, monkeypatch):
    calls = []
    real = qjob.run_by_block
    monkeypatch.setattr(qjob, "run_by_block", lambda *a, **k: (calls.append("blocks"), real(*a, **k))[1])
    run_quantize(_job(sources, "llama", tmp_path / "a"))
    assert calls == []
    monkeypatch.setattr(qjob, "available_memory", lambda device: 1 << 10)  # 1 KiB free: nothing fits
    run_quantize(_job(sources, "llama", tmp_path / "b"))
    assert calls == ["blocks"]
    assert _same_folders(tmp_path / "a", tmp_path / "b") is False  # one-shot whole vs sequential by block
    run_quantize(_job(sources, "llama", tmp_path / "c", sequential=False))
    assert _same_folders(tmp_path / "a", tmp_path / "c")


def test_the_release_recipe_by_block_on_a_hybrid(sources, tmp_path):
    result, path = run_quantize(_job(sources, "hybrid", tmp_path / "super", load="blocks", scheme="mixed",
                                     recipe="nemotron3-super", weight_scale="max"))
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "MIXED_PRECISION"
    layers = quant["quantized_layers"]
    assert not any(n.startswith("mtp.") or n.endswith(".gate") for n in layers)  # MTP and routers in BF16
    assert layers["backbone.layers.0.mixer.in_proj"]["quant_algo"] == "FP8"
    qm = load_quantized(path)
    experts = [n for n in qm.linears if ".experts." in n and not n.startswith("mtp.")]
    assert experts and all(qm.linears[n].format == "nvfp4" and qm.linears[n].input_amax > 0 for n in experts)
    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor("mtp.layers.0.eh_proj.weight").dtype == torch.float32  # the source's own dtype


def test_plain_progress_lines_in_a_log(sources, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "nvfp4kit.cli", "quantize", "--model", str(sources["llama"]),
                        "--out", str(tmp_path / "q"), "--calib", str(sources["calib"]), "--calib-samples", "3",
                        "--seq-len", "24", "--load", "blocks"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert any("quantizing blocks: started (3 steps)" in ln for ln in lines)
    assert any("quantizing blocks: done in" in ln for ln in lines)
    assert "\x1b[" not in r.stderr  # no terminal control sequences in a log


DP_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from nvfp4kit.pipelines.quantize import QuantizeJob, run_quantize
    torch.set_num_threads(1)
    job = QuantizeJob(**json.loads(sys.argv[1]))
    run_quantize(job)
''')


@pytest.mark.slow
@pytest.mark.parametrize("method", ["max", "gptq"])
def test_two_ranks_give_the_statistics_of_one_process(sources, tmp_path, method):
    """torchrun with 2 CPU ranks (gloo): each rank calibrates half the samples, statistics are reduced;
    the same modules and formats, equal scales, and weights equal up to the Hessian summation order."""
    job = dict(model=str(sources["llama"]), calib=str(sources["calib"]), calib_samples=4, seq_len=24,
               scheme="w4a4", weight_scale=method, load="blocks", smooth="none")
    one = tmp_path / "one"
    run_quantize(QuantizeJob(out=str(one), **job))
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                        json.dumps(dict(job, out=str(two)))], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_quantized(one), load_quantized(two)
    assert set(a.linears) == set(b.linears)
    for n, ra in a.linears.items():
        rb = b.linears[n]
        assert ra.format == rb.format and ra.input_amax == rb.input_amax, n
        assert torch.equal(ra.nvfp4.global_decode_scale, rb.nvfp4.global_decode_scale), n
        if method == "max":
            assert torch.equal(ra.nvfp4.packed, rb.nvfp4.packed), n
        else:  # GPTQ on a Hessian summed in another order: almost every code the same
            same = (ra.nvfp4.packed == rb.nvfp4.packed).float().mean()
            assert same > 0.9, (n, float(same))


def test_activations_on_disk_give_the_same_checkpoint(sources, tmp_path):
    run_quantize(_job(sources, "mixtral", tmp_path / "mem", load="blocks"))
    run_quantize(_job(sources, "mixtral", tmp_path / "disk", load="blocks", activation_memory=0))
    assert _same_folders(tmp_path / "mem", tmp_path / "disk")


def test_activation_store_spills_past_its_budget(tmp_path):
    from nvfp4kit.calibrate.activations import ActivationStore

    ts = [torch.randn(2, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    with ActivationStore(budget_bytes=2 * 64 + 1, spill_dir=tmp_path / "spill") as store:
        for t in ts:
            store.append(t)
        assert len(store) == 5 and store.spilled == 3 and store.memory_bytes == 128 and store.disk_bytes == 192
        assert all(torch.equal(store[i], t) for i, t in enumerate(ts))
        store.save(tmp_path / "all.safetensors")
        back = ActivationStore.load(tmp_path / "all.safetensors")
        assert [torch.equal(a, b) for a, b in zip(back, ts)] == [True] * 5
        assert any((tmp_path / "spill").rglob("*.safetensors"))
    assert not any((tmp_path / "spill").rglob("*.safetensors"))  # closing removes the spilled files
    with pytest.raises(ValueError, match=">= 0 bytes"):
        ActivationStore(budget_bytes=-1)


@pytest.mark.slow
def test_the_embedded_gguf_model_by_block_tensor_by_tensor(tmp_path):
    """The GGUF file read tensor by tensor (dequantized as transformers does) gives the whole-model bytes."""
    job = dict(model=None, calib_samples=1, seq_len=32, scheme="w4a4", weight_scale="max", sequential=False)
    run_quantize(QuantizeJob(out=str(tmp_path / "whole"), load="whole", **job))
    run_quantize(QuantizeJob(out=str(tmp_path / "blocks"), load="blocks", **job))
    assert _same_folders(tmp_path / "whole", tmp_path / "blocks")


@pytest.mark.parametrize("family", ["llama", "hybrid"])
def test_the_config_declares_the_dtype_of_the_stored_tensors_under_its_own_key(sources, tmp_path, family):
    src = json.loads((sources[family] / "config.json").read_text())
    _, path = run_quantize(_job(sources, family, tmp_path / "q", load="blocks", weight_scale="max"))
    out = json.loads((path / "config.json").read_text())
    keys = [k for k in ("torch_dtype", "dtype") if k in src]
    assert keys and [k for k in ("torch_dtype", "dtype") if k in out] == keys  # the source's own key(s)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        floats = {str(f.get_slice(k).get_dtype()) for k in f.keys() if k.endswith("norm.weight")}
    assert floats == {"F32"} and all(out[k] == "float32" for k in keys)  # the tiny sources store float32


def test_a_one_block_model_by_block_is_the_whole_model_too(sources, tmp_path, tiny_llama):
    src = _folder(tmp_path, "one", tiny_llama(vocab=128, layers=1, max_positions=128))
    job = dict(model=str(src), calib=str(sources["calib"]), calib_samples=2, seq_len=16, scheme="w4a4",
               weight_scale="gptq", sequential=True)
    run_quantize(QuantizeJob(out=str(tmp_path / "whole"), load="whole", **job))
    _, path = run_quantize(QuantizeJob(out=str(tmp_path / "blocks"), load="blocks", **job))
    assert _same_folders(tmp_path / "whole", path)


def test_unchanged_source_tensors_are_staged_as_references(sources, tmp_path, monkeypatch):
    from nvfp4kit.checkpoint import staged

    run_quantize(_job(sources, "hybrid", tmp_path / "whole", load="whole", sequential=True, weight_scale="max"))
    monkeypatch.setattr(staged, "SOURCE_REFERENCE_MIN_BYTES", 0)  # the tiny model's tensors count as large
    real = staged.StagedCheckpoint.finish
    refs = []

    def count_then_finish(self):
        for piece in self.manifest["pieces"]:
            with safe_open(str(self.dir / piece), "pt") as f:
                refs.extend(e["name"] for e in json.loads(f.metadata()["nvfp4kit.entries"]) if "source" in e)
        return real(self)

    monkeypatch.setattr(staged.StagedCheckpoint, "finish", count_then_finish)
    _, path = run_quantize(_job(sources, "hybrid", tmp_path / "blocks", load="blocks", weight_scale="max"))
    assert "backbone.embeddings.weight" in refs and "lm_head.weight" in refs
    assert _same_folders(tmp_path / "whole", path)  # references resolve to the same bytes
    # a staged reference whose source tensor is gone is named
    piece = tmp_path / "p.safetensors"
    staged.write_piece(piece, [("tensor", "x", torch.ones(4))], source=None)
    with safe_open(str(piece), "pt") as f:
        assert "source" not in json.loads(f.metadata()["nvfp4kit.entries"])[0]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    save_file({"x": torch.ones(4)}, str(src_dir / "model.safetensors"))
    reader = staged._open_source(src_dir)
    staged.write_piece(piece, [("tensor", "x", torch.ones(4))], source=reader)
    assert [v for _, _, v in staged.read_piece(piece, reader)][0].equal(torch.ones(4))
    with pytest.raises(CheckpointError, match="no longer has"):
        list(staged.read_piece(piece, None))


@pytest.mark.parametrize("load", ["whole", "blocks"])
def test_each_unquantized_tensor_keeps_its_own_stored_dtype(sources, tmp_path, load):
    """A bfloat16 Nemotron checkpoint keeps its routers' float32 score-correction bias in float32."""
    src = tmp_path / "hybrid-bf16"
    save_pretrained(build_model("micro", seed=3, dtype=torch.bfloat16), src)
    char_tokenizer().save_pretrained(src)

    def dtypes(folder):
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                out.update({k: str(h.get_slice(k).get_dtype()) for k in h.keys()})
        return out

    given = dtypes(src)
    assert {given[k] for k in given if k.endswith("e_score_correction_bias")} == {"F32"}
    _, path = run_quantize(QuantizeJob(model=str(src), out=str(tmp_path / "q"), calib=str(sources["calib"]),
                                       calib_samples=2, seq_len=16, scheme="w4a4", weight_scale="max", load=load))
    got = dtypes(path)
    kept = [k for k in given if got.get(k) not in (None, "U8", "F8_E4M3")]  # the unquantized tensors
    assert any(k.endswith("e_score_correction_bias") for k in kept) and any(k.endswith("norm.weight") for k in kept)
    assert {k: got[k] for k in kept} == {k: given[k] for k in kept}


def test_big_modules_after_the_blocks_are_copied_a_piece_at_a_time_with_the_same_bytes(sources, tmp_path,
                                                                                      monkeypatch):
    """Streaming from disk: a unit after the blocks that is bigger than the budget (the hybrid's MTP) is loaded
    and handed over a submodule at a time; its copies are staged as references to the source; the quantized
    Linears' source weights are released before the block's emulated copies are made. Same bytes."""
    from nvfp4kit.calibrate import blockwise
    from nvfp4kit.checkpoint import staged

    run_quantize(_job(sources, "hybrid", tmp_path / "whole", load="whole", sequential=True))
    monkeypatch.setattr(blockwise, "COPY_PIECE_BYTES", 0)
    monkeypatch.setattr(staged, "SOURCE_REFERENCE_MIN_BYTES", 1)
    pieces = []
    real_pieces = blockwise.copy_pieces
    monkeypatch.setattr(blockwise, "copy_pieces", lambda model, unit, budget=0: pieces.append(
        (unit, out := real_pieces(model, unit, budget))) or out)
    still_loaded = []
    real_apply = blockwise.apply_quantized

    def spy(block, qmodel, *a, **k):
        mods = dict(block.named_modules())
        still_loaded.extend(n for n in qmodel.linears if mods[n].weight.device.type != "meta")
        return real_apply(block, qmodel, *a, **k)

    monkeypatch.setattr(blockwise, "apply_quantized", spy)
    _, path = run_quantize(_job(sources, "hybrid", tmp_path / "blocks", load="blocks", sequential=True))
    assert _same_folders(tmp_path / "whole", path)
    mtp = dict(pieces)["mtp"]
    assert len(mtp) > 3 and all(p.startswith("mtp.") for p in mtp)
    assert not still_loaded


def test_copy_pieces_cover_a_unit_in_state_dict_order():
    from torch import nn

    from nvfp4kit.calibrate.blockwise import copy_pieces

    class Own(nn.Module):  # tensors of its own beside children: never split
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.inner = nn.Linear(4, 4)

    m = nn.Sequential()
    m.add_module("a", nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), Own()))
    m.add_module("b", nn.Linear(8, 8))
    pieces = copy_pieces(m, "a", budget=100)
    assert pieces == ["a.0", "a.1.0", "a.1.1", "a.2"]
    assert copy_pieces(m, "a", budget=10**9) == ["a"]
    keys = [k for p in pieces for k in m.get_submodule(p).state_dict(prefix=p + ".")]
    assert keys == list(m.get_submodule("a").state_dict(prefix="a."))
