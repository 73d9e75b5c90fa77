"""DistributedDataParallel on CPU: two gloo processes under torchrun."""
import os
import re
import socket

import pytest
import torch

from fastlm.metrics import read_metrics
from tests.helpers import run_cli, tiny_args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return run_cli("torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", free_port(), "-m", "fastlm.train", *args, env=env)


def diagnose(result):
    """The lines of a failed torchrun's output that say why (its tail is mostly launcher noise)."""
    keep = [line for line in result.stderr.splitlines()
            if any(word in line for word in ("terminate", "what()", "Error", "error", "Exception", "abort"))]
    return "\n".join(keep[-40:]) + "\n...\n" + result.stderr[-1500:]


def test_two_gloo_ranks_end_with_identical_weights_and_resume(tmp_path):
    out = tmp_path / "ddp"
    result = torchrun(*tiny_args(out, steps=6))
    assert result.returncode == 0, diagnose(result)
    records = read_metrics(out / "metrics.jsonl")
    final = [r for r in records if r["type"] == "final"]
    assert len(final) == 1  # only rank 0 logs
    assert final[0]["world_size"] == 2 and final[0]["ranks_identical"] is True
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2
    # Ranks share the sampler seed and take disjoint slices of each step's windows (6 steps of
    # batch 4 per rank), so their positions agree and their draws differ.
    assert ckpt["rng"][0]["sampler"]["position"] == ckpt["rng"][1]["sampler"]["position"] == 6 * 4 * 2
    # ... and its own dropout masks: rank 1 reseeds torch with seed + 1 after building the model
    # (the same initial weights on both), so the two torch RNG states differ too.
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    resumed = torchrun(*tiny_args(out, "--resume", steps=9))
    assert resumed.returncode == 0, diagnose(resumed)
    final = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "final"]
    assert final[-1]["step"] == 9 and final[-1]["ranks_identical"] is True


def test_a_resume_on_another_number_of_ranks_is_reported_once(tmp_path):
    out = tmp_path / "one"
    first = run_cli("fastlm.train", *tiny_args(out, steps=2))
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = torchrun(*tiny_args(out, "--resume", steps=3))
    assert resumed.returncode == 0, diagnose(resumed)
    assert resumed.stderr.count("written by 1 process(es), resuming with 2") == 1, diagnose(resumed)


@pytest.mark.parametrize("args,needle", [(["--lr", "-1"], "lr must be positive, got -1.0"),
                                          (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag")])
def test_a_command_line_error_is_printed_once_not_once_per_rank(tmp_path, args, needle):
    result = torchrun("--out_dir", tmp_path / "o", *args)
    assert result.returncode != 0, result.stderr
    assert result.stderr.count(needle) == 1, diagnose(result)
    assert "Traceback" not in result.stderr.split(needle)[0]  # rank 0's one line, before the launcher's report
    # torchrun's report: rank 0 exited 2; rank 1 too, or it was still starting when it was stopped.
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, diagnose(result)
    assert not (tmp_path / "o").exists()


def test_the_ddp_wrapper_is_gone_before_the_process_group_is_destroyed(tmp_path, monkeypatch):
    """A DDP Reducer that outlives the process group's registration destroys a gloo group itself,
    holding the GIL, while a gloo worker waits for the GIL: an exit hang (1 run in 12 before this
    was fixed). In-process, in a one-rank gloo group playing a distributed world, the trainer's
    wrapper must be collected by the time destroy_process_group runs."""
    import weakref

    import torch.distributed as dist
    import torch.nn.parallel

    from fastlm import distributed
    from fastlm import train as train_mod

    class OneRankWorld(distributed.World):
        distributed = True  # DDP, all-reduces and barriers, in a group of one

    wrappers = []

    class RecordedDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            wrappers.append(weakref.ref(self))

    alive_at_destroy = []
    destroy = dist.destroy_process_group

    def checked_destroy(*args, **kwargs):
        alive_at_destroy.append(sum(ref() is not None for ref in wrappers))
        return destroy(*args, **kwargs)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(train_mod, "init_world", lambda device: OneRankWorld())
        monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", RecordedDDP)
        monkeypatch.setattr(dist, "destroy_process_group", checked_destroy)
        assert train_mod.main(tiny_args(tmp_path / "run", steps=3)) == 0
    finally:
        if dist.is_initialized():
            destroy()
    assert len(wrappers) == 1 and alive_at_destroy == [0]
