"""The typer application object every command module registers on."""

import typer

app = typer.Typer(
    name="nvfp4kit",
    help="NVFP4 quantization, compression and low-precision training: quantize, evaluate, inspect, train.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """NVFP4 quantization, compression and low-precision training toolkit."""
