"""Will a written checkpoint load, and compute what nvfp4kit computed, in vLLM and SGLang?

:func:`check_serving` reads a checkpoint folder (configs and safetensors headers, plus the scalar
scales and the block scales) and returns every :class:`Finding`, each naming the file, tensor or
module and the rule it breaks; :func:`verify_serving` raises :class:`CheckpointError` listing the
errors. Every writer of a checkpoint runs it on its temporary folder before renaming it into place
(:class:`~nvfp4kit.checkpoint.writer.ShardedWriter`), so a checkpoint that breaks a rule is never
finished; ``nvfp4kit inspect --check-serving`` runs it on any folder.

The rules, and the engine code they come from (facts read from vLLM's
``vllm/model_executor/layers/quantization/modelopt.py``, ``.../compressed_tensors/compressed_tensors.py``,
``.../compressed_tensors/utils.py``, ``.../compressed_tensors/schemes/compressed_tensors_w4a4_nvfp4.py``,
``.../quantization/kv_cache.py``, ``.../quantization/utils/quant_utils.py`` and
``vllm/model_executor/model_loader/weight_utils.py``; SGLang's
``python/sglang/srt/layers/quantization/modelopt_quant.py`` and ``.../quantization/utils.py``):

``config``
    modelopt: ``hf_quant_config.json`` (``quantization``: ``quant_algo`` and, for NVFP4, ``group_size``,
    ``kv_cache_quant_algo``, ``exclude_modules``: vLLM's NVFP4 config refuses a file without them; older
    SGLang releases read only this nested form) and ``config.json`` ``quantization_config``
    (``quant_method: modelopt``; vLLM reads it first when present, SGLang prefers this flat form, both
    fall back to ``hf_quant_config.json`` without it: a warning) saying the same thing:
    ``quant_algo``, exclusions (``ignore``), KV cache (``kv_cache_scheme``), ``group_size`` (SGLang
    refuses inconsistent group sizes), ``quantized_layers`` of a mixed checkpoint. The algorithm is
    one vLLM's modelopt loader knows (NVFP4, W4A16_NVFP4, FP8, MIXED_PRECISION), group size 16.
    compressed-tensors: ``quant_method: compressed-tensors``, a known ``format``, NVFP4 config groups
    with ``num_bits 4, type float, strategy tensor_group, group_size 16, symmetric`` (what vLLM's
    ``_is_fp4a4_nvfp4`` / ``_is_fp4a16_nvfp4`` test), FP8 groups per-tensor, a KV scheme of 8-bit
    floats, strategy ``tensor``, symmetric (vLLM's ``validate_kv_cache_scheme``), and no stray
    ``hf_quant_config.json``.
``tensors``
    each quantized Linear complete, with the dtypes and shapes the engines allocate: NVFP4 packed
    weight U8 ``[N, K/2]``, block scale F8_E4M3 ``[N, K/16]``, K a multiple of 16 (both engines refuse
    others), one-element F32 global / input scales; FP8 weight F8_E4M3 ``[N, K]`` with one-element F32
    scales. A scale without its weight (a half-quantized module) is an error.
``scheme``
    the tensors are what the config declares: under ``quant_algo`` NVFP4 (W4A4) every NVFP4 Linear
    has an ``input_scale`` (the engines divide by it; an absent one leaves an uninitialised
    parameter); an FP8 Linear of a modelopt checkpoint has an ``input_scale`` (the modelopt FP8 linear
    method always uses a static activation scale, registered at float32 min when absent); each
    quantized module of a mixed checkpoint is listed with its algorithm; a compressed-tensors module
    belongs to a config group of its scheme (an NVFP4 group with input activations needs
    ``input_global_scale``, a static FP8 group ``input_scale``).
``fused``
    the Linears an engine fuses into one GEMM (q/k/v, gate/up and every other group of
    :func:`nvfp4kit.policy.fused_groups`) have one precision (vLLM's and SGLang's ``is_layer_skipped``
    and compressed-tensors' ``should_ignore_layer`` refuse mixed shards) and, for NVFP4, one
    ``weight_scale_2`` / ``weight_global_scale`` and one input scale: the engines keep the max of the
    parts (SGLang's MoE keeps the first part's), without re-quantizing the block scales. Mamba's
    ``in_proj`` is one Linear on disk, so it has nothing to share.
``experts``
    an MoE layer is one fused layer to the engines: all its experts have the same precision and
    tensors, and are numbered 0..E-1 without a gap (a missing expert leaves uninitialised weights).
``scales``
    no NaN, infinite, negative or zero scale where the engines divide by it: input scales and
    compressed-tensors' encode-direction weight global scales must be positive (``1 / scale`` is
    taken); a zero modelopt ``weight_scale_2`` is allowed only for an all-zero weight (all block
    scales zero); FP8 weight scales positive; block scales free of NaN and negative codes.
``exclusions``
    every exclusion / ignore entry names real modules of the checkpoint (a typo silently keeps a
    module quantized or not), no quantized Linear is matched by one (vLLM's modelopt loader matches
    ``exclude_modules`` with fnmatch and also as substrings of module names; compressed-tensors
    entries are exact names or ``re:`` regexes), and, where the config targets every Linear, every
    high-precision Linear is excluded (else the engine allocates quantized parameters for it).
``lm_head``
    the output head is either excluded and kept in high precision, or fully quantized (never
    excluded while quantized, never quantized without all its parts).
``kv``
    a checkpoint whose config declares a quantized KV cache has both scales of every attention
    (a module with ``k_proj`` and ``v_proj``) under the names of its format (:func:`kv_scale_names`:
    modelopt ``<attn>.k_proj.k_scale`` / ``<attn>.v_proj.v_scale``, the names vLLM's
    ``maybe_remap_kv_scale_name`` maps; compressed-tensors ``<attn>.k_scale`` / ``<attn>.v_scale``),
    one-element F32, positive (vLLM treats a non-positive scale as absent and falls back to 1.0). An
    attention outside the calibrated model (a default exclusion of :mod:`nvfp4kit.policy`, e.g. an MTP
    layer that only speculative decoding runs) without scales is a warning.

Warnings (``severity="warning"``) note what only one engine refuses (SGLang's modelopt loader takes
only ``quant_algo`` FP8 or NVFP4; its NVFP4 MoE asserts that an expert's block-scale columns
are a multiple of 16), or KV scales a config does not declare.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from ..formats.nvfp4 import BLOCK_SIZE
from ..policy import DEFAULT_EXCLUDE, expert_family, fused_groups, is_expert, matches_any
from . import compressed_tensors as ct
from . import kv_cache as kvc
from . import modelopt_hf as mo
from .errors import CheckpointError
from .kv_cache import kv_scale_names
from .layout import FP8_W8A16
from .markers import undeclared_quantized_tensors
from .reader import CONFIG_NAME, FLOAT_DTYPES, CheckpointReader, read_json

ERROR = "error"
WARNING = "warning"

RULES = {
    "config": "both config forms present, consistent and supported",
    "tensors": "complete quantized Linears with the engines' dtypes and shapes",
    "scheme": "tensors match the declared scheme (input scales where activations are quantized)",
    "fused": "fused Linears share precision and NVFP4 global / input scales",
    "experts": "experts of a layer share precision and tensors, numbered without gaps",
    "scales": "no zero / NaN / infinite / negative scales where the engines use them",
    "exclusions": "exclusions name real modules, exclude nothing quantized, cover every high-precision Linear",
    "lm_head": "lm_head excluded or fully quantized",
    "kv": "KV-cache scales of every attention under the format's names when a quantized KV cache is declared",
    "engine": "a limitation of one engine",
}

# the engines' NVFP4 group size and the modelopt algorithms vLLM loads / SGLang loads
MODELOPT_ALGOS_VLLM = ("NVFP4", "W4A16_NVFP4", "FP8", "MIXED_PRECISION")
MODELOPT_ALGOS_SGLANG = ("NVFP4", "FP8")
# hf_quant_config.json fields vLLM's NVFP4 config requires
MODELOPT_REQUIRED = ("group_size", "kv_cache_quant_algo", "exclude_modules")
HEAD = "lm_head"


@dataclass(frozen=True)
class Finding:
    """One broken rule: ``rule`` (a key of :data:`RULES`), ``where`` (the tensor, module or file),
    ``message`` and ``severity`` (``"error"``: an engine refuses the checkpoint or computes something
    else than nvfp4kit does; ``"warning"``: one engine's limitation)."""

    rule: str
    where: str
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        tag = "" if self.severity == ERROR else f" ({self.severity})"
        return f"[{self.rule}{tag}] {self.where}: {self.message}"


# ============================================================================= the checkpoint's parts


class _Checkpoint:
    """Tensor names grouped by module, read from the headers."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.modules: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for n in reader.names():
            m, _, leaf = n.rpartition(".")
            self.modules.setdefault(m, {})[leaf] = (reader.dtype_str(n), reader.shape(n))
        # every module and every ancestor of one (what an exclusion may name)
        self.all_modules: set[str] = set()
        for m in self.modules:
            parts = m.split(".")
            for i in range(1, len(parts) + 1):
                self.all_modules.add(".".join(parts[:i]))

    def where(self, name: str) -> str:
        r = self.reader
        return f"{name} ({r.file_of(name)})" if name in r else name


@dataclass
class _Linear:
    """A Linear as the checker sees it: ``kind`` nvfp4 / fp8 / bf16, its weight / global / input
    scale tensor names (None where absent) and (N, K)."""

    name: str
    kind: str
    weight: str | None = None
    block_scale: str | None = None
    global_scale: str | None = None  # nvfp4: weight_scale_2 (modelopt) / weight_global_scale (ct); fp8: weight_scale
    input_scale: str | None = None
    shape: tuple[int, int] | None = None

    @property
    def scheme(self) -> str:
        if self.kind == "bf16":
            return "bf16"
        return self.kind + ("" if self.input_scale else "-weight-only")


def _one_f32(cp: _Checkpoint, name: str, out: list[Finding], rule: str = "tensors") -> bool:
    dt, shape = cp.reader.dtype_str(name), cp.reader.shape(name)
    n = 1
    for d in shape:
        n *= d
    if dt != "F32" or n != 1:
        out.append(Finding(rule, cp.where(name), f"must be one float32 value (the engines load a per-tensor "
                                                 f"F32 scale), has dtype {dt} shape {list(shape)}"))
        return False
    return True


def _linears(cp: _Checkpoint, fmt: str, out: list[Finding]) -> dict[str, _Linear]:
    """Every quantized Linear (and every module with a 2-D floating ``weight``, as bf16), with the
    tensor and shape findings."""
    lin: dict[str, _Linear] = {}
    for m, leaves in cp.modules.items():
        w_dt = leaves.get("weight", (None, None))[0]
        if fmt == mo.FORMAT:
            qmarks = [x for x in (mo.WEIGHT_SCALE, mo.WEIGHT_SCALE_2, mo.INPUT_SCALE) if x in leaves]
            if mo.WEIGHT_SCALE in leaves and w_dt == "U8":
                lin[m] = _Linear(m, "nvfp4", f"{m}.{mo.WEIGHT}", f"{m}.{mo.WEIGHT_SCALE}",
                                 f"{m}.{mo.WEIGHT_SCALE_2}" if mo.WEIGHT_SCALE_2 in leaves else None,
                                 f"{m}.{mo.INPUT_SCALE}" if mo.INPUT_SCALE in leaves else None)
            elif mo.WEIGHT_SCALE in leaves and w_dt == "F8_E4M3":
                lin[m] = _Linear(m, "fp8", f"{m}.{mo.WEIGHT}", None, f"{m}.{mo.WEIGHT_SCALE}",
                                 f"{m}.{mo.INPUT_SCALE}" if mo.INPUT_SCALE in leaves else None)
            elif qmarks or w_dt in ("U8", "F8_E4M3"):
                have = ", ".join(sorted(x for x in leaves if x in (*qmarks, "weight")))
                out.append(Finding("tensors", m, f"half-quantized module: has {have} (weight dtype {w_dt}); a quantized "
                                                 f"Linear needs weight (U8 NVFP4 or F8_E4M3 FP8) and weight_scale"))
                continue
            else:
                if w_dt in FLOAT_DTYPES and len(leaves["weight"][1]) == 2:
                    lin[m] = _Linear(m, "bf16", f"{m}.weight", shape=tuple(leaves["weight"][1]))
                continue
        else:
            qmarks = [x for x in (ct.WEIGHT_GLOBAL_SCALE, ct.INPUT_GLOBAL_SCALE) if x in leaves]
            if ct.WEIGHT_PACKED in leaves:
                if "weight" in leaves:
                    out.append(Finding("tensors", m, f"has both {ct.WEIGHT_PACKED} and weight"))
                lin[m] = _Linear(m, "nvfp4", f"{m}.{ct.WEIGHT_PACKED}",
                                 f"{m}.{ct.WEIGHT_SCALE}" if ct.WEIGHT_SCALE in leaves else None,
                                 f"{m}.{ct.WEIGHT_GLOBAL_SCALE}" if ct.WEIGHT_GLOBAL_SCALE in leaves else None,
                                 f"{m}.{ct.INPUT_GLOBAL_SCALE}" if ct.INPUT_GLOBAL_SCALE in leaves else None)
            elif ct.WEIGHT_SCALE in leaves and w_dt == "F8_E4M3":
                lin[m] = _Linear(m, "fp8", f"{m}.{ct.WEIGHT}", None, f"{m}.{ct.WEIGHT_SCALE}",
                                 f"{m}.{ct.INPUT_SCALE}" if ct.INPUT_SCALE in leaves else None)
            elif qmarks or ct.WEIGHT_SCALE in leaves or w_dt in ("U8", "F8_E4M3"):
                have = ", ".join(sorted(x for x in leaves if x in (*qmarks, ct.WEIGHT_SCALE, "weight")))
                out.append(Finding("tensors", m, f"half-quantized module: has {have} (weight dtype {w_dt}); an NVFP4 "
                                                 f"Linear needs {ct.WEIGHT_PACKED}, an FP8 one an F8_E4M3 weight"))
                continue
            else:
                if w_dt in FLOAT_DTYPES and len(leaves["weight"][1]) == 2:
                    lin[m] = _Linear(m, "bf16", f"{m}.weight", shape=tuple(leaves["weight"][1]))
                continue
        _check_parts(cp, fmt, lin[m], out)
    return lin


def _check_parts(cp: _Checkpoint, fmt: str, q: _Linear, out: list[Finding]) -> None:
    r = cp.reader
    gname = mo.WEIGHT_SCALE_2 if fmt == mo.FORMAT else ct.WEIGHT_GLOBAL_SCALE
    if q.kind == "nvfp4":
        wshape = r.shape(q.weight)
        if r.dtype_str(q.weight) != "U8" or len(wshape) != 2:
            out.append(Finding("tensors", cp.where(q.weight), f"NVFP4 packed weight must be U8 [N, K/2], has dtype "
                                                             f"{r.dtype_str(q.weight)} shape {list(wshape)}"))
            return
        N, K = wshape[0], 2 * wshape[1]
        q.shape = (N, K)
        if K % BLOCK_SIZE:
            out.append(Finding("tensors", cp.where(q.weight), f"K = {K} is not a multiple of {BLOCK_SIZE} (vLLM and "
                                                             "SGLang refuse NVFP4 Linears whose input size is not)"))
        if q.block_scale is None:
            out.append(Finding("tensors", q.name, f"NVFP4 Linear without its block scales ({q.name}.weight_scale)"))
        else:
            bdt, bshape = r.dtype_str(q.block_scale), r.shape(q.block_scale)
            if bdt != "F8_E4M3" or tuple(bshape) != (N, K // BLOCK_SIZE):
                out.append(Finding("tensors", cp.where(q.block_scale),
                                   f"block scales must be F8_E4M3 [{N}, {K // BLOCK_SIZE}] (one per {BLOCK_SIZE} "
                                   f"of the packed weight's {K} columns), has dtype {bdt} shape {list(bshape)}"))
                q.block_scale = None
        if q.global_scale is None:
            out.append(Finding("tensors", q.name, f"NVFP4 Linear without its global scale ({q.name}.{gname})"))
        elif not _one_f32(cp, q.global_scale, out):
            q.global_scale = None
    else:  # fp8
        wshape = r.shape(q.weight)
        if len(wshape) != 2:
            out.append(Finding("tensors", cp.where(q.weight), f"FP8 weight must be 2-dim [N, K], has shape {list(wshape)}"))
            return
        q.shape = (wshape[0], wshape[1])
        if not _one_f32(cp, q.global_scale, out):
            q.global_scale = None
    if q.input_scale is not None and not _one_f32(cp, q.input_scale, out):
        q.input_scale = None


# ============================================================================= configs


def _declared_kv(parse, value, file: str, out: list[Finding]) -> str | None:
    """The KV-cache format a config field of ``file`` declares (:mod:`.kv_cache` reads it), or a finding."""
    try:
        return parse(value, "checkpoint")
    except CheckpointError as e:
        out.append(Finding("config", file, str(e)))
        return None


def _modelopt_config(d: Path, config: dict, hf: dict | None, out: list[Finding]) -> dict | None:
    """The parsed modelopt facts (algo, exclusions, kv, layers), with the config findings."""
    hfq = mo.HF_QUANT_CONFIG  # names relative to the checkpoint (the message names it)
    qc = config.get("quantization_config")
    q = (hf or {}).get("quantization") if hf is not None else None
    if hf is None:
        out.append(Finding("config", hfq, "missing (SGLang's modelopt loaders read this nested form; older releases "
                                          "read nothing else)"))
    elif not isinstance(q, dict):
        out.append(Finding("config", hfq, "has no 'quantization' object"))
        q = None
    if not isinstance(qc, dict):
        out.append(Finding("config", CONFIG_NAME, "has no quantization_config: vLLM and SGLang read it first and "
                                                  "fall back to hf_quant_config.json (transformers reads only config.json)",
                           WARNING))
        qc = None
    elif qc.get("quant_method") != mo.QUANT_METHOD:
        out.append(Finding("config", f"{CONFIG_NAME} quantization_config",
                           f"quant_method is {qc.get('quant_method')!r}, expected {mo.QUANT_METHOD!r}"))
    if q is None and qc is None:
        return None
    if q is not None:
        nvfp4 = "NVFP4" in str(q.get("quant_algo")).upper()
        missing = [f for f in ("quant_algo", *(MODELOPT_REQUIRED if nvfp4 else ())) if f not in q]
        if missing:
            out.append(Finding("config", hfq, f"'quantization' lacks {missing} (vLLM's NVFP4 config requires "
                                                   f"group_size, kv_cache_quant_algo and exclude_modules)"))
    src = q if q is not None else {}
    algo = src.get("quant_algo") if q is not None else qc.get("quant_algo")
    excl = list(src.get("exclude_modules") or []) if q is not None else list(qc.get("ignore") or [])
    kv_c = None if qc is None else _declared_kv(kvc.kv_format_of_modelopt_scheme, qc.get("kv_cache_scheme"), CONFIG_NAME, out)
    kv = _declared_kv(kvc.kv_format_of_modelopt_algo, src.get("kv_cache_quant_algo"), hfq, out) \
        if q is not None else kv_c
    layers = (src.get("quantized_layers") if q is not None else qc.get("quantized_layers")) or {}
    if q is not None and qc is not None:
        where = f"{hfq} vs {CONFIG_NAME} quantization_config"
        if str(qc.get("quant_algo")).upper() != str(algo).upper():
            out.append(Finding("config", where, f"quant_algo {algo!r} vs {qc.get('quant_algo')!r}"))
        if set(excl) != set(qc.get("ignore") or []):
            diff = sorted(set(excl) ^ set(qc.get("ignore") or []))
            out.append(Finding("config", where, f"exclude_modules and ignore differ in {diff[:5]}"
                                                 + (" ..." if len(diff) > 5 else "")))
        if kv != kv_c:
            out.append(Finding("config", where, f"kv_cache_quant_algo {src.get('kv_cache_quant_algo')!r} vs "
                                                 f"kv_cache_scheme {qc.get('kv_cache_scheme')!r}"))
        if (qc.get("quantized_layers") or {}) != (src.get("quantized_layers") or {}):
            out.append(Finding("config", where, "quantized_layers differ"))
    sizes = set()
    if q is not None and isinstance(q.get("group_size"), int):
        sizes.add(q["group_size"])
    for g in ((qc or {}).get("config_groups") or {}).values():
        for sub in (g or {}).values():
            if isinstance(sub, dict) and isinstance(sub.get("group_size"), int):
                sizes.add(sub["group_size"])
    if len(sizes) > 1:
        out.append(Finding("config", "configs", f"inconsistent group_size values {sorted(sizes)} (SGLang refuses them)"))
    elif sizes and sizes != {BLOCK_SIZE}:
        out.append(Finding("config", "configs", f"group_size {sizes.pop()} (NVFP4 uses {BLOCK_SIZE})"))
    if str(algo).upper() not in MODELOPT_ALGOS_VLLM:
        out.append(Finding("config", "configs", f"quant_algo {algo!r} is not one vLLM's modelopt loader knows "
                                              f"({', '.join(MODELOPT_ALGOS_VLLM)})"))
    elif str(algo).upper() not in MODELOPT_ALGOS_SGLANG:
        out.append(Finding("engine", hfq, f"SGLang's modelopt loader takes quant_algo FP8 or NVFP4 only, not {algo}",
                           WARNING))
    return {"algo": str(algo).upper(), "exclude": excl, "kv": kv, "layers": layers}


def _ct_args_problem(args, nvfp4: bool) -> str | None:
    if not isinstance(args, dict):
        return "missing"
    if nvfp4:
        want = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": BLOCK_SIZE, "symmetric": True}
    else:
        want = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}
    bad = {k: args.get(k) for k, v in want.items() if args.get(k) != v}
    return f"{bad} (expected {want})" if bad else None


def _ct_config(d: Path, config: dict, hf: dict | None, out: list[Finding]) -> dict | None:
    qc = config.get("quantization_config") or {}
    where = f"{CONFIG_NAME} quantization_config"
    if hf is not None:
        out.append(Finding("config", mo.HF_QUANT_CONFIG, "a compressed-tensors checkpoint with a modelopt "
                                                         "hf_quant_config.json: loaders that read it take the wrong format"))
    fmt = qc.get("format")
    if fmt not in ct.KNOWN_FORMATS:
        out.append(Finding("config", where, f"format {fmt!r} (expected one of {', '.join(ct.KNOWN_FORMATS)})"))
    groups = {}
    for gname, g in (qc.get("config_groups") or {}).items():
        g = g or {}
        gfmt = g.get("format") or fmt
        nvfp4 = gfmt == ct.NVFP4_FORMAT or (g.get("weights") or {}).get("num_bits") == 4
        prob = _ct_args_problem(g.get("weights"), nvfp4)
        if prob:
            out.append(Finding("config", f"{where} config_groups.{gname}.weights", prob))
        acts = g.get("input_activations")
        if acts:
            prob = _ct_args_problem(acts, nvfp4)
            if prob:
                out.append(Finding("config", f"{where} config_groups.{gname}.input_activations", prob))
        if not g.get("targets"):
            out.append(Finding("config", f"{where} config_groups.{gname}", "has no targets"))
        groups[gname] = {"kind": "nvfp4" if nvfp4 else "fp8", "targets": list(g.get("targets") or []),
                         "input": bool(acts) and not (acts.get("dynamic") is True)}
    if not groups:
        out.append(Finding("config", where, "has no config_groups"))
    kvs = qc.get("kv_cache_scheme")
    kv = _declared_kv(kvc.kv_format_of_ct_scheme, kvs, CONFIG_NAME, out)
    if kv is not None and (kvs.get("strategy") != "tensor" or kvs.get("symmetric") is not True):
        out.append(Finding("config", f"{where} kv_cache_scheme", f"{kvs} (vLLM loads per-tensor symmetric KV "
                                                                 "scales only: strategy tensor, symmetric true)"))
    return {"algo": fmt, "exclude": list(qc.get("ignore") or []), "kv": kv, "groups": groups}


# ============================================================================= matching


def _mo_excluded(name: str, patterns) -> str | None:
    """The modelopt exclusion that keeps ``name`` in high precision in vLLM (fnmatch, or substring)."""
    for p in patterns:
        if fnmatchcase(name, p) or p in name:
            return p
    return None


def _ct_matches(name: str, entry: str) -> bool:
    return re.match(entry[3:], name) is not None if entry.startswith("re:") else entry == name


def _ct_excluded(name: str, entries) -> str | None:
    for e in entries:
        if _ct_matches(name, e):
            return e
    return None


def _ct_group(name: str, groups: dict) -> str | None:
    for gname, g in groups.items():
        if any(t != "Linear" and _ct_matches(name, t) for t in g["targets"]):
            return gname
    for gname, g in groups.items():
        if "Linear" in g["targets"]:
            return gname
    return None


def _ties_embeddings(config: dict) -> bool:
    """Whether the config ties the output head to the embedding (transformers' default when absent)."""
    flags = [c["tie_word_embeddings"] for c in (config, *config.values())
             if isinstance(c, dict) and "tie_word_embeddings" in c]
    return any(flags) if flags else True


# ============================================================================= the rules


def _values(cp: _Checkpoint, fmt: str, lin: dict[str, _Linear], out: list[Finding]) -> dict[str, float]:
    """Scalar scale values by tensor name, with the ``scales`` findings."""
    r = cp.reader
    vals: dict[str, float] = {}
    for q in lin.values():
        if q.kind == "bf16":
            continue
        for role, name in (("global", q.global_scale), ("input", q.input_scale)):
            if name is None:
                continue
            v = float(r.get(name).float().reshape(-1)[0])
            vals[name] = v
            if not math.isfinite(v) or v < 0:
                out.append(Finding("scales", cp.where(name), f"is {v} (a scale must be finite and non-negative)"))
            elif v == 0 and role == "input":
                out.append(Finding("scales", cp.where(name), "is 0: the engines divide by the activation scale "
                                                             "(an input that was never calibrated?)"))
            elif v == 0 and (q.kind == "fp8" or fmt == ct.FORMAT):
                out.append(Finding("scales", cp.where(name), "is 0: the engines divide by this scale"))
        if q.kind == "nvfp4" and q.block_scale is not None:
            codes = r.get(q.block_scale).view(torch.uint8)
            nan = int(((codes & 0x7F) == 0x7F).sum())
            neg = int((codes > 0x80).sum())
            if nan or neg:
                out.append(Finding("scales", cp.where(q.block_scale), f"{nan} NaN and {neg} negative block scale(s)"))
            g = vals.get(q.global_scale) if q.global_scale else None
            if fmt == mo.FORMAT and g == 0 and bool(((codes & 0x7F) != 0).any()):
                out.append(Finding("scales", cp.where(q.global_scale), "is 0 while block scales are not: the weight "
                                                                       "would serve as all zeros"))
    return vals


def _scheme_rules(cp: _Checkpoint, fmt: str, facts: dict, lin: dict[str, _Linear], out: list[Finding]) -> None:
    quantized = {n: q for n, q in lin.items() if q.kind != "bf16"}
    if fmt == mo.FORMAT:
        algo, layers = facts["algo"], facts["layers"]
        for n, q in quantized.items():
            want = (layers.get(n) or {}).get("quant_algo") if algo == mo.MIXED else algo
            if algo == mo.MIXED and n not in layers:
                out.append(Finding("scheme", n, "quantized but not listed in quantized_layers (MIXED_PRECISION)"))
                continue
            want = str(want).upper()
            if q.kind == "nvfp4" and "NVFP4" not in want or q.kind == "fp8" and want != "FP8":
                out.append(Finding("scheme", cp.where(q.weight), f"is {q.kind.upper()} but the config says {want}"))
            elif want in ("NVFP4", "FP8") and q.input_scale is None:
                out.append(Finding("scheme", n, f"quant_algo {want} quantizes activations with a static scale, but "
                                                f"{n}.{mo.INPUT_SCALE} is missing (the engines would use an "
                                                "uninitialised scale)"))
        for n in layers if algo == mo.MIXED else ():
            if n not in quantized:
                out.append(Finding("scheme", n, "listed in quantized_layers but has no quantized tensors"))
    else:
        groups = facts["groups"]
        for n, q in quantized.items():
            gname = _ct_group(n, groups)
            if gname is None:
                out.append(Finding("scheme", n, "quantized but no config group targets it"))
                continue
            g = groups[gname]
            if g["kind"] != q.kind:
                out.append(Finding("scheme", cp.where(q.weight), f"is {q.kind.upper()} but its config group {gname} "
                                                                f"is {g['kind'].upper()}"))
            elif g["input"] and q.input_scale is None:
                need = ct.INPUT_GLOBAL_SCALE if q.kind == "nvfp4" else ct.INPUT_SCALE
                out.append(Finding("scheme", n, f"config group {gname} quantizes activations statically but "
                                                f"{n}.{need} is missing"))
            elif not g["input"] and q.input_scale is not None:
                out.append(Finding("scheme", cp.where(q.input_scale), f"config group {gname} does not quantize "
                                                                     "activations; this input scale would be ignored"))


def _fused_rules(cp: _Checkpoint, lin: dict[str, _Linear], vals: dict[str, float], out: list[Finding]) -> None:
    for group in fused_groups(lin):
        schemes = {lin[n].scheme for n in group}
        if len(schemes) > 1:
            out.append(Finding("fused", group[0].rpartition(".")[0],
                               "fused Linears of different precision: " + ", ".join(f"{n}={lin[n].scheme}" for n in group)
                               + " (the engines need one precision per fused layer)"))
            continue
        if lin[group[0]].kind != "nvfp4":
            continue
        for role in ("global_scale", "input_scale"):
            names = [getattr(lin[n], role) for n in group]
            if any(x is None or x not in vals for x in names):
                continue
            if len({vals[x] for x in names}) > 1:
                out.append(Finding("fused", names[0], "not shared by the Linears the engines fuse: "
                                   + ", ".join(f"{x}={vals[x]:.9g}" for x in names)
                                   + " (vLLM and SGLang keep one value for the fused GEMM and do not re-quantize "
                                     "the block scales; quantize the group with a shared amax)"))


def _expert_rules(cp: _Checkpoint, lin: dict[str, _Linear], out: list[Finding]) -> None:
    families: dict[str, list[str]] = {}
    for n in lin:
        if is_expert(n):
            families.setdefault(expert_family(n), []).append(n)
    lists: dict[str, dict[str, set[str]]] = {}  # experts list -> family -> indices
    for fam, names in families.items():
        schemes = {}
        for n in names:
            schemes.setdefault(lin[n].scheme, []).append(n)
        if len(schemes) > 1:
            parts = "; ".join(f"{s}: {len(v)} (e.g. {v[0]})" for s, v in sorted(schemes.items()))
            out.append(Finding("experts", fam, f"experts of one layer in different precisions ({parts}); the engines "
                                               "quantize an MoE layer as one fused layer"))
        pos = fam.split(".").index("*")
        prefix = ".".join(fam.split(".")[:pos])
        lists.setdefault(prefix, {})[fam] = {n.split(".")[pos] for n in names}
    for prefix, fams in lists.items():
        every = set().union(*fams.values())
        idx = sorted(int(i) for i in every if i.isdigit())
        gaps = sorted(set(range(idx[-1] + 1)) - set(idx)) if idx else []
        if gaps:
            out.append(Finding("experts", prefix, f"experts {gaps[:8]} are missing (the engines allocate experts "
                                                  f"0..{idx[-1]} and would leave them uninitialised)"))
        for fam, have in fams.items():
            lacking = sorted(every - have, key=lambda s: (len(s), s))
            if lacking:
                out.append(Finding("experts", fam, f"experts {lacking[:8]} of {prefix} lack this projection"))


def _exclusion_rules(cp: _Checkpoint, fmt: str, facts: dict, config: dict, lin: dict[str, _Linear],
                     out: list[Finding]) -> None:
    patterns = facts["exclude"]
    excluded = _mo_excluded if fmt == mo.FORMAT else _ct_excluded
    tied = _ties_embeddings(config)  # the engines share the embedding's weight: the head is no Linear of its own
    names = sorted(cp.all_modules | ({HEAD} if tied else set()))
    for p in patterns:
        if fmt == mo.FORMAT:
            hit = any(fnmatchcase(m, p) for m in names)
        else:
            hit = any(_ct_matches(m, p) for m in names)
        if not hit:
            out.append(Finding("exclusions", repr(p), "exclusion that matches no module of the checkpoint "
                                                      "(a typo keeps the module it meant quantized)"))
    for n, q in lin.items():
        if q.kind == "bf16":
            continue
        p = excluded(n, patterns)
        if p is not None:
            rule = "lm_head" if n.rpartition(".")[2] == HEAD else "exclusions"
            out.append(Finding(rule, n, f"quantized ({q.kind}) but the exclusion {p!r} matches it: the engines would "
                                        "load it as a high-precision Linear"))
    targets_all = (fmt == mo.FORMAT and facts["algo"] != mo.MIXED) or (
        fmt == ct.FORMAT and any("Linear" in g["targets"] for g in facts["groups"].values()))
    if not targets_all:
        return
    q_leaves = {n.rpartition(".")[2] for n, q in lin.items() if q.kind != "bf16"}
    fused_leaves = {n.rpartition(".")[2] for g in fused_groups(lin) for n in g}
    for n, q in lin.items():
        if q.kind != "bf16":
            continue
        leaf = n.rpartition(".")[2]
        if not (leaf == HEAD or leaf in q_leaves or leaf in fused_leaves or is_expert(n)):
            continue  # not known to be a Linear (an embedding, a norm...)
        if leaf == HEAD and tied:
            continue
        if excluded(n, patterns) is None:
            rule = "lm_head" if leaf == HEAD else "exclusions"
            out.append(Finding(rule, n, "a high-precision Linear that no exclusion / ignore entry names: the engines "
                                        "would allocate quantized parameters for it"))


def _kv_rules(cp: _Checkpoint, fmt: str, facts: dict, out: list[Finding]) -> None:
    kv = facts["kv"]
    attns = sorted(m for m in cp.all_modules if f"{m}.k_proj" in cp.all_modules and f"{m}.v_proj" in cp.all_modules)
    scale_leaves = {"k_scale", "v_scale"}
    present = {f"{m}.{leaf}" for m, leaves in cp.modules.items() for leaf in leaves if leaf in scale_leaves}
    if kv is None:
        if present:
            out.append(Finding("kv", sorted(present)[0], f"{len(present)} KV-cache scale tensor(s) but the config "
                                                        "declares no quantized KV cache (the engines ignore them)",
                               WARNING))
        return
    expected: set[str] = set()
    for a in attns:
        try:
            names = kv_scale_names(fmt, a, kv)
        except CheckpointError as e:
            out.append(Finding("kv", "configs", str(e)))
            return
        for x in names:
            expected.add(x)
            if x not in cp.reader and matches_any(a, DEFAULT_EXCLUDE):
                # e.g. an MTP layer: not part of the model nvfp4kit calibrates and evaluates; engines that run it
                # (speculative decoding) fall back to a KV scale of 1.0
                out.append(Finding("kv", x, f"missing: {a} is an attention outside the calibrated model "
                                            "(a default exclusion); engines use a KV scale of 1.0 there", WARNING))
            elif x not in cp.reader:
                out.append(Finding("kv", x, f"missing: the config declares a {kv} KV cache and {a} is an attention"))
            elif _one_f32(cp, x, out, "kv"):
                v = float(cp.reader.get(x).float().reshape(-1)[0])
                if not (math.isfinite(v) and v > 0):
                    out.append(Finding("kv", cp.where(x), f"is {v}; vLLM treats a non-positive KV scale as absent "
                                                          "and uses 1.0"))
    for x in sorted(present - expected):
        out.append(Finding("kv", cp.where(x), f"KV-cache scale at a name the {fmt} format does not use for any "
                                              "attention of the checkpoint"))
    if not attns:
        out.append(Finding("kv", "configs", f"the config declares a {kv} KV cache but the checkpoint has no "
                                                     "attention (no module with k_proj and v_proj)", WARNING))


def _engine_notes(lin: dict[str, _Linear], out: list[Finding]) -> None:
    for n, q in lin.items():
        if q.kind == "nvfp4" and is_expert(n) and q.shape and (q.shape[1] // BLOCK_SIZE) % 16:
            out.append(Finding("engine", n, f"SGLang's NVFP4 MoE asserts block-scale columns (K/16 = "
                                            f"{q.shape[1] // BLOCK_SIZE}) divisible by 16", WARNING))
            return  # once is enough


# ============================================================================= entry points


def check_serving(path) -> list[Finding]:
    """Every :class:`Finding` of the checkpoint folder ``path`` against vLLM's and SGLang's NVFP4 / FP8
    loaders (see the module docs); an empty list for a checkpoint that passes. An unquantized
    checkpoint passes unless its tensors look quantized."""
    d = Path(path)
    out: list[Finding] = []
    try:
        reader = CheckpointReader(d, max_open_files=1)
    except CheckpointError as e:
        return [Finding("tensors", str(d), str(e))]
    with reader:
        try:
            config = read_json(d / CONFIG_NAME, "config") if (d / CONFIG_NAME).exists() else {}
            hf = reader.json(mo.HF_QUANT_CONFIG)
        except CheckpointError as e:
            return [Finding("config", str(d), str(e))]
        cp = _Checkpoint(reader)
        qc = config.get("quantization_config")
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if hf is not None or method == mo.QUANT_METHOD:
            fmt = mo.FORMAT
            facts = _modelopt_config(d, config, hf, out)
        elif method == ct.QUANT_METHOD:
            fmt = ct.FORMAT
            facts = _ct_config(d, config, hf, out)
        elif qc:
            return [Finding("config", CONFIG_NAME, f"quantization_config with quant_method {method!r}: "
                                                            "not a format nvfp4kit checks (modelopt, compressed-tensors)")]
        else:
            marked = undeclared_quantized_tensors(reader)
            if marked:
                return [Finding("config", "configs", f"{len(marked)} quantized tensor(s) (e.g. {marked[0]}) but no "
                                                  "quantization config: engines would load packed bytes as weights")]
            return []
        if facts is None:
            return out
        lin = _linears(cp, fmt, out)
        vals = _values(cp, fmt, lin, out)
        _scheme_rules(cp, fmt, facts, lin, out)
        _fused_rules(cp, lin, vals, out)
        _expert_rules(cp, lin, out)
        _exclusion_rules(cp, fmt, facts, config, lin, out)
        _kv_rules(cp, fmt, facts, out)
        _engine_notes(lin, out)
    return out


def check_plan(fmt: str, schemes) -> None:
    """Refuse, before any work, per-Linear schemes (:mod:`.layout` names) that :func:`check_serving`
    would refuse in the finished checkpoint of format ``fmt`` (``"modelopt"`` or
    ``"compressed-tensors"``): weight-only FP8 in the modelopt format (its FP8 linear method always
    applies a static ``input_scale``)."""
    if fmt == mo.FORMAT and FP8_W8A16 in set(schemes):
        raise CheckpointError("weight-only FP8 cannot be written in the modelopt format: vLLM's and SGLang's modelopt "
                              "FP8 loaders always apply a static input_scale (absent, it stays at float32 min); write "
                              "it as compressed-tensors (format='compressed-tensors', --to compressed-tensors), "
                              "which vLLM serves as W8A16")


def errors(findings, *, strict_fused: bool = True) -> list[Finding]:
    """The findings that fail a checkpoint (``strict_fused=False``: unshared fused scales do not)."""
    return [f for f in findings if f.severity == ERROR and (strict_fused or f.rule != "fused")]


def verify_serving(path, *, strict_fused: bool = True, what: str | None = None, limit: int = 25) -> list[Finding]:
    """Raise :class:`CheckpointError` listing every error :func:`check_serving` finds in ``path``
    (``what``: the name the message gives the checkpoint); returns the other findings (warnings)."""
    findings = check_serving(path)
    bad = errors(findings, strict_fused=strict_fused)
    if bad:
        lines = [f"  - {f}" for f in bad[:limit]] + ([f"  ... and {len(bad) - limit} more"] if len(bad) > limit else [])
        raise CheckpointError(f"checkpoint {what or path} would not serve correctly in vLLM / SGLang "
                              f"({len(bad)} problem(s)); it was not written:\n" + "\n".join(lines))
    return [f for f in findings if f not in bad]


__all__ = ["Finding", "RULES", "check_plan", "check_serving", "errors", "kv_scale_names", "verify_serving"]
