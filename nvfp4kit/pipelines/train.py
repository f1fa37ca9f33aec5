"""The training pipeline: tokenizer and packed data, a model preset, a precision recipe, data
parallelism when launched by torchrun, and the training loop with metrics and checkpoints.

    from nvfp4kit.pipelines.train import TrainOptions, run_training
    run_training(TrainOptions(preset="tiny", recipe="nemotron3", data=["texts/"], out="runs/a",
                              train=TrainConfig(steps=200)))
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import progress, scratch
from ..devices import resolve_device
from ..checkpoint.writer import check_apart_from_sources
from ..training.checkpointing import earlier_run, prepare_run_dir
from ..training.data import PackedLoader, load_packed_text, load_tokenizer, pack, tokenize_texts
from ..training.loop import TrainConfig, make_optimizer, train
from ..training.recipes import apply_recipe, get_recipe

VOCAB_MULTIPLE = 64


@dataclass
class TrainOptions:
    out: str
    preset: str = "tiny"
    recipe: str = "nemotron3"
    flags: tuple[str, ...] = ()
    data: list[str] | None = None  # files, directories or globs of plain text
    texts: list[str] | None = None  # in-memory documents instead of files
    tokenizer: str | None = None  # local tokenizer directory; None: bytes
    val_fraction: float = 0.05
    train: TrainConfig = field(default_factory=TrainConfig)
    model_overrides: dict = field(default_factory=dict)
    parallel: str = "auto"  # data parallel wrapper under torchrun: auto, fsdp2, ddp
    backend: str = "emulated"  # or "te" (Transformer Engine NVFP4 on sm100+ GPUs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (``nvfp4kit.devices.resolve_device``)
    resume: bool = True
    overwrite: bool = False  # a new run where an earlier one left its files: remove them first (else refused)
    stop_after: int | None = None
    show_recipe: bool = True


def padded_vocab(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_training_model(opts: TrainOptions, vocab_size: int):
    from ..model.lm import build_model

    overrides = dict(opts.model_overrides)
    overrides.setdefault("vocab_size", padded_vocab(vocab_size))
    # parameters the model's own initialiser leaves to torch's defaults draw from the global RNG
    torch.manual_seed(opts.train.seed)
    return build_model(opts.preset, seed=opts.train.seed, device=resolve_device(opts.device), **overrides)


def run_training(opts: TrainOptions) -> dict:
    """Train as ``opts`` says; returns the summary (also in ``OUT/metrics.json``)."""
    from ..training import distributed

    cfg = opts.train
    cfg.validate()
    get_recipe(opts.recipe, opts.flags)  # fail early on a bad name or flag
    from ..model.config import NemotronConfig

    NemotronConfig.check_fields(opts.model_overrides, "--model-set field")  # before the data is read
    if opts.backend not in ("emulated", "te"):
        raise ValueError(f"--backend must be 'emulated' or 'te', got {opts.backend!r}")
    if (opts.data is None) == (opts.texts is None):
        raise ValueError("give exactly one of --data (text files) or in-memory texts")
    device = resolve_device(opts.device)  # a clear error for --device cuda without CUDA
    info = distributed.init_distributed(device)
    if not info.is_main:
        progress.use_logging()
    try:
        # before any work: a new run never starts where an earlier one left its files (unless --overwrite,
        # which removes them: never a file the run reads)
        if opts.overwrite:
            for name in earlier_run(opts.out):
                check_apart_from_sources(Path(opts.out) / name, [*(opts.data or ()), opts.tokenizer],
                                         "run file removed by --overwrite")
        prepare_run_dir(opts.out, resume=opts.resume, overwrite=opts.overwrite, remove=info.is_main)
        tok = load_tokenizer(opts.tokenizer)
        if opts.data is not None:
            data = load_packed_text(opts.data, tok, cfg.seq_len, opts.val_fraction)
        else:
            data = pack(tokenize_texts(opts.texts, tok), cfg.seq_len, opts.val_fraction, vocab_size=tok.vocab_size)
        model = build_training_model(opts, tok.vocab_size)
        resolved = apply_recipe(model, opts.recipe, opts.flags, show=opts.show_recipe and info.is_main)
        if opts.backend == "te":
            from ..training.te_backend import use_te_backend

            use_te_backend(model)
        model = distributed.wrap_data_parallel(model, info, opts.parallel)
        optimizer = make_optimizer(model, cfg)
        loader = PackedLoader(data.train, cfg.batch_size, seed=cfg.seed, rank=info.rank, world=info.world)
        n_params = sum(p.numel() for p in model.parameters()) * (info.world if info.wrapper == "fsdp2" else 1)
        run_info = {
            "title": f"{opts.preset} / {opts.recipe}" + (f" [{','.join(opts.flags)}]" if opts.flags else ""),
            "preset": opts.preset, "recipe": opts.recipe, "flags": list(opts.flags), "tokenizer": tok.name,
            "vocab_size": tok.vocab_size, "train_sequences": int(data.train.shape[0]),
            "val_sequences": int(data.val.shape[0]), "parallel": info.wrapper, "world_size": info.world,
            "backend": opts.backend, "parameters_approx": int(n_params),
            "precisions": {r.name: str(r.precision) for r in resolved},
        }
        if info.is_main:
            Path(opts.out).mkdir(parents=True, exist_ok=True)
            progress.log(
                f"training {opts.preset} with recipe {opts.recipe}: {data.train.shape[0]} train / "
                f"{data.val.shape[0]} val sequences of {cfg.seq_len} tokens, {info.world} process(es) ({info.wrapper})"
            )
        summary = train(model, optimizer, loader, data.val, cfg, opts.out, resume=opts.resume and not opts.overwrite,
                        run_info=run_info, stop_after=opts.stop_after, device=device)
        if info.is_main:
            run = {k: v for k, v in asdict(opts).items() if k not in ("texts", "train")}
            tmp = Path(opts.out) / scratch.owned(".run.json.tmp-")
            tmp.write_text(json.dumps(dict(run, train=asdict(cfg)), indent=1))
            os.replace(tmp, Path(opts.out) / "run.json")
        return summary
    finally:
        distributed.shutdown()
