"""The compiled CPU kernels the training recipe runs on, against the torch reference bit for bit:
the per-tensor NVFP4 scalars, quantize + block values in one call, MXFP8 quantize-dequantize and
the copy of torch's mt19937 behind stochastic rounding."""

import struct

import pytest
import torch

from nvfp4kit.formats.mx import mx_dequantize, mx_quantize
from nvfp4kit.formats.nvfp4 import BLOCK_1D, BLOCK_2D, block_values
from nvfp4kit.formats.nvfp4 import quantize_parts as reference
from nvfp4kit.formats.scales import (
    _INV_E2M1_MAX,
    NVFP4_RANGE,
    decode_from_encode,
    global_encode_scale,
    nvfp4_block_encode_scale,
)
from nvfp4kit.kernels import cpu, dispatch

if cpu._compiler() is None:  # a machine without a C compiler gets the reference (tested in test_kernels_cpu)
    pytest.skip("no C compiler on this machine", allow_module_level=True)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def f32(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u))[0]


# ----------------------------------------------------------------------------- per-tensor scalars


AMAXES = [0.0, f32(1), f32(0x007FFFFF), 2.0**-126, 1e-30, 2.0**-20, 0.1, 1.0, 6.0, 448.0, 2688.0, 3.0e5,
          1e30, 3.0e38, f32(0x7F7FFFFF)]


def test_tensor_scales_match_the_formats_functions():
    lib = cpu._load()
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 0x7F800000, (300,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    codes = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for amax in AMAXES + pattern.tolist():
        s_dec, factor, table = cpu._scales(lib, amax)
        s_enc = global_encode_scale(torch.tensor(amax, dtype=torch.float32), NVFP4_RANGE)
        want_dec = decode_from_encode(s_enc)
        assert s_dec.dtype == torch.float32 and s_dec.shape == ()
        assert torch.equal(bits(s_dec), bits(want_dec)), amax
        assert factor == float(s_enc * _INV_E2M1_MAX), amax
        want_table = nvfp4_block_encode_scale(codes, want_dec)
        assert torch.equal(bits(table), bits(want_table)), amax  # code 127 (NaN) included


# ----------------------------------------------------------------------------- quantize + values


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [BLOCK_1D, BLOCK_2D])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_values_match_reference_parts_and_block_values(threads, dtype, block, rounding, monkeypatch):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_BLOCKS", 1)
    try:
        g = torch.Generator().manual_seed(5)
        for shape, amax in [((37, 96), None), ((3, 20, 32), None), ((64, 48), 0.5), ((16, 16), 1e30)]:
            x = (torch.randn(shape, generator=g) * 3).to(dtype)
            x[0, :16] = 0  # an all-zero block: scale 0, values +-0
            parts, vals = cpu.quantize_values(x, block=block, rounding=rounding, global_amax=amax,
                                              generator=torch.Generator().manual_seed(9))
            want = reference(x, block, rounding, torch.Generator().manual_seed(9), amax)
            assert torch.equal(parts.packed, want.packed)
            assert torch.equal(parts.block_scale.view(torch.uint8), want.block_scale.view(torch.uint8))
            assert torch.equal(bits(parts.global_decode_scale), bits(want.global_decode_scale))
            assert vals.dtype == torch.float32 and vals.shape == x.shape
            assert torch.equal(bits(vals), bits(block_values(want))), (shape, amax)  # -0.0 kept
    finally:
        torch.set_num_threads(old)


def test_dispatch_quantize_values_agrees_across_backends_and_names_errors():
    x = torch.randn(40, 64) * 7
    for kw in ({}, {"block": BLOCK_2D}, {"scale_rule": "4over6"}, {"global_amax": 2.0}):
        p1, v1 = dispatch.quantize_values(x, backend="compiled", **kw)
        p2, v2 = dispatch.quantize_values(x, backend="torch", **kw)
        assert torch.equal(p1.packed, p2.packed) and torch.equal(bits(v1), bits(v2)), kw
    with pytest.raises(ValueError, match="activation.*multiple of 16"):
        dispatch.quantize_values(torch.randn(4, 24), name="activation")
    with pytest.raises(ValueError, match="activation: contains NaN"):
        dispatch.quantize_values(torch.full((2, 16), float("nan")), backend="compiled", name="activation")


# ----------------------------------------------------------------------------- MXFP8


def mx_reference(x):
    return mx_dequantize(mx_quantize(x, "e4m3"))


def test_mxfp8_fake_quantize_matches_formats_mx():
    g = torch.Generator().manual_seed(1)
    cases = [torch.randn(7, 96, generator=g) * 10.0 ** float(e) for e in (-44, -40, -20, -3, 0, 5, 30, 37)]
    cases += [torch.zeros(2, 64), -torch.zeros(2, 32),
              torch.tensor([[f32(1), -f32(3), 2.0**-140, 0.0] * 8, [3.0e38, -1.0, 448.0, 449.0] * 8]),
              torch.randint(-3, 4, (5, 64), generator=g).float() * 2.0**-133,
              torch.randn(3, 4, 64, generator=g)]
    for x in cases:
        for dt in (torch.float32, torch.bfloat16):
            xx = x.to(dt)
            got = cpu.mxfp8_fake_quantize(xx)
            assert got.dtype == torch.float32 and got.shape == xx.shape
            assert torch.equal(bits(got), bits(mx_reference(xx)))
    top = torch.tensor([f32(0x7F7FFFFF), -f32(0x7F7FFFFE)] * 16)  # the float32 extremes (inf in bfloat16)
    assert torch.equal(bits(cpu.mxfp8_fake_quantize(top)), bits(mx_reference(top)))
    strided = torch.randn(64, 40, generator=g).t()  # a transposed, non-contiguous operand
    assert torch.equal(bits(dispatch.mxfp8_fake_quantize(strided)), bits(mx_reference(strided)))


def test_mxfp8_fake_quantize_errors_are_the_reference_errors():
    bad = torch.randn(2, 64)
    bad[1, 5] = float("inf")
    with pytest.raises(ValueError, match=r"grad_output: contains NaN or inf values \(0 NaN, 1 inf\)"):
        cpu.mxfp8_fake_quantize(bad, name="grad_output")
    with pytest.raises(ValueError, match="weight: last dim must be a multiple of 32"):
        dispatch.mxfp8_fake_quantize(torch.randn(4, 48), name="weight")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.mxfp8_fake_quantize(torch.randn(4, 32), backend="gpu")


# ----------------------------------------------------------------------------- torch.rand's draws


def test_kernel_uniform_draws_torch_rand_numbers_and_state():
    lib = cpu._load()
    assert cpu._mt_check(lib)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    # sizes around the 624-word regeneration, from fresh and partly used states
    for n in (256, 623, 624, 625, 1248, 1249, 5000, 40000, 300):
        got = cpu._uniform(lib, (n,), g1)
        want = torch.rand(n, generator=g2)
        assert torch.equal(bits(got), bits(want)), n
        assert torch.equal(g1.get_state(), g2.get_state()), n
    # the default generator, a blocked shape
    torch.manual_seed(77)
    got = cpu._uniform(lib, (50, 3, 16), None)
    after = torch.rand(4)
    torch.manual_seed(77)
    want = torch.rand(50, 3, 16)
    assert torch.equal(got, want) and torch.equal(after, torch.rand(4))


def test_kernel_uniform_refuses_a_state_outside_the_engine():
    lib = cpu._load()
    state = torch.Generator().manual_seed(1).get_state()
    struct.pack_into("<i", memoryview(state.numpy()), 8, 0)  # left = 0: not a valid engine state
    assert lib.nvfp4_mt_uniform(state.data_ptr(), 4, torch.empty(4).data_ptr()) == -1


# ----------------------------------------------------------------------------- the wgrad operands' copy


def test_transpose_padded_is_the_padded_transpose():
    g = torch.Generator().manual_seed(4)
    for T, C, multiple in [(1, 16, 16), (37, 48, 16), (64, 32, 32), (70, 96, 32), (33, 40, 64)]:
        x = torch.randn(T, C, generator=g)
        x[0, 0] = -0.0
        for t in (x, x.bfloat16(), torch.randn(T, 2 * C, generator=g)[:, ::2].contiguous(),
                  torch.randn(T, C + 8, generator=g)[:, :C]):  # a row stride longer than C
            want = torch.nn.functional.pad(t, (0, 0, 0, -T % multiple)).t().float()
            got = dispatch.transpose_padded(t, multiple)
            assert got.is_contiguous() and got.dtype == torch.float32
            assert torch.equal(bits(got), bits(want)), (T, C, t.dtype)
            assert torch.equal(bits(dispatch.transpose_padded(t, multiple, backend="torch")), bits(want))
    assert cpu.transpose_padded(torch.randn(16, 32).t(), 16) is None  # column stride != 1: torch copies
