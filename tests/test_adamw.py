"""fastlm.optim.AdamW against torch.optim.AdamW: every backend, options, dtypes, state dicts.

Tolerances: fp32 parameters follow torch.optim.AdamW to 1e-6 (max abs) over 25 steps;
bf16/fp16 parameters with master weights stay within half an ulp of the dtype (plus 1e-6)
of the fp32 run fed the same gradients, and their master copy within 1e-6 of it.
"""
import copy

import pytest
import torch

from fastlm.ops import BackendUnavailable
from fastlm.optim import AdamW
from fastlm.optim import adamw as adamw_module
from tests.helpers import count_calls, skip_unless_usable

STEPS = 25
ATOL = 1e-6
# 0-element, 1, primes, a non-contiguous (transposed) view, a non-dense (strided) view, and one
# tensor longer than a CPU work piece (2**15) with a tail.
SHAPES = [(0,), (1,), (7, 13), (101,), "transposed", "strided", (70001,)]
ROUNDING = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    """Each CPU backend; the test skips (or fails, where the backend is required) when it cannot run."""
    skip_unless_usable("adamw", request.param)
    return request.param


def make_param(shape, dtype=torch.float32, device="cpu"):
    if shape == "transposed":
        t = torch.randn(13, 5, device=device).t()
    elif shape == "strided":
        t = torch.randn(6, 22, device=device)[:, ::2]
    else:
        t = torch.randn(shape, device=device)
    return t.to(dtype).requires_grad_()


def make_params(dtype=torch.float32, device="cpu"):
    return [make_param(s, dtype, device) for s in SHAPES]


def clone_params(params, dtype=None):
    out = []
    for p in params:
        c = torch.empty_strided(p.shape, p.stride(), dtype=dtype or p.dtype, device=p.device)
        c.copy_(p.detach())
        out.append(c.requires_grad_())
    return out


def groups(params, weight_decay):
    # Two groups as the trainer builds them (decay / no decay), plus a third with its own lr.
    return [{"params": params[:3], "weight_decay": weight_decay},
            {"params": params[3:6], "weight_decay": 0.0},
            {"params": params[6:], "weight_decay": weight_decay, "lr": 3e-3}]


def set_grads(param_lists, dtype=None):
    """The same fresh random grad on the matching param of every list."""
    for ps in zip(*param_lists):
        g = torch.randn(ps[0].shape, device=ps[0].device)
        if dtype is not None:
            g = g.to(dtype)
        for p in ps:
            p.grad = g.to(p.dtype).clone()


def run_pair(ours, theirs, params_a, params_b, steps, change_lr_at=None, clip=None, grad_dtype=None):
    norms = []
    for i in range(steps):
        if change_lr_at is not None and i == change_lr_at:
            for opt in (ours, theirs):
                for g in opt.param_groups:
                    g["lr"] = g["lr"] * 0.5
        set_grads([params_a, params_b], grad_dtype)
        if clip is not None:
            ref_norm = torch.nn.utils.clip_grad_norm_(params_b, clip)
        out = ours.step()
        theirs.step()
        if clip is not None:
            norms.append((out, ref_norm))
    return norms


def pair_with_torch(backend, amsgrad):
    """(params, ref, ours, theirs): our AdamW on `backend` and torch.optim.AdamW, each over its own
    copy of the same parameters in the same groups, lr 1e-2."""
    params = make_params()
    ref = clone_params(params)
    ours = AdamW(groups(params, 0.1), backend=backend, lr=1e-2, amsgrad=amsgrad)
    theirs = torch.optim.AdamW(groups(ref, 0.1), lr=1e-2, amsgrad=amsgrad)
    return params, ref, ours, theirs


def max_abs_diff(xs, ys):
    return max(((x.detach().double() - y.detach().double()).abs().max().item() if x.numel() else 0.0)
               for x, y in zip(xs, ys))


@pytest.mark.parametrize("amsgrad,maximize,weight_decay", [
    (False, False, 0.1), (True, False, 0.1), (False, True, 0.0), (True, True, 0.05)])
def test_matches_torch_adamw(backend, amsgrad, maximize, weight_decay):
    params = make_params()
    ref = clone_params(params)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, amsgrad=amsgrad, maximize=maximize)
    ours = AdamW(groups(params, weight_decay), backend=backend, **kw)
    theirs = torch.optim.AdamW(groups(ref, weight_decay), **kw)
    with count_calls(adamw_module._STEP_FNS, backend) as calls:
        run_pair(ours, theirs, params, ref, STEPS, change_lr_at=10)
    assert len(calls) == STEPS * len(ours.param_groups), f"the {backend} update did not run every step"
    assert max_abs_diff(params, ref) <= ATOL
    for p, r in zip(params, ref):
        assert p.stride() == r.stride()
        mine, torchs = ours.state[p], theirs.state[r]
        assert set(mine) == set(torchs)
        assert mine["step"].item() == torchs["step"].item() == STEPS
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert mine[key].dtype == torch.float32
            assert max_abs_diff([mine[key]], [torchs[key]]) <= ATOL


@pytest.mark.parametrize("clip", [0.5, 1e4])  # clipping every step / never
def test_max_grad_norm_matches_clip_grad_norm(backend, clip):
    params = make_params()
    ref = clone_params(params)
    ours = AdamW(groups(params, 0.1), lr=1e-2, max_grad_norm=clip, backend=backend)
    theirs = torch.optim.AdamW(groups(ref, 0.1), lr=1e-2)
    norms = run_pair(ours, theirs, params, ref, STEPS, clip=clip)
    assert max_abs_diff(params, ref) <= ATOL
    for norm, ref_norm in norms:
        assert norm.dtype == torch.float32 and norm.dim() == 0
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    # Clipping happens inside the update: the grads themselves are left as they were.
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    ours.step()
    assert all(bool((p.grad == 3.0).all()) for p in params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_master_weights(backend, dtype):
    params = make_params(dtype)
    ref = clone_params(params, torch.float32)
    kw = dict(lr=1e-2, amsgrad=False)
    ours = AdamW(groups(params, 0.1), master_weights=True, backend=backend, **kw)
    theirs = torch.optim.AdamW(groups(ref, 0.1), **kw)
    # Both runs see the same dtype-rounded grads, so the master copy follows the fp32 run.
    run_pair(ours, theirs, params, ref, STEPS, grad_dtype=dtype)
    for p, r in zip(params, ref):
        state = ours.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["master_param"].dtype == torch.float32
        assert max_abs_diff([state["master_param"]], [r]) <= ATOL
        tol = r.detach().abs() * ROUNDING[dtype] + ATOL
        assert bool(((p.detach().float() - r.detach()).abs() <= tol).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_without_master_matches_reference(dtype):
    if adamw_module.backend_reasons("cpu")["cpp"] is not None:
        pytest.skip("cpp backend unavailable")
    params = make_params(dtype)
    ref = clone_params(params)
    ours = AdamW(groups(params, 0.1), lr=1e-2, amsgrad=True, backend="cpp")
    theirs = AdamW(groups(ref, 0.1), lr=1e-2, amsgrad=True, backend="torch")
    run_pair(ours, theirs, params, ref, 5)
    for p, r in zip(params, ref):
        # Same fp32 math, one rounding to the dtype: at most one ulp apart.
        tol = r.detach().float().abs() * 2 * ROUNDING[dtype] + ATOL
        assert bool(((p.detach().float() - r.detach().float()).abs() <= tol).all())


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_round_trips_with_torch(backend, direction):
    params, ref, ours, theirs = pair_with_torch(backend, amsgrad=True)
    kw = dict(lr=1e-2, amsgrad=True)
    run_pair(ours, theirs, params, ref, 5)
    # Hand one optimizer's state to a fresh instance of the other, then continue both.
    if direction == "ours_to_torch":
        resumed_params = clone_params(params)
        resumed = torch.optim.AdamW(groups(resumed_params, 0.1), **kw)
        resumed.load_state_dict(copy.deepcopy(ours.state_dict()))
        follow, follow_params = ours, params
    else:
        resumed_params = clone_params(ref)
        resumed = AdamW(groups(resumed_params, 0.1), backend=backend, **kw)
        resumed.load_state_dict(copy.deepcopy(theirs.state_dict()))
        follow, follow_params = theirs, ref
    run_pair(resumed, follow, resumed_params, follow_params, 5)
    assert max_abs_diff(resumed_params, follow_params) <= ATOL
    for p in resumed_params:
        assert resumed.state[p]["step"].item() == 10


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_resume_is_bit_exact(backend, dtype, master):
    params = make_params(dtype)
    resumed_params = clone_params(params)
    kw = dict(lr=1e-2, max_grad_norm=1.0, master_weights=master, backend=backend)
    straight = AdamW(groups(params, 0.1), **kw)
    first = AdamW(groups(resumed_params, 0.1), **kw)
    run_pair(straight, first, params, resumed_params, 4)
    saved = copy.deepcopy(first.state_dict())
    second = AdamW(groups(resumed_params, 0.1), **kw)
    second.load_state_dict(saved)
    run_pair(straight, second, params, resumed_params, 4)
    for p, r in zip(params, resumed_params):
        assert torch.equal(p, r)
        for key, value in straight.state[p].items():
            assert torch.equal(value, second.state[r][key]), key


def test_cpp_is_deterministic_across_thread_counts():
    if adamw_module.backend_reasons("cpu")["cpp"] is not None:
        pytest.skip("cpp backend unavailable")
    grads = [torch.randn(200_003), torch.randn(7, 13), torch.randn(1)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            params = [torch.ones_like(g).requires_grad_() for g in grads]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            norm = AdamW(params, max_grad_norm=1.0, backend="cpp").step()
            results.append((norm, params))
    finally:
        torch.set_num_threads(threads)
    for norm, params in results[1:]:
        assert torch.equal(norm, results[0][0])
        assert all(torch.equal(p, q) for p, q in zip(params, results[0][1]))
    exact = torch.cat([g.double().flatten() for g in grads]).norm().float()
    torch.testing.assert_close(results[0][0], exact, rtol=1e-6, atol=0)


def _scaler_step(opt, params, scaler, inject_inf=False):
    x = torch.linspace(0.5, 1.5, 5)
    loss = sum((p.float() * x.sum()).square().mean() for p in params if p.numel())
    scaler.scale(loss).backward()
    if inject_inf:
        params[-1].grad.view(-1)[0] = float("inf")
    out = scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return out


def test_grad_scaler_unscales_inside_and_skips_on_inf(backend):
    params = make_params()
    ref = clone_params(params)
    ours = AdamW(groups(params, 0.1), lr=1e-2, max_grad_norm=1.0, backend=backend)
    theirs = torch.optim.AdamW(groups(ref, 0.1), lr=1e-2)
    scaler_ours = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler_theirs = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for _ in range(3):
        norm = _scaler_step(ours, params, scaler_ours)
        x = torch.linspace(0.5, 1.5, 5)
        loss = sum((p * x.sum()).square().mean() for p in ref if p.numel())
        scaler_theirs.scale(loss).backward()
        scaler_theirs.unscale_(theirs)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        scaler_theirs.step(theirs)
        scaler_theirs.update()
        theirs.zero_grad()
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    assert max_abs_diff(params, ref) <= ATOL

    before = [p.detach().clone() for p in params]
    stepped = [p for p in params if p in ours.state]
    steps_before = [ours.state[p]["step"].item() for p in stepped]
    scale_before = scaler_ours.get_scale()
    _scaler_step(ours, params, scaler_ours, inject_inf=True)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [ours.state[p]["step"].item() for p in stepped] == steps_before
    assert scaler_ours.get_scale() < scale_before
    assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")


def test_grad_scaler_fp16_params_with_master_weights(backend):
    params = [make_param(s, torch.float16) for s in [(33,), (4, 9)]]
    opt = AdamW(params, lr=1e-3, master_weights=True, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    start = [p.detach().clone() for p in params]
    _scaler_step(opt, params, scaler)
    assert all(not torch.equal(p, s) for p, s in zip(params, start))
    masters = [opt.state[p]["master_param"].clone() for p in params]
    _scaler_step(opt, params, scaler, inject_inf=True)
    assert all(torch.equal(opt.state[p]["master_param"], m) for p, m in zip(params, masters))
    assert all(opt.state[p]["step"].item() == 1 for p in params)


def test_params_without_grad_are_skipped(backend):
    a, b = torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)
    b_before = b.detach().clone()
    opt = AdamW([a, b], backend=backend)
    a.grad = torch.randn(5)
    opt.step()
    assert b not in opt.state and torch.equal(b, b_before)
    assert opt.step() is None  # without max_grad_norm: the closure's loss, None here


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr=torch.tensor(1e-3)), TypeError, "lr"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    (dict(betas=(0.9,)), ValueError, "betas"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (dict(amsgrad=1), TypeError, "amsgrad"),
    (dict(backend="nope"), ValueError, "backend"),
    (dict(backend="triton"), BackendUnavailable, "triton"),
    (dict(backend="cuda"), BackendUnavailable, "cuda"),
])
def test_validation(kwargs, exc, match):
    if kwargs.get("backend") == "cuda" and torch.cuda.is_available():
        pytest.skip("cuda is available here")
    with pytest.raises(exc, match=match):
        AdamW([torch.randn(3, requires_grad=True)], **kwargs)


def test_validation_of_params_and_grads():
    with pytest.raises(TypeError, match="parameter 0 .*int64"):
        AdamW([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"param group 1"):
        AdamW([{"params": [torch.randn(2, requires_grad=True)]},
               {"params": [torch.randn(2, requires_grad=True)], "lr": -1.0}])
    p = torch.randn(4, requires_grad=True)
    opt = AdamW([p], backend="torch")
    p.grad = torch.randn(4).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("bad_group, exc, match", [
    (dict(lr=-1.0), ValueError, r"lr \(param group 1\)"),
    (dict(betas=(0.9, 1.5)), ValueError, r"betas\[1\] \(param group 1\)"),
    (dict(params_dtype=torch.float64), TypeError, "parameter 1 .*float64"),
])
def test_refused_param_group_is_not_kept(bad_group, exc, match):
    """add_param_group that raises leaves the optimizer as it was, as torch's does for its checks:
    a caller that catches the error must not step a group with, say, a negative lr."""
    p = torch.randn(3, requires_grad=True)
    opt = AdamW([p], backend="torch")
    dtype = bad_group.pop("params_dtype", torch.float32)
    with pytest.raises(exc, match=match):
        opt.add_param_group({"params": [torch.randn(2, dtype=dtype, requires_grad=True)], **bad_group})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [p]
    p.grad = torch.ones(3)
    opt.step()


# --------------------------------------------------------------------------------------------
# step() builds each group's state lists once and reuses them (AdamW._group_lists): every change
# between steps that the lists depend on must still be seen
# --------------------------------------------------------------------------------------------

def assert_follows_torch(ours, theirs, params, ref, keys=("exp_avg", "exp_avg_sq")):
    assert max_abs_diff(params, ref) <= ATOL
    for p, r in zip(params, ref):
        assert (p in ours.state) == (r in theirs.state)
        if r in theirs.state:
            assert ours.state[p]["step"].item() == theirs.state[r]["step"].item()
            for key in keys:
                assert max_abs_diff([ours.state[p][key]], [theirs.state[r][key]]) <= ATOL, key


@pytest.mark.parametrize("amsgrad", [False, True])
def test_grads_that_come_and_go_match_torch(backend, amsgrad):
    params, ref, ours, theirs = pair_with_torch(backend, amsgrad=amsgrad)
    # Per step, the parameters without a grad: 1 (group 0) and 6 (group 2) get theirs only at the
    # second step, lose it again, and 3 (group 1) skips one step late in the run.
    for missing in [{1, 6}, set(), {1}, {3, 6}, set(), set()]:
        set_grads([params, ref])
        for i in missing:
            params[i].grad = ref[i].grad = None
        ours.step()
        theirs.step()
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    assert_follows_torch(ours, theirs, params, ref, keys)
    assert ours.state[params[1]]["step"].item() == 4


@pytest.mark.parametrize("source", ["torch", "ours"])
def test_load_state_dict_mid_run_then_continue_matches_torch(backend, source):
    """Our optimizer steps on alone after the save, then loads the state saved at step 3 into the
    same instance: the steps after it must update the loaded tensors, not the ones it had."""
    params, ref, ours, theirs = pair_with_torch(backend, amsgrad=True)
    run_pair(ours, theirs, params, ref, 3)
    saver, saved_params = (theirs, ref) if source == "torch" else (ours, params)
    saved = copy.deepcopy(saver.state_dict())
    saved_values = [p.detach().clone() for p in saved_params]
    for _ in range(2):
        set_grads([params])
        ours.step()
    with torch.no_grad():
        for p, value in zip(params, saved_values):
            p.copy_(value)
    ours.load_state_dict(saved)
    run_pair(ours, theirs, params, ref, 4)
    assert_follows_torch(ours, theirs, params, ref, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    assert ours.state[params[0]]["step"].item() == 7


def test_add_param_group_after_steps_matches_torch(backend):
    params = make_params()
    ref = clone_params(params)
    ours = AdamW(groups(params, 0.1)[:2], lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(groups(ref, 0.1)[:2], lr=1e-2)
    run_pair(ours, theirs, params, ref, 3)  # the last group's params get grads but are in no group yet
    ours.add_param_group(groups(params, 0.1)[2])
    theirs.add_param_group(groups(ref, 0.1)[2])
    run_pair(ours, theirs, params, ref, 3)
    assert_follows_torch(ours, theirs, params, ref)
    assert ours.state[params[-1]]["step"].item() == 3


def test_hyperparameters_changed_between_steps_take_effect(backend):
    params = make_params()
    ref = clone_params(params)
    ours = AdamW(groups(params, 0.1), lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(groups(ref, 0.1), lr=1e-2)
    run_pair(ours, theirs, params, ref, 2)
    for opt in (ours, theirs):
        opt.param_groups[0].update(lr=3e-2, weight_decay=0.5)
        opt.param_groups[1].update(betas=(0.8, 0.99), eps=1e-4)
        opt.param_groups[2].update(maximize=True, weight_decay=0.0)
    run_pair(ours, theirs, params, ref, 3)
    assert_follows_torch(ours, theirs, params, ref)


def test_amsgrad_and_master_weights_switched_on_between_steps(backend):
    fp32, bf16 = make_param((7, 13)), make_param((33,), torch.bfloat16)
    opt = AdamW([{"params": [fp32]}, {"params": [bf16]}], lr=1e-2, backend=backend)
    for _ in range(2):
        set_grads([[fp32, bf16]])
        opt.step()
    opt.param_groups[0]["amsgrad"] = True
    opt.param_groups[1]["master_weights"] = True
    set_grads([[fp32, bf16]])
    opt.step()
    state = opt.state[fp32]
    assert torch.equal(state["max_exp_avg_sq"], state["exp_avg_sq"])  # max(0, v) after its first step
    master = opt.state[bf16]["master_param"]
    assert master.dtype == torch.float32 and torch.equal(master.to(torch.bfloat16), bf16.detach())


@pytest.mark.parametrize("shape, dtype, match", [
    ((5,), torch.float32, r"got grad \(5,\) float32 for parameter \(4,\) float32"),
    ((4,), torch.bfloat16, r"got grad \(4,\) bfloat16 for parameter \(4,\) float32"),
], ids=["shape", "dtype"])
def test_bad_grad_after_cached_steps_raises_before_any_update(backend, shape, dtype, match):
    q, p = torch.randn(3, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = AdamW([q, p], backend=backend)  # q first: it would be updated if p's check came late
    for _ in range(2):
        q.grad, p.grad = torch.randn(3), torch.randn(4)
        opt.step()
    before = [q.detach().clone(), p.detach().clone()]
    p.grad.data = torch.randn(shape).to(dtype)  # (assigning p.grad itself refuses a mismatch)
    with pytest.raises(ValueError, match="grad must match its parameter, " + match):
        opt.step()
    assert torch.equal(q, before[0]) and torch.equal(p, before[1])
    assert opt.state[q]["step"].item() == opt.state[p]["step"].item() == 2


def test_sparse_grad_after_cached_steps_raises(backend):
    p = torch.randn(4, requires_grad=True)
    opt = AdamW([p], backend=backend)
    for _ in range(2):
        p.grad = torch.randn(4)
        opt.step()
    p.grad = torch.randn(4).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients are not supported"):
        opt.step()


def test_steady_steps_reuse_the_lists(backend):
    """The tests above can only fail through the cache if it is used: count the list builds."""
    params = make_params()
    opt = AdamW(groups(params, 0.1), lr=1e-2, backend=backend)
    with count_calls(adamw_module, "_GroupLists") as builds:
        for _ in range(3):
            set_grads([params])
            opt.step()
        assert len(builds) == 3  # one per group, at the first step
        set_grads([params])
        params[4].grad = None
        opt.step()
        assert len(builds) == 4  # group 1 only
        opt.load_state_dict(opt.state_dict())
        set_grads([params])
        opt.step()
        assert len(builds) == 7


def test_backend_reasons_shape():
    reasons = adamw_module.backend_reasons("cpu")
    assert set(reasons) == {"torch", "cpp", "cuda", "triton"}
    assert reasons["torch"] is None and reasons["cuda"] is not None
    assert reasons["triton"] == "not offered for adamw"


# ---- GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True),
                                          (torch.bfloat16, False)])
@pytest.mark.parametrize("amsgrad,clip", [(False, None), (True, 0.5)])
def test_cuda_matches_reference(dtype, master, amsgrad, clip):
    # More tensors than one launch holds, a tensor longer than one launch's chunks, odd sizes.
    shapes = SHAPES + [(3,)] * 40 + [(320 * 65536 + 5,)]
    params = [make_param(s, dtype, "cuda") for s in shapes]
    ref = clone_params(params)
    kw = dict(lr=1e-2, amsgrad=amsgrad, max_grad_norm=clip, master_weights=master)
    ours = AdamW(groups(params, 0.1), backend="cuda", **kw)
    theirs = AdamW(groups(ref, 0.1), backend="torch", **kw)
    peak = [r.detach().float().abs() for r in ref]
    for _ in range(10):
        set_grads([params, ref])
        norm, ref_norm = ours.step(), theirs.step()
        if clip is not None:
            torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        peak = [torch.maximum(m, r.detach().float().abs()) for m, r in zip(peak, ref)]
    if dtype == torch.float32:
        assert max_abs_diff(params, ref) <= 1e-5
    if master:
        assert max_abs_diff([ours.state[p]["master_param"] for p in params],
                            [theirs.state[r]["master_param"] for r in ref]) <= 1e-5
    for p, r, m in zip(params, ref, peak):
        # fp32 math on both sides, rounded to the dtype each step. Without master weights, a rounding
        # that goes the other way at one step (the clip's norm, reduced in another order, differs in
        # its last bits) stays in the parameter: within two ulps of the largest value it has held.
        # (Seen on an H200: the final value's ulps failed for a parameter that shrank toward zero.)
        bound = m * 4 * ROUNDING.get(dtype, 0.0) + 1e-5
        assert bool(((p.detach().float() - r.detach().float()).abs() <= bound).all())
        assert ours.state[p]["step"].item() == 10 and ours.state[p]["step"].device == p.device


@pytest.mark.gpu
def test_cuda_grad_scaler_skips_on_inf_and_norm_is_deterministic():
    params = [make_param(s, device="cuda") for s in [(1000,), (7, 13), (65537,)]]
    opt = AdamW(params, lr=1e-2, max_grad_norm=1.0, backend="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    x = torch.randn(5, device="cuda")
    (sum((p * x.sum()).square().mean() for p in params)).mul(scaler.get_scale()).backward()
    grads = [p.grad.clone() for p in params]
    norms = [adamw_module.grad_norm_fused(grads) for _ in range(3)]
    assert all(torch.equal(n, norms[0]) for n in norms)
    for p in params:
        p.grad = None
    loss = sum((p * x.sum()).square().mean() for p in params)
    scaler.scale(loss).backward()
    params[1].grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    torch.cuda.synchronize()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(opt.state[p]["step"].item() == 0 for p in params)


# The GPU checks: against torch.optim.AdamW(fused=True) over 25 steps, with GradScaler,
# captured in a CUDA graph, and under inductor.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clip", [None, 1.0])
def test_cuda_matches_torch_fused_over_25_steps(dtype, clip):
    """fp32 params follow torch's fused AdamW to 1e-5; bf16 params with master weights keep an fp32
    master that follows torch's fused AdamW on fp32 copies to 1e-5, and are that master rounded.
    With clip, the reference clips with clip_grad_norm_ first (what max_grad_norm fuses)."""
    shapes = SHAPES + [(3,)] * 40 + [(320 * 65536 + 5,)]
    params = [make_param(s, dtype, "cuda") for s in shapes]
    # torch's fused AdamW wants each parameter, its grad and its states in one layout: on CUDA it
    # raises for the strided ones (seen on an H200), on the CPU it gives wrong numbers. So the
    # reference steps contiguous fp32 copies; ours keeps the transposed and strided views.
    ref = [p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True).requires_grad_()
           for p in params]
    ours = AdamW(groups(params, 0.1), lr=1e-2, max_grad_norm=clip, master_weights=dtype != torch.float32,
                 backend="cuda")
    theirs = torch.optim.AdamW(groups(ref, 0.1), lr=1e-2, fused=True)
    with count_calls(adamw_module._STEP_FNS, "cuda") as calls:
        for _ in range(STEPS):
            set_grads([params, ref], dtype=dtype)
            norm = ours.step()
            if clip is not None:
                ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip)
                torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
            theirs.step()
    assert len(calls) == STEPS * len(ours.param_groups), "the cuda update did not run for every group every step"
    if dtype == torch.float32:
        assert max_abs_diff(params, ref) <= 1e-5
    else:
        masters = [ours.state[p]["master_param"] for p in params]
        assert max_abs_diff(masters, ref) <= 1e-5
        for p, m in zip(params, masters):
            assert torch.equal(p.detach(), m.to(dtype)), "bf16 params are their master rounded"


@pytest.mark.gpu
def test_cuda_grad_scaler_matches_torch_fused_and_skips_the_inf_step():
    shapes = [(1000,), (7, 13), (65537,)]
    params = [make_param(s, device="cuda") for s in shapes]
    ref = clone_params(params)
    ours, theirs = AdamW(params, lr=1e-2, backend="cuda"), torch.optim.AdamW(ref, lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0 ** 12, growth_interval=3) for _ in range(2)]
    for step in range(10):
        weights = [torch.randn(s, device="cuda") for s in shapes]
        for ps, opt, scaler in ((params, ours, scalers[0]), (ref, theirs, scalers[1])):
            opt.zero_grad()
            scaler.scale(sum((p * w).sum() for p, w in zip(ps, weights))).backward()
            if step == 4:
                ps[1].grad[3, 5] = float("inf")  # this step must be skipped, and the scale halved
            before = [p.detach().clone() for p in ps]
            scaler.step(opt)
            scaler.update()
            if step == 4:
                assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert max_abs_diff(params, ref) <= 1e-5
    assert all(ours.state[p]["step"].item() == theirs.state[r]["step"].item() == 9 for p, r in zip(params, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("clip", [None, 1.0])
def test_cuda_step_captures_in_a_cuda_graph_without_host_sync(clip):
    """step() has no host sync (sync debug mode "error" raises on one) and captures into a CUDA
    graph whose replays equal eager steps: the step count and every scalar live on the device."""
    shapes = [(1000,), (7, 13), (65537,), (1,)]
    params = [make_param(s, device="cuda") for s in shapes]
    eager_params = clone_params(params)
    kw = dict(lr=1e-2, weight_decay=0.1, max_grad_norm=clip, backend="cuda")
    opt, eager = AdamW(params, **kw), AdamW(eager_params, **kw)
    set_grads([params, eager_params])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: creates the state outside the capture
        opt.step()
        eager.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager.step()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_norm = opt.step()
    for _ in range(5):
        for p, e in zip(params, eager_params):
            g = torch.randn_like(p)
            p.grad.copy_(g)
            e.grad.copy_(g)
        graph.replay()
        norm = eager.step()
        if clip is not None:
            torch.testing.assert_close(captured_norm, norm, rtol=0, atol=0)
    torch.cuda.synchronize()
    for p, e in zip(params, eager_params):
        torch.testing.assert_close(p, e, rtol=0, atol=0)
    # warm-up, the sync-checked step, five replays (capturing runs nothing)
    assert opt.state[params[0]]["step"].item() == eager.state[eager_params[0]]["step"].item() == 7


@pytest.mark.gpu
def test_cuda_step_under_inductor_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    params = [make_param(s, device="cuda") for s in [(1000,), (7, 13), (65537,)]]
    ref = clone_params(params)
    ours, eager = (AdamW(ps, lr=1e-2, max_grad_norm=1.0, backend="cuda") for ps in (params, ref))
    set_grads([params, ref])
    assert torch._dynamo.explain(ours.step)().graph_break_count == 0  # (explain runs one step)
    eager.step()
    torch._dynamo.reset()
    step = torch.compile(ours.step, fullgraph=True)
    for _ in range(3):
        set_grads([params, ref])
        step()
        eager.step()
    assert max_abs_diff(params, ref) <= 1e-6


@pytest.mark.parametrize("clip", [None, 1.0])
def test_compiled_step_matches_eager(backend, clip):
    """The compiled operators have fake implementations, so optimizer.step compiles whole."""
    import torch._dynamo

    torch._dynamo.reset()
    params = make_params()[1:5]
    ref = clone_params(params)
    ours = AdamW(params, lr=1e-2, max_grad_norm=clip, backend=backend)
    eager = AdamW(ref, lr=1e-2, max_grad_norm=clip, backend=backend)
    step = torch.compile(ours.step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        set_grads([params, ref])
        step()
        eager.step()
    assert max_abs_diff(params, ref) <= ATOL


# --------------------------------------------------------------------------------------------
# Sharded (DTensor) parameters: two gloo ranks on CPU, a 1-D mesh, dim 0 sharded as FSDP2 does
# --------------------------------------------------------------------------------------------

# Uneven shards on purpose: (5,) splits 3 + 2, (1,) leaves rank 1 an empty shard, (7, 13) 4 + 3 rows.
DTENSOR_SHAPES = [(5,), (1,), (7, 13), (64, 8)]


def _dtensor_problem(steps):
    g = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=g) for s in DTENSOR_SHAPES]
    grads = [[torch.randn(s, generator=g) * 3 for s in DTENSOR_SHAPES] for _ in range(steps)]
    return params, grads


def _dtensor_worker(rank, backend, amsgrad, steps, out_file):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    full_params, full_grads = _dtensor_problem(steps)
    # The last parameter stays a plain tensor, replicated: its norm is counted once, not per rank.
    params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in full_params[:-1]]
    params.append(torch.nn.Parameter(full_params[-1].clone()))
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, max_grad_norm=1.0, backend=backend)
    norms = []
    with count_calls(adamw_module._STEP_FNS, backend) as calls:
        for grads in full_grads:
            for p, grad in zip(params[:-1], grads[:-1]):
                p.grad = distribute_tensor(grad, mesh, [Shard(0)])
            params[-1].grad = grads[-1].clone()
            norms.append(float(opt.step()))
    state = opt.state[params[2]]
    result = {"params": [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in params],
              "norms": norms, "calls": len(calls),
              "local_state_shape": tuple(state["exp_avg"].to_local().shape),
              "state_is_dtensor": type(state["exp_avg"]).__name__ == "DTensor"}
    if rank == 0:
        torch.save(result, out_file)


def test_dtensor_params_update_local_shards_and_clip_by_the_global_norm(backend, tmp_path):
    """The sharded run equals the plain one: parameters to ATOL after 5 steps, and the clip norm,
    computed from the shards' squared norms all-reduced, to fp32 rounding (see global_grad_norm).
    amsgrad on, so every state tensor goes through the local-shard path."""
    from tests.test_fsdp import spawn

    steps, amsgrad = 5, True
    spawn(_dtensor_worker, backend, amsgrad, steps, str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt")
    full_params, full_grads = _dtensor_problem(steps)
    params = [p.clone().requires_grad_() for p in full_params]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, max_grad_norm=1.0, backend=backend)
    norms = []
    for grads in full_grads:
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        norms.append(float(opt.step()))
    assert got["calls"] == steps  # the chosen kernel did the update
    assert got["state_is_dtensor"] and got["local_state_shape"] == (4, 13)
    assert min(norms) > 1.0  # the clip was active in every step
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(norms), rtol=1e-6, atol=0)
    for mine, ref in zip(got["params"], params):
        torch.testing.assert_close(mine, ref.detach(), rtol=0, atol=ATOL)
