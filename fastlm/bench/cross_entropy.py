"""Fused cross-entropy and fused linear + cross-entropy against PyTorch.

cross_entropy: fwd+bwd of F.cross_entropy (the reference) vs each fused backend, on logits that
are an autograd intermediate as in training (so a fused backend writes the gradient in place),
over V in {256, 32000, 50257, 128256} and N in {4096, 16384}; on CUDA also N=16384 at V=50304
(50257 padded to 64 as the model pads it: aligned rows).
linear_cross_entropy: lm_head matmul + F.cross_entropy (unfused) vs the chunked fused op, at
N=8192, D=768, V=50257 (CPU) and N=16384, D=768, V=50257 and N=8192, D=4096, V=128256 (CUDA).
On CUDA, extra also holds: compiled_ref_ms, the same reference step under torch.compile (at
N=16384, V=50257 and 128256, the target sizes);
gbs, the fused step's bandwidth counting the logits read once and the gradient written once
(2 x N x V x element size bytes); copy_fraction, gbs over the device's copy bandwidth measured in
the same run (common.copy_bandwidth_gbs); variants_ms (the target sizes and V=50304), the triton
step under each setting of the kernel in KERNEL_VARIANTS (time_kernel_variants).
max_err: max relative error of the loss and of the gradients against the reference in the same
dtype (cross_entropy: the gradient's first 1024 rows). Peak memory is what one step adds over its
inputs (a fresh subprocess per case on CPU). extra logits_mb: the logits the reference holds.
"""
import contextlib
import os

import torch
import torch.nn.functional as F

from fastlm.bench.common import (Row, copy_bandwidth_gbs, max_rel_error, peak_memory_mb, report_rows, time_ms,
                                 timed_backends)
from fastlm.ops import cross_entropy, linear_cross_entropy

DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
CE_SHAPES = [(n, v) for v in (256, 32000, 50257, 128256) for n in (4096, 16384)]
CE_SHAPES_QUICK = [(512, 256), (512, 32000)]
# On CUDA also GPT-2's vocabulary padded to a multiple of 64, as the model pads it: rows that start
# aligned, so the kernel takes no unaligned head and foot, against V=50257's odd row stride.
CE_SHAPES_CUDA_EXTRA = [(16384, 50304)]
# The target sizes, where the compiled reference is timed too (each compile costs seconds of a GPU window).
COMPILED_REFERENCE_SHAPES = [(16384, 50257), (16384, 128256)]
# Where the triton row also times settings of the kernel module (fastlm/triton_kernels/cross_entropy.py:
# MAX_BLOCK_V, EDGE_TILE): the target sizes and the padded GPT-2 vocabulary. Each variant is a label
# and the settings it changes from the module's defaults; EDGE_TILE applies to unaligned rows only
# (V=50257). Not timed again: a bounded grid (PROGRAMS_PER_SM = 2), 0.2-0.8 ms slower than one
# program per block in two runs, and L2 eviction hints, removed (the kernel module says why).
VARIANT_SHAPES = COMPILED_REFERENCE_SHAPES + [(16384, 50304)]
KERNEL_VARIANTS = [
    ("default", {}),
    ("wide", {"MAX_BLOCK_V": 16384}),
    ("edge", {"EDGE_TILE": True}),
]
LINEAR_SHAPES = {"cpu": [(8192, 768, 50257)], "cuda": [(16384, 768, 50257), (8192, 4096, 128256)]}
LINEAR_SHAPES_QUICK = [(512, 128, 8192)]
CE_BACKENDS = ("cpp", "triton")
LINEAR_BACKENDS = ("cpp", "triton", "torch")  # torch: the chunked op, not the unfused reference
# The reference needs about 3x the logits (logits, log-softmax, gradient); beyond this fraction
# of RAM a CPU case is skipped rather than swapping or being killed.
CPU_MEMORY_FRACTION = 0.6
ERROR_ROWS = 1024


def make_inputs(op, shape, dtype, device):
    """The leaves a step differentiates ([logits] or [hidden, weight]) and the targets."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, dtype)
    if op == "cross_entropy":
        n, vocab = shape
        leaves = [torch.randn(n, vocab, device=device, generator=gen).to(dtype).requires_grad_()]
    else:
        n, dim, vocab = shape
        hidden = torch.randn(n, dim, device=device, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(vocab, dim, device=device, generator=gen) / dim**0.5).to(dtype).requires_grad_()
        leaves = [hidden, weight]
    return leaves, torch.randint(0, vocab, (n,), device=device, generator=gen)


class LossStep:
    """One fwd+bwd of `op` on `backend` ("reference": the unfused PyTorch computation).

    cross_entropy's logits are an autograd intermediate, as the lm_head output is in training
    (so a fused backend may write the gradient in place): `prepare`, run outside the timed
    region, makes them as a clone of the leaf, whose backward is the identity.
    """

    def __init__(self, op, leaves, targets, backend, loss_fn=None):
        self.op, self.leaves, self.targets, self.backend = op, leaves, targets, backend
        self.loss_fn = loss_fn or F.cross_entropy  # the reference's loss (torch.compile'd for compiled_ref_ms)
        self.inputs = None

    def prepare(self):
        self.inputs = [self.leaves[0].clone()] if self.op == "cross_entropy" else list(self.leaves)

    def __call__(self, keep_grads=False):
        if self.inputs is None:
            self.prepare()
        inputs, self.inputs = self.inputs, None
        if self.backend == "reference" and self.op == "cross_entropy":
            loss = self.loss_fn(*inputs, self.targets)
        elif self.backend == "reference":
            hidden, weight = inputs
            loss = self.loss_fn((hidden @ weight.t()).float(), self.targets)
        else:
            op = cross_entropy if self.op == "cross_entropy" else linear_cross_entropy
            loss = op(*inputs, self.targets, backend=self.backend)
        del inputs
        loss.backward()
        grads = None
        if keep_grads:  # for the error check; cross_entropy's first rows only, so that two full gradients never coexist
            grads = [g.grad[:ERROR_ROWS].clone() if self.op == "cross_entropy" else g.grad for g in self.leaves]
        for leaf in self.leaves:
            leaf.grad = None
        return loss.detach(), grads


def setup_step(op, shape, dtype, on, backend):
    """Module-level (picklable) setup for peak_memory_mb: inputs on device `on`, one step to run."""
    from fastlm import _ext

    _ext.extension(warn=False)  # mapping the extension's libraries belongs to the baseline, not to a step
    step = LossStep(op, *make_inputs(op, shape, dtype, on), backend)
    step.prepare()  # the logits are an input: part of the baseline
    return step


def measure(op, case, shape, backends, dtype, device, timing, extra):
    """Rows for one shape: the reference once, then every backend against it."""
    leaves, targets = make_inputs(op, shape, dtype, device)

    def timed(backend):
        step = LossStep(op, leaves, targets, backend)
        ms = time_ms(step, device=device, setup=step.prepare, **timing)
        return ms, peak_memory_mb(setup_step, device=device, op=op, shape=shape, dtype=dtype, on=str(device),
                                  backend=backend)

    ref_loss, ref_grads = LossStep(op, leaves, targets, "reference")(keep_grads=True)
    ref_ms, ref_peak = timed("reference")
    if device.type == "cuda" and op == "cross_entropy" and shape in COMPILED_REFERENCE_SHAPES:
        compiled = LossStep(op, leaves, targets, "reference", loss_fn=torch.compile(F.cross_entropy))
        extra["compiled_ref_ms"] = time_ms(compiled, device=device, setup=compiled.prepare, **timing)
    rows = []
    for backend, reason in backends.items():
        rows.append(Row(op, case, backend, skipped=reason, extra=dict(extra)))
        if reason is None:
            loss, grads = LossStep(op, leaves, targets, backend)(keep_grads=True)
            rows[-1].max_err = max([max_rel_error(loss, ref_loss)] +
                                   [max_rel_error(g, r) for g, r in zip(grads, ref_grads)])
            del loss, grads
            rows[-1].fused_ms, rows[-1].fused_peak_mb = timed(backend)
            rows[-1].ref_ms, rows[-1].ref_peak_mb = ref_ms, ref_peak
            if device.type == "cuda" and op == "linear_cross_entropy":
                from fastlm.ops.loss import weight_grad_accumulation

                rows[-1].extra["weight_grad_accumulation"] = weight_grad_accumulation()
            if device.type == "cuda" and op == "cross_entropy" and backend == "triton" and shape in VARIANT_SHAPES:
                rows[-1].extra["variants_ms"] = time_kernel_variants(LossStep(op, leaves, targets, backend), device,
                                                                     timing)
            if device.type == "cuda" and op == "cross_entropy":
                n, vocab = shape
                gbs = 2 * n * vocab * leaves[0].element_size() / (rows[-1].fused_ms * 1e-3) / 1e9
                copy_gbs = copy_bandwidth_gbs(device)
                rows[-1].extra.update(gbs=gbs, copy_gbs=copy_gbs, copy_fraction=gbs / copy_gbs)
    return rows


@contextlib.contextmanager
def kernel_settings(settings):
    """The triton cross-entropy kernel module with `settings` ({name: value}, e.g. a KERNEL_VARIANTS
    entry's) in place of its own, which come back on exit."""
    from fastlm.triton_kernels import cross_entropy as kernel

    saved = {name: getattr(kernel, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(kernel, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(kernel, name, value)


def time_kernel_variants(step, device, timing):
    """{label: ms} of the triton cross-entropy step under each KERNEL_VARIANTS entry."""
    times = {}
    for label, settings in KERNEL_VARIANTS:
        with kernel_settings(settings):
            times[label] = time_ms(step, device=device, setup=step.prepare, **timing)
    return times


def fits(device, nbytes):
    if device.type == "cuda":
        return nbytes <= torch.cuda.mem_get_info(device)[0] * 0.8
    return nbytes <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CPU_MEMORY_FRACTION


def run(quick, device, dtype):
    device = torch.device(device)
    cpu = device.type == "cpu"
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    timing = dict(warmup=1, repeats=3) if cpu else dict(warmup=3, repeats=20)
    rows = []
    for n, vocab in CE_SHAPES_QUICK if quick else CE_SHAPES + (CE_SHAPES_CUDA_EXTRA if not cpu else []):
        case, extra = f"N={n} V={vocab}", {"logits_mb": n * vocab * elem / 2**20}
        needed = n * vocab * (2 * elem + 8)  # logits + fp32 log-softmax + gradient (+ one more of each while comparing)
        if not fits(device, needed):
            rows.append(Row("cross_entropy", case, "all", extra=extra, skipped=f"needs ~{needed / 2**30:.0f} GiB, "
                            f"more than {CPU_MEMORY_FRACTION:.0%} of this machine's memory"))
            continue
        # Small cases are cheap: more repeats make their medians robust to a busy machine.
        case_timing = dict(warmup=3, repeats=25) if extra["logits_mb"] < 64 else timing
        rows += measure("cross_entropy", case, (n, vocab), timed_backends("cross_entropy", device, CE_BACKENDS),
                        dtype, device, case_timing, extra)
        report_rows(rows)
        print(f"  done cross_entropy {case}", flush=True)
    backends = timed_backends("linear_cross_entropy", device, LINEAR_BACKENDS)
    if cpu and not quick:
        backends["torch"] = "not timed on CPU in the full run (about 30 s a step); see --quick"
    for n, dim, vocab in LINEAR_SHAPES_QUICK if quick else LINEAR_SHAPES[device.type]:
        case = f"N={n} D={dim} V={vocab}"
        rows += measure("linear_cross_entropy", case, (n, dim, vocab), backends, dtype, device,
                        dict(warmup=0, repeats=2) if cpu else timing, {"logits_mb": n * vocab * elem / 2**20})
        report_rows(rows)
        print(f"  done linear_cross_entropy {case}", flush=True)
    return rows
