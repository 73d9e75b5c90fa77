"""FSDP2 on CPU: two gloo processes (torch.multiprocessing), against DDP and one process.

Every run here sees the same global batches: rank r of 2 takes rows [r*B, (r+1)*B) of a batch of
2*B, one process takes all 2*B rows, so the mean loss and the averaged gradient are the same
quantities in every layout and only fp32 summation order differs.
"""
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastlm.config import GPTConfig, KernelConfig
from fastlm.model import GPT, decay_groups
from fastlm.optim import AdamW
from fastlm.optim import adamw as adamw_module
from fastlm.ops.backends import backend_reasons

CONFIG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)
BATCH = 4  # rows per rank; the global batch is 2 * BATCH
STEPS = 20
LR, MAX_GRAD_NORM = 3e-3, 0.5  # the tiny model's grad norm starts near 1: clipping is active
# Losses of different layouts after 20 AdamW steps: each layout sums the same fp32 numbers in a
# different order (all-reduce, reduce-scatter, one big matmul), ~1e-7 relative per step; Adam's
# normalisation passes such differences on undamped, and 20 steps keep them below 1e-5 relative.
LOSS_RTOL = 2e-5


def optim_backend():
    return "cpp" if backend_reasons("adamw", "cpu")["cpp"] is None else "torch"


def global_batch(step, world=2):
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, CONFIG["vocab_size"], (world * BATCH, CONFIG["block_size"] + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def build(parallel="single", activation_checkpointing="none", reshard_after_forward=True, kernels=None,
          param_dtype=None):
    from fastlm.parallel import apply_activation_checkpointing, apply_fsdp

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG), dropout=0.0, kernels=kernels or KernelConfig())
    apply_activation_checkpointing(model, activation_checkpointing)
    if parallel == "fsdp":
        apply_fsdp(model, "cpu", param_dtype=param_dtype, reshard_after_forward=reshard_after_forward)
    optimizer = AdamW(decay_groups(model, 0.1), lr=LR, betas=(0.9, 0.95), max_grad_norm=MAX_GRAD_NORM,
                      backend=optim_backend())
    wrapped = model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    return model, wrapped, optimizer


def train(wrapped, optimizer, steps, start=0):
    """[(loss, grad norm)] per step; under a process group the rank's rows of the global batch."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    out = []
    for step in range(start, start + steps):
        x, y = global_batch(step)
        if distributed:
            x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
        _, loss = wrapped(x, y)
        loss.backward()
        norm = optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if distributed:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        out.append((loss.item(), float(norm)))
    return out


# ------------------------------------------------------------------------------ process harness

def _entry(rank, fn, world_size, init_file, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done, and the results are written: leave without the interpreter's teardown. Once in a CI
    # run (not reproduced in 21 runs since), a rank that had finished died at exit in C++
    # ("terminate called without an active exception", SIGABRT), failing a test that had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, world_size=2):
    """Run fn(rank, *args) in world_size gloo processes; they report through files in args."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_entry, args=(fn, world_size, os.path.join(tmp, "store"), args),
                           nprocs=world_size, start_method="spawn")


# ------------------------------------------------------------------------------ workers

def _parity_worker(rank, out_dir):
    results = {}
    for name, kwargs in (("ddp", dict(parallel="ddp")), ("fsdp", dict(parallel="fsdp")),
                         ("fsdp_keep_gathered", dict(parallel="fsdp", reshard_after_forward=False)),
                         ("fsdp_ac_full", dict(parallel="fsdp", activation_checkpointing="full")),
                         ("fsdp_ac_selective", dict(parallel="fsdp", activation_checkpointing="selective")),
                         ("fsdp_bf16", dict(parallel="fsdp", param_dtype=torch.bfloat16))):
        model, wrapped, optimizer = build(**kwargs)
        with_calls = adamw_module._STEP_FNS
        backend = optimizer._backend_for(torch.device("cpu"))
        calls = []
        original = with_calls[backend]
        with_calls[backend] = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        try:
            results[name] = train(wrapped, optimizer, STEPS)
        finally:
            with_calls[backend] = original
        results[name + "_kernel_calls"] = len(calls)
        if name == "fsdp":
            from torch.distributed.tensor import DTensor

            p = model.blocks[0].mlp.fc.weight
            results["sharded"] = isinstance(p, DTensor) and p.to_local().shape[0] == p.shape[0] // 2
            state = optimizer.state[p]["exp_avg"]
            results["state_sharded"] = isinstance(state, DTensor) and state.placements == p.placements
            results["tied"] = model.lm_head.weight is model.wte.weight
        if name == "fsdp_bf16":
            results["bf16_master_dtypes"] = {p.dtype for p in model.parameters()}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "parity.pt"))


def _save_worker(rank, ckpt_dir, steps):
    from fastlm.checkpoint_sharded import save_sharded

    model, wrapped, optimizer = build("fsdp")
    train(wrapped, optimizer, steps)
    save_sharded(ckpt_dir, model, optimizer, {"step": steps})


def _resume_worker(rank, ckpt_dir, start, steps, out_file):
    from fastlm.checkpoint_sharded import load_sharded

    model, wrapped, optimizer = build("fsdp")
    load_sharded(ckpt_dir, model, optimizer)
    losses = train(wrapped, optimizer, steps, start=start)
    if rank == 0:
        torch.save(losses, out_file)


def _full_checkpoint_worker(rank, ckpt_file, start, steps, out_file):
    from fastlm.checkpoint_sharded import load_full

    model, wrapped, optimizer = build("fsdp")
    load_full(model, optimizer, torch.load(ckpt_file, weights_only=True))
    losses = train(wrapped, optimizer, steps, start=start)
    if rank == 0:
        torch.save(losses, out_file)


def _triton_worker(rank, steps, out_file):
    model, wrapped, optimizer = build("fsdp", kernels=TRITON_KERNELS)
    assert model.backends["causal_attention"] == "triton" and model.backends["linear_cross_entropy"] == "triton"
    losses = train(wrapped, optimizer, steps)
    if rank == 0:
        torch.save(losses, out_file)


TRITON_KERNELS = KernelConfig(attn_backend="triton", ce_backend="triton")


# ------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def single_run():
    _, wrapped, optimizer = build("single")
    return train(wrapped, optimizer, STEPS)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    spawn(_parity_worker, str(out))
    return torch.load(out / "parity.pt")


def assert_losses_close(got, want, rtol=LOSS_RTOL):
    got_loss, want_loss = torch.tensor([g[0] for g in got]), torch.tensor([w[0] for w in want])
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=0)


@pytest.mark.parametrize("layout", ["ddp", "fsdp", "fsdp_keep_gathered", "fsdp_ac_full", "fsdp_ac_selective"])
def test_losses_match_one_process_for_20_steps(parity, single_run, layout):
    assert parity[layout + "_kernel_calls"] == 2 * STEPS  # the fused update ran (2 param groups per step)
    assert_losses_close(parity[layout], single_run)
    # The clip factor is that of the unsharded run: the global norms agree.
    norms = torch.tensor([n for _, n in parity[layout]])
    torch.testing.assert_close(norms, torch.tensor([n for _, n in single_run]), rtol=1e-4, atol=0)
    assert max(n for _, n in single_run) > MAX_GRAD_NORM  # clipping was really exercised


def test_fsdp_bf16_mixed_precision_keeps_fp32_shards_and_tracks_the_fp32_run(parity, single_run):
    """bf16 compute (gathered parameters), fp32 reduce-scatter and fp32 sharded parameters for
    AdamW: the losses stay within bf16 resolution (2**-8 relative, times a few) of the fp32 run."""
    assert parity["bf16_master_dtypes"] == {torch.float32}
    assert parity["fsdp_bf16_kernel_calls"] == 2 * STEPS
    assert_losses_close(parity["fsdp_bf16"], single_run, rtol=2e-2)
    assert parity["fsdp_bf16"] != parity["fsdp"]  # it did compute in bf16


def test_fsdp_shards_parameters_and_optimizer_state_and_keeps_the_tie(parity):
    assert parity["sharded"] and parity["state_sharded"] and parity["tied"]


def test_sharded_checkpoint_resumes_across_world_sizes(tmp_path, single_run):
    """2 ranks save at step 8; 1 process (plain model) and 2 FSDP ranks resume: equal losses."""
    from fastlm.checkpoint_sharded import find_sharded, load_sharded, load_meta

    ckpt = str(tmp_path / "ckpt.dcp")
    spawn(_save_worker, ckpt, 8)
    assert find_sharded(str(tmp_path)) == ckpt and load_meta(ckpt)["step"] == 8
    assert len([f for f in os.listdir(ckpt) if f.endswith(".distcp")]) == 2  # each rank wrote its part
    # 2 -> 1: a plain model in this process.
    model, wrapped, optimizer = build("single")
    load_sharded(ckpt, model, optimizer)
    assert_losses_close(train(wrapped, optimizer, STEPS - 8, start=8), single_run[8:])
    # 2 -> 2 (the same world size, FSDP again).
    spawn(_resume_worker, ckpt, 8, STEPS - 8, str(tmp_path / "resumed.pt"))
    assert_losses_close(torch.load(tmp_path / "resumed.pt"), single_run[8:])


def test_sharded_checkpoint_from_one_rank_resumes_on_two(tmp_path, single_run):
    """1 -> 2: a world-of-one FSDP run saves, two FSDP ranks continue it."""
    ckpt = str(tmp_path / "ckpt.dcp")
    spawn(_save_worker, ckpt, 6, world_size=1)
    spawn(_resume_worker, ckpt, 6, STEPS - 6, str(tmp_path / "resumed.pt"))
    assert_losses_close(torch.load(tmp_path / "resumed.pt"), single_run[6:])


# ------------------------------------------------------------------------------ the training CLI

def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_command(*args, nproc=2):
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), "-m", "fastlm.train", *map(str, args)]


def _run(command, timeout=600):
    import subprocess

    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _children(pid):
    """The ids of the processes whose parent is `pid` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def _train_losses(out_dir):
    from fastlm.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if r["type"] == "train"}


# Warm-up longer than any run here: the learning rate of a step does not depend on max_steps, so a
# run killed on its way to 10000 steps and resumed to stop early follows the uninterrupted one.
FSDP_ARGS = ("--parallel", "fsdp", "--dropout", "0.1", "--warmup_steps", "10000", "--ckpt_interval", "3")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's ranks in /proc")
def test_cli_fsdp_resumes_after_kill_9_with_equal_losses_then_on_one_rank_and_consolidates(tmp_path):
    import signal
    import subprocess
    import time

    from fastlm.checkpoint_sharded import find_sharded, load_meta
    from tests.helpers import run_cli, tiny_args

    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w+")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen(_torchrun_command(*tiny_args(killed, *FSDP_ARGS, steps=10000)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = find_sharded(str(killed))
            if ckpt is not None and load_meta(ckpt)["step"] >= 6:
                break
            time.sleep(0.2)
    finally:
        # kill -9 both ranks mid-run (torchrun starts them in sessions of their own), then the launcher.
        for pid in _children(proc.pid) + [proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    ckpt = find_sharded(str(killed))
    log.seek(0)
    assert ckpt is not None, log.read()[-3000:]
    log.close()
    saved_step = load_meta(ckpt)["step"]
    stop = saved_step + 3
    _run(_torchrun_command(*tiny_args(killed, *FSDP_ARGS, "--resume", "--max_steps", stop, steps=10000)))
    reference = tmp_path / "reference"
    _run(_torchrun_command(*tiny_args(reference, *FSDP_ARGS, steps=stop)))
    resumed, uninterrupted = _train_losses(killed), _train_losses(reference)
    for step in range(saved_step + 1, stop + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=0), step
    assert load_meta(find_sharded(str(killed)))["step"] == stop

    # 2 -> 1: the same run goes on in one process (an FSDP world of one, from the checkpoint's settings).
    one = run_cli("fastlm.train", *tiny_args(killed, "--warmup_steps", 10000, "--resume", "--max_steps", stop + 2,
                                             steps=10000))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "written by 2 process(es), resuming with 1" in one.stderr
    assert load_meta(find_sharded(str(killed)))["step"] == stop + 2 and max(_train_losses(killed)) == stop + 2

    # One file for fastlm.sample and export.
    done = run_cli("fastlm.consolidate", killed)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stderr.lower(), done.stderr  # DCP's "torch.distributed is disabled" is the intent here
    from fastlm.checkpoint import load_checkpoint

    single = load_checkpoint(str(killed / "ckpt.pt"))
    assert single["step"] == stop + 2 and not isinstance(single["model"]["wte.weight"], type(None))
    assert single["model"]["wte.weight"].shape == (256, 32)
    sample = run_cli("fastlm.sample", "--ckpt", killed, "--max-new-tokens", "5", "--seed", "0")
    assert sample.returncode == 0, sample.stderr[-2000:]


def test_single_file_readers_ask_for_consolidation_instead_of_reading_older_weights(tmp_path):
    """sample, eval and export read single files: an out_dir whose sharded checkpoint is the only one,
    or newer than its ckpt.pt, is a one-line error naming fastlm.consolidate, not a quiet read of the
    older weights (nor an attempt to read the out_dir as a Hugging Face directory)."""
    from tests.helpers import run_cli, tiny_args

    out = tmp_path / "run"

    def refused(needle):
        for module, args in (("fastlm.sample", ["--ckpt", out, "--max-new-tokens", "2"]),
                             ("fastlm.eval", ["--ckpt", out, "--max-tokens", "8"]),
                             ("fastlm.export", ["--ckpt", out, "--format", "safetensors", "--out", tmp_path / "m.st"])):
            result = run_cli(module, *args)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
            assert needle in lines[0] and f"python -m fastlm.consolidate {out}" in lines[0], lines[0]

    assert run_cli("fastlm.train", *tiny_args(out, "--parallel", "fsdp", steps=2)).returncode == 0
    refused("holds a sharded checkpoint (ckpt.dcp) only")
    assert run_cli("fastlm.consolidate", out).returncode == 0
    assert run_cli("fastlm.sample", "--ckpt", out, "--max-new-tokens", "2").returncode == 0
    resumed = run_cli("fastlm.train", *tiny_args(out, "--resume", steps=4))  # goes on sharded: ckpt.pt stays at step 2
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    refused("is newer than its single-file one (step 2)")


def test_single_file_checkpoint_resumes_under_fsdp(tmp_path, single_run):
    """A one-process run's ckpt.pt layout (full tensors, index-keyed AdamW state) continues on 2 FSDP ranks."""
    model, wrapped, optimizer = build("single")
    train(wrapped, optimizer, 6)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    spawn(_full_checkpoint_worker, str(tmp_path / "ckpt.pt"), 6, STEPS - 6, str(tmp_path / "resumed.pt"))
    assert_losses_close(torch.load(tmp_path / "resumed.pt"), single_run[6:])


@pytest.mark.parametrize("keep_gathered", ["true", "false"])
def test_cli_evals_leave_the_parameters_sharded(tmp_path, keep_gathered):
    """An eval runs forward without backward: with --reshard_after_forward false the gathered
    parameters stayed in the modules, and the update ratios of the eval record met plain tensors
    beside their DTensor snapshot (a traceback at the first eval after a step)."""
    from fastlm.metrics import read_metrics
    from tests.helpers import run_cli, tiny_args

    out = tmp_path / "run"
    result = run_cli("fastlm.train", *tiny_args(out, "--parallel", "fsdp", "--reshard_after_forward", keep_gathered,
                                                "--eval_interval", "2", "--ckpt_interval", "2", steps=4))
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(r["update_ratio"] for r in evals[1:])


def test_consolidate_help_states_the_default_output_once(capsys):
    from fastlm import consolidate

    with pytest.raises(SystemExit):
        consolidate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: ckpt.pt in the run's out_dir)" in text and "(default: None)" not in text, text


def test_triton_attention_and_loss_under_fsdp(tmp_path):
    """The Triton custom ops (attention, fused linear cross-entropy; the interpreter on CPU) inside
    FSDP blocks and on the gathered tied weight give the one-process losses."""
    from tests.helpers import skip_unless_usable

    skip_unless_usable("causal_attention", "triton")
    skip_unless_usable("linear_cross_entropy", "triton")
    steps = 3
    _, wrapped, optimizer = build("single", kernels=TRITON_KERNELS)
    reference = train(wrapped, optimizer, steps)
    spawn(_triton_worker, steps, str(tmp_path / "triton.pt"))
    assert_losses_close(torch.load(tmp_path / "triton.pt"), reference)


def test_sharded_save_is_atomic_at_the_directory_level(tmp_path):
    """A kill between the two renames of a save leaves ckpt.dcp.old whole (and found); a killed
    save's ckpt.dcp.tmp is never read and the next save clears both."""
    from fastlm.checkpoint_sharded import find_sharded, load_meta, save_sharded

    model, _, optimizer = build("single")
    path = str(tmp_path / "ckpt.dcp")
    for step in (1, 2):
        save_sharded(path, model, optimizer, {"step": step})
    assert find_sharded(str(tmp_path)) == path and load_meta(path)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt.dcp"]
    os.replace(path, path + ".old")  # killed after the first rename of the next save ...
    os.makedirs(path + ".tmp")  # ... whose shards were half written
    with open(os.path.join(path + ".tmp", "__0_0.distcp"), "wb") as f:
        f.write(b"partial")
    assert find_sharded(str(tmp_path)) == path + ".old" and load_meta(path + ".old")["step"] == 2
    save_sharded(path, model, optimizer, {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.dcp"] and load_meta(path)["step"] == 3


@pytest.mark.gpu
def test_one_gpu_fsdp_smoke(tmp_path):
    """The CLI under --parallel fsdp on one GPU (nccl, a world of one), bf16, then a resume."""
    from tests.helpers import run_cli, tiny_args

    out = tmp_path / "gpu"
    first = run_cli("fastlm.train", *tiny_args(out, "--parallel", "fsdp", "--dtype", "bfloat16", "--device", "cuda",
                                               "--activation_checkpointing", "full", steps=4))
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli("fastlm.train", *tiny_args(out, "--resume", "--device", "cuda", steps=6))
    assert again.returncode == 0, again.stderr[-3000:]
    assert max(_train_losses(out)) == 6
