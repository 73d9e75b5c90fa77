"""Benchmark: fused cross-entropy and fused linear + cross-entropy vs PyTorch.

cross_entropy: fwd+bwd of F.cross_entropy (the reference) vs each fused backend, on logits that
are an autograd intermediate as in training (so a fused backend writes the gradient in place),
over V in {256, 32000, 50257, 128256} and N in {4096, 16384}.
linear_cross_entropy: lm_head matmul + F.cross_entropy (unfused) vs the chunked fused op, at
N=8192, D=768, V=50257.
Peak memory is what one step adds over its inputs (a fresh subprocess per case on CPU).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastlm.bench.common import (max_rel_error, peak_memory_mb, save_figure, save_report, synchronize,
                                 time_ms)
from fastlm.ops.loss import backend_reasons, cross_entropy, linear_cross_entropy

NAME = "cross_entropy"
CE_SHAPES = [(n, v) for v in (256, 32000, 50257, 128256) for n in (4096, 16384)]
CE_SHAPES_QUICK = [(512, 256), (512, 32000)]
LINEAR_SHAPES = [(8192, 768, 50257)]
LINEAR_SHAPES_QUICK = [(512, 128, 8192)]
# The reference needs about 3x the logits (logits, log-softmax, gradient); beyond this fraction
# of RAM a CPU case is skipped rather than swapping or being killed.
CPU_MEMORY_FRACTION = 0.6
ERROR_ROWS = 1024

COLUMNS = [("name", "op", ""), ("shape", "shape", ""), ("backend", "backend", ""),
           ("ref_ms", "ref ms", ".1f"), ("fused_ms", "fused ms", ".1f"), ("speedup", "speedup", ".2f"),
           ("logits_mb", "logits MiB", ".0f"), ("ref_peak_mb", "ref peak MiB", ".0f"),
           ("fused_peak_mb", "fused peak MiB", ".0f"), ("mem_ratio", "fused/ref mem", ".2f"),
           ("max_err", "max rel err", ".1e"), ("skipped", "skipped", "")]


def _fused_backends(device):
    reasons = backend_reasons(device)
    backends = {}
    for name in ("cpp", "triton"):
        reason = reasons[name]
        if reason is None and name == "triton" and device.type != "cuda":
            reason = "the Triton interpreter on CPU is for tests, not timing"
        backends[name] = reason
    return backends


class _CrossEntropyStep:
    """fwd+bwd on logits that are an autograd intermediate, as the lm_head output is in training
    (so a fused backend may write the gradient in place). `prepare` makes them (a clone of a leaf,
    whose backward is the identity) outside the timed region."""

    def __init__(self, source, targets, backend, keep_grad=False):
        self.source, self.targets, self.backend, self.keep_grad = source, targets, backend, keep_grad
        self.logits = None

    def prepare(self):
        self.logits = self.source.clone()

    def __call__(self):
        if self.logits is None:
            self.prepare()
        logits, self.logits = self.logits, None
        if self.backend == "reference":
            loss = F.cross_entropy(logits, self.targets)
        else:
            loss = cross_entropy(logits, self.targets, backend=self.backend)
        del logits
        loss.backward()
        # The error is checked on the first rows only, so that two full gradients never coexist.
        grad = self.source.grad[:ERROR_ROWS].clone() if self.keep_grad else None
        self.source.grad = None
        return loss.detach(), grad


def _ce_step(x, targets, backend, keep_grad=False):
    return _CrossEntropyStep(x, targets, backend, keep_grad)


def _time_step(step, device, warmup, repeats):
    """Median ms of step(), with step.prepare() (when it has one) run untimed before each call."""
    prepare = getattr(step, "prepare", None)
    if prepare is None:
        return time_ms(step, device=device, warmup=warmup, repeats=repeats)
    for _ in range(warmup):
        prepare()
        step()
    times = []
    for _ in range(repeats):
        prepare()
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _load_kernels():
    # Loading the extension maps its libraries; that belongs to the baseline, not to a step.
    from fastlm import _ext

    _ext.extension(warn=False)


def setup_ce(n, vocab, dtype, where, backend):
    """Module-level (picklable) setup for peak_memory_mb; `where` is the device."""
    device = where
    _load_kernels()
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, vocab, device=device, dtype=torch.float32, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=device, generator=gen)
    step = _ce_step(x, targets, backend)
    step.prepare()  # the logits are an input: part of the baseline
    return step


def _linear_step(hidden, weight, targets, backend, keep_grad=False):
    def step():
        if backend == "reference":
            loss = F.cross_entropy((hidden @ weight.t()).float(), targets)
        else:
            loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
        loss.backward()
        grads = (hidden.grad, weight.grad)
        hidden.grad = weight.grad = None
        return loss.detach(), grads
    return step


def setup_linear(n, dim, vocab, dtype, where, backend):
    device = where
    _load_kernels()
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, dim, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, generator=gen) / dim**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=device, generator=gen)
    return _linear_step(hidden, weight, targets, backend)


def _fits(device, nbytes):
    if device.type == "cuda":
        return nbytes <= torch.cuda.mem_get_info(device)[0] * 0.8
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return nbytes <= total * CPU_MEMORY_FRACTION


def _row(name, shape, backend, **fields):
    row = dict(name=name, shape=shape, backend=backend, ref_ms=None, fused_ms=None, speedup=None,
               logits_mb=None, ref_peak_mb=None, fused_peak_mb=None, mem_ratio=None, max_err=None,
               skipped=None)
    row.update(fields)
    return row


def _measure(name, shape, backends, make_step, setup, setup_kwargs, device, logits_mb, timing):
    """Rows for one shape: the reference once, then every fused backend against it."""
    rows = []
    ref_loss, ref_grad = make_step("reference", True)()
    ref_ms = _time_step(make_step("reference", False), device, **timing)
    ref_peak = peak_memory_mb(setup, device=device, backend="reference", **setup_kwargs)
    for backend, reason in backends.items():
        if reason is not None:
            rows.append(_row(name, shape, backend, skipped=reason))
            continue
        loss, grad = make_step(backend, True)()
        grads = grad if isinstance(grad, tuple) else (grad,)
        ref_grads = ref_grad if isinstance(ref_grad, tuple) else (ref_grad,)
        err = max([max_rel_error(loss, ref_loss)] + [max_rel_error(g, r) for g, r in zip(grads, ref_grads)])
        del loss, grad, grads
        fused_ms = _time_step(make_step(backend, False), device, **timing)
        fused_peak = peak_memory_mb(setup, device=device, backend=backend, **setup_kwargs)
        rows.append(_row(name, shape, backend, ref_ms=ref_ms, fused_ms=fused_ms, speedup=ref_ms / fused_ms,
                         logits_mb=logits_mb, ref_peak_mb=ref_peak, fused_peak_mb=fused_peak,
                         mem_ratio=fused_peak / max(ref_peak, 1e-9), max_err=err))
    return rows


def run(quick=False, device="cpu", dtype=None, out_dir=None):
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    backends = _fused_backends(device)
    linear_backends = dict(backends, torch=None)
    if device.type == "cpu" and not quick:
        linear_backends["torch"] = "not timed on CPU in the full run (about 30 s a step); see --quick"
    timing = dict(warmup=1, repeats=3) if device.type == "cpu" else dict(warmup=3, repeats=20)
    rows = []
    for n, vocab in CE_SHAPES_QUICK if quick else CE_SHAPES:
        shape = f"N={n} V={vocab}"
        elem = torch.empty((), dtype=dtype).element_size()
        logits_mb = n * vocab * elem / 2**20
        # reference: logits + fp32 log-softmax + gradient (+ one more of each while comparing)
        if not _fits(device, n * vocab * (2 * elem + 8)):
            rows.append(_row(NAME, shape, "all", logits_mb=logits_mb,
                             skipped=f"needs ~{n * vocab * (2 * elem + 8) / 2**30:.0f} GiB, more than "
                                     f"{CPU_MEMORY_FRACTION:.0%} of this machine's memory"))
            continue
        kwargs = dict(n=n, vocab=vocab, dtype=dtype, where=device)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, vocab, device=device, generator=gen).to(dtype).requires_grad_()
        targets = torch.randint(0, vocab, (n,), device=device, generator=gen)
        # Small cases are cheap: more repeats make their medians robust to a busy machine.
        case_timing = dict(warmup=3, repeats=25) if logits_mb < 64 else timing
        rows += _measure(NAME, shape, backends, lambda b, keep: _ce_step(x, targets, b, keep), setup_ce, kwargs,
                         device, logits_mb, case_timing)
        del x, targets
        print(f"  done {shape}", flush=True)
    linear_timing = dict(warmup=0, repeats=2) if device.type == "cpu" else timing
    for n, dim, vocab in LINEAR_SHAPES_QUICK if quick else LINEAR_SHAPES:
        shape = f"N={n} D={dim} V={vocab}"
        kwargs = dict(n=n, dim=dim, vocab=vocab, dtype=dtype, where=device)
        gen = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(n, dim, device=device, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(vocab, dim, device=device, generator=gen) / dim**0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, vocab, (n,), device=device, generator=gen)
        logits_mb = n * vocab * torch.empty((), dtype=dtype).element_size() / 2**20
        rows += _measure("linear_cross_entropy", shape, linear_backends,
                         lambda b, keep: _linear_step(hidden, weight, targets, b, keep), setup_linear, kwargs,
                         device, logits_mb, linear_timing)
        print(f"  done {shape}", flush=True)
    dtype_name = str(dtype).replace("torch.", "")
    for row in rows:
        row["dtype"] = dtype_name
    name = NAME + ("_quick" if quick else "")
    save_report(name, rows, COLUMNS, device=device, out_dir=out_dir)
    _plot(rows, name, device, out_dir, dtype_name)
    return rows


def _plot(rows, name, device, out_dir, dtype_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["speedup"] is not None]
    if not measured:
        return None
    labels = [f"{r['name'].replace('cross_entropy', 'CE')}\n{r['shape']}\n{r['backend']}" for r in measured]
    fig, (ax_time, ax_mem) = plt.subplots(2, 1, figsize=(max(8, len(measured) * 1.1), 8))
    ax_time.bar(range(len(measured)), [r["speedup"] for r in measured], color="tab:blue")
    ax_time.axhline(1.0, color="grey", lw=0.8)
    ax_time.set_ylabel("speedup vs PyTorch (fwd+bwd)")
    ax_time.set_title(f"{name} ({dtype_name}, {device.type})")
    ax_mem.bar(range(len(measured)), [r["mem_ratio"] for r in measured], color="tab:orange")
    ax_mem.axhline(1.0, color="grey", lw=0.8)
    ax_mem.set_ylabel("peak memory, fused / PyTorch")
    for ax in (ax_time, ax_mem):
        ax.set_xticks(range(len(measured)))
        ax.set_xticklabels(labels, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, name, device=device, out_dir=out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, well under a minute")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="logits dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--out-dir", default=None, help="where JSON and PNG go (default: benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    run(quick=args.quick, device=args.device, dtype=args.dtype, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
