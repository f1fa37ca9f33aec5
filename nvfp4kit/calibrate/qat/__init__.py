"""Quantization-aware training (QAT) and distillation (QAD): fake-quantized Linears trained through a
straight-through estimator, exported bit for bit as the checkpoint PTQ writes.

* :mod:`.linear` - :class:`FakeQuantLinear`, the module (scales, caches, its checkpoint record) and
  its straight-through estimator;
* :mod:`.prepare` - surgery: :func:`prepare_qat`, :func:`set_formats`, :func:`strip_qat`;
* :mod:`.observe` - :func:`calibrate_input_amax`, the static activation scales;
* :mod:`.objective` - :class:`QATLoss` and :func:`frozen_teacher` (QAD);
* :mod:`.export` - :func:`export_quantized_model`, the records of a fake-quantized model.

The training itself runs on :mod:`nvfp4kit.training`'s loop (``nvfp4kit.pipelines.qat``).
"""

from .export import export_quantized_model
from .linear import QAT_FORMATS, WEIGHT_SCALES, FakeQuantLinear, StraightThrough
from .objective import QATLoss, frozen_teacher
from .observe import calibrate_input_amax
from .prepare import fake_quant_modules, linear_names, prepare_qat, set_formats, strip_qat

__all__ = [
    "FakeQuantLinear",
    "QATLoss",
    "QAT_FORMATS",
    "StraightThrough",
    "WEIGHT_SCALES",
    "calibrate_input_amax",
    "export_quantized_model",
    "fake_quant_modules",
    "frozen_teacher",
    "linear_names",
    "prepare_qat",
    "set_formats",
    "strip_qat",
]
