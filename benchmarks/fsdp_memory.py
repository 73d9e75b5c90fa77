"""Per-rank memory of one training step: one process, DDP and FSDP on 2 ranks, with and without
activation checkpointing.

    python benchmarks/fsdp_memory.py [--world 2] [--n_layer 4] [--d_model 256] [--block_size 256]
                                     [--batch_size 8] [--device cpu|cuda] [--out-dir DIR]

Two measurements per layout, each the largest over the ranks:
  state    bytes this rank holds for parameters + gradients + AdamW state after backward (local
           shards of DTensors, tied weights once): what FSDP divides by the world size
  peak     the step's peak of all live tensors (forward, backward and optimizer step), from
           torch.distributed._tools.mem_tracker.MemTracker, a TorchDispatchMode that tracks
           every tensor storage on any device, CPU included; activations are what checkpointing
           lowers

Prints a table and writes benchmarks/results/<device slug>/fsdp_memory.json. On GPUs, the same
command with --device cuda runs nccl (one GPU per rank).
"""
import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYOUTS = (  # name, parallel, activation checkpointing, ranks (None: --world)
    ("single", "single", "none", 1),
    ("ddp", "ddp", "none", None),
    ("fsdp", "fsdp", "none", None),
    ("fsdp + ac selective", "fsdp", "selective", None),
    ("fsdp + ac full", "fsdp", "full", None),
    ("ddp + ac full", "ddp", "full", None),
)


def measure(rank, args, parallel, checkpointing, out_file):
    from torch.distributed._tools.mem_tracker import MemTracker

    from fastlm.config import GPTConfig
    from fastlm.model import GPT, decay_groups
    from fastlm.optim import AdamW
    from fastlm.parallel import apply_activation_checkpointing, apply_fsdp, local_state_bytes

    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                       d_model=args.d_model)
    model = GPT(config).to(device)
    apply_activation_checkpointing(model, checkpointing)
    if parallel == "fsdp":
        apply_fsdp(model, device)
    optimizer = AdamW(decay_groups(model, 0.1), lr=1e-3, max_grad_norm=1.0)
    wrapped = model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    x = torch.randint(0, 256, (args.batch_size, args.block_size), device=device)

    def step():
        _, loss = wrapped(x, x)
        loss.backward()
        state = local_state_bytes(model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return state

    step()  # optimizer state exists from here on, as in every step of a run
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        state = local_state_bytes(model, optimizer)
        state = step()
    state["optimizer"] = local_state_bytes(model, optimizer)["optimizer"]
    peak = tracker.get_tracker_snapshot("peak")
    peak_bytes = max(snapshot["Total"] for dev, snapshot in peak.items() if torch.device(dev).type == device.type)
    torch.save({"state": state, "peak": peak_bytes}, f"{out_file}.{rank}")


def _entry(rank, world, init_file, args, parallel, checkpointing, out_file):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        measure(rank, args, parallel, checkpointing, out_file)
    finally:
        dist.destroy_process_group()


def run_layout(args, parallel, checkpointing, world, tmp):
    out_file = os.path.join(tmp, f"{parallel}-{checkpointing}-{world}")
    init_file = out_file + ".store"
    if parallel == "single":
        measure(0, args, parallel, checkpointing, out_file)
    else:
        mp.start_processes(_entry, args=(world, init_file, args, parallel, checkpointing, out_file),
                           nprocs=world, start_method="spawn")
    results = [torch.load(f"{out_file}.{rank}") for rank in range(world)]
    state = {key: max(r["state"][key] for r in results) for key in results[0]["state"]}
    return {"state": state, "state_total": max(sum(r["state"].values()) for r in results),
            "peak": max(r["peak"] for r in results)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per rank")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/<device slug>/")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, parallel, checkpointing, world in LAYOUTS:
            world = world or args.world
            result = run_layout(args, parallel, checkpointing, world, tmp)
            rows.append({"layout": name, "ranks": world, **result})
            print(f"measured {name}", file=sys.stderr)
    mib = 2 ** 20
    ddp = next(r for r in rows if r["layout"] == "ddp")
    header = (f"{'layout':<22} {'ranks':>5} {'params':>9} {'grads':>9} {'adamw':>9} {'state':>9} "
              f"{'vs ddp':>7} {'peak':>9} {'vs ddp':>7}")
    lines = [f"per-rank memory (MiB) of one step: GPT n_layer {args.n_layer}, d_model {args.d_model}, "
             f"block {args.block_size}, {args.batch_size} sequences per rank, fp32, {args.device}", header,
             "-" * len(header)]
    for r in rows:
        s = r["state"]
        lines.append(f"{r['layout']:<22} {r['ranks']:>5} {s['params'] / mib:>9.2f} {s['grads'] / mib:>9.2f} "
                     f"{s['optimizer'] / mib:>9.2f} {r['state_total'] / mib:>9.2f} "
                     f"{r['state_total'] / ddp['state_total']:>7.2f} {r['peak'] / mib:>9.2f} "
                     f"{r['peak'] / ddp['peak']:>7.2f}")
    print("\n".join(lines))

    from fastlm.bench.common import env_info, results_dir

    device = torch.device(args.device)
    path = os.path.join(results_dir(device, args.out_dir), "fsdp_memory.json")
    with open(path, "w") as f:
        json.dump({"env": env_info(device), "config": vars(args), "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
