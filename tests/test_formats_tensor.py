"""NVFP4Tensor as a torch tensor subclass: ops, the emulated NVFP4 GEMM, safetensors, torch.compile."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from test_formats_reference import DTYPES, f32_bits, ref_e2m1_value

import nvfp4kit as nk


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def same_parts(a, b):
    return (
        torch.equal(a.packed, b.packed)
        and torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
        and f32_bits(a.global_scale) == f32_bits(b.global_scale)
    )


def ref_gemm(a, b) -> np.ndarray:
    """float64 reference of a [M, K] @ b [N, K]^T from the stored parts (rows blocked along K):
    sum over blocks of the scaled products, then times both global decode scales."""

    def vals(q):
        p = q.packed.numpy()
        codes = np.empty((*p.shape[:-1], p.shape[-1] * 2), dtype=np.uint8)
        codes[..., 0::2] = p & 0xF
        codes[..., 1::2] = p >> 4
        s = np.repeat(q.block_scale.float().numpy().astype(np.float64), 16, axis=-1)
        return ref_e2m1_value(codes) * s

    return vals(a) @ vals(b).T * (float(a.global_scale) * float(b.global_scale))


# ----------------------------------------------------------------------------- basics


@pytest.mark.parametrize("dtype", DTYPES)
def test_is_a_wrapper_subclass_with_logical_shape_and_dtype(dtype):
    x = _x(3, 5, 32, dtype=dtype)
    q = nk.quantize(x)
    assert isinstance(q, torch.Tensor) and type(q) is nk.NVFP4Tensor
    assert q.shape == x.shape and q.dtype == dtype and q.device == x.device
    assert q.dim() == 3 and q.numel() == x.numel()
    assert not q.requires_grad
    assert q.dequantize().dtype == dtype
    assert q.dequantize(torch.float32).dtype == torch.float32
    assert torch.equal(nk.dequantize(q), q.dequantize())
    assert "NVFP4Tensor" in repr(q)
    assert f32_bits(q.global_encode_scale) == f32_bits(np.float32(1.0) / np.float32(q.global_scale))
    with pytest.raises(TypeError):
        nk.dequantize(x)


def test_unsupported_ops_raise_a_clear_error():
    q = nk.quantize(_x(4, 16))
    with pytest.raises(TypeError, match="dequantize"):
        torch.exp(q)
    with pytest.raises(TypeError, match="dequantize"):
        torch.add(q, 1)
    with pytest.raises(TypeError):
        q + 1


def test_detach_and_clone():
    q = nk.quantize(_x(4, 32))
    d = q.detach()
    assert type(d) is nk.NVFP4Tensor and same_parts(d, q)
    c = q.clone()
    assert type(c) is nk.NVFP4Tensor and same_parts(c, q)
    assert c.packed.data_ptr() != q.packed.data_ptr()
    assert c.block_scale.data_ptr() != q.block_scale.data_ptr()
    assert torch.equal(c.dequantize(), q.dequantize())


def test_to_device_and_dtype():
    q = nk.quantize(_x(4, 32))
    moved = q.to("cpu")
    assert type(moved) is nk.NVFP4Tensor and same_parts(moved, q) and moved.device.type == "cpu"
    moved = q.to(torch.device("cpu"))
    assert same_parts(moved, q)
    b = q.to(torch.bfloat16)
    assert type(b) is nk.NVFP4Tensor and b.dtype == torch.bfloat16 and same_parts(b, q)
    assert torch.equal(b.dequantize(), q.dequantize().to(torch.bfloat16))
    with pytest.raises(TypeError):
        q.to(torch.int32)


# ----------------------------------------------------------------------------- transpose, view, slice


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_transpose_of_a_matrix(block):
    x = _x(32, 48)
    q = nk.quantize(x, block=block)
    for qt in (q.t(), q.transpose(0, 1), q.transpose(-1, -2)):
        assert type(qt) is nk.NVFP4Tensor and qt.shape == (48, 32)
        assert torch.equal(qt.dequantize(), q.dequantize().t())
    back = q.t().t()
    assert back.shape == q.shape and torch.equal(back.dequantize(), q.dequantize())
    if block == (16, 16):
        assert same_parts(q.t(), nk.quantize(x.t().contiguous(), block=block))
    with pytest.raises(ValueError):
        nk.quantize(_x(2, 16, 32), block=block).transpose(0, 1)


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_dot_T_of_a_matrix_is_its_transpose(block):
    """``W.T`` (aten.permute with dims (1, 0) on a matrix) is the same transpose as ``W.t()``."""
    q = nk.quantize(_x(32, 48), block=block)
    qt = q.T
    assert type(qt) is nk.NVFP4Tensor and same_parts(qt, q.t())
    assert torch.equal(qt.dequantize(), q.dequantize().T)


def test_2d_transpose_of_a_partial_row_tile_keeps_row_parts():
    """With a partial last row tile the exact re-blocking is impossible: t() flags the transpose,
    keeps the row parts, and still represents exactly the transposed values; t().t() restores it."""
    q = nk.quantize(_x(20, 32), block=(16, 16))
    qt = q.t()
    assert qt.transposed and tuple(qt.shape) == (32, 20)
    assert torch.equal(qt.packed, q.packed)
    assert torch.equal(qt.dequantize(), q.dequantize().t())
    back = qt.t()
    assert not back.transposed and same_parts(back, q)


def test_view_and_reshape_keep_whole_blocks():
    x = _x(2, 3, 4, 32)
    q = nk.quantize(x)
    xh = q.dequantize()
    for shape in [(24, 32), (-1, 32), (6, 4, 32), (2, 12, 32)]:
        for op in ("view", "reshape"):
            v = getattr(q, op)(*shape)
            assert type(v) is nk.NVFP4Tensor
            assert torch.equal(v.dequantize(), xh.reshape(*shape))
    with pytest.raises(ValueError, match="last"):
        q.view(2, 3, 8, 16)
    with pytest.raises(ValueError, match="last"):
        q.reshape(-1)
    q2 = nk.quantize(_x(2, 3, 32, 16), block=(16, 16))
    assert torch.equal(q2.reshape(6, 32, 16).dequantize(), q2.dequantize().reshape(6, 32, 16))
    with pytest.raises(ValueError, match="16x16"):
        q2.reshape(2, 96, 16)


def test_view_of_a_transposed_matrix_to_its_own_shape():
    qt = nk.quantize(_x(16, 32)).t()
    for v in (qt.view(32, 16), qt.reshape(32, 16), qt.view(-1, 16)):
        assert type(v) is nk.NVFP4Tensor and torch.equal(v.dequantize(), qt.dequantize())


def test_slicing_by_whole_blocks():
    x = _x(6, 64)
    q = nk.quantize(x)
    xh = q.dequantize()
    for sl in [(slice(1, 4),), (slice(None), slice(16, 48)), (slice(None), slice(32, None)),
               (slice(2, None, 2), slice(0, 16)), (slice(-3, None),)]:
        s = q[sl]
        assert type(s) is nk.NVFP4Tensor
        assert torch.equal(s.dequantize(), xh[sl]), sl
    q3 = nk.quantize(_x(3, 4, 32))
    assert torch.equal(q3[1].dequantize(), q3.dequantize()[1])
    for bad in [(slice(None), slice(8, 24)), (slice(None), slice(0, 64, 2))]:
        with pytest.raises(ValueError, match="whole blocks"):
            q[bad]
    assert torch.equal(q[2].dequantize(), xh[2])  # a row keeps whole blocks
    with pytest.raises(ValueError, match="split blocks"):
        q[:, 5]


def test_slicing_2d_blocks_by_whole_tiles():
    q = nk.quantize(_x(48, 64), block=(16, 16))
    xh = q.dequantize()
    s = q[16:48, 16:32]
    assert torch.equal(s.dequantize(), xh[16:48, 16:32])
    with pytest.raises(ValueError, match="tiles"):
        q[3:19]


# ----------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("w_block", [(1, 16), (16, 16)])
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_linear_with_two_nvfp4_operands_is_the_emulated_gemm(w_block, x_dtype):
    x = _x(8, 64, seed=1, dtype=x_dtype) * 3
    w = _x(32, 64, seed=2) / 7
    qx = nk.quantize(x)
    qw = nk.quantize(w, block=w_block)
    ref = ref_gemm(qx, qw)  # parts are in row layout [N, K] for both block shapes
    for out in (F.linear(qx, qw), qx @ qw.t(), torch.mm(qx, qw.t()), torch.matmul(qx, qw.t())):
        assert out.dtype == x_dtype and out.shape == (8, 32)
        tol = 1e-5 if x_dtype == torch.float32 else 1e-2
        np.testing.assert_allclose(out.float().numpy(), ref, rtol=tol, atol=tol * np.abs(ref).max())
    bias = _x(32, seed=3).to(x_dtype)
    out = F.linear(qx, qw, bias)
    np.testing.assert_allclose(out.float().numpy(), ref + bias.double().numpy(), rtol=1e-2, atol=1e-2)


def test_gemm_is_exact_when_the_sums_are():
    """Power-of-two global scales and grid values: every partial sum is exact in float32, so the
    emulated GEMM must agree with the float64 reference bit for bit."""
    g = torch.Generator().manual_seed(4)
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6])
    a = grid[torch.randint(0, 15, (16, 64), generator=g)]
    b = grid[torch.randint(0, 15, (32, 64), generator=g)]
    a[:, ::16] = 6.0  # every block has amax 6; global amax 2688 -> S_enc = 1, block scales 1
    b[:, ::16] = -6.0
    qa = nk.quantize(a, global_amax=2688.0)
    qb = nk.quantize(b, global_amax=2688.0 * 4)
    ref = ref_gemm(qa, qb)
    out = F.linear(qa, qb)
    np.testing.assert_array_equal(out.numpy(), ref.astype(np.float32))
    np.testing.assert_array_equal(out.numpy(), (a.double() @ b.double().t()).float().numpy())


@pytest.mark.parametrize("n", [20, 40])
def test_linear_with_a_2d_block_weight_whose_rows_are_not_whole_tiles(n):
    """quantize(W, block=(16, 16)) accepts N % 16 != 0 (the last row tile is partial); such a weight
    must still work in F.linear, with a plain or an NVFP4 activation."""
    w = _x(n, 32, seed=10)
    qw = nk.quantize(w, block=(16, 16))
    x = _x(4, 32, seed=11)
    out = F.linear(x, qw)
    np.testing.assert_allclose(out.numpy(), (x.double() @ qw.dequantize().double().t()).numpy(), rtol=1e-5, atol=1e-5)
    qx = nk.quantize(x)
    out = F.linear(qx, qw)
    np.testing.assert_allclose(out.numpy(), ref_gemm(qx, qw), rtol=1e-5, atol=1e-5)


def test_nvfp4_gemm_function_and_mixed_operands():
    qx = nk.quantize(_x(4, 32, seed=5))
    qw = nk.quantize(_x(16, 32, seed=6))
    out = nk.nvfp4_gemm(qx.parts, qw.parts)
    np.testing.assert_allclose(out.numpy(), ref_gemm(qx, qw), rtol=1e-5, atol=1e-6)
    # a plain activation with an NVFP4 weight: the weight is dequantized
    x = _x(4, 32, seed=7)
    np.testing.assert_allclose(F.linear(x, qw).numpy(), (x @ qw.dequantize().t()).numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        nk.nvfp4_gemm(qx.parts, nk.quantize(_x(16, 48)).parts)


def test_linear_with_batched_activation():
    x = _x(2, 3, 32, seed=8)
    qx = nk.quantize(x)
    qw = nk.quantize(_x(16, 32, seed=9))
    out = F.linear(qx, qw)
    assert out.shape == (2, 3, 16)
    ref = ref_gemm(nk.quantize(x.reshape(6, 32)), qw).reshape(2, 3, 16)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_safetensors_roundtrip_through_parts(tmp_path, block):
    q = nk.quantize(_x(32, 64, dtype=torch.bfloat16), block=block)
    qt = nk.quantize(_x(16, 32, seed=1)).t()
    plain = _x(5, seed=2)
    path = tmp_path / "m.safetensors"
    nk.save_nvfp4({"w": q, "wt": qt, "bias": plain}, path)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary left behind
    # the file holds plain tensors only: the three parts of each NVFP4 tensor
    flat = load_file(str(path))
    assert flat["w.packed"].dtype == torch.uint8 and flat["w.packed"].shape == (32, 32)
    assert flat["w.block_scale"].dtype == torch.float8_e4m3fn and flat["w.block_scale"].shape == (32, 4)
    assert flat["w.global_decode_scale"].dtype == torch.float32
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()  # the logical dtype/block/layout live in the metadata
    back = nk.load_nvfp4(path)
    assert type(back["w"]) is nk.NVFP4Tensor and same_parts(back["w"], q)
    assert back["w"].dtype == torch.bfloat16 and back["w"].block == tuple(block)
    assert back["wt"].shape == (32, 16) and torch.equal(back["wt"].dequantize(), qt.dequantize())
    assert torch.equal(back["bias"], plain)


def test_load_with_a_missing_part_raises(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    nk.save_nvfp4({"w": nk.quantize(_x(4, 32))}, path)
    flat = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    del flat["w.block_scale"]
    save_file(flat, str(path), metadata=meta)
    from nvfp4kit.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"block_scale.*m\.safetensors"):
        nk.load_nvfp4(path)


# ----------------------------------------------------------------------------- torch.compile


def test_flatten_unflatten_roundtrip():
    q = nk.quantize(_x(16, 32), block=(16, 16)).to(torch.bfloat16)
    names, ctx = q.__tensor_flatten__()
    inner = {n: getattr(q, n) for n in names}
    r = nk.NVFP4Tensor.__tensor_unflatten__(inner, ctx, q.shape, q.stride())
    assert type(r) is nk.NVFP4Tensor and same_parts(r, q)
    assert r.dtype == q.dtype and r.block == q.block and r.shape == q.shape


def test_torch_compile_fullgraph_over_nvfp4_arguments():
    torch._dynamo.reset()

    def f(qx, qw, bias):
        y = F.linear(qx, qw, bias)
        return torch.relu(y) * 2

    qx = nk.quantize(_x(8, 32, seed=1))
    qw = nk.quantize(_x(16, 32, seed=2))
    bias = _x(16, seed=3)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(qx, qw, bias), f(qx, qw, bias), rtol=0, atol=0)

    def g(q):
        return q.t()

    out = torch.compile(g, fullgraph=True, backend="aot_eager")(qw)
    assert type(out) is nk.NVFP4Tensor and torch.equal(out.dequantize(), qw.dequantize().t())


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph_over_nvfp4_arguments():
    torch._dynamo.reset()

    def f(qx, qw, bias):
        return torch.relu(F.linear(qx, qw, bias)) * 2

    qx = nk.quantize(_x(8, 32, seed=1))
    qw = nk.quantize(_x(16, 32, seed=2), block=(16, 16))
    bias = _x(16, seed=3)
    out = torch.compile(f, fullgraph=True)(qx, qw, bias)
    torch.testing.assert_close(out, f(qx, qw, bias), rtol=1e-6, atol=1e-6)


def test_constructor_validates_parts():
    q = nk.quantize(_x(4, 32))
    with pytest.raises(TypeError, match="uint8"):
        nk.NVFP4Tensor(q.packed.to(torch.int16), q.block_scale, q.global_scale)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        nk.NVFP4Tensor(q.packed, q.block_scale.float(), q.global_scale)
    with pytest.raises(ValueError, match="block_scale shape"):
        nk.NVFP4Tensor(q.packed, q.block_scale[:, :1], q.global_scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_cuda_quantize_and_to_device_match_cpu(block):
    x = _x(32, 64, seed=12)
    q = nk.quantize(x, block=block)
    qc = nk.quantize(x.cuda(), block=block)
    assert qc.device.type == "cuda"
    assert same_parts(q, qc.to("cpu"))
    moved = q.to("cuda")
    assert type(moved) is nk.NVFP4Tensor and moved.packed.device.type == "cuda"
    assert torch.equal(moved.dequantize().cpu(), q.dequantize())
