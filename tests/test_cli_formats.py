"""The `nvfp4kit formats` command and the report behind it."""

import math

import pytest
import torch
from typer.testing import CliRunner

import nvfp4kit as nk
from nvfp4kit.cli.main import app
from nvfp4kit.pipelines.formats_report import format_error_report


def test_report_rows_match_direct_computation():
    rows = format_error_report(32, 64, seed=3)
    by_name = {r["format"]: r for r in rows}
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    err = nk.quantize(x).dequantize() - x
    expected = math.sqrt(float(err.square().mean()) / float(x.square().mean()))
    assert by_name["nvfp4 1x16"]["rel_rmse"] == pytest.approx(expected, rel=1e-12)
    assert by_name["nvfp4 1x16"]["bits"] == 4.5
    # MXFP8 keeps 3 mantissa bits: far more accurate than any 4-bit format
    assert by_name["mxfp8"]["rel_rmse"] < min(r["rel_rmse"] for r in rows if r["format"] != "mxfp8") / 2


def test_report_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 32"):
        format_error_report(4, 48)
    with pytest.raises(ValueError, match="outliers"):
        format_error_report(4, 64, outlier_fraction=1.5)


def test_cli_prints_table_and_refuses_bad_option():
    runner = CliRunner()
    ok = runner.invoke(app, ["formats", "--rows", "16", "--cols", "64"])
    assert ok.exit_code == 0, ok.output
    assert "nvfp4 16x16" in ok.output and "mxfp4" in ok.output
    bad = runner.invoke(app, ["formats", "--cols", "40"])
    assert bad.exit_code != 0
    assert "multiple of 32" in bad.output
