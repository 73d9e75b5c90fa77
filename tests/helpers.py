"""Shared test utilities: a tiny training configuration and CLI runners."""
import subprocess
import sys

TINY = ["--block_size", "16", "--n_layer", "2", "--n_head", "2", "--d_model", "32", "--batch_size", "4",
        "--eval_iters", "2", "--sample_tokens", "0", "--progress", "false", "--warmup_steps", "2"]


def tiny_args(out_dir, *extra, steps=10):
    return [*TINY, "--max_steps", str(steps), "--eval_interval", str(max(steps, 1)), "--log_interval", "1",
            "--out_dir", str(out_dir), *map(str, extra)]


def run_cli(module, *args, timeout=600, env=None):
    """Run `python -m module args` in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
