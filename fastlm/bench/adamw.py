"""AdamW step time: torch for-loop / foreach / fused against fastlm's cpp and cuda backends.

Parameters are GPT-shaped sets of fp32 tensors (~10M and GPT-2 small's 124M; --quick: ~2M),
each timed as one optimizer step, without and with global-norm clipping at 1.0 (torch:
clip_grad_norm_ then step; fastlm: max_grad_norm inside the step). The reference of every
row is torch.optim.AdamW(fused=True); `speedup_vs_foreach` compares with the foreach path.
max_err: max relative error of the parameters after one clipped step against the torch for-loop
(clip_grad_norm_ + step). fastlm sums squares in double, torch in fp32: on a 38M-element
tensor torch's norm is ~0.3% low, which alone shows up as ~1e-6 here at 124M.
"""
import argparse
import gc
import statistics

import torch

from fastlm.bench.common import (device_name, max_rel_error, peak_memory_mb, save_figure,
                                 save_report, time_ms)
from fastlm.optim import AdamW
from fastlm.optim.adamw import backend_reasons

NAME = "adamw"
LR, BETAS, WEIGHT_DECAY, MAX_NORM = 6e-4, (0.9, 0.95), 0.1, 1.0
TORCH_VARIANTS = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True),
                  "torch-fused": dict(fused=True)}

COLUMNS = [("shape", "params", ""), ("clip", "clip", ""), ("backend", "backend", ""), ("fused_ms", "ms", ".2f"),
           ("ref_ms", "torch fused ms", ".2f"), ("speedup", "vs fused", ".2f"),
           ("speedup_vs_foreach", "vs foreach", ".2f"), ("fused_peak_mb", "peak MB", ".0f"),
           ("max_err", "max err", ".1e"), ("skipped", "skipped", "")]


def gpt_shapes(n_layer, n_embd, vocab_size, block_size):
    """Parameter shapes of a GPT-2 style model (tied embeddings), in model order."""
    shapes = [(vocab_size, n_embd), (block_size, n_embd)]
    for _ in range(n_layer):
        shapes += [(n_embd,), (n_embd,), (3 * n_embd, n_embd), (3 * n_embd,), (n_embd, n_embd), (n_embd,),
                   (n_embd,), (n_embd,), (4 * n_embd, n_embd), (4 * n_embd,), (n_embd, 4 * n_embd), (n_embd,)]
    return shapes + [(n_embd,), (n_embd,)]


CONFIGS = {
    "2M": dict(n_layer=2, n_embd=256, vocab_size=4096, block_size=256),
    "10M": dict(n_layer=4, n_embd=384, vocab_size=8192, block_size=256),
    "124M": dict(n_layer=12, n_embd=768, vocab_size=50257, block_size=1024),
}


def make_params(shapes, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).mul_(0.02).to(device=device, dtype=dtype).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        params.append(p)
    return params


def param_groups(params):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def make_step(backend, params, clip):
    """A zero-argument callable running one optimizer step (with clipping when clip)."""
    if backend in TORCH_VARIANTS:
        opt = torch.optim.AdamW(param_groups(params), lr=LR, betas=BETAS, **TORCH_VARIANTS[backend])

        def step():
            if clip:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.step()
        return step
    opt = AdamW(param_groups(params), lr=LR, betas=BETAS, max_grad_norm=MAX_NORM if clip else None,
                backend=backend)
    return opt.step


def setup_step(backend, config, dtype, clip, on="cpu"):
    """Module-level setup for peak_memory_mb: inputs plus one warm step (state allocated)."""
    params = make_params(gpt_shapes(**CONFIGS[config]), torch.device(on), getattr(torch, dtype))
    step = make_step(backend, params, clip)
    step()
    return step


def skip_reason(backend, device):
    if backend in TORCH_VARIANTS:
        if backend == "torch-fused" and device.type not in ("cpu", "cuda"):
            return f"torch fused AdamW does not run on {device.type}"
        return None
    return backend_reasons(device)[backend]


def run(quick=False, device="cpu", dtype=None, out_dir=None):
    """Time every backend on each size, with and without clipping; returns the table rows."""
    device = torch.device(device)
    dtype = dtype or "float32"
    configs = ["2M"] if quick else ["10M", "124M"]
    backends = list(TORCH_VARIANTS) + ["cpp", "cuda"]
    repeats, warmup = (3, 1) if quick else (10, 3)
    rows = []
    for config in configs:
        shapes = gpt_shapes(**CONFIGS[config])
        n_params = sum(torch.Size(s).numel() for s in shapes)
        label = f"{config} ({n_params / 1e6:.1f}M, {len(shapes)} tensors)"
        # One step of the for-loop from a fixed start is the accuracy reference.
        ref_params = make_params(shapes, device, getattr(torch, dtype))
        make_step("torch-forloop", ref_params, clip=True)()
        ref_after = [p.detach().clone() for p in ref_params]
        del ref_params
        # All backends step the same parameters and grads, each with its own state, and are
        # timed in interleaved rounds: on a shared machine every backend sees the same load.
        params = make_params(shapes, device, getattr(torch, dtype))
        for clip in (False, True):
            steps, clip_rows = {}, []
            for backend in backends:
                row = dict(name=NAME, shape=label, n_params=n_params, clip=clip, backend=backend, dtype=dtype,
                           ref_ms=None, fused_ms=None, speedup=None, speedup_vs_foreach=None,
                           ref_peak_mb=None, fused_peak_mb=None, max_err=None, skipped=None)
                clip_rows.append(row)
                reason = skip_reason(backend, device)
                if reason is not None:
                    row["skipped"] = reason
                    continue
                if clip:
                    fresh = make_params(shapes, device, getattr(torch, dtype))
                    make_step(backend, fresh, clip=True)()
                    row["max_err"] = max(max_rel_error(p.detach(), r) for p, r in zip(fresh, ref_after))
                    del fresh
                steps[backend] = make_step(backend, params, clip)
            samples = {backend: [] for backend in steps}
            for round_ in range(warmup + repeats):
                for backend, step in steps.items():
                    elapsed = time_ms(step, device=device, warmup=0, repeats=1)
                    if round_ >= warmup:
                        samples[backend].append(elapsed)
            times = {backend: statistics.median(v) for backend, v in samples.items()}
            del steps
            gc.collect()
            for row in clip_rows:
                row["fused_ms"] = times.get(row["backend"])
                if row["fused_ms"] is not None and (not quick or config == configs[0]):
                    row["fused_peak_mb"] = peak_memory_mb(setup_step, device=device, backend=row["backend"],
                                                          config=config, dtype=dtype, clip=clip, on=str(device))
            rows += clip_rows
            for row in rows:
                if row["shape"] == label and row["clip"] == clip and row["fused_ms"] is not None:
                    row["ref_ms"] = times.get("torch-fused")
                    row["ref_peak_mb"] = next((r["fused_peak_mb"] for r in rows if r["shape"] == label
                                               and r["clip"] == clip and r["backend"] == "torch-fused"), None)
                    if row["ref_ms"]:
                        row["speedup"] = row["ref_ms"] / row["fused_ms"]
                    if times.get("torch-foreach"):
                        row["speedup_vs_foreach"] = times["torch-foreach"] / row["fused_ms"]
        del params
        gc.collect()
    suffix = "_quick" if quick else ""
    save_report(NAME + suffix, rows, COLUMNS, device=device, out_dir=out_dir,
                extra={"lr": LR, "betas": BETAS, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_NORM})
    _plot(rows, device, out_dir, NAME + suffix)
    return rows


def _plot(rows, device, out_dir, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["fused_ms"] is not None]
    shapes = list(dict.fromkeys(r["shape"] for r in timed))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for offset, clip in ((-0.2, False), (0.2, True)):
            sel = [r for r in timed if r["shape"] == shape and r["clip"] == clip]
            ax.bar([i + offset for i in range(len(sel))], [r["fused_ms"] for r in sel], width=0.4,
                   label="with clipping" if clip else "no clipping")
            ax.set_xticks(range(len(sel)), [r["backend"] for r in sel], rotation=20)
        ax.set_title(shape)
        ax.set_ylabel("ms per step (lower is better)")
        ax.legend()
    fig.suptitle(f"AdamW step, {device_name(device)}")
    save_figure(fig, name, device=device, out_dir=out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size, few repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype (default float32)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    run(quick=args.quick, device=args.device, dtype=args.dtype, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
