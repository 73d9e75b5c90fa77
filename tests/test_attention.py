"""causal_attention: every backend against a float64 reference, bad inputs, the GPT end to end.

Errors are max |out - ref| / max |ref| over each tensor (the denominator floored at 0.1,
as inputs are unit normal and dq, dk are exactly zero at T = 1). Tolerances: fp32 1e-4, bf16/fp16 2e-2.
On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py), so the CPU sweep
is pruned: every T and GQA ratio at D = 16 and 64, fewer cases at D = 128, every dtype on a
few awkward shapes. The `gpu` tests sweep T up to 8192 at D = 64 and 128 against PyTorch's own
error (see check_within_twice_pytorch_error), and run every autotune config once.
"""
import contextlib

import pytest
import torch

import fastlm.ops.attention as attention_module
from fastlm.ops import BackendUnavailable, available_backends, causal_attention, resolve_backend
from fastlm.ops.attention import attention_reference
from tests.helpers import LogOps, compiled_and_eager_grads, count_calls, rel_err, skip_unless_usable

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
GQA = [(4, 4), (4, 2), (4, 1)]


def make_inputs(B, H, H_kv, T, D, dtype, device="cpu", transposed=False):
    if transposed:
        # The GPT's layout: (B, T, H, D) viewed as (B, H, T, D), so only the last dim is contiguous.
        q = torch.randn(B, T, H, D, device=device).transpose(1, 2)
        k = torch.randn(B, T, H_kv, D, device=device).transpose(1, 2)
        v = torch.randn(B, T, H_kv, D, device=device).transpose(1, 2)
    else:
        q = torch.randn(B, H, T, D, device=device)
        k = torch.randn(B, H_kv, T, D, device=device)
        v = torch.randn(B, H_kv, T, D, device=device)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def check_against_reference(backend, B, H, H_kv, T, D, dtype, scale=None, device="cpu", transposed=False):
    if backend == "auto":
        resolved = resolve_backend("causal_attention", device, dtype=dtype, head_dim=D)
    else:
        skip_unless_usable("causal_attention", backend, device)
        resolved = backend
    q, k, v = make_inputs(B, H, H_kv, T, D, dtype, device, transposed)
    entry = {"torch": "attention_reference", "sdpa": "_sdpa", "triton": "_triton"}[resolved]
    with count_calls(attention_module, entry) as calls:
        out = causal_attention(q, k, v, scale=scale, backend=backend)
    assert calls, f"the {resolved} path did not run"
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, D ** -0.5 if scale is None else scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), name
        err = rel_err(got, want)
        assert err <= TOL[dtype], (f"{backend} {name}: rel err {err:.2e} > {TOL[dtype]:.0e} "
                                   f"at B={B} H={H}/{H_kv} T={T} D={D} {dtype}")


# --- Triton (interpreter on CPU) ----------------------------------------------------------------

SWEEP_FP32 = [(B, H, H_kv, T, D) for D in (16, 64) for (H, H_kv) in GQA
              for B, T in ((1, 1), (2, 17), (2, 64), (1, 130))]
SWEEP_FP32 += [(1, 4, 4, 17, 128), (2, 4, 1, 130, 128), (1, 4, 2, 64, 32)]
SWEEP_HALF = [(1, 4, 1, 1, 16), (2, 4, 2, 17, 16), (1, 4, 4, 130, 64), (1, 4, 1, 64, 128), (2, 4, 2, 37, 32)]


def _id(case):
    B, H, H_kv, T, D = case
    return f"B{B}-H{H}/{H_kv}-T{T}-D{D}"


@pytest.mark.parametrize("case", SWEEP_FP32, ids=_id)
def test_triton_fp32(case):
    check_against_reference("triton", *case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", SWEEP_HALF, ids=_id)
def test_triton_half(case, dtype):
    check_against_reference("triton", *case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_triton_custom_scale(scale, dtype):
    check_against_reference("triton", 2, 4, 2, 45, 16, dtype, scale=scale)


def test_triton_strided_inputs():
    check_against_reference("triton", 2, 4, 2, 33, 16, torch.float32, transposed=True)


def test_triton_output_and_gradients_keep_the_gpt_layout():
    """q, k, v seen as (B, H, T, D) over (B, T, H, D) memory (the GPT's heads of its projection): the
    output and dq, dk, dv come back in that memory order, so the GPT's transpose back to (B, T, H*D)
    is a view (no copy), as with SDPA's flash kernel; contiguous inputs keep contiguous outputs.
    Under torch.compile the custom ops' fake outputs have the same strides."""
    skip_unless_usable("causal_attention", "triton")
    for transposed in (True, False):
        q, k, v = make_inputs(2, 4, 2, 19, 16, torch.float32, transposed=transposed)
        out = causal_attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape))
        for t in (out, *grads):
            assert t.transpose(1, 2).is_contiguous() if transposed else t.is_contiguous()
        ref = attention_reference(q.double(), k.double(), v.double(), 16 ** -0.5)
        assert rel_err(out, ref) <= TOL[torch.float32]
    q, k, v = make_inputs(2, 4, 2, 19, 16, torch.float32, transposed=True)

    def loss_fn(q, k, v):
        out = causal_attention(q, k, v, backend="triton")
        return (out.transpose(1, 2).reshape(2, 19, 64) ** 2).sum()

    for got, want in compiled_and_eager_grads(loss_fn, q, k, v):
        assert rel_err(got, want) <= 1e-5


def test_triton_large_logits_stay_finite():
    # Scores around +-1e3 would overflow a naive exp; the online softmax subtracts the running max.
    check_against_reference("triton", 1, 2, 1, 40, 16, torch.float32, scale=100.0)


def test_triton_under_autocast_keeps_input_dtype():
    skip_unless_usable("causal_attention", "triton")
    q, k, v = make_inputs(1, 4, 2, 20, 16, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_attention(q, k, v, backend="triton")
    assert out.dtype == torch.bfloat16
    ref = attention_reference(q.double(), k.double(), v.double(), 16 ** -0.5)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


def test_triton_under_torch_compile():
    skip_unless_usable("causal_attention", "triton")
    q, k, v = make_inputs(1, 4, 2, 24, 16, torch.float32)

    def loss_fn(q, k, v):
        return (causal_attention(q, k, v, backend="triton") ** 2).sum()

    for got, want in compiled_and_eager_grads(loss_fn, q, k, v):
        assert rel_err(got, want) <= 1e-5


def test_triton_eager_launches_directly_and_dispatch_modes_see_the_custom_ops():
    """Plain eager calls launch the kernels without the custom ops' dispatch (host time); under a
    dispatch mode the same call goes through fastlm::flash_attention_forward/backward, with the
    same results, and no (B, H, T) zeros are made for the log-sum-exp's gradient."""
    skip_unless_usable("causal_attention", "triton")
    q, k, v = make_inputs(1, 4, 2, 24, 16, torch.float32)
    grad_out = torch.randn(1, 4, 24, 16)
    results = {}
    for mode in (None, LogOps()):
        with mode or contextlib.nullcontext():
            out = causal_attention(q, k, v, backend="triton")
            results[mode is None] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
        if mode is None:
            assert type(out.grad_fn).__name__ == "_FlashAttentionBackward"
        else:
            assert "fastlm.flash_attention_forward.default" in mode.ops
            assert "fastlm.flash_attention_backward.default" in mode.ops
            assert not [op for op in mode.ops if op.startswith(("aten.zeros", "aten.zero_", "aten.fill_"))]
    for got, want in zip(results[True], results[False]):
        assert torch.equal(got, want)


def test_triton_double_backward_raises():
    """The backward has no autograd formula of its own: differentiating the gradients raises (on the
    eager path as through the custom ops) instead of treating them as constants."""
    skip_unless_usable("causal_attention", "triton")
    q, k, v = make_inputs(1, 2, 2, 8, 16, torch.float32)
    (dq,) = torch.autograd.grad(causal_attention(q, k, v, backend="triton").sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        dq.sum().backward()


# --- torch and sdpa backends ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "sdpa", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(1, 4, 4, 1, 16), (2, 4, 2, 17, 64), (1, 4, 1, 130, 128), (2, 3, 1, 29, 24)], ids=_id)
def test_torch_paths(case, dtype, backend):
    check_against_reference(backend, *case, dtype)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "auto"])
@pytest.mark.parametrize("case", [(1, 2, 2, 7, 16), (2, 4, 2, 9, 16)], ids=_id)
def test_zero_scale_is_the_prefix_mean(case, backend):
    """scale=0: every query weighs its prefix equally. torch's fused CPU sdpa returns nan for
    is_causal with scale=0, so the sdpa path must not hand it that call."""
    check_against_reference(backend, *case, torch.float32, scale=0.0)


def test_auto_on_cpu_is_sdpa_and_unsupported_head_size_falls_back():
    q, k, v = make_inputs(1, 2, 2, 9, 24, torch.float32)  # D = 24: no Triton kernel
    out = causal_attention(q, k, v)
    ref = causal_attention(q, k, v, backend="torch")
    assert rel_err(out, ref) <= 1e-5


def test_backend_reasons():
    reasons = available_backends("cpu")["causal_attention"]
    assert reasons["torch"] is None and reasons["sdpa"] is None
    assert reasons["cpp"] and reasons["cuda"]
    assert set(reasons) == {"torch", "sdpa", "triton", "cpp", "cuda"}


@pytest.mark.parametrize("version,usable", [("3.6.0", False), ("3.7.0", True), ("3.9.1+git2a3b", True),
                                             ("4.0", True)])
def test_triton_interpreter_needs_triton_3_7(monkeypatch, version, usable):
    # Triton 3.6's interpreter cannot run the kernels (it fails on a loop bound computed from the
    # program id); the backend says so instead of failing inside the kernel. CUDA is unaffected.
    import triton

    from fastlm.ops.backends import triton_unusable_reason

    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = triton_unusable_reason(torch.device("cpu"))
    assert (reason is None) == usable, reason
    if not usable:
        assert f"triton {version} cannot run" in reason and "triton >= 3.7" in reason
    assert triton_unusable_reason(torch.device("cuda")) is None


# --- bad inputs -----------------------------------------------------------------------------------

def _qkv(shape_q=(2, 4, 8, 16), shape_kv=(2, 2, 8, 16), dtype=torch.float32):
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


@pytest.mark.parametrize("shape_q,shape_kv,match", [
    ((4, 8, 16), (2, 8, 16), r"q must have 4 dimensions, got shape \(4, 8, 16\)"),
    ((2, 4, 8, 16), (2, 2, 8, 16, 1), r"k must have 4 dimensions"),
    ((2, 4, 8, 16), (3, 2, 8, 16), r"k/v must be .* got \(3, 2, 8, 16\)"),
    ((2, 4, 8, 16), (2, 2, 9, 16), r"k/v must be .* got \(2, 2, 9, 16\)"),
    ((2, 4, 8, 16), (2, 2, 8, 32), r"k/v must be .* got \(2, 2, 8, 32\)"),
    ((2, 4, 8, 16), (2, 3, 8, 16), r"q heads \(4\) must be a multiple of the number of k/v heads \(3\)"),
    ((2, 4, 0, 16), (2, 2, 0, 16), r"T and D must be >= 1"),
])
def test_bad_shapes(shape_q, shape_kv, match):
    q, k, v = _qkv(shape_q, shape_kv)
    with pytest.raises(ValueError, match=match):
        causal_attention(q, k, v, backend="torch")


def test_k_v_shape_mismatch():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        causal_attention(q, k, torch.randn(2, 1, 8, 16), backend="torch")


def test_unsupported_head_size_for_triton():
    q, k, v = _qkv((1, 2, 8, 48), (1, 2, 8, 48))
    with pytest.raises(ValueError, match=r"supports D in \(16, 32, 64, 128\).*got q \(1, 2, 8, 48\) float32"):
        causal_attention(q, k, v, backend="triton")
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"got q \(2, 4, 8, 16\) float64"):
        causal_attention(q, k, v, backend="triton")
    assert causal_attention(q, k, v).dtype == torch.float64  # auto: sdpa takes float64


def test_mixed_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"q float32, k bfloat16, v float32"):
        causal_attention(q, k.bfloat16(), v)


def test_integer_dtype():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"q must have dtype in .* got int64"):
        causal_attention(q.long(), k.long(), v.long())


def test_mixed_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"one device, got q on cpu, k on meta"):
        causal_attention(q, k.to("meta"), v)


def test_bad_scale_and_backend():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"scale must be a finite real number"):
        causal_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match=r"unknown backend 'flash'"):
        causal_attention(q, k, v, backend="flash")
    with pytest.raises(BackendUnavailable, match=r"no compiled C\+\+ attention kernel"):
        causal_attention(q, k, v, backend="cpp")


# --- the GPT end to end ---------------------------------------------------------------------------

def _train_losses(attn_backend, steps=20):
    from fastlm.config import GPTConfig, KernelConfig
    from fastlm.model import GPT

    torch.manual_seed(0)
    # Head size 16 with grouped-query heads; T = 20 leaves a tail past the interpreter's blocks.
    cfg = GPTConfig(vocab_size=64, block_size=20, n_layer=2, n_head=2, n_kv_head=1, d_model=32, pos_emb="rope")
    model = GPT(cfg, kernels=KernelConfig(attn_backend=attn_backend, ce_backend="torch"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size + 1), generator=gen)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def test_gpt_trains_identically_with_torch_and_triton():
    skip_unless_usable("causal_attention", "triton")
    pytest.importorskip("fastlm.model")
    ref_losses, ref_model = _train_losses("torch")
    losses, model = _train_losses("triton")
    assert ref_losses[-1] < ref_losses[0]
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: loss {a} (triton) vs {b} (torch)"
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.detach(), p_ref.detach()) <= 1e-3, name


# --- GPU --------------------------------------------------------------------------------------------
# The sweep: T in {1, 17, 1023, 1024, 4096, 8192}, D in {64, 128}, one and four query heads
# per kv head, bf16 and fp16, forward and backward, judged as FlashAttention's tests judge: the
# error against an fp32 reference at most twice that of PyTorch's own attention in the same dtype
# (pytorch_same_precision), and no NaN.

def pytorch_same_precision(q, k, v):
    """Plain PyTorch attention in the inputs' dtype, built as FlashAttention's tests build their
    baseline: the scores, the probabilities and the output are each rounded to the dtype (the
    softmax itself runs in fp32), as a framework without a fused kernel computes it."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    T = q.shape[2]
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def check_within_twice_pytorch_error(B, H, H_kv, T, D, dtype, device, transposed=False):
    q, k, v = make_inputs(B, H, H_kv, T, D, dtype, device, transposed)
    grad_out = torch.randn(B, H, T, D, device=device).to(dtype)
    with count_calls(attention_module, "_triton") as calls:
        out = causal_attention(q, k, v, backend="triton")
    assert calls, "the triton path did not run"
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    out_pt = pytorch_same_precision(q, k, v)
    grads_pt = torch.autograd.grad(out_pt, (q, k, v), grad_out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q32, k32, v32, D ** -0.5)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())
    for name, got, pt, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_pt, *grads_pt), (ref, *ref_grads)):
        assert got.dtype == dtype and torch.isfinite(got).all(), f"{name}: not finite"
        err = (got.float() - want).abs().max().item()
        err_pt = (pt.float() - want).abs().max().item()
        # + 1e-5: both errors are ~0 where the exact gradient is 0 (dq, dk at T = 1).
        assert err <= 2 * err_pt + 1e-5, (f"{name}: max error {err:.3e} > 2 x PyTorch's {err_pt:.3e} "
                                          f"at B={B} H={H}/{H_kv} T={T} D={D} {dtype}")


GPU_SWEEP = [((2 if T <= 1024 else 1), 4, H_kv, T, D) for T in (1, 17, 1023, 1024, 4096, 8192)
             for D in (64, 128) for H_kv in (4, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_SWEEP, ids=_id)
def test_triton_cuda_within_twice_pytorch_error(case, dtype):
    skip_unless_usable("causal_attention", "triton", "cuda")
    check_within_twice_pytorch_error(*case, dtype, "cuda")


def test_triton_within_twice_pytorch_error_on_cpu():
    # The GPU criterion checked through the interpreter at small shapes with tails. fp16 only:
    # the interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest), which
    # biases its bf16 results by up to an ulp.
    skip_unless_usable("causal_attention", "triton")
    for case in ((2, 4, 1, 37, 16), (1, 4, 4, 70, 64)):
        check_within_twice_pytorch_error(*case, torch.float16, "cpu")


# fp32 (true fp32 dots), the small head sizes, and the GPT's strided layout, against float64.
GPU_EXTRA = [((1, 4, 1, 1023, 64), torch.float32, False), ((2, 4, 4, 130, 128), torch.float32, False),
             ((2, 4, 2, 130, 32), torch.bfloat16, False), ((1, 4, 1, 4096, 16), torch.bfloat16, False),
             ((2, 4, 2, 1000, 64), torch.bfloat16, True), ((1, 4, 4, 17, 128), torch.float16, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype,transposed", GPU_EXTRA,
                         ids=[f"{_id(c)}-{str(d)[6:]}{'-strided' if t else ''}" for c, d, t in GPU_EXTRA])
def test_triton_cuda(case, dtype, transposed):
    check_against_reference("triton", *case, dtype, device="cuda", transposed=transposed)


# test_triton_cuda_every_config runs config `index` of each kernel for each index below this.
CONFIG_SLOTS = 10


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_every_config_has_a_slot_in_the_gpu_test(head_dim):
    # A longer table would leave configs that tuning may pick untested on the GPU.
    pytest.importorskip("triton")
    from fastlm.triton_kernels import attention as kernels

    for name, (_, configs) in kernels.cuda_kernels(head_dim).items():
        assert 0 < len(configs) <= CONFIG_SLOTS, (name, head_dim, len(configs))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("index", range(CONFIG_SLOTS))
def test_triton_cuda_every_config(head_dim, index):
    # The suite runs one fixed config (FASTLM_AUTOTUNE=0); tuning may pick any other, so each
    # kept config of each kernel runs once here: a tail (T = 1000) and four query heads per kv head.
    from fastlm.triton_kernels import attention as kernels

    tables = {name: configs for name, (_, configs) in kernels.cuda_kernels(head_dim).items() if name != "bwd_delta"}
    if index >= max(map(len, tables.values())):
        pytest.skip(f"fewer configs at D={head_dim}")
    pick = {name: configs[index % len(configs)] for name, configs in tables.items()}
    with kernels.forced_configs(fwd=pick["fwd"], dkdv=pick["bwd_dkdv"], dq=pick["bwd_dq"]):
        check_against_reference("triton", 2, 4, 1, 1000, head_dim, torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_triton_cuda_autotuned(monkeypatch):
    # The path the trainer and the benchmarks take: tuning, then the chosen config.
    monkeypatch.setenv("FASTLM_AUTOTUNE", "1")
    check_against_reference("triton", 2, 4, 4, 1024, 64, torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_triton_cuda_under_inductor_without_graph_breaks():
    import torch._dynamo

    q, k, v = make_inputs(2, 4, 2, 257, 64, torch.bfloat16, device="cuda")

    def loss_fn(q, k, v):
        return causal_attention(q, k, v, backend="triton").float().square().sum()

    torch._dynamo.reset()
    assert torch._dynamo.explain(loss_fn)(q, k, v).graph_break_count == 0
    grads = torch.autograd.grad(torch.compile(loss_fn, fullgraph=True)(q, k, v), (q, k, v))
    ref_grads = torch.autograd.grad(loss_fn(q, k, v), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(2, 4, 2, 17, 64), (1, 4, 1, 2048, 128)], ids=_id)
def test_sdpa_cuda(case, dtype):
    check_against_reference("sdpa", *case, dtype, device="cuda")


@pytest.mark.gpu
def test_auto_on_cuda_is_triton_under_bf16_autocast():
    q, k, v = make_inputs(2, 4, 2, 257, 64, torch.bfloat16, device="cuda", transposed=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = causal_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = attention_reference(q.double(), k.double(), v.double(), 64 ** -0.5)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


# --- grid and offsets (issue 15) -------------------------------------------------------------------

def test_launch_grid_fits_cuda_limits_for_large_batch_times_heads():
    # Grid axis 1 stops at 65535: B * H = 2**17 heads must not sit there.
    from fastlm.triton_kernels.attention import MAX_GRID, launch_grid

    for T, block in ((1, 16), (4096, 64), (4097, 128)):
        grid = launch_grid(T, block, 2**17)
        assert grid == (-(-T // block) * 2**17,)
        assert all(n <= limit for n, limit in zip(grid, MAX_GRID)), grid
    with pytest.raises(ValueError, match=r"exceed the CUDA grid limit"):
        launch_grid(2**20, 16, 2**15)


class _Launches:
    """Stands in for a Triton kernel (or its autotuned variant): records each launch's grid and keywords."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, kwargs))


@pytest.mark.parametrize("mode", ["tuned", "default", "forced"])
def test_cuda_launch_tunes_or_uses_one_fixed_config(monkeypatch, mode):
    from fastlm.triton_kernels import attention as kernels

    tuned, plain = _Launches(), _Launches()
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0" if mode == "default" else "1")
    grid_of = lambda meta: (meta["BLOCK_M"] * 1000,)  # noqa: E731
    forced = kernels._configs_for(kernels._FWD_CONFIGS, 128)[-1]
    with kernels.forced_configs(fwd=forced) if mode == "forced" else contextlib.nullcontext():
        kernels._launch_cuda("fwd", tuned, plain, grid_of, (1, 2), {"HEAD_DIM": 64})
    if mode == "tuned":
        assert not plain.calls and len(tuned.calls) == 1 and callable(tuned.calls[0][0])
        assert tuned.calls[0][1] == {"HEAD_DIM": 64, "enable_fp_fusion": True}
        return
    config = forced if mode == "forced" else kernels.DEFAULT_CONFIGS["fwd"]
    assert not tuned.calls
    [(grid, kwargs)] = plain.calls
    assert grid == (config.kwargs["BLOCK_M"] * 1000,)
    # FMA contraction is asked for, not left to Triton's default (which flips in Triton 3.10).
    assert kwargs == {"HEAD_DIM": 64, **config.kwargs, "num_warps": config.num_warps,
                      "num_stages": config.num_stages, "enable_fp_fusion": True}


def test_default_configs_are_tuning_candidates_at_every_head_size():
    from fastlm.triton_kernels import attention as kernels

    tables = {"fwd": kernels._FWD_CONFIGS, "dkdv": kernels._DKDV_CONFIGS, "dq": kernels._DQ_CONFIGS}
    for name, config in kernels.DEFAULT_CONFIGS.items():
        for head_dim in (16, 32, 64, 128):
            assert config in kernels._configs_for(tables[name], head_dim), (name, head_dim)


def test_launchers_build_grids_with_launch_grid(monkeypatch):
    # Every launch, forward and backward, uses one axis of cdiv(T, block) * heads programs.
    skip_unless_usable("causal_attention", "triton")
    from fastlm.triton_kernels import attention

    class Recorder:
        def __init__(self, kernel):
            self.kernel, self.grids = kernel, []

        def __getitem__(self, grid):
            self.grids.append(grid)
            return self.kernel[grid]

    names = ("_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq")
    recorders = {name: Recorder(getattr(attention, name)) for name in names}
    for name, recorder in recorders.items():
        monkeypatch.setattr(attention, name, recorder)
    B, H, H_kv, T = 2, 4, 2, 37
    q, k, v = make_inputs(B, H, H_kv, T, 16, torch.float32)
    causal_attention(q, k, v, backend="triton").sum().backward()
    blocks = attention.INTERPRET_BLOCKS
    expected = {"_attn_fwd": attention.launch_grid(T, blocks["fwd"][0], B * H),
                "_attn_bwd_delta": attention.launch_grid(T, blocks["delta"], B * H),
                "_attn_bwd_dkdv": attention.launch_grid(T, blocks["dkdv"][1], B * H_kv),
                "_attn_bwd_dq": attention.launch_grid(T, blocks["dq"][0], B * H)}
    for name, recorder in recorders.items():
        assert recorder.grids == [expected[name]], name


def test_programs_run_heaviest_causal_blocks_first(monkeypatch):
    # Program p of a launch_grid grid: block p % n_blocks of head p // n_blocks, reversed where
    # the causal work grows with the block (forward, dQ), so each head's last block runs first.
    import triton
    import triton.language as tl

    from fastlm.triton_kernels.attention import _block_and_head, launch_grid

    # A kernel finds the functions it calls among its module's globals.
    monkeypatch.setitem(globals(), "_block_and_head", _block_and_head)

    @triton.jit
    def order(out, T, BLOCK: tl.constexpr, LAST_BLOCK_FIRST: tl.constexpr):
        block, head = _block_and_head(T, BLOCK, LAST_BLOCK_FIRST)
        tl.store(out + 2 * tl.program_id(0), block)
        tl.store(out + 2 * tl.program_id(0) + 1, head)

    T, block, heads = 50, 16, 3  # 4 blocks per head, the last one partial
    for last_first in (True, False):
        grid = launch_grid(T, block, heads)
        out = torch.full((grid[0], 2), -1, dtype=torch.int32)
        order[grid](out, T, BLOCK=block, LAST_BLOCK_FIRST=last_first)
        blocks = [3, 2, 1, 0] if last_first else [0, 1, 2, 3]
        assert out.tolist() == [[b, h] for h in range(heads) for b in blocks], last_first


@pytest.mark.gpu
def test_triton_cuda_row_offsets_past_2_to_the_31():
    # q, k, v: strided views of one buffer whose row stride puts the last rows past 2**31
    # elements (like v in the qkv projection at very long T); 32-bit row offsets wrap there.
    T, D, stride = 80, 64, 2**25 + 3 * 64
    assert (T - 1) * stride > 2**31
    buf = torch.randn(T, stride, device="cuda", dtype=torch.bfloat16)
    views = [buf[:, i * D:(i + 1) * D].as_strided((1, 1, T, D), (T * stride, T * stride, stride, 1)).requires_grad_()
             for i in range(3)]
    out = causal_attention(*views, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, views, grad_out)
    dense = [t.detach().contiguous().double().requires_grad_() for t in views]
    ref = attention_reference(*dense, D ** -0.5)
    ref_grads = torch.autograd.grad(ref, dense, grad_out.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert rel_err(got, want) <= TOL[torch.bfloat16], name


def test_tuned_picks_name_the_config_each_tuned_kernel_ran(monkeypatch):
    # What the attention benchmark records per shape (extra "configs"): the autotuner's last pick
    # of each kernel, labelled as the compile report labels configs; None once forgotten.
    pytest.importorskip("triton")
    from fastlm.bench import attention as bench
    from fastlm.triton_kernels import attention as kernels

    for tuned in kernels._TUNED.values():
        monkeypatch.setattr(tuned, "best_config", None, raising=False)
    picks = {"fwd": kernels._FWD_CONFIGS[4][0], "dq": kernels._DQ_CONFIGS[-1][0]}
    for name, config in picks.items():
        kernels._TUNED[name].best_config = config
    assert kernels.tuned_picks() == {"fwd": "128x64 w8 s3", "dkdv": None, "dq": "64x16 w4 s4"}
    kernels.forget_tuned_picks()
    assert kernels.tuned_picks() == {"fwd": None, "dkdv": None, "dq": None}
    # Only tuned CUDA launches report picks.
    assert bench.tuned_kernels("triton", torch.device("cpu")) is None
    assert bench.tuned_kernels("sdpa", torch.device("cuda")) is None
    monkeypatch.setenv("FASTLM_AUTOTUNE", "1")
    assert bench.tuned_kernels("triton", torch.device("cuda")) is kernels
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0")
    assert bench.tuned_kernels("triton", torch.device("cuda")) is None
