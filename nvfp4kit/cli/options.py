"""The options several commands share, defined once: flag, help text and the value list a help shows.
Each command passes its own default (read from its job's dataclass, so a default lives in one place)."""

from __future__ import annotations

import typer

WEIGHT_SCALES = "max | mse | 4over6 | gptq"
DEVICES = "auto | cpu | cuda | cuda:N"
FORMATS = "modelopt | compressed-tensors"


def scheme(default: str, choices: str) -> typer.models.OptionInfo:
    return typer.Option(default, "--scheme", help=choices)


def weight_scale(default: str, choices: str = WEIGHT_SCALES) -> typer.models.OptionInfo:
    return typer.Option(default, "--weight-scale", help=f"weight block scales: {choices}")


def checkpoint_format(default: str) -> typer.models.OptionInfo:
    return typer.Option(default, "--format", help=f"checkpoint format: {FORMATS}")


def calib_samples(default: int, what: str = "calibration samples") -> typer.models.OptionInfo:
    return typer.Option(default, "--calib-samples", help=what)


def seq_len(default: int, what: str = "tokens per calibration sample") -> typer.models.OptionInfo:
    return typer.Option(default, "--seq-len", help=what)


def device(default: str = "auto") -> typer.models.OptionInfo:
    return typer.Option(default, "--device", help=f"where to compute: {DEVICES} (auto: a GPU when there is one)")


def bos(default: bool = True) -> typer.models.OptionInfo:
    return typer.Option(default, "--bos/--no-bos",
                        help="start every sample / evaluation window with the tokenizer's BOS when it adds one "
                             "(as the model sees inputs in use; lm-eval-harness and llama.cpp do the same)")
