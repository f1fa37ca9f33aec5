"""The compiled CPU backend (nvfp4kit.kernels.cpu) against the torch reference, bit for bit."""

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kit.formats.e2m1 import E2M1_MAGNITUDES
from nvfp4kit.formats.nvfp4 import BLOCK_1D, BLOCK_2D
from nvfp4kit.formats.nvfp4 import quantize_parts as reference
from nvfp4kit.kernels import cpu, dispatch

if cpu._compiler() is None:  # a machine without a C compiler gets the reference (tested below)
    pytest.skip("no C compiler on this machine", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def assert_same_parts(got, want):
    assert got.block == want.block
    assert got.packed.dtype == torch.uint8 and got.packed.shape == want.packed.shape
    assert torch.equal(got.packed, want.packed), "packed codes differ"
    assert got.block_scale.dtype == torch.float8_e4m3fn and got.block_scale.shape == want.block_scale.shape
    assert torch.equal(got.block_scale.view(torch.uint8), want.block_scale.view(torch.uint8)), "block scales differ"
    assert got.global_decode_scale.shape == () and got.global_decode_scale.dtype == torch.float32
    assert torch.equal(got.global_decode_scale.view(torch.int32), want.global_decode_scale.view(torch.int32))


def both(x, block=BLOCK_1D, **kw):
    got = cpu.quantize_parts(x, block=block, **kw)
    want = reference(x, block, kw.get("rounding", "nearest"), kw.get("generator"), kw.get("global_amax"),
                     kw.get("scale_rule", "max"))
    assert_same_parts(got, want)
    return got


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """Run with one and two threads; PARALLEL_MIN_BLOCKS is lowered so small tensors split too."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_BLOCKS", 1)
    yield request.param
    torch.set_num_threads(old)


def test_available_here():
    ok, why = cpu.available(torch.device("cpu"))
    assert ok, why
    ok, why = cpu.available(torch.device("meta"))
    assert not ok and "CPU" in why


# ----------------------------------------------------------------------------- E4M3 rounding


def _e4m3_boundaries() -> torch.Tensor:
    """Every E4M3 value in [0, 448], every midpoint between neighbours, and 4 float32 ulps around each."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (vals[:-1].double() + vals[1:].double()) / 2  # exact in float32 (one more mantissa bit)
    pts = torch.cat([vals, mids.float()])
    bits = pts.view(torch.int32)
    around = torch.cat([bits + d for d in range(-4, 5)]).view(torch.float32)
    return around[(around >= 0) & (around <= 448)]


def test_e4m3_rounding_at_every_boundary():
    v = _e4m3_boundaries()
    assert torch.equal(cpu.e4m3_rtne_kernel(v).view(torch.uint8), v.to(torch.float8_e4m3fn).view(torch.uint8))


def test_e4m3_rounding_sampled_bit_patterns():
    # every float32 in [0, 448] whose 10 low mantissa bits are a fixed pattern, for 3 patterns
    top = int(torch.tensor(448.0).view(torch.int32))
    for low in (0, 0x155, 0x3FF):
        bits = torch.arange(0, top + 1, 1024, dtype=torch.int32) | low
        v = bits.view(torch.float32)
        v = v[v <= 448]
        assert torch.equal(cpu.e4m3_rtne_kernel(v).view(torch.uint8), v.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.slow
def test_e4m3_rounding_exhaustive():
    """All 1.1e9 float32 values in [0, 448] against torch's cast."""
    top = int(torch.tensor(448.0).view(torch.int32))
    step = 1 << 24
    for start in range(0, top + 1, step):
        v = torch.arange(start, min(top + 1, start + step), dtype=torch.int32).view(torch.float32)
        got = cpu.e4m3_rtne_kernel(v).view(torch.uint8)
        want = v.to(torch.float8_e4m3fn).view(torch.uint8)
        assert torch.equal(got, want), f"mismatch in bit range starting {start:#x}"


# ----------------------------------------------------------------------------- fixed cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [BLOCK_1D, BLOCK_2D])
def test_random_tensors(dtype, block, threads):
    g = torch.Generator().manual_seed(0)
    for shape in [(16,), (1, 16), (5, 48), (33, 64), (2, 3, 17, 32), (256, 512)]:
        if block == BLOCK_2D and len(shape) < 2:
            continue
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
        both(x, block)


def test_large_tensor_default_threads():
    x = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert x.numel() // 16 >= cpu.PARALLEL_MIN_BLOCKS
    both(x)
    both(x, BLOCK_2D)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_values(dtype, threads):
    finfo = torch.finfo(dtype)
    rows = [
        [0.0] * 16,  # all-zero block
        [-0.0] * 16,  # negative zeros keep the sign bit
        [-0.0, 0.0, 1.0, -1.0] * 4,
        [finfo.tiny] * 8 + [-finfo.tiny] * 8,  # tiny block: its scale underflows E4M3
        [finfo.max] * 2 + [-finfo.max] * 2 + [1.0] * 12 if dtype != torch.float64 else [1e30] * 16,
        [finfo.smallest_normal / 4] * 16 if dtype != torch.float64 else [1e-300] * 16,
    ]
    x = torch.tensor(rows, dtype=torch.float64).to(dtype)
    both(x)
    both(x, BLOCK_2D)
    both(x, global_amax=0.0)
    both(x, global_amax=1.0)


def test_subnormal_block_scales_and_float32_subnormal_inputs(threads):
    # one large block sets the tensor amax; the others fall into E4M3's subnormal range and below
    big = torch.full((1, 16), 2688.0)
    tiers = [torch.full((1, 16), v) * torch.linspace(-1, 1, 16) for v in (1e-2, 1e-3, 3e-4, 1e-4, 2e-5, 1e-6)]
    sub = torch.full((1, 16), 1e-41) * torch.arange(16)  # float32 subnormal inputs
    x = torch.cat([big, *tiers, sub])
    got = both(x)
    scales = got.block_scale.float()
    assert (scales[1:] < 2**-6).any() and (scales[1:] > 0).any() and (scales == 0).any()
    both(sub, global_amax=1e-40)


@pytest.mark.parametrize("global_amax", [0.5, 3.0, 2688.0, 1e-30, 1e30, torch.tensor(7.25)])
def test_given_global_amax_saturates_like_the_reference(global_amax, threads):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 4
    got = both(x, global_amax=global_amax)
    assert got.global_decode_scale.shape == ()


def test_block_scales_around_the_e4m3_max(threads):
    # S_enc = 1 (global amax 2688): block amax * (1/6) sweeps 440..470, across the E4M3 max 448
    # and the 448/480 midpoint 464; past 448 the scale saturates to 448, never to the NaN code
    amaxes = 6.0 * torch.linspace(440, 470, 241)
    x = amaxes[:, None] * torch.linspace(-1, 1, 16)
    got = both(x, global_amax=2688.0)
    assert got.block_scale.float().max() == 448
    both(x.bfloat16(), global_amax=2688.0)


def test_ties_on_the_e2m1_grid(threads):
    # power-of-two scales make every E2M1 decision point an exact tie
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)
    grid = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    vals = torch.cat([mids, grid, -mids, -grid, torch.tensor([6.0])])  # 31 values + one 6 per row
    row = torch.cat([vals, torch.tensor([6.0])])
    x = torch.stack([row * 2.0**k for k in range(-8, 9)]).float()
    for amax in (None, 6.0 * 2**8, 2688.0 * 4):
        both(x, global_amax=amax)
        both(x.bfloat16(), global_amax=amax)


def test_non_contiguous_parameter_and_requires_grad():
    w = torch.nn.Parameter(torch.randn(64, 96))
    both(w)
    both(w, BLOCK_2D)
    x = torch.randn(96, 64, requires_grad=True)
    both(x.t())  # non-contiguous view
    both(torch.randn(4, 64, 32)[:, ::2, :])


# ----------------------------------------------------------------------------- hypothesis


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.lists(st.integers(1, 20), min_size=0, max_size=2))
    K = 16 * draw(st.integers(1, 6))
    shape = (*lead, K)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["normal", "wide", "grid", "sparse", "constant"]))
    n = math.prod(shape)
    if kind == "normal":
        x = torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** draw(st.integers(-30, 30))
    elif kind == "wide":  # magnitudes spread over many binades: subnormal block scales, saturation
        e = torch.randint(-40, 40, (n,), generator=g).double()
        x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(e)
    elif kind == "grid":  # E2M1 grid values and decision points times powers of two: ties
        pts = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6], dtype=torch.float64)
        idx = torch.randint(0, len(pts), (n,), generator=g)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        x = pts[idx] * sign * 2.0 ** draw(st.integers(-10, 10))
    elif kind == "sparse":  # mostly (signed) zeros, with all-zero blocks
        x = torch.randn(n, generator=g, dtype=torch.float64)
        x = torch.where(torch.rand(n, generator=g) < 0.9, torch.where(x < 0, -0.0, 0.0), x)
    else:
        x = torch.full((n,), draw(st.sampled_from([0.0, -0.0, 1.0, -3.5, 1e-3])), dtype=torch.float64)
    if dtype != torch.float64:
        fin = torch.finfo(dtype)
        x = x.clamp(-fin.max, fin.max)
    return x.reshape(shape).to(dtype)


@settings(max_examples=150)
@given(
    x=tensors(),
    block=st.sampled_from([BLOCK_1D, BLOCK_2D]),
    amax=st.one_of(st.none(), st.floats(0, 1e6), st.sampled_from([0.0, 1e-30, 2688.0])),
    split=st.booleans(),
    seed=st.one_of(st.none(), st.integers(0, 2**31 - 1)),
)
def test_matches_reference(x, block, amax, split, seed):
    """Nearest rounding, or stochastic rounding from a seeded generator when ``seed`` is drawn."""
    if block == BLOCK_2D and x.ndim < 2:
        x = x.reshape(1, -1)
    old = cpu.PARALLEL_MIN_BLOCKS
    threads = torch.get_num_threads()
    try:
        if split:  # exercise the split into per-thread ranges on small tensors
            cpu.PARALLEL_MIN_BLOCKS = 1
            torch.set_num_threads(2)
        if seed is None:
            both(x, block, global_amax=amax)
        else:
            got = cpu.quantize_parts(x, block=block, rounding="stochastic", global_amax=amax,
                                     generator=torch.Generator().manual_seed(seed))
            want = reference(x, block, "stochastic", torch.Generator().manual_seed(seed), amax)
            assert_same_parts(got, want)
    finally:
        cpu.PARALLEL_MIN_BLOCKS = old
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- errors and delegation


def _error_of(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    return None


@pytest.mark.parametrize(
    "make, block",
    [
        (lambda: torch.randn(4, 24), BLOCK_1D),
        (lambda: torch.randn(24), BLOCK_1D),
        (lambda: torch.randn(32), BLOCK_2D),
        (lambda: torch.tensor(1.0), BLOCK_1D),
        (lambda: torch.arange(32).reshape(2, 16), BLOCK_1D),
        (lambda: torch.randn(2, 16).to(torch.float8_e4m3fn), BLOCK_1D),
        (lambda: torch.randn(2, 16), (2, 16)),
    ],
)
def test_structural_errors_match_the_reference(make, block):
    x = make()
    want = _error_of(lambda: reference(x, block))
    assert want is not None
    assert _error_of(lambda: cpu.quantize_parts(x, block=block)) == want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_errors_match_the_reference(dtype, bad):
    x = torch.randn(64, 64).to(dtype)
    x[37, 5] = bad
    want = _error_of(lambda: reference(x))
    assert want is not None and "NaN" in want[1]
    assert _error_of(lambda: cpu.quantize_parts(x)) == want
    assert _error_of(lambda: cpu.quantize_parts(x, block=BLOCK_2D)) == _error_of(lambda: reference(x, BLOCK_2D))


def test_float64_beyond_float32_range_errors_like_the_reference():
    x = torch.ones(2, 16, dtype=torch.float64)
    x[1, 3] = -1e39
    want = _error_of(lambda: reference(x))
    assert want is not None and "float32 range" in want[1]
    assert _error_of(lambda: cpu.quantize_parts(x)) == want


@pytest.mark.parametrize("amax", [float("nan"), -1.0, float("inf")])
def test_bad_global_amax_errors_match_the_reference(amax):
    x = torch.randn(2, 32)
    want = _error_of(lambda: reference(x, global_amax=amax))
    assert want is not None
    assert _error_of(lambda: cpu.quantize_parts(x, global_amax=amax)) == want


@pytest.mark.parametrize("block", [BLOCK_1D, BLOCK_2D])
@pytest.mark.parametrize("amax", [3.0, float("nan"), -2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_data_with_a_given_amax_errors_like_the_reference(block, amax, dtype):
    # with a given amax the 1x16 path is a single pass; bad data is still reported first, also
    # when it sits in an early chunk of a long tensor
    x = torch.randn(512, 64).to(dtype)
    x[3, 40] = float("inf")
    want = _error_of(lambda: reference(x, block, global_amax=amax))
    assert want is not None and "inf" in want[1]
    assert _error_of(lambda: cpu.quantize_parts(x, block=block, global_amax=amax)) == want


def test_bad_rounding_and_scale_rule_errors_match_the_reference():
    x = torch.randn(2, 32)
    for kw in ({"rounding": "up"}, {"scale_rule": "min"}):
        want = _error_of(lambda: reference(x, **kw))
        assert want is not None
        assert _error_of(lambda: cpu.quantize_parts(x, **kw)) == want


def test_four_over_six_delegates_to_the_reference():
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(5))
    both(x, scale_rule="4over6")
    both(x, BLOCK_2D, scale_rule="4over6")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [BLOCK_1D, BLOCK_2D])
def test_stochastic_rounding_matches_the_reference(dtype, block, threads):
    for seed, shape in [(0, (40, 64)), (1, (3, 17, 32)), (2, (256, 512))]:
        g = torch.Generator().manual_seed(100 + seed)
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 ** (seed * 5 - 5)).to(dtype)
        got = cpu.quantize_parts(x, block=block, rounding="stochastic", generator=torch.Generator().manual_seed(seed))
        want = reference(x, block, "stochastic", torch.Generator().manual_seed(seed))
        assert_same_parts(got, want)


def test_stochastic_rounding_on_grid_points_and_edges(threads):
    # values on the grid, on decision points, beyond 6 after scaling (global amax too small)
    grid = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, -0.0])
    x = torch.cat([grid * 2.0**k for k in range(-3, 4)]).reshape(-1, 16)
    x = torch.cat([x, -x])
    for amax in (None, 6.0, 2688.0 * 8, 1.0):
        got = cpu.quantize_parts(x, rounding="stochastic", generator=torch.Generator().manual_seed(7),
                                 global_amax=amax)
        want = reference(x, BLOCK_1D, "stochastic", torch.Generator().manual_seed(7), amax)
        assert_same_parts(got, want)


def test_stochastic_rounding_with_the_default_generator():
    x = torch.randn(64, 128)
    torch.manual_seed(1234)
    got = cpu.quantize_parts(x, rounding="stochastic")
    torch.manual_seed(1234)
    want = reference(x, BLOCK_1D, "stochastic")
    assert_same_parts(got, want)


def test_stochastic_rounding_consumes_the_generator_like_the_reference():
    x = torch.randn(32, 64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cpu.quantize_parts(x, rounding="stochastic", generator=g1)
    reference(x, BLOCK_1D, "stochastic", g2)
    assert torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))


def test_empty_tensor():
    both(torch.empty(0, 32))
    both(torch.empty(3, 0, 16), BLOCK_2D)


# ----------------------------------------------------------------------------- dispatch, build, fallback


def test_dispatch_uses_this_backend(monkeypatch):
    x = torch.randn(1 << 10, 1 << 8)
    assert x.numel() >= dispatch.COMPILED_MIN_NUMEL
    assert dispatch.resolve_backend("auto", x) == "compiled"
    monkeypatch.setattr(dispatch, "COMPILED_MIN_NUMEL", 1 << 12)
    assert dispatch.resolve_backend("auto", x[:2]) == "torch"
    assert_same_parts(dispatch.quantize_parts(x, backend="compiled"), reference(x))


def test_cached_library_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("NVFP4KIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_lib_error", None)
    built = []
    real_build = cpu._build
    monkeypatch.setattr(cpu, "_build", lambda cc, out: (built.append(out), real_build(cc, out)))
    cpu._load()
    assert len(built) == 1 and built[0].exists() and built[0].parent == tmp_path
    monkeypatch.setattr(cpu, "_lib", None)  # a new process: the library file is loaded, not rebuilt
    cpu._load()
    assert len(built) == 1
    both(torch.randn(4, 64))


def test_without_a_compiler_falls_back_to_the_reference(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NVFP4KIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_lib_error", None)
    with caplog.at_level(logging.INFO, logger="nvfp4kit"):
        ok, why = cpu.available(torch.device("cpu"))
    assert not ok and "compil" in why
    assert any("torch reference" in r.getMessage() for r in caplog.records)
    x = torch.randn(1 << 10, 1 << 8)
    assert dispatch.resolve_backend("auto", x) == "torch"
    with pytest.raises(dispatch.BackendUnavailable):
        dispatch.resolve_backend("compiled", x)
    both(x[:8])  # called directly, it answers with the reference


def test_a_forked_child_gets_a_new_thread_pool(monkeypatch):
    # the threads of a pool do not survive fork(); the pool is keyed by process id
    monkeypatch.setattr(cpu, "_pool", None)  # restored afterwards, with its key
    monkeypatch.setattr(cpu, "_pool_key", (0, 0))
    pool = cpu._executor(2)
    assert cpu._executor(2) is pool
    monkeypatch.setattr(cpu.os, "getpid", lambda: -12345)
    child_pool = cpu._executor(2)
    assert child_pool is not pool
    assert sorted(child_pool.map(lambda v: v * v, range(4))) == [0, 1, 4, 9]
    pool.shutdown()
    child_pool.shutdown()
