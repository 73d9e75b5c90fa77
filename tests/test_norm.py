"""layer_norm and rms_norm: every backend against a float64 reference, bad inputs, the GPT.

Errors are max |out - ref| / max |ref| over each tensor (the denominator floored at 0.1). The
float64 reference is PyTorch's own F.layer_norm / F.rms_norm on float64 copies. Tolerances:
fp32 2e-5 (the fp32 statistics and sums), bf16 1e-2 and fp16 2e-3 (a rounding of the result or of
dx, 2**-8 and 2**-11 relative, with room for a flip). The weight and bias gradients are sums in
fp32 over rows of 16-bit dy values, which the reference reads exactly: they get the fp32 bound
when the parameters are fp32. On CPU the Triton kernels run under TRITON_INTERPRET=1
(conftest.py); the `gpu` tests sweep GPU-sized rows against PyTorch's own error.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastlm.ops.norm as norm_module
from fastlm.config import GPTConfig, KernelConfig
from fastlm.model import GPT, LayerNorm, RMSNorm
from fastlm.ops import BackendUnavailable, available_backends, layer_norm, resolve_backend, rms_norm
from fastlm.ops.norm import norm_reference
from tests.helpers import LogOps, compiled_and_eager_grads, count_calls, rel_err, skip_unless_usable

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
OPS = {"layer_norm": layer_norm, "rms_norm": rms_norm}
# (leading shape, D): size 1, primes, a tail past a power of two, 3-D input, GPT-2's width.
SHAPES = [((1,), 1), ((3,), 17), ((2, 5), 40), ((7,), 1000), ((257,), 64), ((4,), 768)]


def make_inputs(op, lead, dim, dtype, param_dtype=None, affine=True, device="cpu"):
    """x with a nonzero mean and scale (so that the mean subtraction matters), weight, bias
    (None for rms_norm or without affine), all requiring grad."""
    x = (torch.randn(*lead, dim, device=device) * 2.0 + 3.0).to(dtype).requires_grad_()
    param_dtype = param_dtype or dtype
    weight = bias = None
    if affine:
        weight = (torch.randn(dim, device=device) * 0.5 + 1.0).to(param_dtype).requires_grad_()
        if op == "layer_norm":
            bias = torch.randn(dim, device=device).to(param_dtype).requires_grad_()
    return x, weight, bias


def call(op, x, weight, bias, **kwargs):
    return layer_norm(x, weight, bias, **kwargs) if op == "layer_norm" else rms_norm(x, weight, **kwargs)


def reference(op, x, weight, bias, eps=1e-5):
    """Output and gradients (x, weight, bias) of the float64 reference for grad_out."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)]
    out = norm_reference(*leaves, eps, op == "rms_norm", torch.float64)
    return out, leaves


def check_against_reference(op, backend, lead, dim, dtype, param_dtype=None, affine=True, out_dtype=None,
                            device="cpu"):
    if backend != "auto":
        skip_unless_usable(op, backend, device)
    resolved = resolve_backend(op, device, backend, dtype=dtype)
    x, weight, bias = make_inputs(op, lead, dim, dtype, param_dtype, affine, device)
    entry = "norm_reference" if resolved == "torch" else "_triton"
    with count_calls(norm_module, entry) as calls:
        out = call(op, x, weight, bias, out_dtype=out_dtype, backend=backend)
    assert calls, f"the {resolved} path did not run"
    assert out.shape == x.shape and out.dtype == (out_dtype or dtype)
    grad_out = torch.randn(x.shape, device=device).to(out.dtype)
    inputs = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref, ref_leaves = reference(op, x, weight, bias)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None], grad_out.double())
    names = ["x", "weight", "bias"][:len(inputs)]
    for name, got, want, leaf in zip(["out", *names], (out, *grads), (ref, *ref_grads), [out, *inputs]):
        assert got.dtype == leaf.dtype, f"{name}: gradient dtype {got.dtype}, input {leaf.dtype}"
        err = rel_err(got, want)
        assert err <= TOL[leaf.dtype], f"{op} {backend} {name} {lead}x{dim} {dtype}: error {err:.2e}"


def _id(value):
    return "x".join(map(str, (*value[0], value[1]))) if isinstance(value, tuple) else str(value)


# --- the Triton kernels (interpreter on CPU) ------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_triton_fp32(op, shape):
    check_against_reference(op, "triton", *shape, torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [((3,), 17), ((257,), 64), ((4,), 768)], ids=_id)
def test_triton_half(op, shape, dtype):
    check_against_reference(op, "triton", *shape, dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("affine", [False, True])
def test_triton_without_bias_or_weight(op, affine):
    check_against_reference(op, "triton", (9,), 48, torch.float32, affine=affine)
    if op == "layer_norm" and affine:  # weight without bias (GPTConfig(bias=False))
        x, weight, _ = make_inputs(op, (9,), 48, torch.float32)
        out = layer_norm(x, weight, None, backend="triton")
        ref = F.layer_norm(x.double(), (48,), weight.double(), None, 1e-5)
        assert rel_err(out, ref) <= TOL[torch.float32]
        gx, gw = torch.autograd.grad(out.sum(), (x, weight))
        rx, rw = torch.autograd.grad(layer_norm(x, weight, None, backend="torch").sum(), (x, weight))
        assert rel_err(gx, rx) <= TOL[torch.float32] and rel_err(gw, rw) <= TOL[torch.float32]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,param_dtype,out_dtype", [
    (torch.float32, torch.float32, torch.bfloat16),   # the model under autocast: fp32 residual, bf16 out
    (torch.bfloat16, torch.float32, None),            # 16-bit activations, fp32 parameters
    (torch.float16, torch.float32, torch.float32),
], ids=str)
def test_triton_mixed_dtypes(op, dtype, param_dtype, out_dtype):
    check_against_reference(op, "triton", (5, 3), 96, dtype, param_dtype=param_dtype, out_dtype=out_dtype)


@pytest.mark.parametrize("op", OPS)
def test_triton_strided_input_and_gradient(op):
    """x with a row stride past D (a slice of a wider tensor) and x whose last dim is not
    contiguous (a transpose), each against the reference on the same values."""
    skip_unless_usable(op, "triton")
    wide = torch.randn(6, 50) * 2 + 1
    base = torch.randn(24, 7) * 2 + 1
    for x in (wide[:, 3:43], base.t()):
        x = x.requires_grad_() if x.is_leaf else x.detach().requires_grad_()
        weight = torch.randn(x.shape[-1], requires_grad=True)
        out = call(op, x, weight, None, backend="triton")
        grad_out = torch.randn(out.shape).t().contiguous().t()  # a non-contiguous incoming gradient
        got = torch.autograd.grad(out, (x, weight), grad_out)
        ref, (x64, w64, _) = reference(op, x, weight, None)
        want = torch.autograd.grad(ref, (x64, w64), grad_out.double())
        assert rel_err(out, ref) <= TOL[torch.float32]
        for g, w in zip(got, want):
            assert rel_err(g, w) <= TOL[torch.float32]


def test_triton_constant_rows_and_large_values():
    """Rows with zero variance give (x - mean) * rsqrt(eps) = 0, not NaN; a row whose mean is 1e3
    times its spread keeps its statistics (the variance is that of x - mean, not E[x^2] - mean^2,
    which would lose them to cancellation) as well as PyTorch's fp32 kernel does."""
    skip_unless_usable("layer_norm", "triton")
    x = torch.full((3, 33), 7.0)
    x[1] = torch.randn(33) + 1e3
    out = layer_norm(x, backend="triton")
    ref = F.layer_norm(x.double(), (33,))
    assert torch.isfinite(out).all() and out[0].abs().max() == 0
    assert rel_err(out, ref) <= 2 * rel_err(F.layer_norm(x, (33,)), ref) + 1e-5


def test_triton_empty_rows():
    skip_unless_usable("layer_norm", "triton")
    x, weight, bias = make_inputs("layer_norm", (0,), 16, torch.float32)
    out = layer_norm(x, weight, bias, backend="triton")
    assert out.shape == (0, 16)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, weight, bias))
    assert gx.shape == (0, 16) and torch.equal(gw, torch.zeros(16)) and torch.equal(gb, torch.zeros(16))


def test_triton_backward_programs_each_take_several_row_blocks(monkeypatch):
    """With fewer backward programs than row blocks, each program loops over blocks and sums its
    rows' dw/db; the launcher adds the programs' partial sums. One program, then three."""
    skip_unless_usable("layer_norm", "triton")
    import fastlm.triton_kernels.norm as kernels

    for programs in (1, 3):
        monkeypatch.setattr(kernels, "INTERPRETED_BWD_PROGRAMS", programs)
        check_against_reference("layer_norm", "triton", (301,), 64, torch.float32)


def test_triton_under_torch_compile():
    skip_unless_usable("layer_norm", "triton")
    x, weight, bias = make_inputs("layer_norm", (2, 9), 24, torch.float32)

    def loss_fn(x, weight, bias):
        return (layer_norm(x, weight, bias, out_dtype=torch.float32, backend="triton") ** 2).sum() + \
            (rms_norm(x, weight, backend="triton") ** 3).sum()

    for got, want in compiled_and_eager_grads(loss_fn, x, weight, bias):
        assert rel_err(got, want) <= 1e-5


def test_triton_eager_launches_directly_and_dispatch_modes_see_the_custom_ops():
    skip_unless_usable("layer_norm", "triton")
    x, weight, bias = make_inputs("layer_norm", (5,), 24, torch.float32)
    grad_out = torch.randn(5, 24)
    results = {}
    for mode in (None, LogOps()):
        with mode or contextlib.nullcontext():
            out = layer_norm(x, weight, bias, backend="triton")
            results[mode is None] = (out, *torch.autograd.grad(out, (x, weight, bias), grad_out))
        if mode is None:
            assert type(out.grad_fn).__name__ == "ViewBackward0"
            assert type(out.grad_fn.next_functions[0][0]).__name__ == "_FusedNormBackward"
        else:
            assert "fastlm.norm_forward.default" in mode.ops and "fastlm.norm_backward.default" in mode.ops
    for got, want in zip(results[True], results[False]):
        assert torch.equal(got, want)


def test_triton_module_parameters_launch_directly():
    """The GPT's norms pass nn.Parameters: still the direct eager path (not the custom ops)."""
    skip_unless_usable("layer_norm", "triton")
    norm = LayerNorm(24)
    norm.backend = "triton"
    out = norm(torch.randn(5, 24))
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_FusedNormBackward"


def test_triton_double_backward_raises():
    skip_unless_usable("layer_norm", "triton")
    x, weight, bias = make_inputs("layer_norm", (3,), 16, torch.float32)
    (dx,) = torch.autograd.grad((layer_norm(x, weight, bias, backend="triton") ** 2).sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        dx.sum().backward()


# --- the torch backend and auto -------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_torch_paths(op, backend, dtype):
    if dtype == torch.float64:
        x, weight, bias = make_inputs(op, (4, 3), 37, dtype)
        out = call(op, x, weight, bias, backend=backend)
        ref, _ = reference(op, x, weight, bias)
        assert out.dtype == torch.float64 and rel_err(out, ref) <= 1e-12
        return
    check_against_reference(op, backend, (4, 3), 37, dtype)


def test_torch_backend_is_pytorchs_own_norm():
    """Same dtypes throughout: the torch backend is exactly F.layer_norm / F.rms_norm."""
    x, weight, bias = make_inputs("layer_norm", (6,), 20, torch.float32)
    assert torch.equal(layer_norm(x, weight, bias, eps=1e-3, backend="torch"), F.layer_norm(x, (20,), weight, bias, 1e-3))
    assert torch.equal(rms_norm(x, weight, backend="torch"), F.rms_norm(x, (20,), weight, 1e-5))


def test_auto_on_cpu_is_torch_and_reasons():
    for op in OPS:
        assert resolve_backend(op, "cpu") == "torch"
        reasons = available_backends("cpu")[op]
        assert reasons["torch"] is None
        assert "no compiled" in reasons["cpp"] and "no compiled" in reasons["cuda"]
        with pytest.raises(BackendUnavailable, match="cpp"):
            call(op, torch.randn(2, 4), None, None, backend="cpp")


def test_auto_falls_back_to_torch_past_the_widest_triton_row(monkeypatch):
    """Rows wider than the kernels hold go to torch under auto; an explicit triton raises."""
    skip_unless_usable("layer_norm", "triton")
    monkeypatch.setattr(norm_module, "auto_preference", lambda device, dtype=None: ("triton",))
    norm_module.register_op("layer_norm", norm_module.backend_reasons, norm_module.auto_preference)
    try:
        monkeypatch.setattr(norm_module, "MAX_TRITON_DIM", 32)
        x = torch.randn(2, 33)
        with count_calls(norm_module, "norm_reference") as calls:
            layer_norm(x)
        assert calls
        with pytest.raises(ValueError, match="D <= 32"):
            layer_norm(x, backend="triton")
        with count_calls(norm_module, "_triton") as calls:
            layer_norm(torch.randn(2, 32))
        assert calls
    finally:
        monkeypatch.undo()
        norm_module.register_op("layer_norm", norm_module.backend_reasons, norm_module.auto_preference)


# --- bad inputs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(2, 3, dtype=torch.int64)), TypeError, "x must have dtype"),
    (dict(x=torch.tensor(1.0)), ValueError, "non-empty last dimension"),
    (dict(x=torch.ones(2, 0)), ValueError, "non-empty last dimension"),
    (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
    (dict(weight=torch.ones(3, dtype=torch.int32)), TypeError, "weight must have dtype"),
    (dict(bias=torch.ones(1, 3)), ValueError, r"bias must have shape \(3,\)"),
    (dict(weight=torch.ones(3, device="meta")), ValueError, "one device"),
    (dict(eps=-1e-5), ValueError, "eps must be a finite float >= 0"),
    (dict(eps=float("nan")), ValueError, "eps must be"),
    (dict(eps=True), ValueError, "eps must be"),
    (dict(out_dtype=torch.int8), TypeError, "out_dtype must be"),
    (dict(backend="fast"), ValueError, "unknown backend 'fast'"),
])
def test_bad_inputs(kwargs, error, match):
    args = dict(x=torch.randn(2, 3), weight=None, bias=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        layer_norm(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


def test_triton_rejects_float64():
    skip_unless_usable("layer_norm", "triton")
    with pytest.raises(BackendUnavailable, match="float64"):
        layer_norm(torch.randn(2, 3, dtype=torch.float64), backend="triton")
    with pytest.raises(ValueError, match="fp32/bf16/fp16 weights and output"):
        layer_norm(torch.randn(2, 3), torch.ones(3, dtype=torch.float64), backend="triton")


# --- the GPT ----------------------------------------------------------------------------------------

def test_gpt_norms_keep_nn_parameters_and_follow_the_kernel_config():
    """The model's norms are nn.LayerNorm / nn.RMSNorm subclasses (state dicts and checkpoints
    unchanged) whose backend is the model's resolved choice."""
    for norm, cls, op in (("layernorm", LayerNorm, "layer_norm"), ("rmsnorm", RMSNorm, "rms_norm")):
        config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, d_model=16, norm=norm)
        model = GPT(config, kernels=KernelConfig(norm_backend="torch"))
        norms = [m for m in model.modules() if isinstance(m, cls)]
        assert len(norms) == 3 and all(m.backend == "torch" for m in norms)
        assert model.backends[op] == "torch"
        base = torch.nn.LayerNorm if norm == "layernorm" else torch.nn.RMSNorm
        assert isinstance(norms[0], base)
        assert "blocks.0.norm1.weight" in model.state_dict()


def test_gpt_norms_under_torch_compile_leave_auto_to_inductor():
    """An "auto" norm backend runs PyTorch's norm under torch.compile (inductor fuses it with its
    neighbours); an explicit one is kept there too."""
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, d_model=16)
    assert GPT(config, kernels=KernelConfig(norm_backend="auto")).norm_f.compiled_backend == "torch"
    assert GPT(config, kernels=KernelConfig(norm_backend="torch")).norm_f.compiled_backend == "torch"
    skip_unless_usable("layer_norm", "triton")
    assert GPT(config, kernels=KernelConfig(norm_backend="triton")).norm_f.compiled_backend == "triton"
    norm = LayerNorm(16)
    norm.backend, norm.compiled_backend = "triton", "torch"
    x = torch.randn(3, 16)
    with count_calls(norm_module, "norm_reference") as calls:
        compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)(x)
    assert calls and torch.allclose(compiled, norm(x), atol=1e-5)
    torch._dynamo.reset()


def test_gpt_norm_under_autocast_returns_the_autocast_dtype_with_pytorchs_values():
    norm = LayerNorm(24)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
        plain = F.layer_norm(x, (24,), norm.weight, norm.bias)
    assert out.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert torch.equal(out, plain.to(torch.bfloat16))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gpt_trains_identically_with_torch_and_triton_norms(norm):
    skip_unless_usable("layer_norm", "triton")
    config = GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, d_model=32, norm=norm)
    idx = torch.randint(0, 50, (3, 12))
    losses, grads = {}, {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        model = GPT(config, kernels=KernelConfig(norm_backend=backend))
        assert model.backends[{"layernorm": "layer_norm", "rmsnorm": "rms_norm"}[norm]] == backend
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            _, loss = model(idx, targets=idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[backend] = loss.item()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert abs(losses["torch"] - losses["triton"]) <= 1e-5
    assert rel_err(grads["triton"], grads["torch"]) <= 1e-4


# --- CUDA -----------------------------------------------------------------------------------------

GPU_SHAPES = [((4096,), 768), ((1023,), 1024), ((2048,), 4096), ((300,), 5120), ((128,), 8192), ((5,), 8191)]


def pytorch_error(op, x, weight, bias, grad_out):
    """PyTorch's own error in x's dtype against float64, per tensor: out, then the gradients."""
    inputs = [t for t in (x, weight, bias) if t is not None]
    out = call(op, x, weight, bias, backend="torch")
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref, leaves = reference(op, x, weight, bias)
    ref_grads = torch.autograd.grad(ref, [t for t in leaves if t is not None], grad_out.double())
    return [rel_err(g, r) for g, r in zip((out, *grads), (ref, *ref_grads))], (ref, *ref_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_id)
def test_triton_cuda_within_twice_pytorch_error(op, shape, dtype):
    """On CUDA every tensor's error against float64 is within 2x PyTorch's own error in the
    same dtype (plus the fp32 floor): the fused path is as accurate as F.layer_norm there."""
    assert resolve_backend(op, "cuda", dtype=dtype) == "triton"
    x, weight, bias = make_inputs(op, *shape, dtype, device="cuda")
    grad_out = torch.randn(x.shape, device="cuda").to(dtype)
    torch_errors, refs = pytorch_error(op, x, weight, bias, grad_out)
    out = call(op, x, weight, bias, backend="triton")
    inputs = [t for t in (x, weight, bias) if t is not None]
    got = (out, *torch.autograd.grad(out, inputs, grad_out))
    for name, g, r, bound in zip(["out", "x", "weight", "bias"], got, refs, torch_errors):
        err = rel_err(g, r)
        assert err <= 2 * bound + 1e-5, f"{name}: {err:.2e} vs PyTorch's {bound:.2e}"


@pytest.mark.gpu
def test_triton_cuda_mixed_dtypes_and_autocast_output():
    check_against_reference("layer_norm", "triton", (4096,), 768, torch.float32, out_dtype=torch.bfloat16,
                            device="cuda")
    check_against_reference("rms_norm", "triton", (999,), 4096, torch.bfloat16, param_dtype=torch.float32,
                            device="cuda")


@pytest.mark.gpu
def test_triton_cuda_more_than_2_31_elements():
    """N x D > 2**31: the row offsets are int64. Spot rows at the far end against the reference."""
    n, dim = 2**31 // 4096 + 3, 4096
    x = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    out = layer_norm(x, weight, backend="triton")
    for row in (0, n // 2, n - 1):
        ref = F.layer_norm(x[row].double(), (dim,), weight.double())
        assert rel_err(out[row], ref) <= TOL[torch.bfloat16]


@pytest.mark.gpu
def test_triton_cuda_under_inductor_without_graph_breaks():
    x, weight, bias = make_inputs("layer_norm", (512,), 768, torch.bfloat16, device="cuda")

    def loss_fn(x, weight, bias):
        return layer_norm(x, weight, bias, backend="triton").float().square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    grads = torch.autograd.grad(compiled(x, weight, bias), (x, weight, bias))
    ref = torch.autograd.grad(loss_fn(x, weight, bias), (x, weight, bias))
    for got, want in zip(grads, ref):
        assert rel_err(got, want) <= TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpt_on_cuda_picks_triton_norms():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, d_model=32), compute_dtype=torch.bfloat16)
    model = model.cuda()
    assert model.backends["layer_norm"] == "triton"
    assert all(m.backend == "triton" for m in model.modules() if isinstance(m, LayerNorm))
