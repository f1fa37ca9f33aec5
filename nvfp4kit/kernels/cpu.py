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
multiplier table follow :mod:`nvfp4kit.formats.scales` step for step in float32 (single IEEE
divisions and products, computed in C). ``tests/test_kernels_cpu.py`` checks the parts bit for
bit against the reference over random and adversarial inputs.

For the training recipe (``tests/test_kernels_cpu_recipe.py``): :func:`quantize_values` returns
the parts with their block values (``formats.nvfp4.block_values``) from the same call;
:func:`mxfp8_fake_quantize` is ``formats.mx``'s MXFP8 quantize-dequantize in one pass;
:func:`transpose_padded` copies a wgrad operand once; stochastic rounding draws ``torch.rand``'s
numbers with a copy of torch's CPU mt19937 on the generator's own state (read with
``get_state``, written back with ``set_state``), used only after it matched ``torch.rand`` once in
this process (``torch.rand`` otherwise, and below :data:`_MT_MIN_NUMEL` draws).

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
from ..formats.nvfp4 import block_values as reference_block_values
from ..formats.nvfp4 import quantize_parts as reference_quantize_parts
from ..formats.scales import (
    _INV_E2M1_MAX,
    FP32_MAX,
    NVFP4_RANGE,
    nvfp4_block_encode_scale,
)

# Below this many 16-element blocks one thread does the whole tensor (thread hand-off costs more).
PARALLEL_MIN_BLOCKS = 1 << 14

_FP32_INF_BITS = 0x7F800000

_C_SOURCE = r"""
#include <float.h>
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

/* The per-tensor scalars of formats/scales.py for a tensor amax, in its float32 steps (single IEEE
   divisions and products, so the same bits): out = {S_enc, S_dec, factor} with
   S_enc = min(range / amax, FLT_MAX) (1 where amax is 0 or the quotient 0), S_dec = 1 / S_enc,
   factor = S_enc * inv6; and per E4M3 code c (its float value e4m3_value[c]) the block encode
   multiplier enc_table[c] = min(1 / (e4m3_value[c] * S_dec), FLT_MAX) (NaN stays NaN, as in torch). */
void nvfp4_tensor_scales(float amax, float range, float inv6, const float *e4m3_value, float *out,
                         float *enc_table) {
    float s = range / amax;
    s = s > FLT_MAX ? FLT_MAX : s;
    if (amax == 0.0f || s == 0.0f) s = 1.0f;
    float d = 1.0f / s;
    out[0] = s;
    out[1] = d;
    out[2] = s * inv6;
    for (int c = 0; c < 128; c++) {
        float e = 1.0f / (e4m3_value[c] * d);
        enc_table[c] = e > FLT_MAX ? FLT_MAX : e;
    }
}

/* torch.rand's float32 draws from a CPU torch.Generator, the same numbers and the same state after:
   torch's mt19937 (at::mt19937_engine: decrement left, regenerate all 624 words when it reaches 0,
   temper state[next++]) and its uniform_real transform (r & 0xFFFFFF) * 2^-24, one 32-bit draw per
   element in memory order. The state is Generator.get_state()'s byte layout: uint64 seed, int32
   left, int32 seeded, uint64 next, uint64 state[624] (32-bit words); it is updated in place.
   Returns 0, or -1 (nothing drawn) for a state outside that engine's invariants. */
static inline uint32_t mt_twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7FFFFFFFu)) >> 1) ^ ((0u - (v & 1u)) & 0x9908B0DFu);
}

static void mt_regenerate(uint32_t *st) {
    for (int i = 0; i < 227; i++) st[i] = st[i + 397] ^ mt_twist(st[i], st[i + 1]);
    for (int i = 227; i < 623; i++) st[i] = st[i - 227] ^ mt_twist(st[i], st[i + 1]);
    st[623] = st[396] ^ mt_twist(st[623], st[0]);
}

int32_t nvfp4_mt_uniform(uint8_t *gstate, int64_t n, float *out) {
    int32_t left; uint64_t next64; uint64_t w[624]; uint32_t st[624];
    memcpy(&left, gstate + 8, 4);
    memcpy(&next64, gstate + 16, 8);
    if (left <= 0 || left > 624 || next64 > 624 || (int64_t)next64 + left - 1 > 624) return -1;
    memcpy(w, gstate + 24, sizeof w);
    for (int i = 0; i < 624; i++) st[i] = (uint32_t)w[i];
    int64_t next = (int64_t)next64;
    for (int64_t k = 0; k < n;) {
        /* the engine regenerates when a draw decrements left to 0, then reads state[0] */
        if (left == 1) { mt_regenerate(st); left = 625; next = 0; }
        int64_t m = left - 1;
        if (m > n - k) m = n - k;
        const uint32_t *src = st + next;
        for (int64_t i = 0; i < m; i++) {
            uint32_t y = src[i];
            y ^= (y >> 11);
            y ^= (y << 7) & 0x9D2C5680u;
            y ^= (y << 15) & 0xEFC60000u;
            y ^= (y >> 18);
            out[k + i] = (float)(int32_t)(y & 0xFFFFFFu) * 0x1.0p-24f;
        }
        k += m; next += m; left -= (int32_t)m;
    }
    for (int i = 0; i < 624; i++) w[i] = st[i];
    next64 = (uint64_t)next;
    memcpy(gstate + 8, &left, 4);
    memcpy(gstate + 16, &next64, 8);
    memcpy(gstate + 24, w, sizeof w);
    return 0;
}

/* out [C, Tp] = float32 of the transpose of x [T, C] (row stride ldx elements), zero in columns T..Tp-1:
   a pure copy (bfloat16 widens exactly), in 32 x 32 tiles for the cache. */
#define TRANSPOSE_PAD(NAME, TYPE, LOAD)                                                          \
void NAME(const TYPE *x, int64_t T, int64_t C, int64_t ldx, int64_t Tp, float *out) {            \
    for (int64_t c0 = 0; c0 < C; c0 += 32) {                                                     \
        int64_t c1 = C - c0 < 32 ? C : c0 + 32;                                                  \
        for (int64_t t0 = 0; t0 < T; t0 += 32) {                                                 \
            int64_t t1 = T - t0 < 32 ? T : t0 + 32;                                              \
            for (int64_t c = c0; c < c1; c++)                                                    \
                for (int64_t t = t0; t < t1; t++) out[c * Tp + t] = LOAD(x[t * ldx + c]);        \
        }                                                                                        \
        for (int64_t c = c0; c < c1; c++)                                                        \
            for (int64_t t = T; t < Tp; t++) out[c * Tp + t] = 0.0f;                             \
    }                                                                                            \
}
#define LOAD_AS_F32(v) (v)
#define LOAD_BF16_AS_F32(v) u2f((uint32_t)(v) << 16)
TRANSPOSE_PAD(nvfp4_transpose_pad_f32, float, LOAD_AS_F32)
TRANSPOSE_PAD(nvfp4_transpose_pad_bf16, uint16_t, LOAD_BF16_AS_F32)

/* MXFP8 quantize-dequantize (E4M3 elements, one E8M0 scale per 32, the "rceil" rule) of nb blocks of
   float32, formats/mx.py's steps: amax = max |x| (integer max of the bits, as above); exponent
   e = ceil(log2(amax * inv_max)) read from the bits (-127 when amax or that product is 0), clamped to
   [-127, 127]; scaled = x * 2^-e (one rounded product); the E4M3 code of clamp(scaled, -448, 448) by
   e4m3_rtne with the sign bit of scaled; out = e4m3_value[code] * 2^e (exact). Returns the largest
   |x| bit pattern (the caller raises for NaN/inf; such blocks are left unwritten). */
static inline int32_t ceil_log2_pos(float r) {
    uint32_t u = f2u(r);
    int32_t e = (int32_t)(u >> 23);
    uint32_t m = u & 0x7FFFFFu;
    if (e == 0) {                                  /* subnormal (m != 0) */
        int32_t f = (31 - __builtin_clz(m)) - 149;
        return (m & (m - 1)) ? f + 1 : f;
    }
    return (e - 127) + (m != 0);
}

static inline float pow2f(int32_t e) {            /* exact 2^e, e in [-149, 127] */
    return e >= -126 ? u2f((uint32_t)(e + 127) << 23) : u2f(1u << (e + 149));
}

uint32_t mxfp8_fake_quant_f32(const uint32_t *x, int64_t nb, float inv_max, const float *e4m3_value, float *out) {
    uint32_t all = 0;
    for (int64_t b = 0; b < nb; b++) {
        const uint32_t *p = x + b * 32;
        uint32_t m = 0;
        for (int j = 0; j < 32; j++) { uint32_t a = p[j] & 0x7FFFFFFFu; m = a > m ? a : m; }
        all = m > all ? m : all;
        if (m >= 0x7F800000u) continue;
        float ratio = u2f(m) * inv_max;
        int32_t e = (m != 0 && ratio > 0.0f) ? ceil_log2_pos(ratio) : -127;
        e = e < -127 ? -127 : (e > 127 ? 127 : e);
        float inv = pow2f(-e), sc = pow2f(e);
        float *o = out + b * 32;
        for (int j = 0; j < 32; j++) {
            uint32_t v = f2u(u2f(p[j]) * inv);
            float a = u2f(v & 0x7FFFFFFFu);
            a = a < 448.0f ? a : 448.0f;
            o[j] = e4m3_value[e4m3_rtne(a) | ((v >> 31) << 7)] * sc;
        }
    }
    return all;
}

/* Block values of nb blocks, no global scale: out[16b + j] = the E2M1 value of element j times the
   float32 value of block b's E4M3 scale (scale_value[code], torch's own conversion): one exact
   product, as formats.nvfp4.block_values computes it. Element 2k is the low nibble of byte k. */
void nvfp4_block_values(const uint8_t *packed, const uint8_t *scale, int64_t nb, const float *scale_value,
                        float *out) {
    for (int64_t b = 0; b < nb; b++) {
        float s = scale_value[scale[b]];
        const uint8_t *p = packed + b * 8;
        float *o = out + b * 16;
        for (int k = 0; k < 8; k++) {
            o[2 * k] = E2M1_VALUE[p[k] & 0xF] * s;
            o[2 * k + 1] = E2M1_VALUE[p[k] >> 4] * s;
        }
    }
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
    lib.nvfp4_tensor_scales.argtypes = [F32, F32, F32, P, P, P]
    lib.nvfp4_tensor_scales.restype = None
    lib.nvfp4_block_values.argtypes = [P, P, N, P, P]
    lib.nvfp4_block_values.restype = None
    lib.mxfp8_fake_quant_f32.argtypes = [P, N, F32, P, P]
    lib.mxfp8_fake_quant_f32.restype = ctypes.c_uint32
    lib.nvfp4_mt_uniform.argtypes = [P, N, P]
    lib.nvfp4_mt_uniform.restype = ctypes.c_int32
    for name in ("nvfp4_transpose_pad_f32", "nvfp4_transpose_pad_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [P, N, N, N, N, P]
        fn.restype = None


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
    return _quantize(x, tuple(block), rounding, generator, global_amax, scale_rule, name, False)[0]


def quantize_values(
    x: torch.Tensor,
    *,
    block=BLOCK_1D,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    global_amax=None,
    scale_rule: str = "max",
    name: str = "input",
) -> tuple[NVFP4Parts, torch.Tensor]:
    """:func:`quantize_parts` and the parts' block values in the same call: float32 ``[..., K]``,
    E2M1 value times the float32 E4M3 block scale, no global scale, the numbers of
    :func:`nvfp4kit.formats.nvfp4.block_values` (one exact product per element, written by the
    kernel right after the codes)."""
    return _quantize(x, tuple(block), rounding, generator, global_amax, scale_rule, name, True)


def _reference(x, block, rounding, generator, global_amax, scale_rule, name, values: bool):
    parts = reference_quantize_parts(x, block, rounding, generator, global_amax, scale_rule, name)
    return parts, (reference_block_values(parts) if values else None)


def _quantize(x, block, rounding, generator, global_amax, scale_rule, name, values: bool):
    _check_structure(x, name, block)
    if _delegate(x, rounding, scale_rule):
        return _reference(x, block, rounding, generator, global_amax, scale_rule, name, values)
    try:
        lib = _load()
    except RuntimeError:
        return _reference(x, block, rounding, generator, global_amax, scale_rule, name, values)

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
        s_dec, factor, enc_table = _scales(lib, float(amax))
        tp = enc_table.data_ptr()
        fn = lib.nvfp4_encode_one_pass_bf16 if bf16 else lib.nvfp4_encode_one_pass_f32
        top = max(_run(lambda s, e: fn(xp + s * BLOCK_SIZE * elem, e - s, factor, tp,
                                       pp + s * (BLOCK_SIZE // 2), sp + s), ranges))
        _reject_non_finite(top, x, name, block)
        return _parts(packed, scale, s_dec, shape, block), _values(lib, packed, scale, shape, ranges, values)

    # pass 1: block amax (and the tensor amax / non-finite detection)
    amax_fn = lib.nvfp4_block_amax_bf16 if bf16 else lib.nvfp4_block_amax_f32
    b_amax = _scratch("block_amax", nb)
    bp = b_amax.data_ptr()
    top = max(_run(lambda s, e: amax_fn(xp + s * BLOCK_SIZE * elem, e - s, bp + 4 * s), ranges))
    _reject_non_finite(top, x, name, block)
    if global_amax is not None:
        amax = float(_as_amax(global_amax, x.device))
    else:
        amax = struct.unpack("<f", struct.pack("<I", top))[0]
    s_dec, factor, enc_table = _scales(lib, amax)
    tp = enc_table.data_ptr()
    if block == BLOCK_2D:
        M = shape[-2]
        lib.nvfp4_tile_amax(bp, nb // (M * (K // BLOCK_SIZE)), M, K // BLOCK_SIZE)

    # pass 2: block scales, codes, packing
    if sr:
        # the reference's one draw: torch.rand over the blocked shape [..., K/16, 16]
        uniform = _uniform(lib, (*shape[:-1], K // BLOCK_SIZE, BLOCK_SIZE), generator)
        up = uniform.data_ptr()
        fn = lib.nvfp4_encode_sr_bf16 if bf16 else lib.nvfp4_encode_sr_f32
        _run(lambda s, e: fn(xp + s * BLOCK_SIZE * elem, bp + 4 * s, e - s, factor, tp,
                             pp + s * (BLOCK_SIZE // 2), sp + s, up + 4 * BLOCK_SIZE * s), ranges)
    else:
        fn = lib.nvfp4_encode_bf16 if bf16 else lib.nvfp4_encode_f32
        _run(lambda s, e: fn(xp + s * BLOCK_SIZE * elem, bp + 4 * s, e - s, factor, tp,
                             pp + s * (BLOCK_SIZE // 2), sp + s), ranges)
    return _parts(packed, scale, s_dec, shape, block), _values(lib, packed, scale, shape, ranges, values)


def _values(lib, packed, scale, shape, ranges, wanted: bool):
    """The block values of freshly encoded parts (None unless ``wanted``), over the same ranges."""
    if not wanted:
        return None
    out = torch.empty(shape, dtype=torch.float32)
    op, pp, sp, tp = out.data_ptr(), packed.data_ptr(), scale.data_ptr(), _e4m3_values().data_ptr()
    _run(lambda s, e: lib.nvfp4_block_values(pp + s * (BLOCK_SIZE // 2), sp + s, e - s, tp,
                                             op + 4 * BLOCK_SIZE * s), ranges)
    return out


# Whether the kernel's mt19937 draws equal torch.rand's here (checked once per process); None: not yet.
_MT_MATCHES: bool | None = None
_MT_MIN_NUMEL = 256  # below this, torch.rand's own call costs less than the state round trip


def _mt_check(lib) -> bool:
    """Draw with the kernel and with torch.rand from two copies of one seeded generator (across a
    state regeneration): the same numbers and the same state after, or the kernel is not used."""
    g = torch.Generator().manual_seed(20251)
    torch.rand(1000, generator=g)
    state = g.get_state()
    out = torch.empty(2 * 624 + 7, dtype=torch.float32)
    if lib.nvfp4_mt_uniform(state.data_ptr(), out.numel(), out.data_ptr()) != 0:
        return False
    ref = torch.rand(out.numel(), generator=g)
    return torch.equal(out, ref) and torch.equal(state, g.get_state())


def _uniform(lib, shape, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.rand(shape, generator=generator)`` (float32; the default CPU generator for None):
    the same numbers, and the generator left in the same state, drawn by the kernel's copy of
    torch's mt19937 when it matches torch here (checked once), by torch.rand otherwise."""
    global _MT_MATCHES
    gen = torch.default_generator if generator is None else generator
    numel = 1
    for d in shape:
        numel *= d
    if numel < _MT_MIN_NUMEL or gen.device.type != "cpu":
        return torch.rand(shape, generator=generator, dtype=torch.float32)
    if _MT_MATCHES is None:
        _MT_MATCHES = _mt_check(lib)
    if not _MT_MATCHES:
        return torch.rand(shape, generator=generator, dtype=torch.float32)
    state = gen.get_state()
    out = _scratch("uniform", numel).view(shape)  # read by the encode pass only: never returned
    if lib.nvfp4_mt_uniform(state.data_ptr(), numel, out.data_ptr()) != 0:
        return torch.rand(shape, generator=generator, dtype=torch.float32)
    gen.set_state(state)
    return out


# Temporaries of one call (block amax, uniform draws), kept per thread up to this many float32 elements:
# a fresh large buffer costs a page fault per 4 KiB on first touch, more than the pass that fills it.
SCRATCH_MAX_NUMEL = 1 << 22
_SCRATCH = threading.local()


def _scratch(name: str, numel: int) -> torch.Tensor:
    """A float32 buffer of ``numel`` elements for a temporary the caller fills and drops before it
    returns (reused by the next call on this thread; fresh above :data:`SCRATCH_MAX_NUMEL`)."""
    if numel > SCRATCH_MAX_NUMEL:
        return torch.empty(numel, dtype=torch.float32)
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 12), dtype=torch.float32)
        setattr(_SCRATCH, name, buf)
    return buf[:numel]


def transpose_padded(t: torch.Tensor, multiple: int) -> torch.Tensor | None:
    """``t [T, C]`` (float32 or bfloat16, CPU, unit column stride) as a contiguous float32 ``t^T``
    ``[C, T_pad]`` with zero columns past T (T_pad: T rounded up to ``multiple``): a pure copy, so
    the values of ``F.pad(t, ...).t().float()``. None where the kernel cannot run (the caller copies
    with torch)."""
    if (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.ndim != 2
            or t.dtype not in (torch.float32, torch.bfloat16) or t.stride(1) != 1 or t.is_neg() or t.is_conj()
            or torch.compiler.is_compiling()):
        return None
    try:
        lib = _load()
    except RuntimeError:
        return None
    T, C = t.shape
    Tp = T + (-T % multiple)
    out = torch.empty((C, Tp), dtype=torch.float32)
    fn = lib.nvfp4_transpose_pad_bf16 if t.dtype == torch.bfloat16 else lib.nvfp4_transpose_pad_f32
    fn(t.data_ptr(), T, C, t.stride(0), Tp, out.data_ptr())
    return out


# float32(1 / 448), as formats.mx computes it
_INV_E4M3_MAX = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(448.0, dtype=torch.float32))


def mxfp8_fake_quantize(x: torch.Tensor, name: str = "input") -> torch.Tensor:
    """``mx_dequantize(mx_quantize(x, "e4m3", "rceil"))`` of :mod:`nvfp4kit.formats.mx` as float32,
    bit-identical, in one kernel pass (float32/bfloat16 CPU tensors; the reference answers the rest,
    and raises its own errors)."""
    from ..formats.mx import MX_BLOCK_SIZE, mx_dequantize, mx_quantize

    if (type(x) not in (torch.Tensor, torch.nn.Parameter) or x.device.type != "cpu" or x.ndim == 0
            or x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] % MX_BLOCK_SIZE or x.numel() == 0
            or torch.compiler.is_compiling()):
        return mx_dequantize(mx_quantize(x, "e4m3", name=name))
    try:
        lib = _load()
    except RuntimeError:
        return mx_dequantize(mx_quantize(x, "e4m3", name=name))
    xf = x.detach().resolve_neg().float().contiguous()  # exact for bfloat16
    out = torch.empty(xf.shape, dtype=torch.float32)
    xp, op, tp = xf.data_ptr(), out.data_ptr(), _e4m3_values().data_ptr()
    nb = xf.numel() // MX_BLOCK_SIZE
    step = 4 * MX_BLOCK_SIZE
    top = max(_run(lambda s, e: lib.mxfp8_fake_quant_f32(xp + s * step, e - s, _INV_E4M3_MAX, tp, op + s * step),
                   _ranges(nb)))
    if top >= _FP32_INF_BITS:
        mx_quantize(x, "e4m3", name=name)  # raises the reference's NaN/inf error
        raise ValueError(f"{name}: contains NaN or inf values; MXFP8 has no encoding for them")
    return out


_E4M3_VALUES: torch.Tensor | None = None
_INV6 = float(_INV_E2M1_MAX)  # float32(1/6), passed to C exactly


def _e4m3_values() -> torch.Tensor:
    """The float32 value of every E4M3 code 0..255, by torch's own conversion."""
    global _E4M3_VALUES
    if _E4M3_VALUES is None:
        _E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().contiguous()
    return _E4M3_VALUES


def _scales(lib, amax: float):
    """S_dec (a float32 0-dim tensor), the float32 factor S_enc * (1/6) and the 128-entry
    encode-multiplier table of a tensor amax (a float32 value): the formulas of
    :mod:`nvfp4kit.formats.scales` (``global_encode_scale``, ``decode_from_encode``,
    ``nvfp4_block_encode_scale``) in one C call, step for step in float32 (same bits, tested)."""
    buf = torch.empty(3 + 128, dtype=torch.float32)
    bp = buf.data_ptr()
    lib.nvfp4_tensor_scales(amax, NVFP4_RANGE, _INV6, _e4m3_values().data_ptr(), bp, bp + 12)
    _, s_dec, factor = buf[:3].tolist()
    return torch.tensor(s_dec, dtype=torch.float32), factor, buf[3:]


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
