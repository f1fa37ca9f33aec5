"""The jobs behind the commands: thin compositions of the library for one run each.

``quantize`` (:class:`QuantizeJob`), ``eval``, ``inspect``, ``demo``, ``train``, ``qat``; every model they
load comes from :mod:`.models`.
"""

from .demo import DemoJob, DemoResult, run_demo
from .eval import EvalResult, run_eval
from .inspect import InspectResult, inspect_checkpoint
from .models import LoadedModel, load_causal_lm, load_model, load_quantized_model, load_source_model
from .qat import QATJob, QATResult, run_qat
from .quantize import QuantizeJob, run_quantize, run_streaming
from .train import TrainOptions, run_training

__all__ = [
    "DemoJob",
    "DemoResult",
    "EvalResult",
    "InspectResult",
    "LoadedModel",
    "QATJob",
    "QATResult",
    "QuantizeJob",
    "TrainOptions",
    "inspect_checkpoint",
    "load_causal_lm",
    "load_model",
    "load_quantized_model",
    "load_source_model",
    "run_demo",
    "run_eval",
    "run_qat",
    "run_quantize",
    "run_streaming",
    "run_training",
]
