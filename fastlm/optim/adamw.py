"""AdamW with decoupled weight decay, global-norm clipping and GradScaler support fused in.

A drop-in for torch.optim.AdamW: the same update, param groups, and state dict layout (per
parameter: `step` as a float32 scalar tensor, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq` with
amsgrad), so each optimizer loads the other's state dict. Extras over torch:

- `max_grad_norm`: the global L2 norm of all gradients is computed once and the clip factor
  min(1, max_grad_norm / (norm + 1e-6)) is applied inside the update, so the gradients are
  never rewritten. step() returns the pre-clip norm.
- `master_weights=True`: bf16/fp16 parameters get an fp32 copy (state key `master_param`,
  which torch ignores) that receives the update, so small updates are not lost to rounding.
- Moments are always fp32, whatever the parameter dtype.
- GradScaler: `scaler.step(opt)` hands the scale and the inf flag to the optimizer, which
  unscales inside the kernel and skips the whole step (step counts included) on inf.
- Sharded parameters (DTensor, as FSDP2's `fully_shard` makes them): the kernels update each
  rank's local shard in place (no gather); the state tensors are DTensors of the parameter's
  sharding, so torch.distributed.checkpoint saves and reshards them; the clip norm is the norm of
  the whole model, the shards' sums of squares all-reduced (see global_grad_norm).

The math lives in one function per implementation, side by side:
  adamw_torch      plain PyTorch loop over parameters, the reference (backend "torch")
  adamw_extension  torch.ops.fastlm.adamw_step_, which dispatches on the device: backend "cpp"
                   (csrc/adamw_cpu.cpp) on CPU, backend "cuda" (csrc/adamw_cuda.cu, multi-tensor
                   apply, no host sync) on CUDA
"""
import functools
import math
import operator

import torch

from fastlm.ops.backends import extension_op_unusable_reason, register_op, resolve_backend
from fastlm.ops.checks import FLOAT_DTYPES, check_same_device, dtype_name

OP = "AdamW"
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_
MASTER_KEY = "master_param"


def backend_reasons(device, dtype=None, head_dim=None):
    """{backend: None if usable for parameters on `device`, else why not}."""
    device = torch.device(device)
    extension = {"cpp": extension_op_unusable_reason("adamw_step_", device, ("cpu",)),
                 "cuda": extension_op_unusable_reason("adamw_step_", device, ("cuda",))}
    if extension["cpp"] is None or extension["cuda"] is None:
        _register_fakes()
    return {
        "torch": None,
        **extension,
        "triton": "not offered for adamw",  # its fused GPU path is the CUDA kernel
    }


@functools.lru_cache(maxsize=None)
def _register_fakes():
    """What the compiled operators return, for torch.compile (a compiled optimizer.step): the
    update mutates its lists in place and returns nothing; the norm is an fp32 scalar."""
    @torch.library.register_fake("fastlm::adamw_step_")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr, beta1, beta2,
          eps, weight_decay, amsgrad, maximize, grad_scale, found_inf, grad_norm, max_grad_norm):
        return None

    @torch.library.register_fake("fastlm::adamw_grad_norm")
    def _(grads, grad_scale):
        return grads[0].new_empty((), dtype=torch.float32)


def auto_preference(device, dtype=None):
    return ("cuda",) if device.type == "cuda" else ("cpp",)


register_op("adamw", backend_reasons, auto_preference)


# --------------------------------------------------------------------------------------------
# Global gradient norm
# --------------------------------------------------------------------------------------------

def grad_norm_torch(grads, grad_scale=None):
    """Global L2 norm of `grads` (any float dtypes, one device) as an fp32 scalar tensor.

    With grad_scale (a GradScaler's scale), the grads are taken as scaled and the norm of the
    unscaled grads is returned.
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    norm = torch.linalg.vector_norm(norms).float()
    if grad_scale is not None:
        norm = norm / grad_scale.to(norm.device).float()
    return norm


def grad_norm_fused(grads, grad_scale=None):
    """Global L2 norm via torch.ops.fastlm.adamw_grad_norm (deterministic, one read of grads)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.ops.fastlm.adamw_grad_norm(grads, grad_scale)


_DTENSOR = []  # [DTensor or None] once resolved: an import statement costs ~1 us, and it ran per tensor


def _dtensor_type():
    """torch.distributed.tensor.DTensor, or None where torch has no distributed support."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_sharded(t):
    """True for a DTensor (a parameter, grad or state tensor spread over a device mesh)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t):
    """This rank's part of a DTensor (sharing its storage, so in-place updates reach it); a plain
    tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def _shard_group(grad):
    """The process group over which a DTensor grad's shards are spread (FSDP2: a 1-D mesh, Shard)."""
    from torch.distributed.tensor import Shard

    mesh, placements = grad.device_mesh, grad.placements
    if mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in placements):
        raise ValueError(f"{OP}: max_grad_norm supports DTensor parameters sharded on a 1-D device mesh "
                         f"(FSDP2), got mesh of {mesh.ndim} dims with placements {placements}")
    return mesh.get_group()


def global_grad_norm(grads, norm_fn, grad_scale=None, device=None):
    """The L2 norm of all of `grads` (plain tensors and DTensors) over every rank, fp32 scalar.

    Plain tensors are taken as whole on every rank (replicated) and counted once. For DTensors
    each rank takes the norm of its local shards with `norm_fn` (the fused kernel or the torch
    reference), squares it in fp64, and the squares are summed over the mesh with one all-reduce,
    then the root is taken. Precision: each local norm carries fp32 rounding (relative ~1e-7);
    squaring, summing and the root in fp64 add nothing measurable, so the global norm equals the
    unsharded run's to ~1e-7 relative, and so does the clip factor.
    """
    plain = [g for g in grads if not is_sharded(g)]
    sharded = [g for g in grads if is_sharded(g)]
    if not sharded:
        return norm_fn(plain, grad_scale)
    groups = {_shard_group(g) for g in sharded}
    if len(groups) != 1:
        raise ValueError(f"{OP}: max_grad_norm needs all sharded parameters on one device mesh, got {len(groups)}")
    import torch.distributed as dist

    local = [g.to_local() for g in sharded]
    squares = norm_fn(local, grad_scale).to(device or local[0].device).double().square()
    dist.all_reduce(squares, group=groups.pop())
    if plain:
        squares = squares + norm_fn(plain, grad_scale).to(squares.device).double().square()
    return squares.sqrt().float()


# --------------------------------------------------------------------------------------------
# The update, one function per backend. All take lists of equal length (max_exp_avg_sqs empty
# unless amsgrad, master_params empty or one per param), mutate params, moments, master params
# and steps in place, and return nothing.
# --------------------------------------------------------------------------------------------

def adamw_torch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
                *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                grad_scale=None, found_inf=None, grad_norm=None, max_grad_norm=None):
    """Reference AdamW step: a readable loop over parameters in PyTorch.

    grad_scale: the scale the grads carry (they are divided by it); found_inf: nonzero skips
    the step entirely; grad_norm + max_grad_norm: the (unscaled) global norm and the clip
    threshold, the grads are multiplied by min(1, max_grad_norm / (grad_norm + 1e-6)).
    """
    if found_inf is not None and found_inf.item() != 0:
        return
    grad_factor = None
    if max_grad_norm is not None:
        grad_factor = (max_grad_norm / (grad_norm.double() + CLIP_EPS)).clamp(max=1.0)
    if grad_scale is not None:
        inv_scale = 1.0 / grad_scale.double()
        grad_factor = inv_scale if grad_factor is None else grad_factor * inv_scale
    for i, param in enumerate(params):
        grad = grads[i].float()
        if grad_factor is not None:
            grad = grad * grad_factor.to(grad.device).float()
        if maximize:
            grad = -grad
        weights = master_params[i] if master_params else param.float()
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        state_steps[i] += 1
        step = state_steps[i].item()

        weights.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            second_moment = max_exp_avg_sqs[i]
        else:
            second_moment = exp_avg_sq
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
        weights.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        if master_params or param.dtype != torch.float32:
            param.copy_(weights)


def adamw_extension(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
                    *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                    grad_scale=None, found_inf=None, grad_norm=None, max_grad_norm=None):
    """AdamW step by the compiled kernel of the parameters' device: on CPU one pass per element
    over fixed pieces of all tensors; on CUDA multi-tensor apply, a few launches for all tensors,
    never synchronizing with the host (found_inf, grad_scale and grad_norm are read on the device)."""
    torch.ops.fastlm.adamw_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
        grad_scale, found_inf, grad_norm, -1.0 if max_grad_norm is None else float(max_grad_norm))


_STEP_FNS = {"torch": adamw_torch, "cpp": adamw_extension, "cuda": adamw_extension}
_NORM_FNS = {"torch": grad_norm_torch, "cpp": grad_norm_fused, "cuda": grad_norm_fused}


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------

class _GroupLists:
    """The tensors one param group's update takes besides the grads: params, exp_avgs, exp_avg_sqs,
    max_exp_avg_sqs, masters, steps. Built at a step (state initialised for every parameter with a
    grad) and kept for the steps after it while matches() holds.

    with_grad: the parameters that had a grad, in group order; sharded: whether any is a DTensor,
    in which case `lists` holds the DTensors and local() takes their local shards.
    """

    def __init__(self, opt, group, with_grad, sharded):
        self.group, self.with_grad, self.sharded = group, with_grad, sharded
        self.amsgrad, self.master_weights = group["amsgrad"], group["master_weights"]
        states = [opt._init_state(p, group) for p in with_grad]
        masters = [state[MASTER_KEY] for state in states if MASTER_KEY in state]
        if masters and len(masters) != len(with_grad):
            # Mixed fp32 / low-precision params in one group: give fp32 params a master view of themselves.
            masters = [state.get(MASTER_KEY, p) for p, state in zip(with_grad, states)]
        self.lists = (list(with_grad), [state["exp_avg"] for state in states],
                      [state["exp_avg_sq"] for state in states],
                      [state["max_exp_avg_sq"] for state in states] if self.amsgrad else [],
                      masters, [state["step"] for state in states])

    def matches(self, group, with_grad):
        """Whether these lists still serve `group` whose parameters `with_grad` have a grad now."""
        return (group is self.group and group["amsgrad"] == self.amsgrad
                and group["master_weights"] == self.master_weights and len(with_grad) == len(self.with_grad)
                and all(map(operator.is_, with_grad, self.with_grad)))

    def local(self):
        # The steps are plain tensors, as the state initialises them.
        return tuple([local_tensor(t) for t in ts] for ts in self.lists[:-1]) + (self.lists[-1],)


def _check_hyperparameters(lr, betas, eps, weight_decay, amsgrad, maximize, master_weights, where):
    if isinstance(lr, torch.Tensor):
        raise TypeError(f"{OP}: lr{where} must be a Python float, got a tensor")
    if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"{OP}: lr{where} must be a finite float >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{OP}: betas{where} must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor) or not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"{OP}: betas[{i}]{where} must be a float in [0, 1), got {beta!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{OP}: eps{where} must be a finite float >= 0, got {eps!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"{OP}: weight_decay{where} must be a finite float >= 0, got {weight_decay!r}")
    for name, flag in (("amsgrad", amsgrad), ("maximize", maximize), ("master_weights", master_weights)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: {name}{where} must be a bool, got {type(flag).__name__}")


class AdamW(torch.optim.Optimizer):
    """AdamW, a drop-in for torch.optim.AdamW with clipping and mixed precision fused in.

    params: an iterable of tensors or of param-group dicts (per-group lr, betas, eps,
        weight_decay, amsgrad, maximize, master_weights). Parameters are fp32, bf16 or fp16
        tensors on one device; their grads have the parameter's dtype and shape.
    max_grad_norm: None, or the threshold for global L2 norm clipping over all groups.
    master_weights: keep an fp32 copy of bf16/fp16 parameters (no effect on fp32 ones).
    backend: "auto" (cuda for CUDA parameters, cpp on CPU when fastlm._C is built, else
        torch), "torch", "cpp" or "cuda". An explicit backend that cannot run raises
        BackendUnavailable.

    step() returns the pre-clip global grad norm (fp32 scalar tensor, unscaled when a
    GradScaler is in use) when max_grad_norm is set; otherwise the closure's loss, or None.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, max_grad_norm=None, master_weights=False,
                 backend="auto"):
        _check_hyperparameters(lr, betas, eps, weight_decay, amsgrad, maximize, master_weights, "")
        if max_grad_norm is not None and not (
                isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"{OP}: max_grad_norm must be None or a finite float > 0, got {max_grad_norm!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, master_weights=master_weights)
        super().__init__(params, defaults)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = backend
        # GradScaler.step sets self.grad_scale / self.found_inf instead of unscaling the grads.
        self._step_supports_amp_scaling = True
        self._check_params()
        self._resolved = None
        self._backend_for(self._device())  # an unknown or unusable backend fails here, not at step()

    def add_param_group(self, param_group):
        self._invalidate_lists()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" (param group {len(self.param_groups) - 1})"
        try:
            _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                                   group["amsgrad"], group["maximize"], group["master_weights"], where)
            if hasattr(self, "backend"):
                self._check_params()
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group must not stay behind to be stepped
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        self._invalidate_lists()
        # A state dict saved by torch.optim.AdamW has groups without our options.
        for group in self.param_groups:
            group.setdefault("master_weights", self.defaults.get("master_weights", False))
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _device(self):
        for group in self.param_groups:  # the first parameter's, without listing them all every step
            if group["params"]:
                return group["params"][0].device
        return torch.device("cpu")

    def _check_params(self):
        params = self._params()
        for i, p in enumerate(params):
            if p.dtype not in FLOAT_DTYPES:
                names = ", ".join(dtype_name(d) for d in FLOAT_DTYPES)
                raise TypeError(f"{OP}: parameter {i} must have dtype in ({names}), got {dtype_name(p.dtype)}")
        if params:
            check_same_device(OP, **{f"param {i}": p for i, p in enumerate(params)})

    def _backend_for(self, device):
        """The backend for parameters on `device`, resolved once per device."""
        if self._resolved is None or self._resolved[0] != device:
            self._resolved = (device, resolve_backend("adamw", device, self.backend))
        return self._resolved[1]

    def _init_state(self, p, group):
        state = self.state[p]
        if len(state) == 0:
            # On the parameter's device: the CUDA kernel reads and bumps it there, without a host sync.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if group["master_weights"] and p.dtype != torch.float32 and MASTER_KEY not in state:
            state[MASTER_KEY] = p.detach().to(torch.float32, memory_format=torch.preserve_format)
        return state

    def _invalidate_lists(self):
        """Forget the cached per-group lists: the next step rebuilds them (see _group_lists)."""
        self._lists = {}  # param group index -> _GroupLists
        self._lists_state = (None, -1)  # (self.state, its length) when the lists were built

    def _group_lists(self, index, group, use_cache):
        """What the update of one param group takes: (grads as the parameters hold them, whether
        they are all plain tensors (no DTensor), the kernels' lists params, grads, exp_avgs,
        exp_avg_sqs, max_exp_avg_sqs, masters, steps).

        Every step reads and checks the grads. The rest is built once (state initialised, sharding
        decided) and reused while the same parameters, in the same order, have grads, the group's
        amsgrad and master_weights are unchanged and the state is not replaced (load_state_dict,
        add_param_group, __setstate__, a change in its number of entries). State tensors put into
        self.state[p] by other means are not seen: call _invalidate_lists after doing so. Without
        use_cache (while torch.compile traces the step) the lists are built and not kept.
        """
        with_grad, grads, plain_grads, tensor = [], [], True, torch.Tensor
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise TypeError(f"{OP}: sparse gradients are not supported (parameter of shape "
                                f"{tuple(p.shape)} has a {g.layout} grad)")
            if g.dtype != p.dtype or g.shape != p.shape:
                raise ValueError(f"{OP}: grad must match its parameter, got grad {tuple(g.shape)} "
                                 f"{dtype_name(g.dtype)} for parameter {tuple(p.shape)} {dtype_name(p.dtype)}")
            plain_grads = plain_grads and type(g) is tensor
            with_grad.append(p)
            grads.append(g)
        cached = self._lists.get(index) if use_cache else None
        if cached is not None and not cached.matches(group, with_grad):
            cached = None
        sharded = cached.sharded if cached is not None else any(is_sharded(p) for p in with_grad)
        if sharded:
            for p, g in zip(with_grad, grads):
                if is_sharded(p) and not (is_sharded(g) and g.placements == p.placements):
                    raise ValueError(f"{OP}: the grad of a sharded parameter {tuple(p.shape)} {p.placements} "
                                     f"must be a DTensor of the same placements, got "
                                     f"{getattr(g, 'placements', type(g).__name__)}")
        if cached is None:
            cached = _GroupLists(self, group, with_grad, sharded)
            if use_cache:
                self._lists[index] = cached
        # The kernels see each rank's local shards (plain tensors sharing the DTensors' storage),
        # taken every step: FSDP may swap a sharded parameter's local tensor between steps.
        lists = cached.local() if sharded else cached.lists
        return grads, plain_grads, (lists[0], grads if plain_grads else [local_tensor(g) for g in grads], *lists[1:])

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a grad.

        Returns the pre-clip global grad norm when max_grad_norm is set, else the closure's
        loss (None without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        device = self._device()
        backend = self._backend_for(device)
        # A compiled step reads no cache: its graph holds the lists, and guards on a cache would recompile.
        use_cache = not torch.compiler.is_compiling()
        if use_cache and (self.state is not self._lists_state[0] or len(self.state) != self._lists_state[1]):
            self._invalidate_lists()
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)

        per_group = [self._group_lists(i, group, use_cache) for i, group in enumerate(self.param_groups)]
        if use_cache:
            self._lists_state = (self.state, len(self.state))
        grad_norm = None
        if self.max_grad_norm is not None:
            # The norm of the whole model: DTensor grads' shards are reduced over their mesh.
            all_grads = [g for grads, _, _ in per_group for g in grads]
            if all(plain_grads for _, plain_grads, _ in per_group):
                # global_grad_norm's first case, without testing every grad for a DTensor again
                grad_norm = _NORM_FNS[backend](all_grads, grad_scale)
            else:
                grad_norm = global_grad_norm(all_grads, _NORM_FNS[backend], grad_scale, device)
            if grad_norm.device != device:
                grad_norm = grad_norm.to(device)
        step_fn = _STEP_FNS[backend]
        for group, (_, _, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps)) in zip(
                self.param_groups, per_group):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            step_fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps,
                    lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), amsgrad=group["amsgrad"],
                    maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf,
                    grad_norm=grad_norm, max_grad_norm=self.max_grad_norm)
        return grad_norm if self.max_grad_norm is not None else loss

    def load_state_dict(self, state_dict):
        """Load a state dict saved by this class or by torch.optim.AdamW.

        torch casts every floating state tensor to its parameter's dtype on load; moments and
        master weights are put back in fp32 here from the saved tensors, losing nothing.
        """
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        index_to_param = dict(enumerate(self._params()))
        for index, saved in saved_state.items():
            p = index_to_param.get(index)
            if p is None or p not in self.state:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if key == "step":
                    state[key] = torch.as_tensor(value).detach().to(
                        device=p.device, dtype=torch.float32).clone()
                elif isinstance(value, torch.Tensor) and value.is_floating_point():
                    state[key] = value.detach().to(device=p.device, dtype=torch.float32).clone()
        self._invalidate_lists()  # the state tensors were just replaced
