"""Which tensors mark a Linear as quantized, by name and dtype alone: what a checkpoint still holds
when the config markers that declare its quantization (``config.json`` ``quantization_config``,
``hf_quant_config.json``) were removed. :func:`~nvfp4kit.checkpoint.detect_format` refuses such a
checkpoint (read as plain weights, its packed bytes would be taken for values), and the serving
checker reports it."""

from __future__ import annotations

from . import compressed_tensors as ct
from . import modelopt_hf as mo
from .reader import CheckpointReader

# names only a quantized Linear has (modelopt's NVFP4 global scale, compressed-tensors' NVFP4 tensors)
_QUANTIZED_ONLY = (mo.WEIGHT_SCALE_2, ct.WEIGHT_PACKED, ct.WEIGHT_GLOBAL_SCALE, ct.INPUT_GLOBAL_SCALE)
# dtypes a quantized weight is stored in (packed E2M1 pairs, FP8), never a plain Linear's
_QUANTIZED_WEIGHT_DTYPES = ("U8", "F8_E4M3", "F8_E5M2")


def undeclared_quantized_tensors(reader: CheckpointReader) -> list[str]:
    """Tensors that mark a Linear as quantized, by name and dtype alone (what a checkpoint whose
    config markers were removed still holds): modelopt's / compressed-tensors' NVFP4 global scales and
    packed weights, a ``weight_scale`` beside a U8 / FP8 ``weight`` or a packed one, a 2-dim U8 ``weight``."""
    found = []
    for n in reader.names():
        module, _, leaf = n.rpartition(".")
        w = f"{module}.{mo.WEIGHT}"
        if leaf in _QUANTIZED_ONLY:
            found.append(n)
        elif leaf == mo.WEIGHT_SCALE and ((w in reader and reader.dtype_str(w) in _QUANTIZED_WEIGHT_DTYPES)
                                          or f"{module}.{ct.WEIGHT_PACKED}" in reader):
            found.append(n)
        elif leaf == mo.WEIGHT and reader.dtype_str(n) == "U8" and len(reader.shape(n)) == 2:
            found.append(n)
    return found


__all__ = ["undeclared_quantized_tensors"]
