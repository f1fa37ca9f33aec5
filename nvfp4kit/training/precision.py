"""Per-module precision of a Linear in training: which format it computes in, with which switches.

``LinearPrecision`` is data: every :class:`~nvfp4kit.training.linear.Linear` stores one, recipes set it
by module name, and :func:`~nvfp4kit.training.qlinear.quantized_linear` computes the layer in it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

FORMATS = ("bf16", "nvfp4", "mxfp8", "fp8")


@dataclass(frozen=True)
class LinearPrecision:
    """How one Linear computes. ``format``: bf16 (high precision), nvfp4, mxfp8 or fp8.

    NVFP4 recipe switches (arXiv 2509.25149): 2D weight blocks, random Hadamard transform on the
    wgrad operands (of ``rht_size``, with ``rht_sign``), stochastic rounding of gradients,
    Four Over Six weight scales.
    """

    format: str = "bf16"
    weight_2d: bool = True
    rht: bool = True
    rht_size: int = 16
    rht_sign: tuple[int, ...] | None = None
    stochastic_rounding: bool = True
    four_over_six: bool = False
    # join the data-parallel amax reduction of activations/gradients when one is set
    # (off for modules whose calls depend on the data, e.g. routed experts)
    amax_reduction: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"LinearPrecision: format must be one of {', '.join(FORMATS)}, got {self.format!r}")

    def with_format(self, fmt: str) -> "LinearPrecision":
        return replace(self, format=fmt)

    def __str__(self) -> str:
        if self.format != "nvfp4":
            return self.format
        flags = [f for f, on in (("2d", self.weight_2d), ("rht", self.rht), ("sr", self.stochastic_rounding),
                                  ("4/6", self.four_over_six)) if on]
        return "nvfp4[" + ",".join(flags) + "]"


BF16 = LinearPrecision("bf16")


def as_precision(p: "LinearPrecision | str | None") -> LinearPrecision:
    if p is None:
        return BF16
    if isinstance(p, LinearPrecision):
        return p
    return LinearPrecision(str(p))
