"""Triton kernels against the format core, bit for bit.

On a machine without CUDA these run under the Triton interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1`` before triton is imported); with a GPU the same tests run the compiled kernels.
Tensors stay small because the interpreter executes each program's tile as numpy arrays.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton  # noqa: E402,F401  (after the interpreter switch in conftest)

import triton.language as tl  # noqa: E402

from nvfp4kit.formats import gemm as ref_gemm  # noqa: E402
from nvfp4kit.formats import hadamard, mx  # noqa: E402
from nvfp4kit.formats import nvfp4 as ref  # noqa: E402
from nvfp4kit.formats.e2m1 import E2M1_MAGNITUDES, unpack_nibbles  # noqa: E402
from nvfp4kit.formats.hadamard import rht_butterfly  # noqa: E402
from nvfp4kit.kernels import dispatch  # noqa: E402
from nvfp4kit.kernels import triton_nvfp4 as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXAMPLES = 40  # each example launches interpreted kernels: keep the count modest
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

if not tk.available(torch.device(DEVICE))[0]:  # pragma: no cover - triton imported without the interpreter
    pytest.skip(tk.available(torch.device(DEVICE))[1], allow_module_level=True)


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def assert_parts_equal(got: ref.NVFP4Parts, want: ref.NVFP4Parts):
    assert got.packed.shape == want.packed.shape
    assert got.block_scale.shape == want.block_scale.shape
    assert got.block_scale.dtype == torch.float8_e4m3fn
    assert torch.equal(got.packed.cpu(), want.packed.cpu()), "packed codes differ"
    assert torch.equal(u8(got.block_scale).cpu(), u8(want.block_scale).cpu()), "block scale bytes differ"
    assert got.global_decode_scale.shape == ()
    assert torch.equal(got.global_decode_scale.cpu(), want.global_decode_scale.cpu()), "global scale differs"
    assert got.block == want.block


def rand_tensor(shape, dtype, seed, spread=8):
    if dtype == torch.float16:
        spread = min(spread, 11)  # stay inside float16's range
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-spread, spread + 1, shape, generator=g).float())
    return x.to(dtype).to(DEVICE)


# ----------------------------------------------------------------------------- E4M3 / bf16 bit arithmetic


@triton.jit
def _e4m3_probe_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    y = tl.load(y_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, tk._e4m3_code_nonneg(y), mask=m)


@triton.jit
def _e4m3_value_probe_kernel(c_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tk._e4m3_value(tl.load(c_ptr + offs)))


@triton.jit
def _bf16_probe_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tk._bf16_bits_rtne(tl.load(x_ptr + offs, mask=m, other=0.0)), mask=m)


def _e4m3_grid() -> torch.Tensor:
    """All non-negative finite E4M3 values, in order."""
    return torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def test_e4m3_rounding_is_rtne_and_saturating_at_every_tie_and_neighbour():
    grid = _e4m3_grid()
    mids = (grid[:-1] + grid[1:]) / 2  # exact in float32: every tie point
    pts = torch.cat([grid, mids])
    inf = torch.tensor(float("inf"))
    near = torch.cat([torch.nextafter(pts, inf), torch.nextafter(pts, -inf).clamp(min=0)])
    rnd = torch.rand(4000, generator=torch.Generator().manual_seed(1)) * 448
    tiny = torch.tensor([0.0, 1e-45, 2.0**-126, 2.0**-12, 2.0**-10, 3 * 2.0**-11, 2.0**-6 - 2.0**-12, 448.0])
    y = torch.cat([pts, near, rnd, tiny]).clamp(max=448.0).float().contiguous()
    # the independent reference: nearest grid value by float64 distance, ties to the even code
    g64 = grid.double()
    dist = (y.double()[:, None] - g64[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    cand = (dist == best)
    codes = torch.arange(127)
    # among the (at most two) nearest, prefer the even code
    score = cand.int() * 2 + ((codes % 2) == 0).int()[None, :] * cand.int()
    want = score.argmax(1)
    out = torch.empty(y.numel(), dtype=torch.int32, device=DEVICE)
    _e4m3_probe_kernel[(triton.cdiv(y.numel(), 512),)](y.to(DEVICE), out, y.numel(), BLOCK=512)
    assert torch.equal(out.cpu().long(), want)
    # and it agrees with torch's saturating cast, which the reference uses
    assert torch.equal(out.cpu().to(torch.uint8), y.to(torch.float8_e4m3fn).view(torch.uint8))


def test_e4m3_decode_is_exact_for_every_byte():
    codes = torch.arange(256, dtype=torch.int32)
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _e4m3_value_probe_kernel[(1,)](codes.to(DEVICE), out, BLOCK=256)
    want = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out.cpu()), nan)
    assert torch.equal(out.cpu()[~nan], want[~nan])
    assert torch.equal(torch.signbit(out.cpu()[~nan]), torch.signbit(want[~nan]))


def test_bf16_rounding_is_rtne():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3000, generator=g) * torch.exp2(torch.randint(-130, 128, (3000,), generator=g).float())
    ties = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 3.3895e38, 3.4e38, -0.0, 1e-40])
    x = torch.cat([base, ties]).float()
    out = torch.empty(x.numel(), dtype=torch.int16, device=DEVICE)
    _bf16_probe_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(DEVICE), out, x.numel(), BLOCK=1024)
    assert torch.equal(out.cpu(), x.bfloat16().view(torch.int16))


# ----------------------------------------------------------------------------- fused quantize, nearest


@settings(max_examples=EXAMPLES)
@given(
    rows=st.integers(1, 70),
    kb=st.integers(1, 12),
    dtype=st.sampled_from(DTYPES),
    block=st.sampled_from([ref.BLOCK_1D, ref.BLOCK_2D]),
    spread=st.integers(0, 20),
    small_tile=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_matches_reference_bit_for_bit(rows, kb, dtype, block, spread, small_tile, seed):
    x = rand_tensor((rows, 16 * kb), dtype, seed, spread)
    tile = (16, 32) if small_tile else None
    assert_parts_equal(tk.quantize_parts(x, block=block, tile=tile), ref.quantize_parts(x, block))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [ref.BLOCK_1D, ref.BLOCK_2D])
def test_quantize_adversarial_values(dtype, block):
    # global amax 448 makes S_enc * (1/6) exactly 1, so block amaxes below hit E4M3 ties directly
    assert float(torch.tensor(6.0) * torch.tensor(tk._INV6)) == 1.0
    rows = []
    e2m1_ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    rows.append(torch.tensor(e2m1_ties + [6.0] + [-t for t in e2m1_ties] + [-0.0]))  # element ties, amax 6
    rows.append(torch.tensor([1.0625] + [0.0] * 15))  # E4M3 tie between 1 and 1.125 -> 1
    rows.append(torch.tensor([1.1875] + [0.5] * 15))  # tie -> 1.25
    rows.append(torch.tensor([1.5 * 2.0**-9] * 16))  # E4M3 subnormal tie -> 2 * 2^-9
    rows.append(torch.tensor([0.5 * 2.0**-9] + [-(2.0**-12)] * 15))  # scale rounds to 0: codes saturate
    rows.append(torch.tensor([3 * 2.0**-10, 2.0**-10, -(2.0**-11)] + [0.0] * 13))  # subnormal scale 2^-9*1.5
    rows.append(torch.zeros(16))  # zero block
    rows.append(-torch.zeros(16))  # -0.0 block keeps its sign bits
    rows.append(torch.tensor([1000.0, -2000.0, 448.0, 447.0] + [300.0] * 12))  # saturates past amax 448
    rows.append(torch.tensor([448.0 * 1.0625] + list(range(15))).float())
    x = torch.stack([r.float() for r in rows])
    x = torch.cat([x, x * 0.5, -x], 0)  # 33 rows: ragged for 16x16 tiles
    x = torch.cat([x, x.flip(-1)], -1).to(dtype).to(DEVICE)
    for amax in (448.0, None, 0.0, 1e-30):
        got = tk.quantize_parts(x, block=block, global_amax=amax)
        assert_parts_equal(got, ref.quantize_parts(x, block, global_amax=amax))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_noncontiguous_and_batched_inputs(dtype):
    base = rand_tensor((48, 64), dtype, 7)
    views = [base.t(), base[::2, :], base[:, 16:48], base.reshape(3, 16, 64).transpose(0, 1)]
    for v in views:
        assert not v.is_contiguous()
        for block in (ref.BLOCK_1D, ref.BLOCK_2D):
            assert_parts_equal(tk.quantize_parts(v, block=block), ref.quantize_parts(v.contiguous(), block))
    x3 = rand_tensor((3, 20, 32), dtype, 8)  # 2D blocks per matrix, 20 rows: ragged tiles per batch
    assert_parts_equal(tk.quantize_parts(x3, block=(16, 16)), ref.quantize_parts(x3, (16, 16)))
    x1 = rand_tensor((48,), dtype, 9)
    assert_parts_equal(tk.quantize_parts(x1), ref.quantize_parts(x1))
    xg = rand_tensor((16, 32), dtype, 10).requires_grad_()
    got = tk.quantize_parts(xg)
    assert got.packed.grad_fn is None and got.global_decode_scale.grad_fn is None
    assert_parts_equal(got, ref.quantize_parts(xg))


def test_quantize_float64_is_converted_like_the_reference():
    x = rand_tensor((17, 32), torch.float64, 10, 30)
    assert_parts_equal(tk.quantize_parts(x), ref.quantize_parts(x))
    with pytest.raises(ValueError, match="float32 range"):
        tk.quantize_parts(torch.full((1, 16), 1e300, dtype=torch.float64, device=DEVICE))


def test_quantize_empty_and_caller_amax():
    e = torch.zeros(0, 32, device=DEVICE)
    assert_parts_equal(tk.quantize_parts(e), ref.quantize_parts(e))
    x = rand_tensor((20, 48), torch.bfloat16, 11)
    for amax in (1.0, 3.5, torch.tensor(1e4)):
        assert_parts_equal(tk.quantize_parts(x, global_amax=amax), ref.quantize_parts(x, global_amax=amax))
    with pytest.raises(ValueError, match="global_amax"):
        tk.quantize_parts(x, global_amax=-1.0)


def _same_error(fn_a, fn_b):
    with pytest.raises(Exception) as ea:
        fn_a()
    with pytest.raises(Exception) as eb:
        fn_b()
    assert type(ea.value) is type(eb.value)
    assert str(ea.value) == str(eb.value)
    return ea.value


@pytest.mark.parametrize(
    "make, block",
    [
        (lambda: torch.ones(4, 24), (1, 16)),  # K not a multiple of 16
        (lambda: torch.ones(4, 16, dtype=torch.int32), (1, 16)),
        (lambda: torch.ones(4, 16).to(torch.float8_e4m3fn), (1, 16)),
        (lambda: torch.tensor(1.0), (1, 16)),
        (lambda: torch.ones(16), (16, 16)),
        (lambda: torch.ones(4, 16), (2, 16)),
        (lambda: torch.tensor([[1.0] * 15 + [float("nan")]]), (1, 16)),
        (lambda: torch.tensor([[1.0] * 15 + [float("inf")]] * 3).bfloat16(), (16, 16)),
        (lambda: torch.tensor([[1.0] * 15 + [float("-inf")]]).half(), (1, 16)),
    ],
)
def test_bad_inputs_raise_the_reference_errors(make, block):
    x = make().to(DEVICE)
    err = _same_error(lambda: tk.quantize_parts(x, block=block, name="w"), lambda: ref.quantize_parts(x, block, name="w"))
    assert "w:" in str(err)


def test_bad_options_raise():
    x = torch.ones(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="rounding"):
        tk.quantize_parts(x, rounding="up")
    with pytest.raises(ValueError, match="scale_rule"):
        tk.quantize_parts(x, scale_rule="mse")
    with pytest.raises(ValueError, match="tile"):
        tk.quantize_parts(x, tile=(16, 24))


def test_four_over_six_falls_back_to_the_reference():
    x = rand_tensor((20, 64), torch.float32, 12)
    assert_parts_equal(tk.quantize_parts(x, scale_rule="4over6"), ref.quantize_parts(x, scale_rule="4over6"))


# ----------------------------------------------------------------------------- stochastic rounding


def _neighbours(x: torch.Tensor, parts: ref.NVFP4Parts):
    """Float32 |x| * enc_b per element (the reference's scaled magnitude) and the two grid neighbours."""
    s_dec = parts.global_decode_scale.float()
    enc = torch.clamp(1.0 / (parts.block_scale.float() * s_dec), max=torch.finfo(torch.float32).max)
    xb = x.float().reshape(*x.shape[:-1], -1, 16)
    a = (xb * enc.unsqueeze(-1)).abs().clamp(max=6.0).reshape(x.shape)
    mags = torch.tensor(E2M1_MAGNITUDES)
    lo = torch.bucketize(a, mags, right=True) - 1
    hi = torch.where(mags[lo] == a, lo, (lo + 1).clamp(max=7))
    return a, lo, hi


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_is_reproducible_and_picks_a_neighbour(dtype):
    x = rand_tensor((40, 64), dtype, 13, 4)
    a1 = tk.quantize_parts(x, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(5))
    a2 = tk.quantize_parts(x, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(5))
    a3 = tk.quantize_parts(x, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(6))
    assert_parts_equal(a1, a2)
    assert not torch.equal(a1.packed, a3.packed)
    nearest = ref.quantize_parts(x)
    assert torch.equal(u8(a1.block_scale), u8(nearest.block_scale))  # scales do not depend on rounding
    codes = unpack_nibbles(a1.packed.cpu()).long()
    _, lo, hi = _neighbours(x.cpu(), nearest)
    mag = codes & 7
    assert bool(((mag == lo) | (mag == hi)).all())
    sign = (codes >> 3).bool()
    assert torch.equal(sign, torch.signbit(x.cpu().float()))


@settings(max_examples=EXAMPLES)
@given(rows=st.integers(1, 40), kb=st.integers(1, 6), dtype=st.sampled_from(DTYPES),
       block=st.sampled_from([ref.BLOCK_1D, ref.BLOCK_2D]), seed=st.integers(0, 999))
def test_stochastic_codes_are_neighbours_with_reference_scales(rows, kb, dtype, block, seed):
    x = rand_tensor((rows, 16 * kb), dtype, seed, 5)
    got = tk.quantize_parts(x, block=block, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(seed))
    nearest = ref.quantize_parts(x, block)
    assert torch.equal(u8(got.block_scale).cpu(), u8(nearest.block_scale).cpu())
    assert torch.equal(got.global_decode_scale.cpu(), nearest.global_decode_scale.cpu())
    codes = unpack_nibbles(got.packed.cpu()).long()
    _, lo, hi = _neighbours(x.cpu(), nearest)
    assert bool((((codes & 7) == lo) | ((codes & 7) == hi)).all())
    assert torch.equal((codes >> 3).bool(), torch.signbit(x.cpu().float()))


def test_stochastic_columnwise_and_rht_operands_pick_neighbours():
    x = rand_tensor((32, 48), torch.bfloat16, 25, 4)
    gen = torch.Generator(DEVICE).manual_seed(3)
    rw, cw = tk.quantize_rowwise_columnwise(x, rounding="stochastic", generator=gen, columnwise_rht=True)
    for operand, parts in ((x, rw), (rht_butterfly(x.t()), cw)):
        nearest = ref.quantize_parts(operand)
        assert torch.equal(u8(parts.block_scale).cpu(), u8(nearest.block_scale).cpu())
        codes = unpack_nibbles(parts.packed.cpu()).long()
        _, lo, hi = _neighbours(operand.cpu(), nearest)
        assert bool((((codes & 7) == lo) | ((codes & 7) == hi)).all())
    # the two outputs draw from different streams: not the nearest codes everywhere
    assert not torch.equal(cw.packed, ref.quantize_parts(rht_butterfly(x.t())).packed)


def test_stochastic_rounding_is_unbiased():
    # one row of values between grid points, replicated over many rows: each row is an independent draw
    g = torch.Generator().manual_seed(14)
    row = torch.rand(64, generator=g) * 6.0
    row[::16] = 6.0  # block amax 6 -> block scale 1 with global amax 2688, so scaled values == row
    x = row.repeat(512, 1).to(DEVICE)
    parts = tk.quantize_parts(x, rounding="stochastic", global_amax=2688.0,
                              generator=torch.Generator(DEVICE).manual_seed(1))
    assert torch.equal(parts.block_scale.float().cpu(), torch.ones(512, 4))
    vals = torch.tensor(E2M1_MAGNITUDES)[unpack_nibbles(parts.packed.cpu()).long() & 7]
    mean = vals.double().mean(0)
    _, lo, hi = _neighbours(row[None], ref.quantize_parts(row[None], global_amax=2688.0))
    gap = (torch.tensor(E2M1_MAGNITUDES)[hi[0]] - torch.tensor(E2M1_MAGNITUDES)[lo[0]]).double()
    # each mean is of 512 Bernoulli draws scaled by gap: std <= gap / (2 sqrt(512)); allow 5 sigma
    tol = 5 * gap / (2 * 512**0.5) + 1e-12
    assert bool(((mean - row.double()).abs() <= tol).all()), (mean - row.double()).abs().max()


# ----------------------------------------------------------------------------- rowwise + columnwise, RHT


def rht_loop_reference(x: torch.Tensor, sign) -> torch.Tensor:
    """Float64 plain loops: y_j = sum_i x_i * sign_i * (-1)^popcount(i & j) / 4 per 16-group."""
    xf = x.double().reshape(-1, 16)
    out = torch.zeros_like(xf)
    for j in range(16):
        for i in range(16):
            h = -1.0 if bin(i & j).count("1") % 2 else 1.0
            out[:, j] += xf[:, i] * sign[i] * h / 4
    return out.reshape(x.shape)


def test_rht_butterfly_is_the_orthonormal_transform():
    x = rand_tensor((8, 64), torch.float32, 15, 3).cpu()
    sign = hadamard.DEFAULT_RHT_SIGN
    y = rht_butterfly(x)
    torch.testing.assert_close(y.double(), rht_loop_reference(x, sign), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, hadamard.rht(x), rtol=1e-6, atol=1e-6)
    # on small integers every sum is exact, so the butterfly equals the float64 loops exactly
    xi = torch.randint(-50, 50, (4, 32), generator=torch.Generator().manual_seed(3)).float()
    assert torch.equal(rht_butterfly(xi).double(), rht_loop_reference(xi, sign))
    other = [1, -1] * 8
    assert torch.equal(rht_butterfly(xi, other).double(), rht_loop_reference(xi, other))


@settings(max_examples=EXAMPLES)
@given(t16=st.integers(1, 4), kb=st.integers(1, 6), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 999),
       use_rht=st.booleans(), small_tile=st.booleans())
def test_rowwise_columnwise_one_launch_matches_reference(t16, kb, dtype, seed, use_rht, small_tile):
    x = rand_tensor((16 * t16, 16 * kb), dtype, seed, 6)
    tile = (16, 32) if small_tile else None
    rw, cw = tk.quantize_rowwise_columnwise(x, columnwise_rht=use_rht, tile=tile)
    assert_parts_equal(rw, ref.quantize_parts(x))
    xt = rht_butterfly(x.t()) if use_rht else x.t()
    assert_parts_equal(cw, ref.quantize_parts(xt))


def test_rowwise_columnwise_batched_input_caller_amax_and_stochastic():
    x = rand_tensor((2, 24, 32), torch.bfloat16, 16)
    x2 = x.reshape(-1, 32)
    rw, cw = tk.quantize_rowwise_columnwise(x, global_amax=2.0, columnwise_rht=True, columnwise_global_amax=3.0)
    assert_parts_equal(rw, ref.quantize_parts(x, global_amax=2.0))
    assert_parts_equal(cw, ref.quantize_parts(rht_butterfly(x2.t()), global_amax=3.0))
    s1 = tk.quantize_rowwise_columnwise(x, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(2))
    s2 = tk.quantize_rowwise_columnwise(x, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(2))
    for a, b in zip(s1, s2):
        assert_parts_equal(a, b)
    assert torch.equal(u8(s1[1].block_scale), u8(ref.quantize_parts(x2.t()).block_scale))
    with pytest.raises(ValueError, match="multiple of 16"):
        tk.quantize_rowwise_columnwise(torch.ones(20, 32, device=DEVICE))
    with pytest.raises(ValueError, match="NaN"):
        tk.quantize_rowwise_columnwise(torch.full((16, 32), float("nan"), device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rht_quantize_matches_reference(dtype):
    dy = rand_tensor((48, 32), dtype, 17, 6)
    for v in (dy, dy.t()):  # the wgrad operand is the transposed view, read in place
        assert_parts_equal(tk.rht_quantize(v), ref.quantize_parts(rht_butterfly(v)))
    sign = [-1, 1] * 8
    assert_parts_equal(tk.rht_quantize(dy, rht_sign=sign, tile=(16, 16)),
                       ref.quantize_parts(rht_butterfly(dy, sign)))
    assert_parts_equal(tk.rht_quantize(dy, global_amax=1.0), ref.quantize_parts(rht_butterfly(dy), global_amax=1.0))
    r1 = tk.rht_quantize(dy, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(9))
    r2 = tk.rht_quantize(dy, rounding="stochastic", generator=torch.Generator(DEVICE).manual_seed(9))
    assert_parts_equal(r1, r2)
    with pytest.raises(ValueError, match="sign"):
        tk.rht_quantize(dy, rht_sign=[1, 2] * 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_amax_two_phase(dtype):
    x = rand_tensor((37, 80), dtype, 18, 20)
    assert torch.equal(tk.global_amax(x).cpu(), x.float().abs().amax().cpu())
    assert torch.equal(tk.global_amax(x.t()).cpu(), x.float().abs().amax().cpu())
    assert torch.equal(tk.global_amax(x, rht=True).cpu(), rht_butterfly(x).abs().amax().cpu())
    assert float(tk.global_amax(torch.zeros(3, 16, device=DEVICE))) == 0.0
    assert float(tk.global_amax(torch.zeros(0, 16, device=DEVICE))) == 0.0
    with pytest.raises(ValueError, match="NaN or inf"):
        tk.global_amax(torch.tensor([1.0, float("inf")], device=DEVICE))
    with pytest.raises(TypeError, match="floating"):
        tk.global_amax(torch.ones(3, dtype=torch.int64))


# ----------------------------------------------------------------------------- dequantize, GEMM


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_matches_reference(out_dtype):
    for dtype, block, shape in [(torch.float32, (1, 16), (33, 48)), (torch.bfloat16, (16, 16), (2, 20, 64))]:
        p = ref.quantize_parts(rand_tensor(shape, dtype, 19, 12), block)
        want = ref.dequantize_parts(p.packed, p.block_scale, p.global_decode_scale, out_dtype)
        assert torch.equal(tk.dequantize(p, out_dtype).cpu(), want.cpu())
    # arbitrary bytes and scales (every E4M3 byte including negatives and NaN), odd global scales
    g = torch.Generator().manual_seed(20)
    packed = torch.randint(0, 256, (40, 32), generator=g, dtype=torch.uint8)
    scale = torch.arange(0, 256, dtype=torch.uint8)[torch.randperm(256, generator=g)][:160].reshape(40, 4)
    for sdec in (1.0, 1e-30, 7e35, 0.3):
        p = ref.NVFP4Parts(packed.to(DEVICE), scale.view(torch.float8_e4m3fn).to(DEVICE), torch.tensor(sdec))
        want = ref.dequantize_parts(p.packed, p.block_scale, p.global_decode_scale, out_dtype).cpu()
        got = tk.dequantize(p, out_dtype).cpu()
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert torch.equal(got[ok], want[ok])
        assert torch.equal(torch.signbit(got[ok]), torch.signbit(want[ok]))
    with pytest.raises(ValueError, match="does not match"):
        tk.dequantize(ref.NVFP4Parts(packed, scale[:, :3].view(torch.float8_e4m3fn), torch.tensor(1.0)))
    with pytest.raises(TypeError, match="dequantize writes"):
        tk.dequantize(p, torch.float64)


def test_gemm_exact_when_sums_are_exact_and_close_otherwise():
    # integers times power-of-two scales: every partial sum is exact, so any order gives the same bits
    g = torch.Generator().manual_seed(21)
    a = ref.quantize_parts(torch.randint(-6, 7, (40, 96), generator=g).float(), global_amax=2688.0)
    b = ref.quantize_parts(torch.randint(-6, 7, (24, 96), generator=g).float(), (16, 16), global_amax=2688.0)
    for out_dtype in DTYPES:
        got = tk.nvfp4_gemm(a, b, out_dtype, tile=(16, 16, 32))
        assert torch.equal(got.cpu(), ref_gemm.nvfp4_gemm(a, b, out_dtype).cpu())
    a = ref.quantize_parts(rand_tensor((2, 20, 80), torch.bfloat16, 22, 6))
    b = ref.quantize_parts(rand_tensor((36, 80), torch.float32, 23, 6), (16, 16))
    got = tk.nvfp4_gemm(a, b)
    want = torch.matmul(ref.block_values(a).double(), ref.block_values(b).double().t()) * (
        a.global_decode_scale.double() * b.global_decode_scale.double())
    assert got.shape == (2, 20, 36)
    bound = 80 * 2**-23 * torch.matmul(ref.block_values(a).abs().double(), ref.block_values(b).abs().double().t()) * (
        a.global_decode_scale.double() * b.global_decode_scale.double())
    assert bool(((got.double() - want).abs() <= bound + 1e-30).all())
    with pytest.raises(ValueError, match="share K"):
        tk.nvfp4_gemm(a, ref.quantize_parts(torch.ones(4, 32)))


# ----------------------------------------------------------------------------- MXFP8


@settings(max_examples=EXAMPLES)
@given(rows=st.integers(1, 40), kb=st.integers(1, 6), dtype=st.sampled_from(DTYPES),
       spread=st.integers(0, 60), rule=st.sampled_from(["rceil", "floor"]), seed=st.integers(0, 999))
def test_mxfp8_matches_reference(rows, kb, dtype, spread, rule, seed):
    x = rand_tensor((rows, 32 * kb), dtype, seed, spread)
    got, want = tk.mxfp8_quantize(x, rule), mx.mx_quantize(x, "e4m3", rule)
    assert torch.equal(got.data.view(torch.uint8).cpu(), want.data.view(torch.uint8).cpu())
    assert torch.equal(got.scale.view(torch.uint8).cpu(), want.scale.view(torch.uint8).cpu())
    assert got.data.dtype == torch.float8_e4m3fn and got.scale.dtype == torch.float8_e8m0fnu


@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_mxfp8_adversarial(rule):
    vals = [0.0] * 32
    rows = [
        vals,
        [-0.0] * 32,
        [1e-45, -2e-45] + [0.0] * 30,  # float32 subnormal amax (ratio underflows)
        [1e-39] * 32,
        [3.0e38, -1.0] + [1e-30] * 30,  # huge amax: scale 2^120-ish, tiny elements flush
        [448.0, 449.0, 0.5 * 2.0**-9, 1.5 * 2.0**-9] + [1.0625, 1.1875] * 14,
        [2.0**k for k in range(-16, 16)],
        [448.0 * 2.0**k * 1.0000001 for k in range(-16, 16)],
    ]
    x = torch.tensor(rows, dtype=torch.float32)
    x = torch.cat([x, -x, x.flip(-1)], 0).to(DEVICE)
    for v in (x, x.t().contiguous().t()):
        got, want = tk.mxfp8_quantize(v, rule), mx.mx_quantize(v.contiguous(), "e4m3", rule)
        assert torch.equal(got.data.view(torch.uint8).cpu(), want.data.view(torch.uint8).cpu())
        assert torch.equal(got.scale.view(torch.uint8).cpu(), want.scale.view(torch.uint8).cpu())
    with pytest.raises(ValueError, match="multiple of 32"):
        tk.mxfp8_quantize(torch.ones(2, 16, device=DEVICE))
    bad = torch.full((1, 32), float("nan"), device=DEVICE)
    _same_error(lambda: tk.mxfp8_quantize(bad, name="o"), lambda: mx.mx_quantize(bad, "e4m3", name="o"))
    with pytest.raises(ValueError, match="scale_rule"):
        tk.mxfp8_quantize(x, "nearest")


# ----------------------------------------------------------------------------- availability and dispatch


def test_available_and_dispatch(monkeypatch):
    ok, why = tk.available(torch.device(DEVICE))
    assert ok and why == ""
    ok, why = tk.available(torch.device("meta"))
    assert not ok and "meta" in why
    x = rand_tensor((20, 32), torch.bfloat16, 24)
    got = dispatch.quantize_parts(x, backend="triton")
    assert_parts_equal(got, ref.quantize_parts(x))
    if DEVICE == "cpu":
        assert dispatch.resolve_backend("auto", x) != "triton"  # auto never picks the interpreter
        # without the interpreter, CPU tensors are refused with a reason naming the fix
        monkeypatch.setattr(tk, "_interpreted", lambda: False)
        ok, why = tk.available(torch.device("cpu"))
        assert not ok and "TRITON_INTERPRET=1" in why
        with pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET"):
            dispatch.quantize_parts(x, backend="triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            tk.quantize_parts(x)
    else:  # pragma: no cover - exercised on GPU machines
        assert dispatch.resolve_backend("auto", x) == "triton"


# ----------------------------------------------------------------------------- the hardware build

_COMPILE_SCRIPT = r'''
import re, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nvfp4kit.kernels import triton_nvfp4 as tk

def build(fn, sig, consts):
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n] != "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]

quant = dict(x_ptr="*bf16", M="i32", K="i32", stride_b="i32", stride_m="i32", stride_k="constexpr",
             row_amax_ptr="*fp32", row_packed_ptr="*u8", row_scale_ptr="*u8", row_sdec_ptr="*fp32",
             col_amax_ptr="*fp32", col_packed_ptr="*u8", col_scale_ptr="*u8", col_sdec_ptr="*fp32",
             seed_ptr="*i64", bad_ptr="*i32", RANGE="constexpr", BLOCK_M="constexpr", BLOCK_K="constexpr",
             ROW="constexpr", COL="constexpr", TWO_D="constexpr", STOCHASTIC="constexpr", ROW_RHT="constexpr",
             COL_RHT="constexpr", SIGN_MASK="constexpr")
base = dict(stride_k=1, RANGE=2688.0, BLOCK_M=32, BLOCK_K=128, SIGN_MASK=0x1234, ROW=True, COL=False,
            TWO_D=False, STOCHASTIC=False, ROW_RHT=False, COL_RHT=False)
ptx = {
    "quant": build(tk._quantize_kernel, quant, base),
    "quant2d": build(tk._quantize_kernel, dict(quant, x_ptr="*fp32"), dict(base, TWO_D=True)),
    "quant_sr_rowcol_rht": build(tk._quantize_kernel, dict(quant, x_ptr="*fp16"),
                                 dict(base, COL=True, STOCHASTIC=True, COL_RHT=True)),
    "quant_rht": build(tk._quantize_kernel, quant, dict(base, ROW_RHT=True)),
    "deq": build(tk._dequantize_kernel, dict(packed_ptr="*u8", scale_ptr="*u8", sdec_ptr="*fp32", out_ptr="*i16",
                 R="i32", K="i32", BLOCK_R="constexpr", BLOCK_K="constexpr", OUT_KIND="constexpr"),
                 dict(BLOCK_R=32, BLOCK_K=256, OUT_KIND=1)),
    "gemm": build(tk._gemm_kernel, dict(a_packed="*u8", a_scale="*u8", b_packed="*u8", b_scale="*u8",
                  alpha_ptr="*fp32", out_ptr="*fp32", M="i32", N="i32", K="i32", BLOCK_M="constexpr",
                  BLOCK_N="constexpr", BLOCK_K="constexpr", OUT_KIND="constexpr"),
                  dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, OUT_KIND=0)),
    "mx": build(tk._mxfp8_kernel, dict(x_ptr="*bf16", R="i32", K="i32", stride_r="i32", stride_k="constexpr",
                data_ptr="*u8", scale_ptr="*u8", bad_ptr="*i32", BLOCK_R="constexpr", BLOCK_K="constexpr",
                RCEIL="constexpr"), dict(stride_k=1, BLOCK_R=32, BLOCK_K=128, RCEIL=True)),
}
for name, text in ptx.items():
    assert "e4m3" not in text and "e5m2" not in text, name + ": uses a hardware fp8 conversion"
    assert "div.full" not in text and "div.approx" not in text, name + ": approximate division"
    assert ".ftz" not in text, name + ": flushes subnormals"
    assert "fma.rn.f32" not in text or name == "gemm", name + ": contracted multiply-add"
assert "div.rn.f32" in ptx["quant"]
assert "ld.global.v4" in ptx["quant"], "the fused quantize should read 16 bytes per load"
print("compiled", len(ptx))
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_exact_arithmetic():
    """Build the kernels for an H100 target with the real backend (no GPU needed) and check the PTX keeps the
    properties the interpreter cannot show: no fp8 conversion, IEEE division, no flush-to-zero, no FMA."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled 7" in res.stdout
