"""Numerical parity: train the same model with the reference path and with the fused path.

Both runs start from the same seed (same initial weights, same batches), in fp32 with dropout
0 so that any difference comes from the kernels. They pass when the loss agrees within
LOSS_RTOL (relative) at every step and, at the end, every weight tensor agrees within
WEIGHT_RTOL in relative L2 norm (||fused - ref|| / ||ref||). The max absolute and relative
elementwise differences are reported too: Adam's normalised update amplifies rounding noise in
near-zero gradients to up to lr per step, so a single element's difference is no pass criterion.

The limits are what fp32 reordering allows, not a few percent: the two paths sum in different
orders, so each step differs by a few fp32 ulps (~1e-7 relative) and training grows that over
the run. Measured on CPU: 50 steps of the default model 1.7e-7 on the loss and 1.2e-4 on the
weights; 20 steps of the tiny model 2e-7 and 7e-5. A wrong kernel fails: with the right loss
but a gradient with 5% label smoothing mixed in, the tiny model shows 7e-5 and 3e-3 (a test
plants it). A uniformly scaled gradient would not show at all: Adam's update is invariant to it.
"""
import gc
import tempfile

import torch

from fastlm.bench.common import env_info, max_rel_error
from fastlm.bench.e2e import describe_backends, make_trainer

LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-3
# The default training config (d_model 128, 4 layers, sequence 128, batch 32, byte vocab).
DEFAULT_CASE = dict(name="default d128 L4", vocab_size=256, block_size=128, n_layer=4, n_head=4, d_model=128,
                    batch_size=32)
TINY_CASE = dict(name="tiny d64 L2", vocab_size=256, block_size=64, n_layer=2, n_head=2, d_model=64, batch_size=8)


def train_losses(case, path, steps, device, lr, seed):
    """Per-step training losses and the final weights (on CPU) of one path."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(case, path, device, "float32", tmp, seed=seed, dropout=0.0, lr=lr,
                               warmup_steps=max(1, steps // 5), max_steps=steps)
        losses = [trainer.train_step()[0] for _ in range(steps)]
        weights = {k: v.detach().float().cpu().clone() for k, v in trainer.raw_model.state_dict().items()}
        backends = describe_backends(trainer.backends)
        del trainer
    gc.collect()
    return losses, weights, backends


def compare_weights(ref, fused):
    """Max over tensors of the relative L2 difference, of max |diff|, and of max |diff| / max |ref|."""
    rel_l2, max_abs, max_rel, worst = 0.0, 0.0, 0.0, None
    for name, r in ref.items():
        diff = (fused[name].double() - r.double())
        tensor_rel = (diff.norm() / r.double().norm().clamp_min(1e-30)).item()
        if tensor_rel >= rel_l2:
            rel_l2, worst = tensor_rel, name
        max_abs = max(max_abs, diff.abs().max().item())
        max_rel = max(max_rel, max_rel_error(fused[name], r))
    return {"max_tensor_rel_l2": rel_l2, "worst_tensor": worst, "max_abs": max_abs, "max_rel": max_rel}


def run_parity(steps=50, device="cpu", case=None, lr=1e-3, seed=1337):
    """Train both paths `steps` steps; returns the report (the runner writes it as parity.json)."""
    device = torch.device(device)
    case = case or DEFAULT_CASE
    ref_losses, ref_weights, _ = train_losses(case, "reference", steps, device, lr, seed)
    fused_losses, fused_weights, backends = train_losses(case, "fused", steps, device, lr, seed)
    rel = [abs(f - r) / abs(r) for r, f in zip(ref_losses, fused_losses)]
    weights = compare_weights(ref_weights, fused_weights)
    report = {
        "benchmark": "parity", "env": env_info(device), "case": case, "steps": steps, "lr": lr, "seed": seed,
        "dtype": "float32", "dropout": 0.0, "fused_backends": backends,
        "loss_rtol": LOSS_RTOL, "weight_rtol": WEIGHT_RTOL,
        "ref_losses": ref_losses, "fused_losses": fused_losses,
        "max_loss_rel_diff": max(rel), "worst_step": rel.index(max(rel)) + 1,
        "weights": weights,
    }
    report["loss_ok"] = report["max_loss_rel_diff"] <= LOSS_RTOL
    report["weights_ok"] = weights["max_tensor_rel_l2"] <= WEIGHT_RTOL
    report["passed"] = report["loss_ok"] and report["weights_ok"]
    return report


def describe(report):
    """A few lines saying what was compared and whether it passed."""
    w = report["weights"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    return "\n".join([
        f"parity {verdict}: {report['steps']} steps of {report['case']['name']} from seed {report['seed']}, "
        f"fp32, dropout 0, reference (torch) vs fused ({report['fused_backends']})",
        f"  loss: max relative difference {report['max_loss_rel_diff']:.2e} at step {report['worst_step']} "
        f"(limit {report['loss_rtol']:.0e} at every step){'' if report['loss_ok'] else '  <-- FAILED'}",
        f"  final weights: max per-tensor relative L2 difference {w['max_tensor_rel_l2']:.2e} ({w['worst_tensor']}; "
        f"limit {report['weight_rtol']:.0e}){'' if report['weights_ok'] else '  <-- FAILED'}; "
        f"max abs {w['max_abs']:.2e}, max |diff|/max |ref| {w['max_rel']:.2e}",
        f"  final loss: reference {report['ref_losses'][-1]:.5f}, fused {report['fused_losses'][-1]:.5f}",
    ])


def plot(report):
    """The losses of both paths, and their relative difference against the limit."""
    import matplotlib.pyplot as plt

    steps = range(1, report["steps"] + 1)
    rel = [abs(f - r) / abs(r) for r, f in zip(report["ref_losses"], report["fused_losses"])]
    fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax.plot(steps, report["ref_losses"], label="reference (torch)", linewidth=2.5, alpha=0.6)
    ax.plot(steps, report["fused_losses"], label=f"fused ({report['fused_backends']})", linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{report['case']['name']}, fp32, seed {report['seed']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax_rel.semilogy(steps, [max(r, 1e-10) for r in rel], marker=".")
    ax_rel.axhline(report["loss_rtol"], color="red", linestyle=":", label=f"limit {report['loss_rtol']:.0e}")
    ax_rel.set_xlabel("step")
    ax_rel.set_ylabel("|fused - reference| / reference")
    ax_rel.set_title("relative loss difference (equal losses drawn at 1e-10)", fontsize=9)
    ax_rel.grid(True, alpha=0.3)
    ax_rel.legend(fontsize=8)
    return fig
