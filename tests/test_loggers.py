"""Logger backends (TensorBoard read back with its own reader, wandb optional) and step statistics."""
import sys

import pytest
import torch

from fastlm import loggers
from fastlm.config import GPTConfig
from fastlm.metrics import MetricsLog
from fastlm.model import GPT


def read_scalars(log_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_records_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    run = loggers.make_loggers(tmp_path, tensorboard=True)
    metrics = loggers.LoggedMetrics(MetricsLog(tmp_path), run)
    metrics.start()
    metrics.log({"type": "train", "step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 100.0,
                 "mfu": None, "clip_rate": 0.0})
    metrics.log({"type": "train", "step": 2, "loss": 2.0, "lr": 2e-3, "grad_norm": 0.5, "tokens_per_s": 120.0})
    metrics.log({"type": "eval", "step": 2, "val_loss": 2.1, "train_loss": None,
                 "update_ratio": {"embedding": 1e-3, "blocks.0.attn": 2e-3}})
    metrics.log({"type": "final", "step": 2, "elapsed_s": 1.0})  # closes the writers
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2] and scalars["train/tokens_per_s"][1] == (2, 120.0)
    assert scalars["eval/val_loss"] == [(2, pytest.approx(2.1))]
    assert scalars["eval/update_ratio/blocks.0.attn"] == [(2, pytest.approx(2e-3))]
    assert "train/mfu" not in scalars and "eval/train_loss" not in scalars
    assert len(metrics.records()) == 4  # metrics.jsonl is written as before


def test_missing_wandb_is_one_line_and_no_logger(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    lines = []
    run = loggers.make_loggers(tmp_path, wandb_project="p", warn=lines.append)
    assert run.backends == [] and len(lines) == 1 and "wandb is not installed" in lines[0]


def test_wandb_runs_offline_without_an_account(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = loggers.make_loggers(tmp_path, wandb_project="fastlm-test", config={"lr": 1e-3})
    run.log_record({"type": "train", "step": 1, "loss": 1.0})
    run.close()
    assert any((tmp_path / "wandb").iterdir())
    del wandb


def test_other_ranks_log_nothing(tmp_path):
    assert loggers.make_loggers(tmp_path, tensorboard=True, enabled=False).backends == []
    assert not (tmp_path / "tensorboard").exists()


def test_clip_rate_and_loss_spikes():
    lines = []
    stats = loggers.StepStats(grad_clip=1.0, warmup=10, warn=lines.append)
    torch.manual_seed(0)
    losses = (3.0 + 0.01 * torch.randn(40)).tolist()
    losses[30] = 6.0
    flagged = [step for step, loss in enumerate(losses) if stats.observe(step, loss, 2.0 if step % 4 == 0 else 0.5)]
    assert flagged == [30] and len(lines) == 1 and "step 30" in lines[0]
    extras = stats.record_extras()
    assert extras["clip_rate"] == pytest.approx(10 / 40) and extras["loss_spikes"] == 1 and extras["memory_gb"] > 0
    assert stats.record_extras()["clip_rate"] == 0.0  # counts restart at every log line


def test_update_ratios_per_layer_group():
    model = GPT(GPTConfig(vocab_size=256, block_size=8, n_layer=2, n_head=2, d_model=16))
    stats = loggers.StepStats(grad_clip=1.0)
    assert stats.update_ratios(model) == {}
    stats.snapshot(model)
    with torch.no_grad():
        model.blocks[1].mlp.fc.weight.mul_(1.1)
    ratios = stats.update_ratios(model)
    assert set(ratios) == {"embedding", "norm", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"}
    assert ratios["blocks.0.attn"] == 0.0 and 0 < ratios["blocks.1.mlp"] < 0.1


def test_training_run_logs_to_tensorboard_with_step_stats_and_hellaswag(tmp_path):
    pytest.importorskip("tensorboard")
    import json

    from fastlm import train as train_mod
    from fastlm.metrics import read_metrics
    from tests.helpers import tiny_args

    record = {"ctx": "To be or", "endings": [" not to be", "xyz", "qq", "the"], "label": 0}
    (tmp_path / "h.jsonl").write_text(json.dumps(record) + "\n")
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--tensorboard", "true", "--hellaswag", tmp_path / "h.jsonl",
                                    "--wandb_project", "", steps=3)) == 0
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    assert all({"grad_norm", "clip_rate", "loss_spikes", "memory_gb"} <= set(r) for r in train)
    last_eval = [r for r in records if r["type"] == "eval"][-1]
    assert last_eval["hellaswag_acc"] in (0.0, 1.0) and "hellaswag_acc_norm" in last_eval
    assert set(last_eval["update_ratio"]) >= {"embedding", "blocks.0.attn", "blocks.1.mlp"}
    scalars = read_scalars(out / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/memory_gb",
                "eval/val_loss", "eval/hellaswag_acc", "eval/update_ratio/blocks.0.attn"):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
