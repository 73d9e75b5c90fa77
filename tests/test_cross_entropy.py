"""cross_entropy and linear_cross_entropy against F.cross_entropy in float64.

Tolerances: fp32 inputs rtol 1e-5 (1e-4 for the torch backend, which is F.cross_entropy in fp32) (atol 1e-5 x the largest reference value, for entries that
cancel to ~0); bf16/fp16 inputs 1e-2 (the gradient is stored in the input dtype). The triton
backend runs through the interpreter on CPU, so it gets a smaller sweep here and a large one
on GPU.
"""
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlm.bench import cross_entropy as bench_ce
from fastlm.ops import BackendUnavailable
from fastlm.ops import loss as ce_module
from fastlm.ops.loss import (backend_reasons, cross_entropy, cross_entropy_reference, linear_cross_entropy,
                             linear_cross_entropy_reference)
from tests.helpers import LogOps, count_calls, skip_unless_usable

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def usable(backend, device="cpu"):
    return backend_reasons(torch.device(device))[backend] is None


def skip_unless(backend, device="cpu"):
    skip_unless_usable("cross_entropy", backend, device)


def ran(backend):
    """Count the calls of `backend`'s kernel (the torch backend of cross_entropy is its reference)."""
    if backend == "torch":
        return count_calls(ce_module, "cross_entropy_reference")
    return count_calls(ce_module._ROW_KERNELS, backend)


def make_targets(n, vocab, ignore, ignore_index=-100, device="cpu"):
    targets = torch.randint(0, vocab, (n,), device=device)
    if ignore == "some" and n > 1:
        targets[torch.randperm(n, device=device)[: max(1, n // 3)]] = ignore_index
    elif ignore == "all":
        targets.fill_(ignore_index)
    return targets


def assert_close(out, ref, tol, what, floor=1e-3, chunk=1 << 22):
    """rtol=tol, and atol=tol x the largest |ref| (at least `floor`): entries that cancel to ~0
    carry the rounding error of their larger terms. Compared `chunk` entries at a time in float64,
    so a GPU-sized gradient (4099 x 50257) needs no full-size float64 temporaries."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.reshape(-1), ref.reshape(-1)
    scale = None  # the largest finite |ref|
    for start in range(0, ref.numel(), chunk):
        part = ref[start:start + chunk].double()
        part = part[torch.isfinite(part)]
        if part.numel():
            scale = max(scale or 0.0, part.abs().max().item())
    atol = tol * max(1.0 if scale is None else scale, floor)
    for start in range(0, ref.numel(), chunk):
        torch.testing.assert_close(out[start:start + chunk].double(), ref[start:start + chunk].double(),
                                   rtol=tol, atol=atol, equal_nan=True,
                                   msg=lambda m, start=start: f"{what} (flat entries from {start}): {m}")


def check_against_reference(backend, logits, targets, grad_out_seed=1, **options):
    """Loss and gradient of `backend` vs float64 F.cross_entropy on the same input values."""
    tol = TOL[logits.dtype]
    if backend == "torch" and logits.dtype == torch.float32:
        tol = 1e-4  # F.cross_entropy's own fp32 backward (label smoothing sums V terms in fp32)
    # The backend runs first and its graph is gone before the float64 reference is built, so a
    # GPU-sized case holds one of the two at a time.
    # A non-leaf input, as in training, lets the fused backends reuse the logits buffer.
    leaf = logits.detach().clone().requires_grad_()
    with ran(backend) as calls:
        out = cross_entropy(leaf * 1, targets, backend=backend, **options)
    assert calls, f"the {backend} kernel did not run"
    assert out.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.rand(out.shape, generator=gen, dtype=torch.float64).to(out.device) + 0.5
    out.backward(grad_out.to(out.dtype))
    out, grad = out.detach(), leaf.grad
    del leaf
    assert grad.dtype == logits.dtype

    ref_in = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(ref_in, targets, **options)
    assert out.shape == ref.shape
    # A loss is a difference of terms of the size of the logits.
    assert_close(out, ref, tol, f"{backend} loss", floor=max(1.0, logits.abs().max().item()))
    ref.backward(grad_out)
    ref_grad = ref_in.grad
    del ref, ref_in
    # A gradient entry is a difference of probabilities times its row's weight.
    count = (targets != options.get("ignore_index", -100)).sum().clamp_min(1).item()
    row_weight = grad_out.max().item() / (count if options.get("reduction", "mean") == "mean" else 1)
    assert_close(grad, ref_grad, tol, f"{backend} grad", floor=row_weight)


# ---------------------------------------------------------------------------------------------
# cross_entropy: shapes x dtypes x reductions (all options on), torch and cpp
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab", [(1, 1), (3, 7), (257, 256), (3, 1000), (257, 1000), (1, 50257),
                                     (257, 50257)])
def test_shapes_dtypes(backend, reduction, dtype, n, vocab):
    skip_unless(backend)
    if n * vocab > 1_000_000 and (dtype != torch.float32 or reduction == "sum"):
        pytest.skip("the largest shape runs once per backend/reduction, in fp32")
    logits = (torch.randn(n, vocab) * 3).to(dtype)
    targets = make_targets(n, vocab, "some")
    check_against_reference(backend, logits, targets, reduction=reduction, label_smoothing=0.1,
                            z_loss=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["absent", "some", "all"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_options(backend, reduction, ignore, label_smoothing, z_loss):
    skip_unless(backend)
    logits = torch.randn(67, 256) * 2
    ignore_index = -1 if ignore == "some" else -100
    targets = make_targets(67, 256, ignore, ignore_index)
    check_against_reference(backend, logits, targets, reduction=reduction, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, z_loss=z_loss)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_all_ignored_matches_torch(backend):
    skip_unless(backend)
    logits = torch.randn(5, 11, requires_grad=True)
    targets = torch.full((5,), -100)
    mean = cross_entropy(logits * 1, targets, backend=backend)
    assert torch.isnan(mean)  # 0 / 0, as F.cross_entropy gives
    mean.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert cross_entropy(logits, targets, reduction="sum", backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_float64_exact(backend):
    skip_unless(backend)
    logits = torch.randn(31, 97, dtype=torch.float64)
    check_against_reference(backend, logits, make_targets(31, 97, "some"), label_smoothing=0.2, z_loss=0.1)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, reduction):
    """gradcheck runs several backwards, so fused cross_entropy is checked through the chunked
    linear_cross_entropy (whose backward is repeatable) on top of the same kernel."""
    skip_unless(backend)
    hidden = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    # Chunks of 4 rows: each chunk has ignored and counted rows, so a chunk-accumulation bug shows.
    targets = make_targets(6, 9, "absent")
    targets[[1, 4]] = -100
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, targets, reduction=reduction, label_smoothing=0.1,
                                          z_loss=0.05, chunk_size=4, backend=backend), (hidden, weight))
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy(x, targets, reduction=reduction, label_smoothing=0.1, z_loss=0.05,
                                backend="torch"), (logits,))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_3d_and_non_contiguous(backend):
    skip_unless(backend)
    logits = torch.randn(2, 5, 37)
    targets = make_targets(10, 37, "some").reshape(2, 5)
    check_against_reference(backend, logits, targets, reduction="none", label_smoothing=0.1)
    check_against_reference(backend, logits, targets, z_loss=1e-4)
    wide = torch.randn(7, 50)
    check_against_reference(backend, wide[:, 3:40], make_targets(7, 37, "some"))  # row stride 50
    check_against_reference(backend, wide.t()[:37], make_targets(37, 7, "some"))  # column stride 50


# ---------------------------------------------------------------------------------------------
# triton through the interpreter (small), and on GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab", [(1, 1), (3, 7), (257, 256), (3, 1000), (3, 50257)])
def test_triton(dtype, n, vocab):
    skip_unless("triton")
    logits = (torch.randn(n, vocab) * 3).to(dtype)
    targets = make_targets(n, vocab, "some")
    check_against_reference("triton", logits, targets, reduction="none", label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.parametrize("programs,backward", [(1, True), (3, False), (3, True), (None, False)])
def test_triton_grid_and_gradient_walk_settings_give_the_same_bits(programs, backward, monkeypatch):
    """A bounded grid (each program looping over blocks of rows, as on CUDA) and either order of the
    gradient walk compute every element the same way: bit-equal losses and gradients, on rows with an
    unaligned head and foot, several body tiles, label smoothing and ignored rows."""
    skip_unless("triton")
    from fastlm.triton_kernels import cross_entropy as kernel

    logits = torch.randn(37, 5003) * 3
    targets = make_targets(37, 5003, "some")
    leaf = logits.clone().requires_grad_()
    want = cross_entropy(leaf * 1, targets, reduction="none", label_smoothing=0.1, backend="triton")
    (want_grad,) = torch.autograd.grad(want.sum(), leaf)
    monkeypatch.setattr(kernel, "BACKWARD_GRAD_WALK", backward)
    if programs is not None:
        monkeypatch.setattr(kernel, "_grid", lambda n_blocks, device, aligned_rows: (min(n_blocks, programs),))
    got = cross_entropy(leaf * 1, targets, reduction="none", label_smoothing=0.1, backend="triton")
    (got_grad,) = torch.autograd.grad(got.sum(), leaf)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,vocab", [(1, 1), (257, 1000), (4099, 50257), (1024, 128256), (64, 262144)])
def test_triton_gpu(dtype, reduction, n, vocab):
    skip_unless("triton", "cuda")
    logits = (torch.randn(n, vocab, device="cuda") * 3).to(dtype)
    targets = make_targets(n, vocab, "some", device="cuda")
    check_against_reference("triton", logits, targets, reduction=reduction, label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [label for label, _ in bench_ce.KERNEL_VARIANTS])
@pytest.mark.parametrize("n,vocab", [(257, 50257), (130, 50304), (64, 128256)])
def test_triton_gpu_benchmark_variants(variant, n, vocab, monkeypatch):
    """Every kernel setting the benchmark times (a candidate default) is right on the GPU: bf16,
    unaligned and aligned rows, label smoothing, z-loss and ignored rows, against float64."""
    skip_unless("triton", "cuda")
    from fastlm.triton_kernels import cross_entropy as kernel

    for name, value in dict(bench_ce.KERNEL_VARIANTS)[variant].items():
        monkeypatch.setattr(kernel, name, value)
    logits = (torch.randn(n, vocab, device="cuda") * 3).bfloat16()
    targets = make_targets(n, vocab, "some", device="cuda")
    check_against_reference("triton", logits, targets, reduction="mean", label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_gpu_all_rows_ignored(reduction):
    skip_unless("triton", "cuda")
    logits = (torch.randn(300, 50257, device="cuda") * 3).bfloat16()
    check_against_reference("triton", logits, make_targets(300, 50257, "all", device="cuda"), reduction=reduction)


@pytest.mark.gpu
def test_triton_gpu_int64_offsets():
    skip_unless("triton", "cuda")
    n, vocab = 16500, 131072  # n * vocab > 2**31: the last rows start past 2**31 elements
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    targets = make_targets(n, vocab, "some", device="cuda")
    targets[-3:] = torch.tensor([0, vocab - 1, 12345], device="cuda")
    last = logits[-3:].double().requires_grad_()
    ref = cross_entropy_reference(last, targets[-3:], reduction="none")
    ref.sum().backward()
    leaf = logits.requires_grad_()
    out = cross_entropy(leaf * 1, targets, reduction="none", backend="triton")
    assert_close(out[-3:], ref, 1e-2, "loss of the last rows", floor=1.0)
    out.sum().backward()
    assert_close(leaf.grad[-3:], last.grad, 1e-2, "gradient of the last rows", floor=1.0)
    assert not leaf.grad[:-3].isnan().any()


def check_linear_within_twice_torch_error(backend, n, dim, vocab, chunk_size, device):
    """bf16 hidden and weight: the loss and both gradients against float64, each within twice the
    error of the unfused PyTorch pipeline in the same dtype (bf16 lm_head matmul, F.cross_entropy
    in fp32 on its output, the backward through both). A grad_weight summed over chunks in bf16
    would round once per chunk and miss this; it must be accumulated in fp32."""
    hidden = torch.randn(n, dim, device=device).bfloat16()
    weight = (torch.randn(vocab, dim, device=device) / dim ** 0.5).bfloat16()
    targets = make_targets(n, vocab, "some", device=device)
    results = {}
    for name in ("fused", "pytorch", "float64"):
        inputs = [t.detach().clone().to(torch.float64 if name == "float64" else t.dtype).requires_grad_()
                  for t in (hidden, weight)]
        if name == "fused":
            with count_calls(ce_module._ROW_KERNELS, backend) as calls:
                loss = linear_cross_entropy(*inputs, targets, chunk_size=chunk_size, backend=backend)
            assert calls, f"the {backend} kernel did not run"
        else:
            loss = linear_cross_entropy_reference(*inputs, targets)
        results[name] = (loss, *torch.autograd.grad(loss, inputs))
    for i, what in enumerate(("loss", "grad hidden", "grad weight")):
        got, pt, want = (results[name][i].double() for name in ("fused", "pytorch", "float64"))
        assert results["fused"][i].dtype == (torch.float32 if i == 0 else torch.bfloat16), what
        err, err_pt = (got - want).abs().max().item(), (pt - want).abs().max().item()
        assert err <= 2 * err_pt + 1e-6, f"{what}: max error {err:.3e} > 2 x PyTorch's {err_pt:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("n,dim,vocab,chunk_size", [(2048, 768, 50257, 256), (1024, 4096, 128256, 256)])
def test_triton_gpu_linear_bf16_within_twice_torch_error(n, dim, vocab, chunk_size):
    skip_unless("triton", "cuda")
    check_linear_within_twice_torch_error("triton", n, dim, vocab, chunk_size, "cuda")


@pytest.mark.gpu
def test_triton_gpu_linear_bf16_memory_is_the_accumulator_and_one_chunk():
    """At Llama 3's lm_head (V=128256, D=4096, bf16) a fwd+bwd adds the weight gradient's fp32
    accumulator (which the bf16 gradient then lives in), one chunk of logits and the hidden
    gradient, plus the V/8 slice of a product where torch's matmul cannot accumulate into fp32."""
    skip_unless("triton", "cuda")
    n, dim, vocab = 8192, 4096, 128256
    hidden = torch.randn(n, dim, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(vocab, dim, device="cuda") / dim**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    chunk_rows = ce_module.default_chunk_rows(n, vocab, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(hidden, weight, targets, backend="triton").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = vocab * dim * 4 + chunk_rows * vocab * 2 + n * dim * 2 + 64 * 2**20
    if ce_module.weight_grad_accumulation() == "slices":
        bound += (vocab // ce_module.WEIGHT_GRAD_SLICES + 64) * dim * 2
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    assert weight.grad.dtype == torch.bfloat16 and weight.grad.untyped_storage().nbytes() == vocab * dim * 4


def test_linear_bf16_within_twice_torch_error_on_cpu():
    # The GPU criterion on CPU (cpp: the interpreter rounds bf16 by truncation, see test_attention).
    skip_unless("cpp")
    check_linear_within_twice_torch_error("cpp", 600, 64, 1000, 32, "cpu")


# ---------------------------------------------------------------------------------------------
# Buffer reuse and autograd behaviour of the fused path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_overwrites_intermediate_not_leaf(backend):
    skip_unless(backend)
    leaf = torch.randn(9, 33, requires_grad=True)
    targets = make_targets(9, 33, "some")
    before = leaf.detach().clone()
    cross_entropy(leaf, targets, backend=backend).backward()
    assert torch.equal(leaf.detach(), before)  # callers' tensors are never overwritten
    assert_close(leaf.grad, cross_entropy_grad(before, targets), 1e-5, "leaf grad")
    leaf.grad = None
    scaled = leaf * 2.0
    cross_entropy(scaled, targets, backend=backend).backward()
    assert not torch.equal(scaled.detach(), before * 2.0)  # the intermediate now holds the gradient
    assert_close(leaf.grad, 2.0 * cross_entropy_grad(before * 2.0, targets), 1e-5, "chain rule")


def cross_entropy_grad(logits, targets):
    x = logits.detach().double().requires_grad_()
    cross_entropy_reference(x, targets).backward()
    return x.grad


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_backward_twice_raises(backend):
    skip_unless(backend)
    logits = torch.randn(4, 10, requires_grad=True)
    loss = cross_entropy(logits, make_targets(4, 10, "absent"), reduction="none", backend=backend)
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        loss.sum().backward()


def test_overwritten_logits_saved_elsewhere_fail_loudly():
    skip_unless("cpp")
    leaf = torch.randn(4, 10, requires_grad=True)
    logits = torch.tanh(leaf)  # tanh saves its output for backward
    loss = cross_entropy(logits, make_targets(4, 10, "absent"), backend="cpp")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_leaves_logits_untouched():
    skip_unless("cpp")
    logits = torch.randn(5, 20)
    before = logits.clone()
    with torch.no_grad():
        cross_entropy(logits * 1, make_targets(5, 20, "some"), backend="cpp")
        cross_entropy(logits, make_targets(5, 20, "some"), backend="cpp")
    assert torch.equal(logits, before)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("shape", [(1, 11), (1, 1, 11)])
def test_fused_expanded_intermediate_matches_reference(backend, shape):
    """Rows of an expanded intermediate share memory: each cannot hold its own gradient in place."""
    skip_unless(backend)
    source = torch.randn(shape, requires_grad=True)
    lead = (6,) if len(shape) == 2 else (2, 3)
    targets = make_targets(6, 11, "some").reshape(lead)
    ref_source = source.detach().double().requires_grad_()
    ref = cross_entropy_reference((ref_source * 2).expand(*lead, 11), targets)
    ref.backward()
    with ran(backend) as calls:
        loss = cross_entropy((source * 2).expand(*lead, 11), targets, backend=backend)
    assert calls
    loss.backward()
    assert_close(loss, ref, 1e-5, f"{backend} loss")
    assert_close(source.grad, ref_source.grad, 1e-5, f"{backend} grad")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_double_backward_raises_instead_of_a_wrong_hessian(backend):
    """The fused backwards return gradients formed in the forward; differentiating them again
    would silently give the wrong second derivative (that of the buffer's own history)."""
    skip_unless(backend)
    targets = make_targets(4, 5, "absent")
    logits = torch.randn(4, 5, requires_grad=True)
    loss = cross_entropy(logits * 1, targets, backend=backend)
    if backend == "torch":  # F.cross_entropy: the real second derivative
        (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
        grad.sum().backward()
        assert torch.allclose(logits.grad, torch.zeros_like(logits), atol=1e-6)  # rows of p - onehot sum to 0
    else:
        with pytest.raises(RuntimeError, match=f"cross_entropy: backend '{backend}' has no double backward"):
            torch.autograd.grad(loss, logits, create_graph=True)
    hidden = torch.randn(4, 3, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(5, 3), targets, backend=backend)
    with pytest.raises(RuntimeError, match=f"linear_cross_entropy: backend '{backend}' has no double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_numpy_ignore_index_and_zero_hidden_size(backend):
    """Valid inputs that F.cross_entropy / F.linear take: an integer ignore_index of any integer
    type, and D = 0 (all logits 0, loss ln V)."""
    skip_unless(backend)
    np = pytest.importorskip("numpy")
    logits, targets = torch.randn(5, 7), torch.tensor([0, 3, 3, 6, 1])
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=3)
    assert torch.allclose(cross_entropy(logits, targets, ignore_index=np.int64(3), backend=backend), expected)
    hidden, weight = torch.randn(5, 0, requires_grad=True), torch.randn(7, 0, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=np.int32(3), backend=backend)
    assert torch.allclose(loss, torch.tensor(7.0).log())
    loss.backward()
    assert hidden.grad.shape == (5, 0) and weight.grad.shape == (7, 0)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy vs the unfused reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_linear(backend, reduction, with_bias, chunk_size):
    skip_unless(backend)
    if backend == "triton" and chunk_size == 1:
        pytest.skip("interpreter: one launch per row is slow")
    n, dim, vocab = 23, 16, 97
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) / dim**0.5).requires_grad_()
    bias = torch.randn(vocab, requires_grad=True) if with_bias else None
    targets = make_targets(n, vocab, "some")
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = linear_cross_entropy_reference(ref_inputs[0], ref_inputs[1], targets,
                                         bias=ref_inputs[2] if with_bias else None, **options)
    with count_calls(ce_module._ROW_KERNELS, backend) as calls:
        out = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size, backend=backend,
                                   **options)
    assert calls, f"the {backend} kernel did not run"
    assert out.dtype == torch.float32
    assert_close(out, ref, 1e-5, "loss")
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(out, inputs, grad_out.float())
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close(g, r, 1e-5, f"grad {name}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_linear_3d_half_precision(backend):
    skip_unless(backend)
    hidden = torch.randn(2, 9, 32).bfloat16().requires_grad_()
    weight = (torch.randn(300, 32) / 32**0.5).bfloat16().requires_grad_()
    targets = make_targets(18, 300, "some", ignore_index=-1).reshape(2, 9)
    out = linear_cross_entropy(hidden, weight, targets, ignore_index=-1, chunk_size=5, backend=backend)
    ref_h, ref_w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = linear_cross_entropy_reference(ref_h, ref_w, targets, ignore_index=-1)
    assert out.dtype == torch.float32
    assert_close(out, ref, 1e-2, "loss")
    out.backward()
    ref.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert_close(hidden.grad, ref_h.grad, 2e-2, "grad hidden")
    assert_close(weight.grad, ref_w.grad, 2e-2, "grad weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 1000, 4099])
def test_round_in_place_is_the_cast_over_the_accumulators_own_bytes(n, dtype):
    acc = torch.randn(n) * torch.logspace(-30, 30, n)  # tiny to huge, some past fp16's range
    want = acc.to(dtype)
    ptr = acc.data_ptr()
    got = ce_module.round_in_place(acc, dtype)
    assert got.dtype == dtype and got.shape == (n,) and got.data_ptr() == ptr
    assert torch.equal(got, want) or (dtype == torch.float16 and torch.equal(got.isinf(), want.isinf())
                                      and torch.equal(got[~want.isinf()], want[~want.isinf()]))
    matrix = torch.randn(37, 29)
    assert torch.equal(ce_module.round_in_place(matrix.clone(), dtype), matrix.to(dtype))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_half_weight_gradient_lives_in_the_accumulator(reduction, monkeypatch):
    """A bf16 weight's gradient is the fp32 accumulator rounded over its own storage (no second
    V x D buffer), its chunk products formed in slices of V: the same values as with one slice."""
    skip_unless("cpp")
    hidden = torch.randn(40, 32).bfloat16().requires_grad_()
    weight = (torch.randn(300, 32) / 32**0.5).bfloat16().requires_grad_()
    targets = make_targets(40, 300, "some")
    grads = {}
    for slices in (1, 3):
        monkeypatch.setattr(ce_module, "WEIGHT_GRAD_SLICES", slices)
        out = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=16, backend="cpp")
        (grad,) = torch.autograd.grad(out.sum(), (weight,))
        assert grad.dtype == torch.bfloat16 and grad.untyped_storage().nbytes() == 300 * 32 * 4
        grads[slices] = grad
    assert_close(grads[3], grads[1], 1e-2, "grad weight, 3 slices against 1")
    ref_h, ref_w = hidden.detach().double(), weight.detach().double().requires_grad_()
    ref = linear_cross_entropy_reference(ref_h, ref_w, targets, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum(), (ref_w,))
    assert_close(grads[3], ref_grad, 2e-2, "grad weight")


@pytest.mark.parametrize("in_place", [False, True], ids=["host-checked", "device-scaled"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_linear_incoming_gradient_other_than_one(backend, in_place, monkeypatch):
    """An incoming gradient other than 1 (a scaled loss) scales the saved gradients. Where the host
    cannot read it without a sync (CUDA; here forced), the fused backends scale them in place: the
    bf16 weight gradient stays in its fp32 accumulator's storage, no second V x D buffer, and a
    second backward raises. Elsewhere, and on the torch backend, out of place and repeatable."""
    skip_unless(backend)
    monkeypatch.setattr(ce_module, "_scales_in_place", lambda grad_out: in_place)
    hidden = torch.randn(40, 32).bfloat16().requires_grad_()
    weight = (torch.randn(300, 32) / 32**0.5).bfloat16().requires_grad_()
    targets = make_targets(40, 300, "some")
    out = linear_cross_entropy(hidden, weight, targets, chunk_size=16, backend=backend)
    grad_h, grad_w = torch.autograd.grad(out * 3.0, (hidden, weight), retain_graph=True)
    ref_h, ref_w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = linear_cross_entropy_reference(ref_h, ref_w, targets)
    want_h, want_w = torch.autograd.grad(ref * 3.0, (ref_h, ref_w))
    assert_close(grad_h, want_h, 2e-2, "grad hidden")
    assert_close(grad_w, want_w, 2e-2, "grad weight")
    if backend == "torch" or not in_place:
        again = torch.autograd.grad(out * 3.0, (hidden, weight))
        assert all(torch.equal(a, b) for a, b in zip(again, (grad_h, grad_w)))
        return
    assert grad_w.untyped_storage().nbytes() == 300 * 32 * 4, "the weight gradient left its accumulator"
    with pytest.raises(RuntimeError, match="cannot run twice"):
        torch.autograd.grad(out, (weight,))


def test_half_products_accumulate_in_the_matmul_where_torch_can_else_in_slices(monkeypatch):
    """Where torch's addmm accumulates 16-bit operands into fp32 (CUDA, newer torch) the product
    goes straight into the accumulator; where it refuses (it checks before doing anything) the
    process falls back to slices, once; a failure after it has worked is a real error."""
    acc, a, b = torch.randn(300, 8), torch.randn(300, 5).bfloat16(), torch.randn(5, 8).bfloat16()
    want = acc + (a.double() @ b.double()).float()
    state = {"usable": None}
    monkeypatch.setattr(ce_module, "_FP32_ACCUMULATING_ADDMM", state)
    monkeypatch.setattr(ce_module, "_fp32_accumulating_addmm_possible", lambda acc: state["usable"] is not False)
    calls = []

    def refusing_addmm(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")

    monkeypatch.setattr(torch, "addmm", refusing_addmm)
    got = acc.clone()
    ce_module._add_half_product(got, a, b)
    ce_module._add_half_product(got, a, b)
    assert len(calls) == 1 and calls[0]["out_dtype"] == torch.float32 and state["usable"] is False
    assert ce_module.weight_grad_accumulation() == "slices"
    assert_close(got - acc, 2 * (want - acc), 1e-2, "sliced products")

    def accumulating_addmm(c, a, b, out_dtype, out):
        assert out is c and out_dtype == torch.float32
        return out.add_((a.float() @ b.float()))

    state["usable"] = None
    monkeypatch.setattr(torch, "addmm", accumulating_addmm)
    got = acc.clone()
    ce_module._add_half_product(got, a, b)
    assert state["usable"] is True and ce_module.weight_grad_accumulation() == "addmm"
    assert_close(got, want, 1e-5, "accumulated in the matmul")
    monkeypatch.setattr(torch, "addmm", refusing_addmm)
    with pytest.raises(RuntimeError, match="same dtype"):
        ce_module._add_half_product(got, a, b)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_linear_under_autocast(backend):
    skip_unless(backend)
    hidden = torch.randn(20, 32, requires_grad=True)
    weight = (torch.randn(100, 32) / 32**0.5).requires_grad_()
    targets = make_targets(20, 100, "some", ignore_index=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(hidden, weight, targets, ignore_index=-1, backend=backend)
        logits = hidden @ weight.t()
        assert logits.dtype == torch.bfloat16
        unfused = cross_entropy(logits, targets, ignore_index=-1, backend=backend)
    assert out.dtype == torch.float32 and unfused.dtype == torch.float32
    out.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    ref = linear_cross_entropy_reference(hidden.detach().double(), weight.detach().double(), targets,
                                         ignore_index=-1)
    assert_close(out, ref, 2e-2, "loss")
    assert_close(unfused, ref, 2e-2, "unfused loss")


def test_default_chunk_rows_bounds_memory():
    rows = ce_module.default_chunk_rows(100_000, 50257, "cpu")
    assert 1 <= rows <= 100_000 and rows * 50257 * 4 <= 256 * 2**20
    assert ce_module.default_chunk_rows(10, 50257, "cpu") == 10


# ---------------------------------------------------------------------------------------------
# Validation: before any kernel, on every backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("bad", [7, -5, 1000])
def test_targets_out_of_range(backend, bad, monkeypatch):
    skip_unless(backend)

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before validation")

    for name in ("_ce_rows_cpp", "_ce_rows_triton", "_ce_rows_torch"):
        monkeypatch.setitem(ce_module._ROW_KERNELS, name.split("_")[-1], no_kernel)
    targets = torch.tensor([0, 3, bad, -100])
    with pytest.raises(ValueError, match=rf"targets must be in \[0, 7\).*got {bad}"):
        cross_entropy(torch.randn(4, 7), targets, backend=backend)
    with pytest.raises(ValueError, match=rf"targets must be in \[0, 7\).*got {bad}"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3), targets, backend=backend)


@pytest.mark.parametrize("call, error, match", [
    (lambda: cross_entropy(torch.randn(4, 7), torch.zeros(5, dtype=torch.long)), ValueError, r"shape \(4,\)"),
    (lambda: cross_entropy(torch.randn(4, 7), torch.zeros(4, dtype=torch.int32)), TypeError, "int32"),
    (lambda: cross_entropy(torch.randn(4, 7).long(), torch.zeros(4, dtype=torch.long)), TypeError, "int64"),
    (lambda: cross_entropy(torch.randn(7), torch.zeros((), dtype=torch.long)), ValueError, r"\(7,\)"),
    (lambda: cross_entropy(torch.randn(4, 0), torch.zeros(4, dtype=torch.long)), ValueError, "vocabulary"),
    (lambda: cross_entropy(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), reduction="avg"),
     ValueError, "reduction"),
    (lambda: cross_entropy(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), label_smoothing=1.5),
     ValueError, "label_smoothing"),
    (lambda: cross_entropy(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), z_loss=-1.0),
     ValueError, "z_loss"),
    (lambda: cross_entropy(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), backend="fast"),
     ValueError, "unknown backend"),
    (lambda: cross_entropy(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), backend="cuda"),
     BackendUnavailable, "no hand-written CUDA kernel"),
    (lambda: linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 5), torch.zeros(4, dtype=torch.long)),
     ValueError, r"\(7, 5\)"),
    (lambda: linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3).double(), torch.zeros(4, dtype=torch.long)),
     TypeError, "share a dtype"),
    (lambda: linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3), torch.zeros(4, dtype=torch.long),
                                  bias=torch.randn(6)), ValueError, r"bias must have shape \(7,\)"),
    (lambda: linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3), torch.zeros(4, dtype=torch.long),
                                  chunk_size=0), ValueError, "chunk_size"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_readme_names_work_after_import_fastlm():
    """The README writes fastlm.ops.available_backends() and fastlm.optim.AdamW(...): after a bare
    `import fastlm` those names resolve, and `import fastlm` alone still does not import torch."""
    script = ("import sys, fastlm; assert 'torch' not in sys.modules; "
              "print(fastlm.ops.available_backends('cpu')['cross_entropy']['torch'], fastlm.optim.AdamW.__name__, "
              "fastlm.model.GPT.__name__, fastlm.config.GPTConfig.__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "AdamW", "GPT", "GPTConfig"]


def test_backend_reasons_and_auto():
    reasons = backend_reasons(torch.device("cpu"))
    assert set(reasons) == {"torch", "triton", "cpp", "cuda"}
    assert reasons["torch"] is None and "triton" in reasons["cuda"]
    logits, targets = torch.randn(3, 5), torch.tensor([0, 1, 2])
    expected = cross_entropy_reference(logits, targets)
    assert_close(cross_entropy(logits, targets), expected, 1e-5, "auto")  # cpp or torch, never the interpreter


# ---------------------------------------------------------------------------------------------
# Loss scaling in fp16, forward-only under no_grad, torch.compile
# ---------------------------------------------------------------------------------------------

def _weight_grad_error(grad, ref):
    return ((grad.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fp16_loss_scaling_keeps_small_gradients(backend):
    """fp16 + GradScaler: a fused loss told the scale stores its fp16 gradient already scaled, so
    the lm_head weight gradient is as accurate as fp16 matmul + F.cross_entropy; untold, most
    logit gradients round to zero in fp16 (the defect this guards against)."""
    skip_unless(backend)
    n, dim, vocab = (4096, 64, 8192) if backend == "cpp" else (2048, 32, 8192)  # the interpreter is slow
    scale = 65536.0
    hidden = torch.randn(n, dim).half()
    weight = (torch.randn(vocab, dim) / dim**0.5).half()
    targets = torch.randint(0, vocab, (n,))
    w64 = weight.double().requires_grad_()
    linear_cross_entropy_reference(hidden.double(), w64, targets).backward()

    def weight_grad(loss_fn):
        w = weight.clone().requires_grad_()
        (loss_fn(w) * scale).backward()
        return w.grad.double() / scale

    unfused = weight_grad(lambda w: torch.nn.functional.cross_entropy((hidden @ w.t()).float(), targets))
    told = weight_grad(lambda w: linear_cross_entropy(hidden, w, targets, grad_scale=scale, backend=backend))
    untold = weight_grad(lambda w: linear_cross_entropy(hidden, w, targets, backend=backend))
    reference_error = _weight_grad_error(unfused, w64.grad)
    assert _weight_grad_error(told, w64.grad) <= 2 * reference_error
    assert _weight_grad_error(untold, w64.grad) > 10 * reference_error
    # cross_entropy (unfused logits, fused loss) takes the same argument
    logits = (hidden @ weight.t()).requires_grad_()
    (cross_entropy(logits * 1, targets, grad_scale=scale, backend=backend) * scale).backward()
    expected = torch.softmax(logits.detach().double(), -1)
    expected[torch.arange(n), targets] -= 1
    assert _weight_grad_error(logits.grad.double() / scale, expected / n) < 1e-2


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_linear_without_grad_mode_is_forward_only(backend, mode):
    skip_unless(backend)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = make_targets(37, 97, "some")
    grads_passed = []
    kernel = ce_module._ROW_KERNELS[backend]

    def spy(logits, targets, grad, *args):
        grads_passed.append(grad)
        return kernel(logits, targets, grad, *args)

    with count_calls(ce_module, "_accumulate") as accumulated, mode():
        ce_module._ROW_KERNELS[backend] = spy
        try:
            loss = linear_cross_entropy(hidden, weight, targets, chunk_size=10, backend=backend)
        finally:
            ce_module._ROW_KERNELS[backend] = kernel
    assert len(grads_passed) == 4 and all(g is None for g in grads_passed)  # no gradient written
    assert not accumulated and not loss.requires_grad  # no gradient matmuls
    ref = linear_cross_entropy_reference(hidden.detach().double(), weight.detach().double(), targets)
    assert_close(loss, ref, 1e-5, "loss")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_ops_compile_without_graph_breaks(backend):
    skip_unless(backend)
    check_ops_compile(backend, "cpu", "aot_eager")


@pytest.mark.gpu
def test_triton_ops_compile_under_inductor_on_cuda():
    skip_unless("triton", "cuda")
    check_ops_compile("triton", "cuda", "inductor")


def check_ops_compile(backend, device, compiler):
    import torch._dynamo

    logits = torch.randn(16, 50, device=device)
    hidden, weight = torch.randn(16, 8, device=device), torch.randn(50, 8, device=device)
    targets = make_targets(16, 50, "some", device=device)

    def ce(x, t):
        return cross_entropy(x * 1, t, label_smoothing=0.1, backend=backend)

    def lce(h, w, t):
        return linear_cross_entropy(h, w, t, chunk_size=5, backend=backend)

    for fn, inputs in ((ce, (logits,)), (lce, (hidden, weight))):
        torch._dynamo.reset()
        leaves = [x.clone().requires_grad_() for x in inputs]
        explanation = torch._dynamo.explain(fn)(*leaves, targets)
        assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
        compiled = torch.compile(fn, fullgraph=True, backend=compiler)
        eager_leaves = [x.clone().requires_grad_() for x in inputs]
        fn(*eager_leaves, targets).backward()
        out = compiled(*leaves, targets)
        out.backward()
        assert_close(out, fn(*[x.detach() for x in inputs], targets), 1e-5, f"{fn.__name__} compiled loss")
        for leaf, eager in zip(leaves, eager_leaves):
            assert_close(leaf.grad, eager.grad, 1e-5, f"{fn.__name__} compiled grad")

# Kernel hardening (issue 15): -inf tiles, unaligned rows, the device guard
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_starting_with_whole_tiles_of_minus_inf(backend, dtype):
    # Vocabulary masking with -inf: rows whose first 16384 logits (whole tiles of 2048 under the
    # interpreter, of 8192 on GPU) are -inf gave NaN, as exp(-inf - -inf) is.
    skip_unless(backend)
    vocab = 20000
    logits = torch.randn(5, vocab) * 3
    logits[0, :16384] = float("-inf")
    logits[1, :19990] = float("-inf")        # 10 finite logits, all in the last tile
    logits[2, 2048:4096] = float("-inf")     # a whole tile in the middle
    logits[3, 16384:] = float("-inf")        # -inf only after the finite part
    logits = logits.to(dtype)
    targets = torch.tensor([16400, 19995, 100, 5, 12345])
    ref_in = logits.double().requires_grad_()
    ref = cross_entropy_reference(ref_in, targets, reduction="none", z_loss=1e-4)
    leaf = logits.clone().requires_grad_()
    out = cross_entropy(leaf * 1, targets, reduction="none", z_loss=1e-4, backend=backend)
    assert torch.isfinite(out).all(), out
    assert_close(out, ref, TOL[dtype], "loss", floor=1.0)
    out.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert_close(leaf.grad, ref_in.grad, TOL[dtype], "grad", floor=1.0)


def _strided_rows(n, vocab, row_stride, col_offset, dtype, device):
    """(n, vocab) logits at column `col_offset` of rows `row_stride` apart in a larger buffer."""
    buffer = torch.randn(n, row_stride, device=device) * 3
    return buffer.to(dtype)[:, col_offset:col_offset + vocab]


# (vocab, row stride, column offset): odd V and stride, so each row starts at a different
# offset from a 16-byte boundary (head of 0 to VEC - 1 columns); storage padded to a multiple of
# 8 with an odd V (aligned starts, a foot); V a multiple of 8 at odd starts; V smaller than a
# vector group; one column.
ROW_LAYOUTS = [(4099, 4099, 0), (4099, 4104, 0), (4096, 4101, 3), (3, 7, 1), (1, 1, 0)]


def check_rows_kernel(vocab, row_stride, col_offset, dtype, grad_mode, device):
    from fastlm.triton_kernels.cross_entropy import cross_entropy_rows

    n = 11  # more rows than the interpreter's 8 per program
    logits = _strided_rows(n, vocab, row_stride, col_offset, dtype, device)
    targets = make_targets(n, vocab, "some", device=device)
    scale = torch.tensor(0.5, device=device)
    ref_grad = torch.empty(n, vocab, dtype=torch.float64, device=device)
    ref_loss, ref_lse = ce_module._ce_rows_torch(logits.double(), targets, ref_grad, -100, 0.1, 1e-4, scale)
    if grad_mode == "in place":
        grad = logits
    elif grad_mode == "other stride":
        grad = torch.empty(n, vocab + 5, dtype=dtype, device=device)[:, :vocab]
    else:
        grad = None
    loss, lse = cross_entropy_rows(logits, targets, grad, -100, 0.1, 1e-4, scale)
    tol = TOL[dtype]
    assert_close(loss, ref_loss, tol, "loss", floor=1.0)
    assert_close(lse, ref_lse, tol, "lse", floor=1.0)
    if grad is not None:
        assert_close(grad, ref_grad, tol, "grad", floor=0.5)


@pytest.mark.parametrize("edge_tile", [False, True], ids=["edge-loop", "edge-tile"])
@pytest.mark.parametrize("grad_mode", ["in place", "other stride", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ROW_LAYOUTS, ids=lambda c: "V{}-stride{}-at{}".format(*c))
def test_triton_rows_at_any_alignment(layout, dtype, grad_mode, edge_tile, monkeypatch):
    # The kernel walks each row as head | aligned body | foot (fastlm/triton_kernels/cross_entropy.py);
    # every column must be counted once, whatever the row's alignment and the gradient's stride, with
    # the head and foot read column by column or as one gather tile (EDGE_TILE).
    skip_unless("triton")
    from fastlm.triton_kernels import cross_entropy as kernel

    monkeypatch.setattr(kernel, "EDGE_TILE", edge_tile)
    check_rows_kernel(*layout, dtype, grad_mode, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("grad_mode", ["in place", "other stride", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ROW_LAYOUTS + [(50257, 50257, 0), (50257, 50304, 0), (50304, 50311, 7)],
                         ids=lambda c: "V{}-stride{}-at{}".format(*c))
def test_triton_gpu_rows_at_any_alignment(layout, dtype, grad_mode):
    skip_unless("triton", "cuda")
    check_rows_kernel(*layout, dtype, grad_mode, "cuda")


@pytest.mark.gpu
def test_triton_gpu_logits_on_a_device_that_is_not_current():
    # Triton launches on the current device: logits on cuda:1 with device 0 current need a guard.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    skip_unless("triton", "cuda")
    with torch.cuda.device(0):
        logits = torch.randn(257, 1000, device="cuda:1") * 3
        targets = make_targets(257, 1000, "some", device="cuda:1")
        check_against_reference("triton", logits, targets, reduction="none", label_smoothing=0.1)


def test_triton_out_of_range_target_gives_nan_not_a_wild_read():
    """On CUDA the op leaves the target range to the data path; the kernel itself must then
    neither read out of bounds nor return a plausible loss for a bad target."""
    skip_unless("triton")
    from fastlm.triton_kernels.cross_entropy import cross_entropy_rows

    logits = torch.randn(4, 37)
    targets = torch.tensor([3, 37, -5, -100])
    loss, _ = cross_entropy_rows(logits, targets, None, -100, 0.0, 0.0, torch.ones(()))
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert loss[3] == 0.0
    assert_close(loss[0], cross_entropy_reference(logits[:1], targets[:1]), 1e-5, "valid row")


# ---------------------------------------------------------------------------------------------
# The backward's in-place scaling (Triton): skipped on the device when the scale is exactly 1
# ---------------------------------------------------------------------------------------------

def check_scale_rows(n, vocab, row_stride, dtype, scale, device):
    """scale_rows_ against the fp32 product rounded once; entries outside the (n, vocab) view of a
    wider buffer never change. Under the interpreter bf16 is rounded by truncation (see
    test_attention), so a bf16 entry may be one unit in the last place below the rounded one."""
    from fastlm.triton_kernels.cross_entropy import scale_rows_

    buffer = (torch.randn(n, row_stride, device=device) * 3).to(dtype)
    before = buffer.clone()
    x = buffer[:, :vocab]
    expected = (x.float() * torch.tensor(scale, dtype=torch.float32)).to(dtype)
    assert scale_rows_(x, torch.tensor(scale, device=device)) is x
    if dtype == torch.bfloat16 and device == "cpu":
        torch.testing.assert_close(x, expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(x, expected)
    assert torch.equal(buffer[:, vocab:], before[:, vocab:])


SCALE_SHAPES = [(1, 1, 1), (3, 7, 7), (5, 37, 50), (2, 4099, 4099), (3, 4096, 4101), (1, 9000, 9000)]
# 1/3 rounds differently in fp32 and in bf16; 1024 is a power of two like a GradScaler's scale.
SCALES = [0.5, 2.0, 1 / 3, 1024.0, 0.0]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SCALE_SHAPES, ids=lambda c: "N{}-V{}-stride{}".format(*c))
def test_triton_scale_rows(shape, dtype, scale):
    skip_unless("triton")
    check_scale_rows(*shape, dtype, scale, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SCALE_SHAPES + [(4099, 50257, 50257), (257, 50257, 50304), (3, 128256, 128263)],
                         ids=lambda c: "N{}-V{}-stride{}".format(*c))
def test_triton_gpu_scale_rows(shape, dtype, scale):
    skip_unless("triton", "cuda")
    check_scale_rows(*shape, dtype, scale, "cuda")


def check_scale_of_one_writes_nothing(device):
    """With a scale of exactly 1 the kernel must not store, not even the same values: the buffer
    holds NaNs (a NaN times 1 is NaN, so a write of the product could not be told apart from no
    write) and signalling patterns that a float32 round trip would change, and it is compared bit
    for bit. Then the same kernel with 1 + 2**-23 rewrites every entry, so it does reach them."""
    from fastlm.triton_kernels.cross_entropy import scale_rows_

    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16), (torch.float16, torch.int16)):
        width = 8 * dtype.itemsize  # every bit pattern: NaNs of every payload, infinities, subnormals
        raw = torch.randint(-2**(width - 1), 2**(width - 1), (5, 4101), device=device).to(bits)
        x = raw.view(dtype)[:, :4099]
        before = raw.clone()
        scale_rows_(x, torch.ones((), device=device))
        assert torch.equal(raw, before), f"{dtype}: a scale of 1 wrote into the buffer"
        finite = torch.ones(3, 4099, device=device, dtype=dtype)
        scale_rows_(finite, torch.tensor(2.0, device=device))
        assert torch.equal(finite, torch.full_like(finite, 2.0)), f"{dtype}: a scale of 2 did not reach every entry"


def test_triton_scale_of_one_writes_nothing():
    skip_unless("triton")
    check_scale_of_one_writes_nothing("cpu")


@pytest.mark.gpu
def test_triton_gpu_scale_of_one_writes_nothing():
    skip_unless("triton", "cuda")
    check_scale_of_one_writes_nothing("cuda")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad_out", [1.0, 0.5, 2.0, "grad_scale"])
def test_triton_backward_scales_by_grad_out(grad_out, dtype, reduction, monkeypatch):
    """The fused backward against float64 F.cross_entropy for an incoming gradient of 1, 0.5, 2
    and the GradScaler pattern (grad_scale told to the forward, the loss multiplied by it); the
    Triton scaling kernel runs where the scale is not 1 on the host (CPU tensors check it there)."""
    skip_unless("triton")
    from fastlm.triton_kernels import cross_entropy as triton_ce

    n, vocab = 13, 4099  # an odd V: rows start at every alignment
    logits = (torch.randn(n, vocab) * 3).to(dtype)
    targets = make_targets(n, vocab, "some")
    grad_scale = 1024.0 if grad_out == "grad_scale" else None
    leaf = logits.clone().requires_grad_()
    with count_calls(triton_ce, "scale_rows_") as scaled:
        loss = cross_entropy(leaf * 1, targets, reduction=reduction, grad_scale=grad_scale, backend="triton")
        factor = grad_scale or grad_out
        (loss.sum() * factor).backward()
    ref_in = logits.double().requires_grad_()
    (cross_entropy_reference(ref_in, targets, reduction=reduction).sum() * factor).backward()
    count = (targets != -100).sum().item()
    row_weight = factor / (count if reduction == "mean" else 1)
    assert_close(leaf.grad, ref_in.grad, TOL[dtype], "grad", floor=row_weight)
    # reduction="none" scales each row by its own incoming gradient (no scalar); the host skips 1.
    assert len(scaled) == (reduction != "none" and grad_out in (0.5, 2.0))


def test_triton_backward_scale_goes_through_the_custom_op_under_a_dispatch_mode():
    """Under a dispatch mode (here one that logs the ops) the Triton launches are reached through
    their custom ops, as torch.compile, export and fake tensors need; in plain eager they are not."""
    skip_unless("triton")
    logits, targets = torch.randn(6, 37), make_targets(6, 37, "some")
    results = {}
    for mode in (None, LogOps()):
        leaf = logits.clone().requires_grad_()
        with mode or contextlib.nullcontext():
            (cross_entropy(leaf * 1, targets, backend="triton") * 0.5).backward()
        results[mode is None] = leaf.grad
        if mode is not None:
            assert "fastlm.cross_entropy_rows_triton.default" in mode.ops
            assert "fastlm.scale_rows_triton.default" in mode.ops
    assert torch.equal(results[True], results[False])
