"""``nvfp4kit model``: inspect Nemotron 3 hybrid models (sizes, checkpoint tensor names)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import app

model_app = typer.Typer(help="Nemotron 3 hybrid model: presets, parameter counts, checkpoint layout.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


@model_app.command("info")
def info_cmd(
    preset: Optional[str] = typer.Option(None, help="preset name (see `nvfp4kit model presets`)"),
    config: Optional[Path] = typer.Option(None, help="a config.json, or a checkpoint directory holding one"),
    list_tensors: bool = typer.Option(False, "--list-tensors", help="print every checkpoint tensor with its shape"),
) -> None:
    """Total and active parameter counts of a model (built on the meta device: no weights allocated)."""
    from ..model.config import NemotronConfig
    from ..model.params import checkpoint_tensors, count_parameters
    from ..model.presets import get_preset

    if (preset is None) == (config is None):
        raise typer.BadParameter("give exactly one of --preset or --config")
    try:
        cfg = get_preset(preset) if preset else NemotronConfig.from_json(config)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    console = Console()
    if list_tensors:
        for name, (shape, dtype) in checkpoint_tensors(cfg).items():
            console.print(f"{name}\t{list(shape)}\t{str(dtype).replace('torch.', '')}", highlight=False,
                          soft_wrap=True)
        return
    counts = count_parameters(cfg)
    emb = counts.by_block.get("embeddings", 0)
    t = Table(title=f"{preset or config}: {cfg.num_hidden_layers} layers, pattern {cfg.hybrid_override_pattern}")
    t.add_column("quantity")
    t.add_column("parameters", justify="right")
    t.add_column("exact", justify="right")
    rows = [("total (backbone + lm_head)", counts.total), ("active per token", counts.active),
            ("active, without input embeddings", counts.active - emb)]
    if counts.mtp_total:
        rows += [("MTP total", counts.mtp_total), ("MTP active", counts.mtp_active),
                 ("total with MTP", counts.total_with_mtp)]
    rows += [(f"  {k}", v) for k, v in counts.by_block.items()]
    for label, n in rows:
        t.add_row(label, _fmt(n), f"{n:,}")
    console.print(t)


@model_app.command("presets")
def presets_cmd() -> None:
    """List the named model configurations."""
    from ..model.presets import PRESETS, get_preset

    t = Table(title="model presets")
    for c in ("name", "layers", "hidden", "pattern", "experts (top-k)", "latent", "MTP"):
        t.add_column(c, no_wrap=c == "name")
    for name in PRESETS:
        c = get_preset(name)
        pat = c.hybrid_override_pattern
        t.add_row(name, str(c.num_hidden_layers), str(c.hidden_size), pat if len(pat) <= 24 else pat[:21] + "...",
                  f"{c.n_routed_experts} ({c.num_experts_per_tok})", str(c.moe_latent_size or "-"),
                  str(c.num_nextn_predict_layers))
    Console().print(t)
