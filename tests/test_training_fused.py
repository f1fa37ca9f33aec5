"""The NVFP4 training Linear's fused path (``qlinear.NVFP4FusedLinear``, the path CUDA tensors take), bit for bit.

Without a GPU, ``dispatch.force_fused("triton")`` runs it on CPU tensors through the Triton interpreter
(conftest sets ``TRITON_INTERPRET=1`` before triton is imported) and ``force_fused("torch")`` runs the same
steps with the reference of ``formats/``; the two agree to the bit for round-to-nearest. With a GPU the same
tests run the compiled kernels on CUDA tensors, and the tests marked ``cuda`` (skipped without one) check
what only the hardware path does: the bf16 cuBLAS GEMM, no host sync, the default dispatch.
Shapes stay tiny: the interpreter executes each program's tile as numpy arrays.
"""

from __future__ import annotations

import pytest
import torch

import triton  # noqa: F401  (after the interpreter switch in conftest)

from nvfp4kit.formats import gemm as ref_gemm
from nvfp4kit.formats import nvfp4 as ref
from nvfp4kit.formats.hadamard import rht_butterfly
from nvfp4kit.kernels import dispatch
from nvfp4kit.training.precision import LinearPrecision
from nvfp4kit.training.qlinear import emulated_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="the hardware path needs a CUDA GPU")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def u8(t):
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def assert_parts_equal(a: ref.NVFP4Parts, b: ref.NVFP4Parts):
    assert a.packed.shape == b.packed.shape and a.block_scale.shape == b.block_scale.shape
    assert torch.equal(a.packed.cpu(), b.packed.cpu()), "packed codes differ"
    assert torch.equal(u8(a.block_scale).cpu(), u8(b.block_scale).cpu()), "block scales differ"
    assert torch.equal(a.global_decode_scale.reshape(()).cpu(), b.global_decode_scale.reshape(()).cpu())


def rand(shape, seed, spread=6, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-spread, spread + 1, shape, generator=g).float())
    return x.to(dtype).to(device)


# ----------------------------------------------------------------------------- the exact GEMM


@pytest.mark.parametrize("block", [ref.BLOCK_1D, ref.BLOCK_2D])
def test_block_values_are_exact_in_bf16_on_both_backends(block):
    # a wide spread drives block scales into E4M3 subnormals and up to 448
    x = rand((32, 64), 1, spread=30)
    parts = ref.quantize_parts(x, block)
    want = ref.block_values(parts)
    for backend in ("torch", "triton"):
        got = dispatch.block_values(parts, torch.bfloat16, backend)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.float().cpu(), want.cpu()), backend  # bf16 holds every value exactly


def test_values_gemm_equals_formats_gemm_up_to_reassociation():
    # small integers with power-of-two scales: every partial sum is exact, so any order gives the same bits
    g = torch.Generator().manual_seed(2)
    a = ref.quantize_parts(torch.randint(-6, 7, (48, 96), generator=g).float().to(DEVICE), global_amax=2688.0)
    b = ref.quantize_parts(torch.randint(-6, 7, (32, 96), generator=g).float().to(DEVICE), (16, 16),
                           global_amax=2688.0)
    alpha = a.global_decode_scale.float() * b.global_decode_scale.float()
    got = dispatch.values_gemm(dispatch.block_values(a), dispatch.block_values(b), alpha)
    assert got.dtype == torch.float32
    assert torch.equal(got.cpu(), ref_gemm.nvfp4_gemm(a, b).cpu())
    # random operands: the same products, float32 sums within the reassociation bound K * 2^-23 * sum|a b|
    a = ref.quantize_parts(rand((40, 80), 3))
    b = ref.quantize_parts(rand((24, 80), 4), (16, 16))
    alpha = (a.global_decode_scale.double() * b.global_decode_scale.double()).cpu()
    got = dispatch.values_gemm(dispatch.block_values(a), dispatch.block_values(b),
                               a.global_decode_scale.float() * b.global_decode_scale.float())
    va, vb = ref.block_values(a).double().cpu(), ref.block_values(b).double().cpu()
    exact = (va @ vb.t()) * alpha
    bound = 80 * 2.0**-23 * (va.abs() @ vb.abs().t()) * alpha
    assert bool(((got.double().cpu() - exact).abs() <= bound + 1e-30).all())
    ref_out = ref_gemm.nvfp4_gemm(a, b).double().cpu()
    assert bool(((got.double().cpu() - ref_out).abs() <= 2 * bound + 1e-30).all())


# ----------------------------------------------------------------------------- the fused operations


@pytest.mark.parametrize("rht", [False, True])
def test_fused_operations_triton_equal_torch(rht):
    x = rand((48, 32), 5, dtype=torch.bfloat16)
    sign = tuple([1, -1] * 8)
    got = dispatch.quantize_rowwise_columnwise(x, columnwise_rht=rht, rht_sign=sign, backend="triton")
    want = dispatch.quantize_rowwise_columnwise(x, columnwise_rht=rht, rht_sign=sign, backend="torch")
    for g, w in zip(got, want):
        assert_parts_equal(g, w)
    # the torch side is the format core itself
    assert_parts_equal(want[0], ref.quantize_parts(x))
    assert_parts_equal(want[1], ref.quantize_parts(rht_butterfly(x.t(), sign) if rht else x.t()))
    amax = dispatch.global_amax(x.t(), rht=True, backend="torch")
    assert torch.equal(dispatch.global_amax(x.t(), rht=True, backend="triton").cpu(), amax.cpu())
    assert_parts_equal(dispatch.rht_quantize(x.t(), global_amax=amax, backend="triton"),
                       dispatch.rht_quantize(x.t(), global_amax=amax, backend="torch"))
    for block in (ref.BLOCK_1D, ref.BLOCK_2D):
        assert_parts_equal(dispatch.fused_quantize(x, block, backend="triton"), ref.quantize_parts(x, block))
    with pytest.raises(ValueError, match="multiple of 16"):
        dispatch.quantize_rowwise_columnwise(x[:40], backend="torch")


def test_nan_checks_are_deferred_to_one_per_step():
    x = rand((32, 32), 6)
    x[3, 7] = float("nan")
    count = dispatch.nonfinite_counter(DEVICE)
    dispatch.fused_quantize(x, backend="triton", nonfinite=count)  # no host sync, no raise here
    dispatch.quantize_rowwise_columnwise(x, columnwise_rht=True, backend="triton", nonfinite=count)
    with pytest.raises(ValueError, match="NaN or inf"):
        dispatch.raise_if_nonfinite()
    dispatch.raise_if_nonfinite()  # the counter restarted
    with pytest.raises(ValueError, match="NaN"):  # without a counter the kernels raise at once, as the reference
        dispatch.fused_quantize(x, backend="triton")
    # through the training Linear: forward and backward run, the step's check raises
    w = rand((16, 32), 7).requires_grad_()
    with dispatch.force_fused("triton"):
        y = emulated_linear(x.clone().requires_grad_(), w, None, LinearPrecision("nvfp4"))
        y.sum().backward()
    with pytest.raises(ValueError, match="NVFP4 Linear operand"):
        dispatch.raise_if_nonfinite()


def test_force_fused_switch():
    assert dispatch.fused_backend("cpu") is None  # the CPU's own path unless forced
    with dispatch.force_fused("torch"):
        assert dispatch.fused_backend("cpu") == "torch"
        with dispatch.force_fused("triton"):
            assert dispatch.fused_backend("cpu") == "triton"
        assert dispatch.fused_backend("cpu") == "torch"
    assert dispatch.fused_backend("cpu") is None
    with pytest.raises(ValueError, match="force_fused"):
        with dispatch.force_fused("compiled"):
            pass


# ----------------------------------------------------------------------------- the training Linear


def _linear_run(mode, precision, x, w, b, seed=1, grad_x=True, grad_w=True):
    xx, ww = x.clone().requires_grad_(grad_x), w.clone().requires_grad_(grad_w)
    bb = None if b is None else b.clone().requires_grad_()
    torch.manual_seed(seed)
    if DEVICE == "cuda":
        torch.cuda.manual_seed(seed)
    if mode is None:
        y = emulated_linear(xx, ww, bb, precision)
    else:
        with dispatch.force_fused(mode):
            y = emulated_linear(xx, ww, bb, precision)
    dy = rand(tuple(y.shape), 99, 2, device=y.device).to(y.dtype)
    y.backward(dy)
    return [y.detach(), xx.grad, ww.grad] + ([] if b is None else [bb.grad])


NEAREST = dict(stochastic_rounding=False)


@pytest.mark.parametrize("switches, x_dtype", [
    ({}, torch.float32),  # 16x16 weights, RHT; 40 tokens: padded to 48 for the columnwise operands
    (dict(weight_2d=False, rht_sign=tuple([1, -1] * 8)), torch.bfloat16),
    (dict(rht=False, four_over_six=True), torch.float32),
    (dict(rht_size=32), torch.float32),  # an RHT size the kernels do not fuse: the per-operation wgrad
])
def test_fused_linear_triton_is_bit_identical_to_the_reference(switches, x_dtype):
    p = LinearPrecision("nvfp4", **NEAREST, **switches)
    x, w, b = rand((40, 64), 10, dtype=x_dtype), rand((32, 64), 11, 2) * 0.1, rand((32,), 12, 1)
    got = _linear_run("triton", p, x, w, b)
    want = _linear_run("torch", p, x, w, b)
    for name, g, r in zip(("y", "dx", "dw", "db"), got, want):
        assert g.dtype == r.dtype and torch.equal(g.cpu(), r.cpu()), name


@pytest.mark.parametrize("grad_x, grad_w, rht", [(False, True, True), (False, True, False), (True, False, True)])
def test_fused_linear_single_gradient_paths(grad_x, grad_w, rht):
    """Only wgrad (an input without grad: RHT(dy^T) alone, or dy^T read through its transposed view) or only
    dgrad (a frozen weight: no columnwise x in the forward), triton against the reference."""
    p = LinearPrecision("nvfp4", rht=rht, **NEAREST)
    x, w = rand((24, 32), 40), rand((16, 32), 41, 2) * 0.1
    got = _linear_run("triton", p, x, w, None, grad_x=grad_x, grad_w=grad_w)
    want = _linear_run("torch", p, x, w, None, grad_x=grad_x, grad_w=grad_w)
    both = _linear_run("torch", p, x, w, None)
    for i, (g, r) in enumerate(zip(got, want)):
        assert (g is None) == (r is None) and (g is None) == ((i == 1 and not grad_x) or (i == 2 and not grad_w))
        if g is not None:
            assert torch.equal(g.cpu(), r.cpu()), i
            assert torch.equal(g.cpu(), both[i].cpu()), i  # the same numbers as with both gradients


def test_fused_linear_inference_under_no_grad():
    p = LinearPrecision("nvfp4", **NEAREST)
    x, w = rand((24, 32), 44), (rand((16, 32), 45, 2) * 0.1).requires_grad_()
    with torch.no_grad(), dispatch.force_fused("triton"):
        y = emulated_linear(x, w, None, p)  # fprop only: no columnwise x is computed or kept
    assert y.grad_fn is None
    assert torch.equal(y.cpu(), _linear_run("torch", p, x, w.detach(), None)[0].cpu())


def test_fused_linear_with_the_amax_reduction_switched_on():
    """With the data-parallel amax reduction on (no process group here: the reduction is the identity) the
    amaxes are computed first and handed to the kernels: the same bits as the kernels' own amax."""
    from nvfp4kit.training.qlinear import set_amax_reduction

    p = LinearPrecision("nvfp4", **NEAREST)
    x, w = rand((32, 32), 42), rand((16, 32), 43, 2) * 0.1
    plain = _linear_run("triton", p, x, w, None)
    set_amax_reduction(None, True)
    try:
        for mode in ("triton", "torch"):
            for g, r in zip(_linear_run(mode, p, x, w, None), plain):
                assert torch.equal(g.cpu(), r.cpu()), mode
    finally:
        set_amax_reduction(None, False)


def test_fused_linear_computes_the_recipe_of_the_format_core():
    """y, dx and dW against the recipe written with ``formats/`` alone (quantize, butterfly RHT with the
    precision's sign, zero-padded tokens, the emulated GEMM): equal up to float32 reassociation."""
    import torch.nn.functional as F

    sign = tuple([1, 1, -1, -1] * 4)
    p = LinearPrecision("nvfp4", rht_sign=sign, **NEAREST)
    x, w, b = rand((40, 64), 30), rand((32, 64), 31, 2) * 0.1, rand((32,), 32, 1)
    y, dx, dw, db = _linear_run("triton", p, x, w, b)
    dy = rand(tuple(y.shape), 99, 2, device=y.device)
    qw = ref.quantize_parts(w, ref.BLOCK_2D)
    pad = lambda t: F.pad(t, (0, 0, 0, 8))  # noqa: E731 - 40 tokens -> 48
    want = {
        "y": ref_gemm.nvfp4_gemm(ref.quantize_parts(x), qw) + b,
        "dx": ref_gemm.nvfp4_gemm(ref.quantize_parts(dy), ref.transpose_2d_parts(qw)),
        "dw": ref_gemm.nvfp4_gemm(ref.quantize_parts(rht_butterfly(pad(dy).t(), sign)),
                                  ref.quantize_parts(rht_butterfly(pad(x).t(), sign))),
    }
    for name, got in (("y", y), ("dx", dx), ("dw", dw)):
        r = want[name]
        assert torch.allclose(got.cpu(), r.cpu(), rtol=1e-5, atol=1e-5 * float(r.abs().max())), name
    assert torch.equal(db.cpu(), dy.sum(0).cpu())
    # a different sign is a different wgrad operand (the RHT cancels in the product, the rounding does not)
    other = ref_gemm.nvfp4_gemm(ref.quantize_parts(rht_butterfly(pad(dy).t())), ref.quantize_parts(
        rht_butterfly(pad(x).t())))
    assert not torch.allclose(dw.cpu(), other.cpu(), rtol=1e-5, atol=1e-5 * float(other.abs().max()))


@pytest.mark.parametrize("rht", [False, True])
def test_fused_linear_matches_the_cpu_path(rht):
    """On CPU the fused steps equal the per-operation path: fprop and dgrad to the bit (same quantized
    operands, same float32 products and sums); wgrad to the bit without RHT, and with it up to the float32
    rounding of the RHT's sums (butterfly vs matrix product)."""
    p = LinearPrecision("nvfp4", rht=rht, **NEAREST)
    x, w, b = rand((32, 64), 13, device="cpu"), rand((48, 64), 14, 2, device="cpu") * 0.1, rand((48,), 15, 1,
                                                                                                  device="cpu")
    y, dx, dw, db = _linear_run("torch", p, x, w, b)
    y0, dx0, dw0, db0 = _linear_run(None, p, x, w, b)
    assert torch.equal(y, y0) and torch.equal(dx, dx0) and torch.equal(db, db0)
    if rht:
        assert torch.allclose(dw, dw0, rtol=0.05, atol=0.05 * float(dw0.abs().max()))
        assert float((dw - dw0).norm() / dw0.norm()) < 0.05
    else:
        assert torch.equal(dw, dw0)


def test_fused_stochastic_rounding_is_seeded_by_the_default_generator():
    p = LinearPrecision("nvfp4")
    x, w = rand((32, 64), 16), rand((32, 64), 17, 2) * 0.1
    a = _linear_run("triton", p, x, w, None, seed=3)
    b = _linear_run("triton", p, x, w, None, seed=3)
    c = _linear_run("triton", p, x, w, None, seed=4)
    near = _linear_run("triton", LinearPrecision("nvfp4", **NEAREST), x, w, None)
    for g, r in zip(a, b):
        assert torch.equal(g, r)  # reproducible for a seed (exact resume restores the generator)
    assert torch.equal(a[0], near[0])  # fprop rounds to nearest
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])  # dgrad and wgrad draw
    assert not torch.equal(a[1], near[1])
    for g, r in zip(a[1:], near[1:]):  # unbiased rounding stays near the nearest-rounded gradient
        assert float((g - r).norm() / r.norm()) < 0.3


def test_tiny_model_forward_backward_through_the_kernels_is_bit_identical():
    from nvfp4kit.model.lm import build_model
    from nvfp4kit.training.loop import model_loss
    from nvfp4kit.training.recipes import apply_recipe

    model = build_model("micro", hybrid_override_pattern="M-", num_nextn_predict_layers=0, vocab_size=64,
                        hidden_size=64, intermediate_size=128, mamba_num_heads=4, device=torch.device(DEVICE))
    resolved = apply_recipe(model, "all-nvfp4", flags=["no-sr"], show=False)
    assert sum(r.precision.format == "nvfp4" for r in resolved) >= 3
    batch = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def step(mode):
        model.zero_grad(set_to_none=True)
        with dispatch.force_fused(mode):
            loss, _ = model_loss(model, batch)
            loss.backward()
        return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    loss_t, grads_t = step("triton")
    loss_r, grads_r = step("torch")
    assert torch.equal(loss_t, loss_r)
    assert grads_t.keys() == grads_r.keys() and len(grads_t) > 5
    for name in grads_t:
        assert torch.equal(grads_t[name], grads_r[name]), name


def test_nemotron3_recipe_on_the_fused_path_equals_the_cpu_path():
    """Every precision of the recipe (NVFP4 with experts, MXFP8, BF16) on the micro model: the fused steps'
    loss equals the CPU path's to the bit (fprop is the same numbers), the gradients up to the RHT's sums."""
    from nvfp4kit.model.lm import build_model
    from nvfp4kit.training.loop import model_loss
    from nvfp4kit.training.recipes import apply_recipe

    model = build_model("micro", seed=0)
    apply_recipe(model, "nemotron3", flags=["no-sr"], show=False)
    batch = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    out = []
    for forced in (True, False):
        model.zero_grad(set_to_none=True)
        with dispatch.force_fused("torch") if forced else torch.enable_grad():
            loss, _ = model_loss(model, batch)
            loss.backward()
        out.append((loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}))
    (loss_f, grads_f), (loss_c, grads_c) = out
    assert torch.equal(loss_f, loss_c)
    assert grads_f.keys() == grads_c.keys()
    for name, g in grads_c.items():
        assert float((grads_f[name] - g).norm()) <= 1e-4 * float(g.norm()) + 1e-12, name


def test_train_device_option_errors_clearly_without_cuda(monkeypatch, tmp_path):
    from nvfp4kit.pipelines.train import TrainOptions, run_training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda.*no usable CUDA device"):
        run_training(TrainOptions(out=str(tmp_path / "run"), texts=["hello"], device="cuda"))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the hardware path (CUDA only)


@pytest.mark.cuda
@cuda_only
def test_cuda_takes_the_fused_path_without_host_syncs():
    assert dispatch.fused_backend("cuda") == "triton"
    p = LinearPrecision("nvfp4")
    x = rand((64, 128), 20, dtype=torch.bfloat16).requires_grad_()
    w = (rand((64, 128), 21, 2) * 0.1).requires_grad_()
    emulated_linear(x, w, None, p).sum().backward()  # warm-up: compilation syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = emulated_linear(x, w, None, p)
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dispatch.raise_if_nonfinite()


@pytest.mark.cuda
@cuda_only
def test_cuda_training_step_matches_the_cpu_emulation():
    """The same weights and batch on CUDA (fused kernels, bf16 cuBLAS GEMMs) and on the CPU (compiled
    kernels, float32 GEMMs): the loss within float reassociation, the gradients close."""
    from nvfp4kit.model.lm import build_model
    from nvfp4kit.training.loop import model_loss
    from nvfp4kit.training.recipes import apply_recipe

    out = {}
    for dev in ("cpu", "cuda"):
        model = build_model("micro", seed=0, device=torch.device(dev))
        apply_recipe(model, "nemotron3", flags=["no-sr"], show=False)
        batch = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1)).to(dev)
        loss, _ = model_loss(model, batch)
        loss.backward()
        out[dev] = (float(loss), {n: q.grad.detach().cpu() for n, q in model.named_parameters() if q.grad is not None})
    assert abs(out["cuda"][0] - out["cpu"][0]) <= 1e-3 * abs(out["cpu"][0])
    for name, g in out["cpu"][1].items():
        assert float((out["cuda"][1][name] - g).norm()) <= 0.05 * float(g.norm()) + 1e-8, name


@pytest.mark.cuda
@cuda_only
def test_cuda_gemm_without_mm_out_dtype_falls_back_to_float32(monkeypatch):
    """A torch without ``mm(..., out_dtype=)`` multiplies the same exact values in float32."""
    g = torch.Generator().manual_seed(5)
    a = ref.quantize_parts(torch.randint(-6, 7, (32, 64), generator=g).float().cuda(), global_amax=2688.0)
    b = ref.quantize_parts(torch.randint(-6, 7, (16, 64), generator=g).float().cuda(), global_amax=2688.0)
    va, vb = dispatch.block_values(a), dispatch.block_values(b)
    alpha = a.global_decode_scale.float() * b.global_decode_scale.float()
    fast = dispatch.values_gemm(va, vb, alpha)
    real_mm = torch.mm

    def old_mm(*args, **kw):
        if "out_dtype" in kw:
            raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
        return real_mm(*args, **kw)

    monkeypatch.setattr(torch, "mm", old_mm)
    slow = dispatch.values_gemm(va, vb, alpha)
    assert slow.dtype == torch.float32 and torch.equal(slow, fast)
    assert torch.equal(slow.cpu(), ref_gemm.nvfp4_gemm(a, b).cpu())
