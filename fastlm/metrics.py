"""What a run reports: metrics.jsonl, the eval table on stdout, the loss plot, and MFU.

metrics.jsonl has one JSON object per line: {"type": "train", ...} every log_interval steps,
{"type": "eval", ...} at every eval, {"type": "final", ...} at the end. Only the main process
writes; a resumed run keeps the records up to its checkpoint's step.
"""
import contextlib
import json
import math
import os
import time

import torch

from fastlm.files import atomic_write_text
from fastlm.plots import ascii_curve, save_loss_plot

METRICS_NAME = "metrics.jsonl"
# Dense bf16 peak FLOP/s of common training GPUs (no sparsity), the denominator of MFU, from the
# vendors' data sheets. The first key found in torch.cuda.get_device_name() wins, so the PCIe and
# NVL variants of the H100 (lower clocks and power) come before the SXM's plain "H100".
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
TABLE_HEADER = (f"{'step':>6} | {'train loss':>10} | {'val loss':>8} | {'val ppl':>8} | {'lr':>9} | "
                f"{'tok/s':>8} | {'elapsed':>8}")


def peak_flops(device):
    """The device's dense bf16 peak FLOP/s if known (for MFU), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def read_metrics(path):
    """The records of a metrics.jsonl. A last line without its newline that does not parse is
    what a killed writer left half-written: it is dropped (a resumed run rewrites the file)."""
    with open(path) as f:
        *lines, tail = f.read().split("\n")
    records = [json.loads(line) for line in lines if line.strip()]
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except ValueError:
            pass
    return records


class MetricsLog:
    """metrics.jsonl of one run; a no-op on processes other than the main one."""

    def __init__(self, out_dir, enabled=True):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, METRICS_NAME)
        self.enabled = enabled

    def start(self, resumed_step=None):
        """Fresh run: an empty file. Resumed run: keep only the records up to its step."""
        if not self.enabled:
            return
        kept = []
        if resumed_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_step and r.get("type") != "final"]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self):
        return read_metrics(self.path)

    def finish(self, eval_train_split):
        """Write loss.png and return the ASCII val-loss curve for the terminal."""
        records = self.records()
        save_loss_plot(records, os.path.join(self.out_dir, "loss.png"), train_measured=eval_train_split)
        return ascii_curve([(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"], label="val loss")


class Throughput:
    """Tokens per second of training over the steps since the last measurement (measured at log
    steps, after the loop has read the device, so that the time of queued GPU work is counted).
    The time of evaluations and checkpoint writes is left out (`excluded`)."""

    def __init__(self, tokens_per_step):
        self.tokens_per_step = tokens_per_step
        self.tokens_per_s = 0.0
        self._start, self._steps = time.perf_counter(), 0

    def count_step(self):
        self._steps += 1

    def measure(self):
        now = time.perf_counter()
        if now > self._start:
            self.tokens_per_s = self._steps * self.tokens_per_step / (now - self._start)
        self._start, self._steps = now, 0
        return self.tokens_per_s

    @contextlib.contextmanager
    def excluded(self):
        """Leave the time of the block (an evaluation, a checkpoint write) out of the current window."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - start


def eval_record(step, losses, lr):
    return {"type": "eval", "step": step, "train_loss": losses["train"], "val_loss": losses["val"],
            "val_ppl": math.exp(min(losses["val"], 50)), "lr": lr}


def table_row(record, tokens_per_s, elapsed):
    """One line of the eval table printed at every eval."""
    train = f"{record['train_loss']:>10.4f}" if record["train_loss"] is not None else f"{'-':>10}"
    speed = f"{tokens_per_s:>8.0f}" if tokens_per_s else f"{'-':>8}"  # none measured yet (step 0)
    return (f"{record['step']:>6} | {train} | {record['val_loss']:>8.4f} | {record['val_ppl']:>8.2f} | "
            f"{record['lr']:>9.2e} | {speed} | {elapsed:>7.1f}s")
