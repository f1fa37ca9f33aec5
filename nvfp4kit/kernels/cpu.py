"""The "compiled" CPU backend: NVFP4 quantization as one small C kernel, bit-identical to the reference.

The reference (:func:`nvfp4kit.formats.nvfp4.quantize_parts`) runs a dozen whole-tensor torch ops
(and a full NaN/inf scan); this backend reads the input twice (once when a ``global_amax`` is
given for 1x16 blocks: pass 1 is folded into pass 2) and writes the outputs once:

1. *block amax pass*: per 16 elements, the largest ``|x|``, taken as an unsigned integer max over
   the float bit patterns with the sign bit cleared. For non-negative floats the integer order is
   the float order, and NaN/inf patterns sort above every finite value, so the same pass finds the
   tensor amax and detects non-finite input (the reference's error is then raised by
   :func:`~nvfp4kit.formats.nvfp4.check_quantizable` itself).
2. *encode pass*: per block, ``s_b = e4m3_rtne(min(block_amax * (S_enc * 1/6), 448))``; the block's
   multiplier into the E2M1 grid comes from a 128-entry table ``min(1 / (fp32(s_b) * S_dec), FLT_MAX)``
   computed by the reference's own function; then ``|x| * enc`` against the seven E2M1 decision
   points, the sign bit of ``x``, and nibble packing (element 2i in the low nibble).

Why it is exact: the kernel does only single IEEE-754 float32 multiplications and comparisons
(no division, no sums), compiled without fast-math and with ``-ffp-contract=off``; the FP32 -> E4M3
rounding is integer arithmetic (round to nearest even on the mantissa bits, a power-of-two
multiply and an exact remainder in the subnormal range). The per-tensor scalars and the
multiplier table come from :mod:`nvfp4kit.formats.scales`. ``tests/test_kernels_cpu.py`` checks
the parts bit for bit against the reference over random and adversarial inputs.

What runs where:

* ``scale_rule="max"`` with ``rounding="nearest"`` or ``"stochastic"``, float32 / bfloat16 input:
  the kernel reads the input directly; float16 and float64 input is first cast to float32 in
  torch, as the reference does (float64 also gets the reference's "beyond the float32 range"
  check). Stochastic rounding takes the reference's single ``torch.rand`` draw over the blocked
  shape ``[..., K/16, 16]`` from the same generator, so a seeded generator gives the same codes.
* ``scale_rule="4over6"`` (its per-block error sums would have to follow torch's reduction
  order), empty tensors, other float dtypes, tensor subclasses other than ``nn.Parameter`` and
  calls made while ``torch.compile`` traces: delegated to the reference (same result by definition).
* 16x16 blocks: the tile amax is the max of the 16 rows' block amaxes (a small in-place step on
  the ``[..., M, K/16]`` block amax), then the same encode pass.

Build: the C source below is compiled once per machine with the system C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``) into ``$NVFP4KIT_CACHE_DIR`` (default ``~/.cache/nvfp4kit``), keyed
by a hash of the source, the compiler and the CPU, and loaded with :mod:`ctypes`; later processes
only load it. Without a working compiler :func:`available` says why (logged once through
:mod:`nvfp4kit.progress`) and the dispatch's ``auto`` uses the reference.

Threads: the blocks are split over ``torch.get_num_threads()`` Python threads (a ctypes call
releases the GIL); tensors under :data:`PARALLEL_MIN_BLOCKS` blocks run on the calling thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import progress
from ..formats.nvfp4 import (
    BLOCK_1D,
    BLOCK_2D,
    BLOCK_SIZE,
    NVFP4Parts,
    _as_amax,
    check_quantizable,
)
from ..formats.nvfp4 import quantize_parts as reference_quantize_parts
from ..formats.scales import (
    _INV_E2M1_MAX,
    FP32_MAX,
    NVFP4_RANGE,
    decode_from_encode,
    global_encode_scale,
    nvfp4_block_encode_scale,
)

# Below this many 16-element blocks one thread does the whole tensor (thread hand-off costs more).
PARALLEL_MIN_BLOCKS = 1 << 14

_FP32_INF_BITS = 0x7F800000

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* Exactness rules for this file: single IEEE float32/float64 operations whose results equal the
   reference's, in the reference's order (the quantizer: no division, sums only of small dyadic
   values, which are exact; GPTQ: the reference's own divisions and its fixed summation order), no
   fused multiply-add (built with -ffp-contract=off), no fast-math. */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Pass 1: out[b] = max |x| over block b, as an integer max of the float bits with the sign
   cleared (NaN and inf sort above all finite values). Returns the max over all blocks. */
uint32_t nvfp4_block_amax_f32(const uint32_t *x, int64_t nb, float *out) {
    uint32_t all = 0;
    for (int64_t b = 0; b < nb; b++) {
        const uint32_t *p = x + b * 16;
        uint32_t m = 0;
        for (int j = 0; j < 16; j++) { uint32_t a = p[j] & 0x7FFFFFFFu; m = a > m ? a : m; }
        out[b] = u2f(m);
        all = m > all ? m : all;
    }
    return all;
}

uint32_t nvfp4_block_amax_bf16(const uint16_t *x, int64_t nb, float *out) {
    uint32_t all = 0;
    for (int64_t b = 0; b < nb; b++) {
        const uint16_t *p = x + b * 16;
        uint32_t m = 0;
        for (int j = 0; j < 16; j++) { uint32_t a = p[j] & 0x7FFFu; m = a > m ? a : m; }
        m <<= 16;
        out[b] = u2f(m);
        all = m > all ? m : all;
    }
    return all;
}

/* float32 in [0, 448] -> float8_e4m3fn bits, round to nearest, ties to even. */
static inline uint32_t e4m3_rtne(float v) {
    uint32_t u = f2u(v);
    if (u < 0x3C800000u) {             /* below 2^-6: the subnormal grid, step 2^-9 */
        float q = v * 512.0f;          /* exact: a power-of-two scaling, q < 8 */
        uint32_t i = (uint32_t)q;      /* floor */
        float rem = q - (float)i;      /* exact */
        i += (rem > 0.5f) | ((rem == 0.5f) & (i & 1u));
        return i;                      /* 8 is 2^-6, the first normal, same bits */
    }
    /* normal: keep 3 of 23 mantissa bits, ties to even; a carry bumps the exponent */
    uint32_t r = u + 0x7FFFFu + ((u >> 20) & 1u);
    return (r >> 20) - (120u << 3);    /* rebias the exponent from 127 to 7 */
}

/* E2M1 code of one element: magnitude by the RTNE decision points, sign bit of x. */
static inline uint32_t e2m1_code(uint32_t bits, float enc) {
    float a = u2f(bits & 0x7FFFFFFFu) * enc;
    uint32_t m = (uint32_t)(a > 0.25f) + (uint32_t)(a >= 0.75f) + (uint32_t)(a > 1.25f)
               + (uint32_t)(a >= 1.75f) + (uint32_t)(a > 2.5f) + (uint32_t)(a >= 3.5f)
               + (uint32_t)(a > 5.0f);
    return m | ((bits >> 31) << 3);
}

/* Stochastic rounding, the reference's steps: a = min(|v|, 6); lower = the largest grid value
   <= a (index lo); frac = (a - lower) / gap; round up when the uniform draw u < frac. Every step
   is exact: a - lower by Sterbenz' lemma, and the gaps (0.5, 1, 2) are powers of two, so dividing
   and multiplying by the reciprocal give the same float. Branch-free so that it vectorizes. */
static inline uint32_t e2m1_code_sr(uint32_t bits, float enc, float u) {
    float a = u2f(bits & 0x7FFFFFFFu) * enc;
    a = a < 6.0f ? a : 6.0f;
    uint32_t lo = (uint32_t)(a >= 0.5f) + (uint32_t)(a >= 1.0f) + (uint32_t)(a >= 1.5f)
                + (uint32_t)(a >= 2.0f) + (uint32_t)(a >= 3.0f) + (uint32_t)(a >= 4.0f)
                + (uint32_t)(a >= 6.0f);
    float lower = (a >= 0.5f ? 0.5f : 0.0f) + (a >= 1.0f ? 0.5f : 0.0f) + (a >= 1.5f ? 0.5f : 0.0f)
                + (a >= 2.0f ? 0.5f : 0.0f) + (a >= 3.0f ? 1.0f : 0.0f) + (a >= 4.0f ? 1.0f : 0.0f)
                + (a >= 6.0f ? 2.0f : 0.0f);
    float inv_gap = a < 2.0f ? 2.0f : (a < 4.0f ? 1.0f : (a < 6.0f ? 0.5f : 0.0f));
    float frac = (a - lower) * inv_gap;   /* 0 at a == 6: no grid value above */
    return (lo + (uint32_t)(u < frac)) | ((bits >> 31) << 3);
}

#define CODE_NEAREST(bits, enc, i) e2m1_code(bits, enc)
#define CODE_STOCHASTIC(bits, enc, i) e2m1_code_sr(bits, enc, uniform[i])

#define NVFP4_ENCODE(LOAD, CODE)                                                      \
    for (int64_t b = 0; b < nb; b++) {                                                \
        float v = block_amax[b] * factor;                                             \
        v = v < 448.0f ? v : 448.0f;                                                  \
        uint32_t s = e4m3_rtne(v);                                                    \
        scale[b] = (uint8_t)s;                                                        \
        float enc = enc_table[s];                                                     \
        uint32_t c[16];                                                               \
        for (int j = 0; j < 16; j++) c[j] = CODE(LOAD(b * 16 + j), enc, b * 16 + j);  \
        /* two codes a byte, element 2k in the low nibble */                          \
        for (int k = 0; k < 8; k++) packed[b * 8 + k] = (uint8_t)(c[2 * k] | (c[2 * k + 1] << 4)); \
    }

#define LOAD_F32(i) (x[i])
#define LOAD_BF16(i) ((uint32_t)x[i] << 16)

/* Pass 2: block scales and packed codes of nb blocks. */
void nvfp4_encode_f32(const uint32_t *x, const float *block_amax, int64_t nb, float factor,
                      const float *enc_table, uint8_t *packed, uint8_t *scale) {
    NVFP4_ENCODE(LOAD_F32, CODE_NEAREST)
}

void nvfp4_encode_bf16(const uint16_t *x, const float *block_amax, int64_t nb, float factor,
                       const float *enc_table, uint8_t *packed, uint8_t *scale) {
    NVFP4_ENCODE(LOAD_BF16, CODE_NEAREST)
}

/* The same with stochastic rounding, one uniform draw per element. */
void nvfp4_encode_sr_f32(const uint32_t *x, const float *block_amax, int64_t nb, float factor,
                         const float *enc_table, uint8_t *packed, uint8_t *scale, const float *uniform) {
    NVFP4_ENCODE(LOAD_F32, CODE_STOCHASTIC)
}

void nvfp4_encode_sr_bf16(const uint16_t *x, const float *block_amax, int64_t nb, float factor,
                          const float *enc_table, uint8_t *packed, uint8_t *scale, const float *uniform) {
    NVFP4_ENCODE(LOAD_BF16, CODE_STOCHASTIC)
}

/* One pass for a given tensor amax (1x16 blocks, nearest rounding): both steps run chunk by
   chunk, so the input is read from memory once and the second read hits the cache. Returns the
   largest |x| bit pattern so that the caller can reject NaN/inf afterwards (NaN/inf blocks get
   scale 448 meanwhile: v < 448 is false for them). */
#define ONE_PASS_CHUNK 256

uint32_t nvfp4_encode_one_pass_f32(const uint32_t *x, int64_t nb, float factor, const float *enc_table,
                                   uint8_t *packed, uint8_t *scale) {
    float tmp[ONE_PASS_CHUNK];
    uint32_t all = 0;
    for (int64_t b = 0; b < nb; b += ONE_PASS_CHUNK) {
        int64_t n = nb - b < ONE_PASS_CHUNK ? nb - b : ONE_PASS_CHUNK;
        uint32_t m = nvfp4_block_amax_f32(x + b * 16, n, tmp);
        all = m > all ? m : all;
        nvfp4_encode_f32(x + b * 16, tmp, n, factor, enc_table, packed + b * 8, scale + b);
    }
    return all;
}

uint32_t nvfp4_encode_one_pass_bf16(const uint16_t *x, int64_t nb, float factor, const float *enc_table,
                                    uint8_t *packed, uint8_t *scale) {
    float tmp[ONE_PASS_CHUNK];
    uint32_t all = 0;
    for (int64_t b = 0; b < nb; b += ONE_PASS_CHUNK) {
        int64_t n = nb - b < ONE_PASS_CHUNK ? nb - b : ONE_PASS_CHUNK;
        uint32_t m = nvfp4_block_amax_bf16(x + b * 16, n, tmp);
        all = m > all ? m : all;
        nvfp4_encode_bf16(x + b * 16, tmp, n, factor, enc_table, packed + b * 8, scale + b);
    }
    return all;
}

/* 16x16 blocks: in place, each row's block amax [n_mat][M][KB] becomes the amax of its 16-row
   tile (a partial last tile takes the rows it has). Values are finite and non-negative here. */
void nvfp4_tile_amax(float *a, int64_t n_mat, int64_t M, int64_t KB) {
    for (int64_t l = 0; l < n_mat; l++) {
        float *mat = a + l * M * KB;
        for (int64_t r0 = 0; r0 < M; r0 += 16) {
            int64_t r1 = M - r0 < 16 ? M : r0 + 16;
            float *first = mat + r0 * KB;
            for (int64_t r = r0 + 1; r < r1; r++) {
                const float *row = mat + r * KB;
                for (int64_t k = 0; k < KB; k++) first[k] = row[k] > first[k] ? row[k] : first[k];
            }
            for (int64_t r = r0 + 1; r < r1; r++) memcpy(mat + r * KB, first, (size_t)KB * sizeof(float));
        }
    }
}

/* GPTQ on NVFP4 1x16 blocks, one lazy block of L columns (a multiple of 16) for rows [r0, r1):
   the per-column loop of calibrate/weight_scales.py's reference, operation for operation. Rows
   are independent, so each row runs its whole lazy block in cache. Per 16-column group: the
   block scale from the error-updated weights (max rule, then, when n_off > 0, the E4M3 code
   offsets of the mse search, a candidate kept only when its float64 error is strictly lower,
   the error summed in the reference's fixed pairwise order); then per column: the E2M1 code,
   err = (w - q) / U[j][j], and w[k] = w[k] - err * U[j][k] for the later columns of the block
   (a rounded product, then a rounded difference, as torch's two ops do). */
static const float E2M1_VALUE[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static double block_sq_err(const float *x, float enc, float deq) {
    double s[16];
    for (int j = 0; j < 16; j++) {
        float q = E2M1_VALUE[e2m1_code(f2u(x[j]), enc)] * deq;
        double d = (double)q - (double)x[j];
        s[j] = d * d;
    }
    for (int h = 8; h >= 1; h >>= 1)
        for (int j = 0; j < h; j++) s[j] = s[j] + s[j + h];
    return s[0];
}

/* The mse search of one block from its max-rule scale code s: the E4M3 codes s + offsets[k]
   (clamped to [1, 126]; a zero block keeps 0), the first strictly lowest float64 error wins. */
static inline uint32_t mse_scale(const float *x, uint32_t s, const float *enc_table, const float *deq_table,
                                 const int32_t *offsets, int64_t n_off) {
    if (n_off <= 0 || s == 0) return s;
    double best = block_sq_err(x, enc_table[s], deq_table[s]);
    uint32_t best_s = s;
    for (int64_t k = 0; k < n_off; k++) {
        int32_t cand = (int32_t)s + offsets[k];
        cand = cand < 1 ? 1 : (cand > 126 ? 126 : cand);
        double err = block_sq_err(x, enc_table[cand], deq_table[cand]);
        if (err < best) { best = err; best_s = (uint32_t)cand; }
    }
    return best_s;
}

/* The mse weight-scale method on nb blocks of float32: per block the max-rule scale, the mse
   search, then the codes at the chosen scale, packed two a byte. */
void nvfp4_mse_encode_f32(const float *x, int64_t nb, float factor, const float *enc_table,
                          const float *deq_table, const int32_t *offsets, int64_t n_off,
                          uint8_t *packed, uint8_t *scale) {
    for (int64_t b = 0; b < nb; b++) {
        const float *p = x + b * 16;
        uint32_t m = 0;
        for (int j = 0; j < 16; j++) { uint32_t a = f2u(p[j]) & 0x7FFFFFFFu; m = a > m ? a : m; }
        float v = u2f(m) * factor;
        v = v < 448.0f ? v : 448.0f;
        uint32_t s = mse_scale(p, e4m3_rtne(v), enc_table, deq_table, offsets, n_off);
        scale[b] = (uint8_t)s;
        float enc = enc_table[s];
        for (int k = 0; k < 8; k++)
            packed[b * 8 + k] = (uint8_t)(e2m1_code(f2u(p[2 * k]), enc) | (e2m1_code(f2u(p[2 * k + 1]), enc) << 4));
    }
}

void nvfp4_gptq_block_f32(float *W, int64_t ldw, float *E, int64_t lde, const float *U, int64_t ldu,
                          int64_t L, int64_t r0, int64_t r1, uint8_t *codes, int64_t ldc,
                          uint8_t *scales, int64_t lds, float factor, const float *enc_table,
                          const float *deq_table, const int32_t *offsets, int64_t n_off) {
    for (int64_t r = r0; r < r1; r++) {
        float *w = W + r * ldw;
        float *e = E + r * lde;
        uint8_t *c = codes + r * ldc;
        uint8_t *sc = scales + r * lds;
        for (int64_t g0 = 0; g0 < L; g0 += 16) {
            uint32_t m = 0;
            for (int j = 0; j < 16; j++) { uint32_t a = f2u(w[g0 + j]) & 0x7FFFFFFFu; m = a > m ? a : m; }
            float v = u2f(m) * factor;
            v = v < 448.0f ? v : 448.0f;
            uint32_t s = e4m3_rtne(v);
            s = mse_scale(w + g0, s, enc_table, deq_table, offsets, n_off);
            sc[g0 / 16] = (uint8_t)s;
            float enc = enc_table[s], deq = deq_table[s];
            for (int64_t j = g0; j < g0 + 16; j++) {
                uint32_t code = e2m1_code(f2u(w[j]), enc);
                c[j] = (uint8_t)code;
                float q = E2M1_VALUE[code] * deq;
                const float *u = U + j * ldu;
                float err = (w[j] - q) / u[j];
                for (int64_t k = j + 1; k < L; k++) { float p = err * u[k]; w[k] = w[k] - p; }
                e[j] = err;
            }
        }
    }
}

/* The E4M3 rounding alone, for values in [0, 448] (lets tests compare it with torch's cast). */
void nvfp4_e4m3_rtne_f32(const float *v, int64_t n, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = (uint8_t)e4m3_rtne(v[i]);
}
"""

# IEEE float semantics: no fast-math, no FMA contraction. -fno-trapping-math only declares that no
# code reads floating-point exception flags, which lets branch-free selects vectorize; it changes
# no result. -march=native is tried first and dropped if the compiler refuses it.
_BASE_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math"]

_lock = threading.Lock()
_lib = None
_lib_error: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (size, pid): a forked child starts its own pool


# ----------------------------------------------------------------------------- build and load


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (may carry a wrapper, e.g. "ccache gcc"), else cc/gcc/clang."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _cache_dir() -> Path:
    env = os.environ.get("NVFP4KIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nvfp4kit"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and feature flags (Linux), else the platform."""
    ident = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    ident.append(line.strip())
                if len(ident) >= 4:
                    break
    except OSError:
        pass
    return "\n".join(ident)


def _compiler_version(cc: list[str]) -> str:
    try:
        return subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: list[str], out: Path) -> None:
    """Compile the kernel to ``out`` (written under a temporary name, then renamed)."""
    progress.log(f"nvfp4kit: building the CPU quantize kernel (once per machine) into {out.parent}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "nvfp4_cpu.c"
        src.write_text(_C_SOURCE)
        lib = Path(tmp) / out.name
        errors = []
        for extra in (["-march=native"], []):
            cmd = [*cc, *_BASE_FLAGS, *extra, str(src), "-o", str(lib)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{' '.join(cmd)}: {e}")
                continue
            if res.returncode == 0:
                os.replace(lib, out)
                return
            errors.append(f"{' '.join(cmd)}: {res.stderr.strip()[-500:]}")
        raise RuntimeError("C compilation failed: " + " | ".join(errors))


def _declare(lib) -> None:
    P, N, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for name in ("nvfp4_block_amax_f32", "nvfp4_block_amax_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [P, N, P]
        fn.restype = ctypes.c_uint32
    for name in ("nvfp4_encode_f32", "nvfp4_encode_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [P, P, N, F32, P, P, P]
        fn.restype = None
    for name in ("nvfp4_encode_sr_f32", "nvfp4_encode_sr_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [P, P, N, F32, P, P, P, P]
        fn.restype = None
    for name in ("nvfp4_encode_one_pass_f32", "nvfp4_encode_one_pass_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [P, N, F32, P, P, P]
        fn.restype = ctypes.c_uint32
    lib.nvfp4_tile_amax.argtypes = [P, N, N, N]
    lib.nvfp4_tile_amax.restype = None
    lib.nvfp4_gptq_block_f32.argtypes = [P, N, P, N, P, N, N, N, N, P, N, P, N, F32, P, P, P, N]
    lib.nvfp4_gptq_block_f32.restype = None
    lib.nvfp4_mse_encode_f32.argtypes = [P, N, F32, P, P, P, N, P, P]
    lib.nvfp4_mse_encode_f32.restype = None
    lib.nvfp4_e4m3_rtne_f32.argtypes = [P, N, P]
    lib.nvfp4_e4m3_rtne_f32.restype = None


def _load():
    """The loaded kernel library, building it on first use; raises RuntimeError with the reason."""
    global _lib, _lib_error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise RuntimeError(_lib_error)
        try:
            if sys.byteorder != "little":
                raise RuntimeError("the kernel packs nibbles for little-endian machines only")
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
            key = hashlib.sha256(
                "\0".join([_C_SOURCE, " ".join(_BASE_FLAGS), *cc, _compiler_version(cc), _cpu_identity()]).encode()
            ).hexdigest()[:20]
            path = _cache_dir() / f"nvfp4_cpu_{key}.so"
            if not path.exists():
                try:
                    _build(cc, path)
                except OSError:  # unwritable cache dir: build in a private temp dir instead
                    path = Path(tempfile.gettempdir()) / f"nvfp4kit-{os.getuid() if hasattr(os, 'getuid') else 0}" / path.name
                    if not path.exists():
                        _build(cc, path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
        except Exception as e:  # noqa: BLE001 - any build/load failure means "use the reference"
            _lib_error = f"compiled CPU kernel unavailable: {e}"
            progress.log(f"nvfp4kit: {_lib_error}; quantizing with the torch reference instead")
            raise RuntimeError(_lib_error) from e
        _lib = lib
        return lib


def available(device: torch.device) -> tuple[bool, str]:
    """Whether this backend can quantize tensors on ``device`` (builds the kernel on first call)."""
    if torch.device(device).type != "cpu":
        return False, f"the compiled backend runs on CPU tensors only, not {torch.device(device).type}"
    try:
        _load()
    except RuntimeError as e:
        return False, str(e)
    return True, ""


# ----------------------------------------------------------------------------- running the kernel


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    with _lock:
        key = (n, os.getpid())
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[1] == key[1]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nvfp4kit-cpu")
            _pool_key = key
        return _pool


def _ranges(nb: int) -> list[tuple[int, int]]:
    threads = max(1, torch.get_num_threads())
    if threads == 1 or nb < PARALLEL_MIN_BLOCKS:
        return [(0, nb)]
    step = -(-nb // threads)
    return [(s, min(nb, s + step)) for s in range(0, nb, step)]


def _run(fn, ranges: list[tuple[int, int]]):
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    return list(_executor(len(ranges)).map(lambda r: fn(*r), ranges))


def _check_structure(x, name: str, block) -> None:
    """check_quantizable's type, dtype, block and shape checks without its full NaN/inf scan
    (the block amax pass detects non-finite values). Errors come from check_quantizable itself."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.numel() == 0 or (x.ndim < 2 and block != BLOCK_1D):
        check_quantizable(x, name, block)
        return
    # Those checks read only the dtype, the number of dims and the last dim: an empty stand-in
    # with the same three stops before the scan.
    probe = x.new_empty((0,) * max(x.ndim - 1, 1) + (x.shape[-1],))
    try:
        check_quantizable(probe, name, block)
    except (TypeError, ValueError):
        check_quantizable(x, name, block)  # the same error, naming x's own shape
        raise


def _delegate(x, rounding: str, scale_rule: str) -> bool:
    """Whether the reference answers this call (see the module docstring)."""
    return (
        rounding not in ("nearest", "stochastic")
        or scale_rule != "max"
        or type(x) not in (torch.Tensor, torch.nn.Parameter)
        or x.device.type != "cpu"
        or x.numel() == 0
        or x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        or torch.compiler.is_compiling()
    )


def quantize_parts(
    x: torch.Tensor,
    *,
    block=BLOCK_1D,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    global_amax=None,
    scale_rule: str = "max",
    name: str = "input",
) -> NVFP4Parts:
    """Quantize ``x`` to NVFP4 parts, bit-identical to the reference ``quantize_parts``.

    Same arguments, checks and errors as :func:`nvfp4kit.formats.nvfp4.quantize_parts`; stochastic
    rounding draws the same uniform numbers from ``generator`` as the reference does.
    ``scale_rule="4over6"`` is delegated to the reference (so are empty tensors, tensor subclasses
    and calls during ``torch.compile`` tracing), and so is everything when the kernel could not be
    built (the reason is logged once).
    """
    block = tuple(block)
    _check_structure(x, name, block)
    if _delegate(x, rounding, scale_rule):
        return reference_quantize_parts(x, block, rounding, generator, global_amax, scale_rule, name)
    try:
        lib = _load()
    except RuntimeError:
        return reference_quantize_parts(x, block, rounding, generator, global_amax, scale_rule, name)

    x = x.detach().resolve_neg()
    if x.dtype == torch.float64:
        lo, hi = torch.aminmax(x)
        if not bool(torch.maximum(-lo, hi) <= FP32_MAX):  # NaN, inf or beyond float32
            check_quantizable(x, name, block)
    if x.dtype in (torch.float16, torch.float64):
        x = x.float()  # exact for float16; the reference's own rounding for float64
    x = x.contiguous()
    shape = x.shape
    K = shape[-1]
    nb = x.numel() // BLOCK_SIZE
    sr = rounding == "stochastic"
    bf16 = x.dtype == torch.bfloat16
    elem = x.element_size()
    xp = x.data_ptr()
    ranges = _ranges(nb)
    packed = torch.empty(nb * BLOCK_SIZE // 2, dtype=torch.uint8)
    scale = torch.empty(nb, dtype=torch.uint8)
    pp, sp = packed.data_ptr(), scale.data_ptr()

    if global_amax is not None and block == BLOCK_1D and not sr:
        # one pass: block amax, scales and codes together
        try:
            amax = _as_amax(global_amax, x.device)
        except ValueError:
            check_quantizable(x, name, block)  # the reference reports bad data before a bad amax
            raise
        s_dec, factor, enc_table = _scales(amax)
        tp = enc_table.data_ptr()
        fn = lib.nvfp4_encode_one_pass_bf16 if bf16 else lib.nvfp4_encode_one_pass_f32
        top = max(_run(lambda s, e: fn(xp + s * BLOCK_SIZE * elem, e - s, factor, tp,
                                       pp + s * (BLOCK_SIZE // 2), sp + s), ranges))
        _reject_non_finite(top, x, name, block)
        return _parts(packed, scale, s_dec, shape, block)

    # pass 1: block amax (and the tensor amax / non-finite detection)
    amax_fn = lib.nvfp4_block_amax_bf16 if bf16 else lib.nvfp4_block_amax_f32
    b_amax = torch.empty(nb, dtype=torch.float32)
    bp = b_amax.data_ptr()
    top = max(_run(lambda s, e: amax_fn(xp + s * BLOCK_SIZE * elem, e - s, bp + 4 * s), ranges))
    _reject_non_finite(top, x, name, block)
    if global_amax is not None:
        amax = _as_amax(global_amax, x.device)
    else:
        amax = torch.tensor(struct.unpack("<f", struct.pack("<I", top))[0], dtype=torch.float32)
    s_dec, factor, enc_table = _scales(amax)
    tp = enc_table.data_ptr()
    if block == BLOCK_2D:
        M = shape[-2]
        lib.nvfp4_tile_amax(bp, nb // (M * (K // BLOCK_SIZE)), M, K // BLOCK_SIZE)

    # pass 2: block scales, codes, packing
    if sr:
        # the reference's one draw: torch.rand over the blocked shape [..., K/16, 16]
        uniform = torch.rand((*shape[:-1], K // BLOCK_SIZE, BLOCK_SIZE), generator=generator, dtype=torch.float32)
        up = uniform.data_ptr()
        fn = lib.nvfp4_encode_sr_bf16 if bf16 else lib.nvfp4_encode_sr_f32
        _run(lambda s, e: fn(xp + s * BLOCK_SIZE * elem, bp + 4 * s, e - s, factor, tp,
                             pp + s * (BLOCK_SIZE // 2), sp + s, up + 4 * BLOCK_SIZE * s), ranges)
    else:
        fn = lib.nvfp4_encode_bf16 if bf16 else lib.nvfp4_encode_f32
        _run(lambda s, e: fn(xp + s * BLOCK_SIZE * elem, bp + 4 * s, e - s, factor, tp,
                             pp + s * (BLOCK_SIZE // 2), sp + s), ranges)
    return _parts(packed, scale, s_dec, shape, block)


def _scales(amax: torch.Tensor):
    """S_dec, the float32 factor S_enc * (1/6) and the 128-entry encode-multiplier table, by the
    reference's own functions."""
    s_enc = global_encode_scale(amax, NVFP4_RANGE)
    s_dec = decode_from_encode(s_enc)
    factor = float(s_enc.float() * _INV_E2M1_MAX)  # a float32 value, passed to C exactly
    codes = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn)
    return s_dec, factor, nvfp4_block_encode_scale(codes, s_dec).contiguous()


def _reject_non_finite(top_bits: int, x, name: str, block) -> None:
    if top_bits >= _FP32_INF_BITS:
        check_quantizable(x, name, block)  # raises the reference's NaN/inf error
        raise ValueError(f"{name}: contains NaN or inf values; NVFP4 has no encoding for them")


def _parts(packed, scale, s_dec, shape, block) -> NVFP4Parts:
    K = shape[-1]
    return NVFP4Parts(
        packed.view(*shape[:-1], K // 2),
        scale.view(torch.float8_e4m3fn).view(*shape[:-1], K // BLOCK_SIZE),
        s_dec.reshape(()),
        block,
    )


def e4m3_rtne_kernel(v: torch.Tensor) -> torch.Tensor:
    """The kernel's float32 -> E4M3 rounding of values in [0, 448] (float8_e4m3fn result)."""
    lib = _load()
    v = v.detach().float().contiguous()
    if v.numel() and not bool(((v >= 0) & (v <= 448)).all()):
        raise ValueError("e4m3_rtne_kernel: values must lie in [0, 448]")
    out = torch.empty(v.shape, dtype=torch.uint8)
    lib.nvfp4_e4m3_rtne_f32(v.data_ptr(), v.numel(), out.data_ptr())
    return out.view(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------- mse scales, GPTQ lazy blocks

# rows x columns below which a lazy block runs on the calling thread
GPTQ_PARALLEL_MIN = 1 << 15


def search_available(W: torch.Tensor) -> bool:
    """Whether :func:`mse_encode` and :func:`gptq_lazy_block` run this (float32, CPU) tensor; the
    reference runs the rest."""
    if W.device.type != "cpu" or W.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    try:
        _load()
    except RuntimeError:
        return False
    return True


class ScaleTables:
    """The per-tensor constants of the mse search and GPTQ: the float32 factor S_enc * (1/6), per
    E4M3 code the encode multiplier and the decode scale ``fp32(s_b) * S_dec`` (by the reference's
    own functions), and the E4M3 code offsets tried (none: the max rule alone)."""

    def __init__(self, s_enc: torch.Tensor, s_dec: torch.Tensor, offsets: tuple[int, ...]):
        codes = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn)
        self.factor = float(s_enc.float() * _INV_E2M1_MAX)
        self.enc = nvfp4_block_encode_scale(codes, s_dec).contiguous()
        self.deq = (codes.float() * s_dec.float()).contiguous()
        self.offsets = torch.tensor([d for d in offsets if d != 0], dtype=torch.int32)


def mse_encode(x: torch.Tensor, tables: "ScaleTables") -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes ``[..., K/2]`` and E4M3 scale bits ``[..., K/16]`` (uint8) of the ``mse`` method on a
    float32 CPU tensor ``x`` ``[..., K]``, bit-identical to
    :func:`nvfp4kit.calibrate.weight_scales.mse_weight_parts`; blocks split over threads."""
    lib = _load()
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] % BLOCK_SIZE:
        raise ValueError("mse_encode: needs a float32 CPU tensor whose last dim is a multiple of 16")
    x = x.contiguous()
    nb = x.numel() // BLOCK_SIZE
    packed = torch.empty(nb * BLOCK_SIZE // 2, dtype=torch.uint8)
    scale = torch.empty(nb, dtype=torch.uint8)
    if nb == 0:
        return packed.view(*x.shape[:-1], x.shape[-1] // 2), scale.view(*x.shape[:-1], 0)
    xp, pp, sp = x.data_ptr(), packed.data_ptr(), scale.data_ptr()
    tail = (tables.factor, tables.enc.data_ptr(), tables.deq.data_ptr(), tables.offsets.data_ptr(),
            tables.offsets.numel())
    # each block costs about ten quantize passes: split at a tenth of the quantizer's threshold
    ranges = _ranges(nb * 10)
    step = -(-nb // len(ranges))
    ranges = [(s, min(nb, s + step)) for s in range(0, nb, step)]
    _run(lambda s, e: lib.nvfp4_mse_encode_f32(xp + 4 * BLOCK_SIZE * s, e - s, *tail, pp + 8 * s, sp + s), ranges)
    return packed.view(*x.shape[:-1], x.shape[-1] // 2), scale.view(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE)


def gptq_lazy_block(W1: torch.Tensor, Err1: torch.Tensor, U1: torch.Tensor, codes: torch.Tensor,
                    scales: torch.Tensor, tables: ScaleTables) -> None:
    """One lazy block of GPTQ in place, bit-identical to the reference loop in
    :func:`nvfp4kit.calibrate.weight_scales.gptq_weight_parts`.

    ``W1``/``Err1`` ``[N, L]`` float32 (contiguous rows); ``U1`` the ``[L, L]`` block of the upper
    Cholesky factor (rows may be strided); ``codes`` ``[N, L]`` uint8 and ``scales``
    ``[N, L/16]`` uint8 views into the full outputs (row strides of their own)."""
    lib = _load()
    N, L = W1.shape
    for t, what in ((W1, "W1"), (Err1, "Err1"), (U1, "U1")):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"gptq_lazy_block: {what} must be float32 with unit column stride")
    if L % BLOCK_SIZE or codes.shape != (N, L) or scales.shape != (N, L // BLOCK_SIZE) or U1.shape != (L, L):
        raise ValueError("gptq_lazy_block: inconsistent shapes")
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8 or codes.stride(-1) != 1 or scales.stride(-1) != 1:
        raise ValueError("gptq_lazy_block: codes and scales must be uint8 with unit column stride")
    args = (W1.data_ptr(), W1.stride(0), Err1.data_ptr(), Err1.stride(0), U1.data_ptr(), U1.stride(0), L)
    tail = (codes.data_ptr(), codes.stride(0), scales.data_ptr(), scales.stride(0), tables.factor,
            tables.enc.data_ptr(), tables.deq.data_ptr(), tables.offsets.data_ptr(), tables.offsets.numel())
    threads = max(1, torch.get_num_threads())
    if threads == 1 or N * L < GPTQ_PARALLEL_MIN:
        ranges = [(0, N)]
    else:
        step = -(-N // threads)
        ranges = [(s, min(N, s + step)) for s in range(0, N, step)]
    _run(lambda s, e: lib.nvfp4_gptq_block_f32(*args, s, e, *tail), ranges)
