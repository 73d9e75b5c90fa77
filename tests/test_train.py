import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastlm import metrics as metrics_mod
from fastlm import train as train_mod
from fastlm.config import TrainConfig, parse_args
from fastlm.metrics import read_metrics
from fastlm.plots import loss_curves
from fastlm.train import get_lr
from tests.helpers import run_cli, stop_at, tiny_args


def losses(out_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if r["type"] == "train"}


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def test_get_lr_schedule():
    cfg = TrainConfig(lr=3e-4, min_lr=0.0, warmup_steps=100, max_steps=2000)
    assert get_lr(0, cfg) == pytest.approx(3e-6)
    assert get_lr(49, cfg) == pytest.approx(1.5e-4)
    assert get_lr(99, cfg) == pytest.approx(3e-4)
    assert get_lr(100, cfg) == pytest.approx(3e-4)
    assert get_lr(1050, cfg) == pytest.approx(1.5e-4)
    assert get_lr(2000, cfg) == pytest.approx(0.0)
    with_floor = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert get_lr(60, with_floor) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert get_lr(110, with_floor) == pytest.approx(1e-4)
    values = [get_lr(s, cfg) for s in range(100, 2000)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_end_to_end_training_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = train_mod.main(tiny_args(out, "--sample_tokens", "20", "--lr", "3e-3", steps=30))
    assert code == 0
    for name in ("ckpt.pt", "metrics.jsonl", "config.json", "loss.png", "tokenizer.json"):
        assert (out / name).is_file(), name
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # it learns
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    # Without --eval_train_split the train column is the mean batch loss since the last eval.
    train_batches = [r["loss"] for r in records if r["type"] == "train"]
    assert evals[0]["train_loss"] is None
    assert evals[-1]["train_loss"] == pytest.approx(sum(train_batches) / len(train_batches))
    train = [r for r in records if r["type"] == "train"]
    assert len(train) == 30 and all(r["tokens_per_s"] > 0 for r in train)
    assert records[-1]["type"] == "final"
    stdout = capsys.readouterr().out
    assert "val loss" in stdout and "sample:" in stdout
    assert "wrote ckpt.pt, metrics.jsonl" in stdout  # one checkpoint written: no "newest of 2 kept"
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["d_model"] == 32 and config["train"]["max_steps"] == 30


def _table_rows(stdout):
    """{step: tok/s column} of the eval table ('-' where none was measured yet)."""
    rows = [line.split("|") for line in stdout.splitlines() if line.count("|") == 6 and "step" not in line]
    return {int(cells[0]): cells[5].strip() for cells in rows}


def test_tokens_per_s_counts_training_steps_only(tmp_path, capsys):
    throughput = metrics_mod.Throughput(tokens_per_step=1000)
    throughput.count_step()
    with throughput.excluded():  # an evaluation or a checkpoint write
        time.sleep(0.5)
    assert throughput.measure() > 1000 / 0.25  # the half second is not in the window
    # An eval between log steps shows the tokens/s of its own window, not 0 or a stale value.
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--eval_interval", "5", "--log_interval", "10", steps=10)) == 0
    speeds = _table_rows(capsys.readouterr().out)
    assert speeds[0] == "-" and float(speeds[5]) > 0 and float(speeds[10]) > 0, speeds


def test_an_explicit_tokenizer_that_the_data_overrides_is_reported(tmp_path, capsys):
    from fastlm.prepare import prepare

    tok = tmp_path / "data.tok"
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 97} x{i % 13}" for i in range(6000)))
    prepare(str(text), str(tok), "bpe", 300)
    assert train_mod.main(tiny_args(tmp_path / "run", "--data", tok, "--tokenizer", "byte", steps=1)) == 0
    err = capsys.readouterr().err
    assert "--tokenizer byte ignored" in err and "bpe tokenizer" in err, err
    config = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert config["kind"] == "bpe"


def test_eval_train_split_measures_train_loss_in_eval_mode(tmp_path, monkeypatch):
    out = tmp_path / "run"
    plotted = []
    original = metrics_mod.save_loss_plot

    def spy(records, path, train_measured=False):
        plotted.append(train_measured)
        return original(records, path, train_measured=train_measured)

    monkeypatch.setattr(metrics_mod, "save_loss_plot", spy)
    assert train_mod.main(tiny_args(out, "--eval_train_split", "true", steps=2)) == 0
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "eval"]
    assert all(isinstance(e["train_loss"], float) for e in evals)
    # The plot labels that curve as measured in eval mode, not as the mean since the last eval.
    assert plotted == [True]
    labels = [label for label, _, _ in loss_curves(records, train_measured=True)]
    assert labels == ["train (batch)", "train (eval mode)", "val"]
    assert [label for label, _, _ in loss_curves(records)][1] == "train (mean since the last eval)"



def test_resume_is_bit_exact(tmp_path, monkeypatch):
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_mod.main(tiny_args(full, "--ckpt_interval", "5", steps=20)) == 0
    monkeypatch.setattr(train_mod.Trainer, "_should_stop", stop_at(10))
    assert train_mod.main(tiny_args(split, "--ckpt_interval", "5", steps=20)) == 128 + signal.SIGTERM
    assert torch.load(split / "ckpt.pt", weights_only=True)["step"] == 10
    monkeypatch.undo()
    assert train_mod.main(tiny_args(split, "--resume", steps=20)) == 0
    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    wa, wb = weights(full), weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_takes_architecture_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--n_kv_head", "1", steps=4)) == 0
    # Resuming without repeating --n_kv_head keeps the checkpoint's value; max_steps can grow.
    args = [a for a in tiny_args(out, "--resume", steps=6)]
    assert train_mod.main(args) == 0
    assert json.loads((out / "config.json").read_text())["model"]["n_kv_head"] == 1


def evals(out_dir):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(os.path.join(out_dir, "metrics.jsonl"))
            if r["type"] == "eval"]


def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs. "
                     * 40 + "how vexingly quick daft zebras jump! " * 40) * 3)
    return path


def non_default(kind, tmp_path):
    """Flags of a run that differs from the defaults in what it computes."""
    if kind == "batch_lr_accum":
        return ["--batch_size", "3", "--lr", "2e-3", "--min_lr", "1e-4", "--grad_accum_steps", "2", "--seed", "7",
                "--warmup_steps", "3", "--weight_decay", "0.05", "--grad_clip", "0.5"]
    if kind == "bpe_text":
        return ["--data", corpus(tmp_path), "--tokenizer", "bpe", "--vocab_size", "300"]
    from fastlm.prepare import prepare

    token_file = tmp_path / "corpus.tok"
    prepare(str(corpus(tmp_path)), str(token_file), "bpe", 300)
    return ["--data", token_file, "--vocab_size", "300"]


@pytest.mark.parametrize("kind", ["batch_lr_accum", "bpe_text", "token_file"])
def test_resume_with_only_resume_and_out_dir_continues_exactly(tmp_path, monkeypatch, kind):
    """`--resume --out_dir X` alone: every setting comes back from the checkpoint, and the run
    ends bit for bit as the uninterrupted one (losses, evals, weights, config)."""
    extra = [*non_default(kind, tmp_path), "--eval_interval", "3", "--eval_iters", "1"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_mod.main(tiny_args(full, *extra, steps=8)) == 0
    monkeypatch.setattr(train_mod.Trainer, "_should_stop", stop_at(4))
    assert train_mod.main(tiny_args(split, *extra, steps=8)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert train_mod.main(["--resume", "--out_dir", str(split)]) == 0
    assert losses(full) == losses(split) and sorted(losses(split)) == list(range(1, 9))
    assert evals(full) == evals(split) and [e[0] for e in evals(split)] == [0, 3, 6, 8]
    wa, wb = weights(full), weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (full, split))
    for config in (config_a, config_b):
        config["train"].pop("out_dir"), config["train"].pop("resume")
    assert config_a == config_b


def test_resume_restores_the_training_config_and_max_steps_extends_it(tmp_path, capsys):
    out = tmp_path / "run"
    first = ["--batch_size", "5", "--lr", "1e-3", "--eval_interval", "3", "--eval_iters", "1", "--seed", "11"]
    assert train_mod.main(tiny_args(out, *first, steps=4)) == 0
    before = json.loads((out / "config.json").read_text())
    capsys.readouterr()
    assert train_mod.main(["--resume", "--out_dir", str(out), "--max_steps", "7"]) == 0
    changes = [line for line in capsys.readouterr().out.splitlines() if "resuming with changes" in line]
    assert changes == ["fastlm: resuming with changes: max_steps 4 -> 7 (the cosine schedule now ends there)"]
    after = json.loads((out / "config.json").read_text())
    assert after["train"] == {**before["train"], "max_steps": 7}  # "resume" stays false: see below
    assert after["model"] == before["model"]
    assert [e[0] for e in evals(out)] == [0, 3, 4, 6, 7]  # eval_interval 3 came back (4: the first run's end)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert train_mod.main(tiny_args(out, "--lr", "3e-3", steps=2)) == 0
    return out


@pytest.mark.parametrize("flag,value", [("batch_size", "5"), ("lr", "1e-2"), ("grad_accum_steps", "2"),
                                        ("seed", "3"), ("dtype", "bfloat16"), ("tokenizer", "bpe"),
                                        ("warmup_steps", "5"), ("dropout", "0.0")])
def test_resume_refuses_a_change_of_what_the_run_computes(finished_run, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--resume", "--out_dir", str(finished_run), "--max_steps", "3", f"--{flag}", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--{flag} " in err[0] and "--override_resume_config" in err[0], err


def test_override_resume_config_says_what_changed(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--lr", "3e-3", steps=2)) == 0
    capsys.readouterr()
    assert train_mod.main(["--resume", "--out_dir", str(out), "--max_steps", "3", "--lr", "1e-3",
                           "--override_resume_config"]) == 0
    changes = [line for line in capsys.readouterr().out.splitlines() if "resuming with changes" in line]
    assert len(changes) == 1 and "lr 0.003 -> 0.001 (overridden)" in changes[0]
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-3


def test_resume_on_changed_data_is_an_error(tmp_path, capsys):
    text = corpus(tmp_path)
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--data", text, steps=2)) == 0
    saved = torch.load(out / "ckpt.pt", weights_only=True)["data"]
    assert saved["source"] == str(text) and saved["fingerprint"].startswith("sha256:")
    text.write_text(text.read_text().replace("fox", "cat"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--resume", "--out_dir", str(out), "--max_steps", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not what the checkpoint trained on" in err[0], err
    assert train_mod.main(["--resume", "--out_dir", str(out), "--max_steps", "3", "--override_resume_config"]) == 0
    assert "is not what the checkpoint trained on" in capsys.readouterr().out
    text.unlink()  # gone: an error too, never a silent switch to the embedded corpus
    with pytest.raises(SystemExit):
        train_mod.main(["--resume", "--out_dir", str(out), "--max_steps", "4"])
    assert "data path not found" in capsys.readouterr().err


def test_sigint_saves_a_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastlm.train", *tiny_args(out, steps=100000)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "checkpoint saved" in err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 4
    result = run_cli("fastlm.train", *tiny_args(out, "--resume", steps=step + 3))
    assert result.returncode == 0, result.stderr
    assert max(losses(out)) == step + 3


def test_nan_loss_stops_without_overwriting_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, steps=3)) == 0
    before = (out / "ckpt.pt").read_bytes()
    original = train_mod.GPT.forward

    def poisoned(self, idx, targets=None, return_logits=False, **kwargs):
        logits, loss = original(self, idx, targets, return_logits, **kwargs)
        return logits, (loss * float("nan") if self.training and loss is not None else loss)

    monkeypatch.setattr(train_mod.GPT, "forward", poisoned)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(tiny_args(out, "--resume", "--ckpt_interval", "1", steps=10))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    # Steps are numbered as in metrics.jsonl: the 4th step, the first after the checkpoint of step 3.
    assert len(err) == 1 and "loss became nan at step 4" in err[0] and "step 3, is kept" in err[0]
    assert (out / "ckpt.pt").read_bytes() == before


def test_a_run_whose_every_step_was_skipped_ends_without_a_sample_not_a_traceback(tmp_path, capsys):
    # The first update with lr 1e12 breaks the weights; every later step is NaN and skipped.
    args = tiny_args(tmp_path / "run", "--lr", "1e12", "--grad_clip", "0", "--warmup_steps", "1",
                     "--skip_nonfinite_steps", "10", "--sample_tokens", "5", steps=4)
    assert train_mod.main(args) == 0
    assert "no sample: the model's logits are NaN or inf" in capsys.readouterr().err


def test_help_lists_every_field_with_default():
    result = run_cli("fastlm.train", "--help")
    assert result.returncode == 0
    for flag in ("--d_model", "--n_kv_head", "--pos_emb", "--lr", "--min_lr", "--grad_accum_steps", "--dtype",
                 "--compile", "--ckpt_interval", "--resume", "--data", "--tokenizer", "--attn_backend",
                 "--ce_backend", "--optim_backend", "--config", "--seed", "--device"):
        assert flag in result.stdout, flag
    assert "(default: 0.0003)" in result.stdout
    assert "--max_steps INT, --max-steps INT" in result.stdout
    assert "(default: None)" not in result.stdout.split("--data STR", 1)[1].split("--tokenizer", 1)[0]


def test_config_file_and_cli_precedence(tmp_path):
    from fastlm.config import parse_args

    toml = tmp_path / "c.toml"
    toml.write_text('[model]\nd_model = 64\nn_head = 2\n[train]\nlr = 0.001\nmax_steps = 7\n')
    run = parse_args(["--config", str(toml), "--max_steps", "9"])
    model, train = run.model, run.train
    assert (model.d_model, model.n_head, train.lr, train.max_steps) == (64, 2, 0.001, 9)
    assert {"d_model", "max_steps"} <= run.explicit
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"batch_size": 3, "compile": "false"}))
    train = parse_args(["--config", str(js)]).train
    assert train.batch_size == 3 and train.compile is False
    # Flags also take dashes, as fastlm's other commands do.
    run = parse_args(["--max-steps", "11", "--grad-accum-steps", "2", "--eval_interval", "5"])
    assert (run.train.max_steps, run.train.grad_accum_steps, run.train.eval_interval) == (11, 2, 5)
    assert {"max_steps", "grad_accum_steps"} <= run.explicit


def test_warnings_are_one_line_like_errors(monkeypatch):
    import warnings

    from fastlm.config import one_line_warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    one_line_warnings("python -m fastlm.train")
    text = warnings.formatwarning("the BPE file is neither cached nor given", UserWarning, __file__, 1)
    assert text == "python -m fastlm.train: warning: the BPE file is neither cached nor given\n"


def test_a_runs_config_json_starts_a_new_run_with_its_settings(tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--lr", "2e-3", "--seed", "7", steps=2)) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["backends"]  # the record beside the settings, skipped when read back
    run = parse_args(["--config", str(out / "config.json"), "--out_dir", str(tmp_path / "again")])
    assert run.as_dict()["model"] == saved["model"] and run.as_dict()["kernels"] == saved["kernels"]
    assert {**saved["train"], "out_dir": str(tmp_path / "again")} == run.as_dict()["train"]
    assert train_mod.main(["--config", str(out / "config.json"), "--out_dir", str(tmp_path / "again")]) == 0
    assert losses(tmp_path / "again") == losses(out)  # the same settings train the same run


def test_config_json_of_a_resumed_or_overwriting_run_starts_a_new_run(tmp_path):
    """--resume and --overwrite are the invocation's, not the run's: a run's config.json given as
    --config neither resumes the new out_dir nor replaces the run it holds."""
    out, other = tmp_path / "run", tmp_path / "other"
    assert train_mod.main(tiny_args(out, steps=2)) == 0
    assert train_mod.main(tiny_args(out, "--overwrite", steps=2)) == 0
    assert train_mod.main(["--resume", "--out_dir", str(out), "--max_steps", "3", "--override_resume_config"]) == 0
    saved = json.loads((out / "config.json").read_text())["train"]
    assert (saved["resume"], saved["overwrite"], saved["override_resume_config"]) == (False, False, False)
    assert train_mod.main(["--config", str(out / "config.json"), "--out_dir", str(tmp_path / "again")]) == 0
    assert train_mod.main(tiny_args(other, steps=2)) == 0
    kept = (other / "ckpt.pt").read_bytes()
    _one_line_error(run_cli("fastlm.train", "--config", out / "config.json", "--out_dir", other), "already holds a run")
    assert (other / "ckpt.pt").read_bytes() == kept


def _one_line_error(result, *needles):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_INPUTS = [
    (["--d_model", "30", "--n_head", "4"], "divisible by n_head"),
    (["--n_head", "4", "--n_kv_head", "3"], "divisible by n_kv_head"),
    (["--lr", "0"], "lr must be positive"),
    (["--lr=-1e-3"], "lr must be positive"),
    (["--max_steps", "0"], "max_steps must be positive"),
    (["--batch_size", "-2"], "batch_size must be positive"),
    (["--no_such_option", "1"], "unrecognized arguments"),
    (["--dtype", "float8"], "invalid choice"),
    (["--lr", "fast"], "invalid float value"),
    (["--data", "/nonexistent/corpus.txt"], "data path not found"),
    (["--ce_backend", "triton"], "cannot run on cpu"),
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--beta2", "nan"], "beta2 must be a finite number"),
    (["--pos_emb", "rope", "--rope_theta", "0"], "rope_theta must be positive"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--hellaswag_limit", "5"], "--hellaswag FILE, which is not given"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[b[1] for b in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = run_cli("fastlm.train", "--out_dir", tmp_path / "o", "--max_steps", "1", *args, env=env)
    _one_line_error(result, needle)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_a_command_line_error_is_rank_0_s_to_print(tmp_path, monkeypatch, capsys):
    """Under torchrun (RANK, WORLD_SIZE) another rank leaves a command-line error to rank 0 and
    waits, silent, for the launcher to stop it; one that is not stopped says it after all."""
    from fastlm import config

    waited = []
    monkeypatch.setattr(config.time, "sleep", waited.append)
    for rank, world_size, waits in (("0", "2", []), ("1", "2", [config.RANK0_GRACE_S]), ("1", "1", [])):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world_size)
        for args, needle in ((["--lr", "-1"], "lr must be positive"), (["--no_such_flag"], "unrecognized arguments")):
            waited.clear()
            with pytest.raises(SystemExit) as info:
                train_mod.main(["--out_dir", str(tmp_path / "o"), *args])
            err = capsys.readouterr().err.strip().splitlines()
            assert info.value.code == 2 and len(err) == 1 and needle in err[0], err
            assert waited == waits, (rank, world_size)
    assert not (tmp_path / "o").exists()


def test_a_rank_stopped_while_it_waits_exits_with_the_error_s_code_in_silence():
    code = ("import os, signal, threading; from fastlm import config; config.RANK0_GRACE_S = 600; "
            "threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start(); "
            "config.fail('prog', 'bad flag', code=2, same_on_every_rank=True)")
    env = dict(os.environ, RANK="1", WORLD_SIZE="2")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", "")  # ended by the signal, in silence


def test_a_nanogpt_character_vocabulary_sizes_the_model(tmp_path):
    """vocab_size left at its default is the data's vocabulary: smaller than 256 too, so the model has
    no rows that the data never uses (and a sample never draws ids that decode to nothing)."""
    import numpy as np

    from tests.test_shards import nanogpt_write

    chars = "\n !abcdefghij"
    rng = np.random.default_rng(3)
    (tmp_path / "data").mkdir()
    nanogpt_write(tmp_path / "data", rng.integers(0, len(chars), 3000), rng.integers(0, len(chars), 500), chars)
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--data", tmp_path / "data", steps=2)) == 0
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == len(chars)
    chosen = tmp_path / "chosen"
    assert train_mod.main(tiny_args(chosen, "--data", tmp_path / "data", "--vocab_size", "100", steps=2)) == 0
    assert json.loads((chosen / "config.json").read_text())["model"]["vocab_size"] == 100


def test_bad_data_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(run_cli("fastlm.train", "--data", empty, "--out_dir", tmp_path / "o"), "is empty")
    short = tmp_path / "short.txt"
    short.write_text("too short " * 20)
    _one_line_error(run_cli("fastlm.train", "--data", short, "--out_dir", tmp_path / "o"), "too short")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc" * 100)
    _one_line_error(run_cli("fastlm.train", "--data", binary, "--out_dir", tmp_path / "o"), "not UTF-8")
    no_txt = tmp_path / "dir"
    no_txt.mkdir()
    _one_line_error(run_cli("fastlm.train", "--data", no_txt, "--out_dir", tmp_path / "o"), "no .txt files")
    records = tmp_path / "docs.jsonl"  # read as text, its JSON syntax would be trained on
    records.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(200)))
    _one_line_error(run_cli("fastlm.train", "--data", records, "--out_dir", tmp_path / "o"),
                    "holds records, not plain text", "fastlm.prepare")
    assert not (tmp_path / "o").exists()


def test_token_id_out_of_vocab(tmp_path):
    from fastlm.prepare import prepare

    tok = tmp_path / "data.tok"
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    prepare(str(text), str(tok), "bpe", 300)
    _one_line_error(run_cli("fastlm.train", "--data", tok, "--vocab_size", "256", "--out_dir", tmp_path / "o"),
                    "vocab")


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _one_line_error(run_cli("fastlm.train", "--out_dir", blocker / "sub", "--max_steps", "1"), "not writable")
    _one_line_error(run_cli("fastlm.train", "--out_dir", blocker, "--max_steps", "1"), "is a file")
    assert blocker.read_text() == "not a directory"


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, steps=2)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _one_line_error(run_cli("fastlm.train", *tiny_args(out, steps=2)), "already holds a run")
    # incompatible checkpoint on resume
    _one_line_error(run_cli("fastlm.train", *tiny_args(out, "--resume", "--d_model", "64", steps=4)),
                    "incompatible", "d_model")
    # Nothing to train: a stop before the checkpoint's step.
    _one_line_error(run_cli("fastlm.train", *tiny_args(out, "--resume", steps=1)), "below step 2")
    # --init_from starts a new run; a resumed one keeps its own weights.
    _one_line_error(run_cli("fastlm.train", *tiny_args(out, "--resume", "--init_from", out / "ckpt.pt", steps=4)),
                    "starts a new run")
    # --overwrite replaces the run only once the new one passed its checks: a refused one touches nothing.
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(run_cli("fastlm.train", *tiny_args(out, "--overwrite", "--data", empty, steps=2)), "is empty")
    _one_line_error(run_cli("fastlm.train", *tiny_args(out, "--overwrite", "--vocab_size", "100", steps=2)),
                    "vocab_size is 100")
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    before.pop(".lock"), after.pop(".lock")  # each run writes its pid into the lock file
    assert before == after


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"definitely not a checkpoint")
    _one_line_error(run_cli("fastlm.train", *tiny_args(out, "--resume", steps=2)), "corrupt")
    assert (out / "ckpt.pt").read_bytes() == b"definitely not a checkpoint"
    _one_line_error(run_cli("fastlm.train", *tiny_args(tmp_path / "none", "--resume", steps=2)), "no checkpoint")


# --------------------------------------------------------------------------- on a CUDA device
# What the tests above show of the loop (no host sync between reads, bit-exact resume), shown with
# the GPU kernels: those `auto` picks there (Triton loss and norms, CUDA AdamW), and attention by
# name (`auto` picks SDPA's): Triton for 16-bit runs, SDPA for fp32 (the Triton kernel's fp32 dots
# would not use tensor cores).

# Head dim 64 (the kernels' main case), block 64, on the GPU; dropout stays on (CUDA RNG state).
CUDA = ["--device", "cuda", "--block_size", "64", "--d_model", "128", "--n_head", "2", "--batch_size", "8"]


def attention_backend(dtype):
    return "sdpa" if dtype == "float32" else "triton"


def cuda_args(dtype):
    return [*CUDA, "--dtype", dtype, "--attn_backend", attention_backend(dtype)]


def expected_backends(dtype):
    return {"causal_attention": attention_backend(dtype),
            "layer_norm": "triton", "linear_cross_entropy": "triton", "adamw": "cuda"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,extra", [
    ("bfloat16", []),
    ("float16", []),  # GradScaler: scale, unscale-on-step and update stay on the device
    ("float32", ["--grad_clip", "0"]),
    ("bfloat16", ["--skip_nonfinite_steps", "2", "--grad_accum_steps", "2"]),  # the device-side skip flag
], ids=["bf16", "fp16-scaler", "fp32-noclip", "bf16-skip-accum"])
def test_cuda_steps_between_reads_never_wait_for_the_device(tmp_path, dtype, extra):
    """Every step between two reads (log, eval, checkpoint) is launched without one host sync:
    torch's sync debug mode "error" raises at the first (a .item(), a blocking copy, a
    synchronize), in the data feed, forward, loss, backward, scaler or optimizer."""
    trainer = train_mod.Trainer(parse_args(tiny_args(tmp_path / "run", *cuda_args(dtype), *extra, steps=20)))
    try:
        assert trainer.backends == expected_backends(dtype)
        for _ in range(2):  # first launches: kernel compiles, lazy CUDA and scaler state
            trainer.advance()
        trainer._read_pending()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                trainer.advance()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        loss, norm, lr = trainer._read_pending()
        assert math.isfinite(loss) and loss < math.log(256) + 0.5 and lr > 0
        assert trainer.step == 5 and trainer.skipped_steps == 0
    finally:
        trainer.close()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_resume_is_bit_exact(tmp_path, monkeypatch, dtype):
    """Stopped by SIGTERM at step 6 and resumed, a CUDA run ends as the uninterrupted one, bit for bit:
    losses and weights (dropout's CUDA RNG, the data order, AdamW and GradScaler state restored).
    Two uninterrupted runs are compared first, so that a nondeterministic kernel is named as such."""
    args = [*cuda_args(dtype), "--ckpt_interval", "4", "--eval_interval", "5"]
    full, again, split = tmp_path / "full", tmp_path / "again", tmp_path / "split"
    for out in (full, again):
        assert train_mod.main(tiny_args(out, *args, steps=12)) == 0
    assert losses(full) == losses(again), "two identical CUDA runs differ: a kernel is not deterministic"
    monkeypatch.setattr(train_mod.Trainer, "_should_stop", stop_at(6))
    assert train_mod.main(tiny_args(split, *args, steps=12)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert train_mod.main(["--resume", "--out_dir", str(split)]) == 0
    a, b = losses(full), losses(split)
    assert sorted(b) == list(range(1, 13))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    wa, wb = weights(full), weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_loss_scale_holds_the_micro_batch_mean_so_fused_backwards_see_exactly_one(tmp_path, monkeypatch):
    """With gradient accumulation the fused loss is told the 1/accum the loss is multiplied by
    (grad_scale): its stored gradient is scaled once, in the forward, and the incoming gradient it
    divides that out of is exactly 1 in every micro-batch's backward."""
    from fastlm.ops import loss as ce_module

    seen = []
    real_is_one = ce_module._is_one
    monkeypatch.setattr(ce_module, "_is_one", lambda grad: seen.append(real_is_one(grad)) or seen[-1])
    trainer = train_mod.Trainer(parse_args(tiny_args(tmp_path / "run", "--grad_accum_steps", "3", steps=2)))
    try:
        assert trainer._loss_scale(1) is None and trainer._loss_scale(3) == 1 / 3
        trainer.advance()
    finally:
        trainer.close()
    assert seen == [True] * 3
