"""The compressed-tensors checkpoint format (llm-compressor output; vLLM loads it).

All on-disk names of this format live here.

* ``config.json`` ``quantization_config``: ``quant_method: "compressed-tensors"``, ``format``
  (``nvfp4-pack-quantized``, ``float-quantized`` or ``mixed-precision``), ``config_groups`` with
  ``targets`` / ``weights`` / ``input_activations`` / ``format``, and ``ignore`` (module names, or
  ``re:REGEX`` patterns).
* NVFP4 Linear ``X``: ``X.weight_packed`` U8 [N, K/2], ``X.weight_scale`` F8_E4M3 [N, K/16],
  ``X.weight_global_scale`` F32 [1] and ``X.input_global_scale`` F32 [1], both in the ENCODE
  direction (2688 / amax): the reciprocals of modelopt's ``weight_scale_2`` / ``input_scale``.
  Nibble order and block-scale layout are modelopt's, so conversion is a rename plus the float32
  reciprocal of the two global scales.
* FP8 Linear ``X`` (``float-quantized``, per-tensor): ``X.weight`` F8_E4M3 [N, K], ``X.weight_scale``
  F32 [1] and ``X.input_scale`` F32 [1], decode direction (amax / 448).
* KV cache of attention ``A`` (FP8 or NVFP4): ``A.k_scale`` and ``A.v_scale`` F32 [1], decode direction,
  announced by ``kv_cache_scheme`` (names, values and config fields: :mod:`.kv_cache`).
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from ..formats.nvfp4 import BLOCK_SIZE, NVFP4Parts
from ..formats.scales import decode_from_encode, encode_from_decode
from . import kv_cache as kvc
from .errors import CheckpointError
from .layout import (
    FP8,
    FP8_W8A16,
    FP8_RANGE,
    NVFP4,
    NVFP4_ACT_RANGE,
    NVFP4_W4A16,
    amax_from_decode,
    amax_from_encode,
    input_decode_scale,
    input_encode_scale,
)
from .reader import CheckpointReader
from .types import QuantizedLinearWeight

FORMAT = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
NVFP4_FORMAT = "nvfp4-pack-quantized"
FP8_FORMAT = "float-quantized"
MIXED_FORMAT = "mixed-precision"
KNOWN_FORMATS = (NVFP4_FORMAT, FP8_FORMAT, MIXED_FORMAT)
GROUP_SIZE = BLOCK_SIZE

# tensor suffixes
WEIGHT = "weight"
BIAS = "bias"
WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
WEIGHT_GLOBAL_SCALE = "weight_global_scale"
INPUT_GLOBAL_SCALE = "input_global_scale"
INPUT_SCALE = "input_scale"
K_SCALE, V_SCALE = kvc.scale_leaf_names(kvc.COMPRESSED_TENSORS)  # "k_scale", "v_scale"
NVFP4_SUFFIXES = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_GLOBAL_SCALE, INPUT_GLOBAL_SCALE, BIAS)
FP8_SUFFIXES = (WEIGHT, WEIGHT_SCALE, INPUT_SCALE, BIAS)


# ============================================================================= writing


def _one(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).reshape(1)


def _weight_encode_scale(name: str, p: NVFP4Parts) -> torch.Tensor:
    """The encode-direction global scale: the float32 reciprocal of the decode scale. A zero decode
    scale (all-zero weight) has no reciprocal; with all-zero block scales any value decodes to
    zeros, and 1 is written."""
    g = p.global_decode_scale.float().reshape(())
    if float(g) == 0.0:
        if bool((p.block_scale.float() != 0).any()):
            raise CheckpointError(f"{name}: global decode scale is 0 but block scales are not; cannot write an encode scale")
        return torch.ones((), dtype=torch.float32)
    return encode_from_decode(g)


def linear_tensors(name: str, lw: QuantizedLinearWeight) -> dict[str, torch.Tensor]:
    """On-disk tensors of one Linear record (validated beforehand)."""
    out: dict[str, torch.Tensor] = {}
    if lw.format == "nvfp4":
        p = lw.nvfp4
        out[f"{name}.{WEIGHT_PACKED}"] = p.packed
        out[f"{name}.{WEIGHT_SCALE}"] = p.block_scale
        out[f"{name}.{WEIGHT_GLOBAL_SCALE}"] = _one(_weight_encode_scale(name, p))
        if lw.input_amax is not None:
            out[f"{name}.{INPUT_GLOBAL_SCALE}"] = _one(input_encode_scale(lw.input_amax, NVFP4_ACT_RANGE))
    elif lw.format == "fp8":
        out[f"{name}.{WEIGHT}"] = lw.fp8_weight
        out[f"{name}.{WEIGHT_SCALE}"] = _one(lw.fp8_weight_scale)
        if lw.input_amax is not None:
            out[f"{name}.{INPUT_SCALE}"] = _one(input_decode_scale(lw.input_amax, FP8_RANGE))
    else:
        out[f"{name}.{WEIGHT}"] = lw.weight
    if lw.bias is not None:
        out[f"{name}.{BIAS}"] = lw.bias
    return out


def kv_tensors(attn: str, k_amax: float, v_amax: float, kv_format: str = "fp8") -> dict[str, torch.Tensor]:
    k_name, v_name = kvc.kv_scale_names(kvc.COMPRESSED_TENSORS, attn, kv_format)
    return {k_name: _one(kvc.kv_scale(kv_format, k_amax)), v_name: _one(kvc.kv_scale(kv_format, v_amax))}


def _nvfp4_args(dynamic) -> dict:
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": GROUP_SIZE,
        "strategy": "tensor_group",
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "scale_dtype": "torch.float8_e4m3fn",
        "zp_dtype": "torch.float8_e4m3fn",
        "observer": "static_minmax" if dynamic == "local" else "memoryless_minmax",
        "observer_kwargs": {},
    }


def _fp8_args() -> dict:
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": "tensor",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def _scheme_group(scheme: str, targets: list[str]) -> dict:
    if scheme in (NVFP4, NVFP4_W4A16):
        weights = _nvfp4_args(False)
        acts = _nvfp4_args("local") if scheme == NVFP4 else None
        fmt = NVFP4_FORMAT
    else:
        weights = _fp8_args()
        acts = _fp8_args() if scheme == FP8 else None
        fmt = FP8_FORMAT
    return {
        "targets": targets,
        "weights": weights,
        "input_activations": acts,
        "output_activations": None,
        "format": fmt,
    }


def _glob_to_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and "]" in pattern[i + 2 :]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1 : j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "^" + "".join(out) + "$"


def ignore_entry(pattern: str) -> str:
    """An fnmatch exclusion as a compressed-tensors ``ignore`` entry: plain names stay as they are,
    wildcard patterns become ``re:^...$`` regexes (compressed-tensors and vLLM match ``re:`` entries)."""
    if pattern.startswith("re:") or not any(c in pattern for c in "*?["):
        return pattern
    return "re:" + _glob_to_regex(pattern)


def exclude_pattern(entry: str) -> str:
    """Inverse of :func:`ignore_entry` where the regex came from a glob; other ``re:`` entries stay."""
    if not entry.startswith("re:"):
        return entry
    rx = entry[3:]
    m = re.fullmatch(r"\^(.*)\$", rx)
    if not m:
        return entry
    body, out, i = m.group(1), [], 0
    while i < len(body):
        if body.startswith(".*", i):
            out.append("*")
            i += 2
        elif body[i] == ".":
            out.append("?")
            i += 1
        elif body[i] == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        elif body[i] == "[" and "]" in body[i + 1 :]:
            j = body.index("]", i + 1)
            cls = body[i + 1 : j]
            out.append("[" + ("!" + cls[1:] if cls.startswith("^") else cls) + "]")
            i = j + 1
        else:
            out.append(body[i])
            i += 1
    candidate = "".join(out)
    return candidate if ignore_entry(candidate) == entry else entry


def quant_config(
    schemes: dict[str, str], exclude_modules: list[str], kv_cache_format: str | None, bf16_linears: list[str]
) -> dict:
    """config.json ``quantization_config`` for the given per-Linear schemes.

    One scheme: a single config group targeting ``Linear``, with the exclusions (and any
    high-precision Linear they do not cover) in ``ignore``. Several: ``mixed-precision``, one group per
    scheme targeting its modules by name.
    """
    kinds = sorted(set(schemes.values()))
    if not kinds:
        raise CheckpointError("no quantized Linear to write (every module is excluded)")
    ignore = [ignore_entry(p) for p in exclude_modules]
    covered = [m for m in bf16_linears if not any(_ignore_matches(e, m) for e in ignore)]
    ignore += covered
    if len(kinds) == 1:
        groups = {"group_0": _scheme_group(kinds[0], ["Linear"])}
        fmt = groups["group_0"]["format"]
    else:
        groups = {
            f"group_{i}": _scheme_group(k, sorted(m for m, s in schemes.items() if s == k)) for i, k in enumerate(kinds)
        }
        fmt = MIXED_FORMAT
    try:  # the format version this layout matches, without importing the library
        from importlib.metadata import version

        ct_version = version("compressed-tensors")
    except Exception:  # not installed: the field is optional
        ct_version = None
    qc = {
        "quant_method": QUANT_METHOD,
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": kvc.ct_kv_cache_scheme(kv_cache_format),
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    if ct_version:
        qc["version"] = ct_version
    return qc


def _ignore_matches(entry: str, module: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return entry == module


# ============================================================================= reading


def detect(config: dict | None) -> bool:
    qc = (config or {}).get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def quantization_section(config: dict, where: str) -> dict:
    qc = config.get("quantization_config") or {}
    fmt = qc.get("format")
    if fmt not in KNOWN_FORMATS:
        raise CheckpointError(
            f"{where}/config.json: compressed-tensors format {fmt!r} is not supported (supported: {', '.join(KNOWN_FORMATS)})"
        )
    groups = qc.get("config_groups") or {}
    for gname, g in groups.items():
        w = (g or {}).get("weights") or {}
        gfmt = (g or {}).get("format") or fmt
        if gfmt == NVFP4_FORMAT and (w.get("num_bits"), w.get("group_size")) != (4, GROUP_SIZE):
            raise CheckpointError(f"{where}/config.json: config group {gname} is not NVFP4 (num_bits 4, group_size 16)")
        if gfmt == FP8_FORMAT and (w.get("num_bits"), w.get("strategy")) != (8, "tensor"):
            raise CheckpointError(
                f"{where}/config.json: config group {gname}: only per-tensor FP8 weights are supported, "
                f"got num_bits={w.get('num_bits')} strategy={w.get('strategy')}"
            )
        if gfmt not in (NVFP4_FORMAT, FP8_FORMAT):
            raise CheckpointError(f"{where}/config.json: config group {gname} has unsupported format {gfmt!r}")
    kvc.kv_format_of_ct_scheme(qc.get("kv_cache_scheme"), where)
    return qc


def _scalar(reader: CheckpointReader, name: str) -> torch.Tensor:
    reader.expect_dtype(name, "F32")
    shp = reader.shape(name)
    if int(torch.Size(shp).numel()) != 1:
        raise CheckpointError(f"{reader.where(name)} must hold one float32 value, has shape {list(shp)}")
    t = reader.get(name).reshape(())
    if not bool(torch.isfinite(t)) or float(t) < 0:
        raise CheckpointError(f"{reader.where(name)} must be finite and non-negative, got {float(t)}")
    return t


def read_nvfp4(reader: CheckpointReader, module: str) -> QuantizedLinearWeight:
    w = f"{module}.{WEIGHT_PACKED}"
    reader.expect_dtype(w, "U8")
    shp = reader.shape(w)
    if len(shp) != 2:
        raise CheckpointError(f"{reader.where(w)}: must be 2-dim [N, K/2], has shape {list(shp)}")
    N, K = shp[0], shp[1] * 2
    if K % BLOCK_SIZE:
        raise CheckpointError(f"{reader.where(w)}: K={K} is not a multiple of {BLOCK_SIZE}")
    packed = reader.get(w)
    scale = reader.get(f"{module}.{WEIGHT_SCALE}", "F8_E4M3", (N, K // BLOCK_SIZE))
    gs = _scalar(reader, f"{module}.{WEIGHT_GLOBAL_SCALE}")
    if float(gs) == 0:
        raise CheckpointError(f"{reader.where(module + '.' + WEIGHT_GLOBAL_SCALE)} is 0 (an encode scale must be positive)")
    in_name = f"{module}.{INPUT_GLOBAL_SCALE}"
    input_amax = None
    if in_name in reader:
        ig = _scalar(reader, in_name)
        if float(ig) == 0:
            raise CheckpointError(f"{reader.where(in_name)} is 0 (an encode scale must be positive)")
        input_amax = amax_from_encode(ig, NVFP4_ACT_RANGE)
    bias = reader.get(f"{module}.{BIAS}") if f"{module}.{BIAS}" in reader else None
    parts = NVFP4Parts(packed, scale, decode_from_encode(gs).reshape(()))
    return QuantizedLinearWeight("nvfp4", (N, K), nvfp4=parts, input_amax=input_amax, bias=bias)


def read_fp8(reader: CheckpointReader, module: str) -> QuantizedLinearWeight:
    w = f"{module}.{WEIGHT}"
    reader.expect_dtype(w, "F8_E4M3")
    shp = reader.shape(w)
    if len(shp) != 2:
        raise CheckpointError(f"{reader.where(w)}: FP8 weight must be 2-dim, has shape {list(shp)}")
    ws = _scalar(reader, f"{module}.{WEIGHT_SCALE}")
    in_name = f"{module}.{INPUT_SCALE}"
    input_amax = amax_from_decode(_scalar(reader, in_name), FP8_RANGE) if in_name in reader else None
    bias = reader.get(f"{module}.{BIAS}") if f"{module}.{BIAS}" in reader else None
    return QuantizedLinearWeight("fp8", (shp[0], shp[1]), fp8_weight=reader.get(w), fp8_weight_scale=ws,
                                 input_amax=input_amax, bias=bias)


def linear_schemes(reader: CheckpointReader) -> dict[str, tuple[str, tuple[int, int]]]:
    """module -> (scheme, (N, K)) of every quantized Linear, from the headers alone."""
    out = {}
    for n in reader.names():
        m, _, leaf = n.rpartition(".")
        if leaf == WEIGHT_PACKED and len(reader.shape(n)) == 2:
            N, k = reader.shape(n)
            out[m] = (NVFP4 if f"{m}.{INPUT_GLOBAL_SCALE}" in reader else NVFP4_W4A16, (N, 2 * k))
        elif leaf == WEIGHT_SCALE and f"{m}.{WEIGHT}" in reader and reader.dtype_str(f"{m}.{WEIGHT}") == "F8_E4M3":
            shape = reader.shape(f"{m}.{WEIGHT}")
            if len(shape) == 2:
                out[m] = (FP8 if f"{m}.{INPUT_SCALE}" in reader else FP8_W8A16, (shape[0], shape[1]))
    return out


def iter_records(reader: CheckpointReader, qc: dict) -> Iterator[tuple[str, str, object]]:
    """Yield ``("linear", module, QuantizedLinearWeight)``, ``("kv", attention, (k_amax, v_amax))``
    and ``("tensor", name, Tensor)`` one at a time."""
    names = reader.names()
    present = set(names)
    nvfp4 = {n[: -len(WEIGHT_PACKED) - 1] for n in names if n.endswith("." + WEIGHT_PACKED)}
    fp8 = {
        n[: -len(WEIGHT_SCALE) - 1]
        for n in names
        if n.endswith("." + WEIGHT_SCALE)
        and n[: -len(WEIGHT_SCALE) - 1] not in nvfp4
        and f"{n[: -len(WEIGHT_SCALE) - 1]}.{WEIGHT}" in present
        and reader.dtype_str(f"{n[: -len(WEIGHT_SCALE) - 1]}.{WEIGHT}") == "F8_E4M3"
    }
    for n in names:
        if n.endswith("." + WEIGHT_SCALE):
            m = n[: -len(WEIGHT_SCALE) - 1]
            if m not in nvfp4 and m not in fp8:
                w = f"{m}.{WEIGHT}"
                got = reader.dtype_str(w) if w in present else "missing"
                raise CheckpointError(
                    f"{reader.where(n)}: {m} has a weight_scale but neither {WEIGHT_PACKED} (NVFP4) nor an "
                    f"F8_E4M3 {WEIGHT} (FP8; {w} is {got})"
                )
    kv_attn = {n[: -len(K_SCALE) - 1] for n in names if n.endswith("." + K_SCALE)}
    kv_attn |= {n[: -len(V_SCALE) - 1] for n in names if n.endswith("." + V_SCALE)}
    # scales without a declared KV format are read as FP8 (what they were before NVFP4 KV caches)
    kv_format = kvc.kv_format_of_ct_scheme(qc.get("kv_cache_scheme"), str(reader.dir)) or kvc.FP8
    done: set[str] = set()
    for n in names:
        if n in done:
            continue
        module, _, leaf = n.rpartition(".")
        if module in nvfp4 or module in fp8:
            allowed = NVFP4_SUFFIXES if module in nvfp4 else FP8_SUFFIXES
            if leaf not in allowed:
                raise CheckpointError(
                    f"{reader.where(n)}: unsupported tensor of a quantized Linear ({leaf!r}; nvfp4kit reads {', '.join(allowed)})"
                )
            yield "linear", module, (read_nvfp4(reader, module) if module in nvfp4 else read_fp8(reader, module))
            done.update(f"{module}.{s}" for s in allowed)
            continue
        if module in kv_attn and leaf in (K_SCALE, V_SCALE):
            k_name, v_name = kvc.kv_scale_names(kvc.COMPRESSED_TENSORS, module, kv_format)
            for x in (k_name, v_name):
                if x not in present:
                    raise CheckpointError(f"{reader.dir}: {x} is missing ({kv_format.upper()} KV cache needs both "
                                          "k_scale and v_scale)")
            done.update((k_name, v_name))
            yield "kv", module, (kvc.kv_amax(kv_format, _scalar(reader, k_name)),
                                 kvc.kv_amax(kv_format, _scalar(reader, v_name)))
            continue
        yield "tensor", n, reader.get(n)
