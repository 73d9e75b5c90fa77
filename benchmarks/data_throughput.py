"""Data pipeline throughput: `python -m fastlm.prepare` on a generated corpus, and the batch
loader against the training step.

    python benchmarks/data_throughput.py [--corpus_mb 210] [--workers 2] [--device cpu]

The corpus (not committed) is the embedded Shakespeare repeated with variations -- each copy's
paragraphs shuffled and every line's words rotated, split into .txt files and .jsonl documents --
written once to --corpus_dir. Prepare runs with the byte tokenizer and with tiktoken using the
GPT-2 regex and a byte-level BPE of --bpe_vocab tokens trained here (tiktoken's real GPT-2 file
needs a download; the speed depends on the regex and the rank table, not on which merges it holds).
The loader is timed alone (BatchSampler.next() over the prepared shards) and beside the training
step it feeds (the default model on CPU, GPT-2 small in bf16 on CUDA). Writes benchmarks/results/<device>/data.json.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from fastlm.bench.common import device_slug, env_info
from fastlm.data import BatchSampler, embedded_corpus, load_data
from fastlm.prepare import prepare_shards

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def make_corpus(directory, target_mb):
    """Copies of the embedded corpus with shuffled paragraphs and rotated words; half .txt, half .jsonl."""
    marker = os.path.join(directory, f".complete-{target_mb}")
    if os.path.exists(marker):
        return
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    paragraphs = [p for p in embedded_corpus().split("\n\n") if p.strip()]
    rng = np.random.default_rng(0)
    written, copy = 0, 0
    while written < target_mb * 1e6:
        order = rng.permutation(len(paragraphs))
        shift = copy % 7

        def vary(paragraph):
            lines = []
            for line in paragraph.split("\n"):
                words = line.split(" ")
                lines.append(" ".join(words[shift % len(words):] + words[:shift % len(words)]))
            return "\n".join(lines)

        docs = [vary(paragraphs[i]) for i in order]
        if copy % 2:
            text = "\n\n".join(docs)
            path = os.path.join(directory, f"copy_{copy:04d}.txt")
            with open(path, "w") as f:
                f.write(text)
        else:
            path = os.path.join(directory, f"copy_{copy:04d}.jsonl")
            with open(path, "w") as f:
                for start in range(0, len(docs), 40):
                    f.write(json.dumps({"text": "\n\n".join(docs[start:start + 40])}) + "\n")
        written += os.path.getsize(path)
        copy += 1
    open(marker, "w").close()


def tiktoken_file(directory, vocab):
    """A .tiktoken file from a byte-level BPE trained here (ranks = the BPE's ids in merge order)."""
    import base64

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = os.path.join(directory, f"bpe{vocab}.tiktoken")
    if os.path.exists(path):
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([embedded_corpus()], trainers.BpeTrainer(
        vocab_size=vocab, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # byte-level BPE spells bytes as printable characters (GPT-2's bytes_to_unicode); undo it
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    decode = {chr(c): b for b, c in zip(printable, chars)}
    ranks = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    with open(path, "w") as f:
        for rank, (token, _) in enumerate(ranks):
            f.write(f"{base64.b64encode(bytes(decode[c] for c in token)).decode()} {rank}\n")
    return path


def time_prepare(corpus, out, workers, **kwargs):
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    manifest = prepare_shards(corpus, out, workers=workers, progress=False, **kwargs)
    seconds = time.perf_counter() - started
    tokens = manifest["train_tokens"] + manifest["val_tokens"]
    return {"text_mb": manifest["text_bytes"] / 1e6, "tokens": tokens, "seconds": seconds,
            "mb_per_s": manifest["text_bytes"] / 1e6 / seconds, "tokens_per_s": tokens / seconds,
            "shards": len(manifest["shards"])}


def time_loader(data_dir, batch_size, block_size, order, device, repeats=300):
    data = load_data(data_dir, "byte", None, block_size)
    sampler = BatchSampler(data.train, block_size, batch_size, seed=0, device=device, order=order)
    for _ in range(20):
        sampler.next()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sampler.next()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def time_step(device, steps=8):
    """(case, median ms) of the fused training step the loader feeds: the default model in fp32 on
    CPU, the end-to-end benchmark's GPT-2 small in bf16 on CUDA (timed with CUDA events)."""
    import torch

    from fastlm.bench.common import time_ms
    from fastlm.bench.e2e import CASES, DTYPE, make_trainer

    device = torch.device(device)
    case = CASES[device.type][0]
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(case, "fused", device, DTYPE[device.type], out)
        trainer.train_step()
        return case, time_ms(trainer.train_step, device=device, warmup=0, repeats=steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus_dir", default=os.path.join(tempfile.gettempdir(), "fastlm-data-bench", "corpus"))
    p.add_argument("--corpus_mb", type=int, default=210)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--bpe_vocab", type=int, default=32768)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip_prepare", action="store_true", help="reuse the shards of an earlier run")
    args = p.parse_args(argv)
    work = os.path.dirname(args.corpus_dir)
    make_corpus(args.corpus_dir, args.corpus_mb)
    corpus_bytes = sum(os.path.getsize(os.path.join(args.corpus_dir, n)) for n in os.listdir(args.corpus_dir))
    print(f"corpus: {corpus_bytes / 1e6:.0f} MB in {len(os.listdir(args.corpus_dir)) - 1} files at {args.corpus_dir}")
    rows = []
    if not args.skip_prepare:
        for name, kwargs in (("byte", dict(tokenizer_kind="byte")),
                             (f"tiktoken gpt2-regex bpe{args.bpe_vocab}",
                              dict(tokenizer_kind="gpt2", tokenizer_file=tiktoken_file(work, args.bpe_vocab)))):
            out = os.path.join(work, "shards-" + name.split()[0])
            row = {"tokenizer": name, "workers": args.workers, **time_prepare(args.corpus_dir, out, args.workers,
                                                                              **kwargs)}
            print(f"prepare {name}: {row['text_mb']:.0f} MB, {row['tokens']:,} tokens in {row['seconds']:.1f} s: "
                  f"{row['mb_per_s']:.1f} MB/s, {row['tokens_per_s'] / 1e6:.2f}M tok/s", flush=True)
            rows.append(row)
    case, step_ms = time_step(args.device)
    loader = {}
    for order in ("random", "sequential"):
        loader[order] = time_loader(os.path.join(work, "shards-tiktoken"), case["batch_size"], case["block_size"],
                                    order, args.device)
        print(f"loader ({order}, batch {case['batch_size']} x {case['block_size'] + 1} from memmapped shards): "
              f"{loader[order]:.3f} ms/batch vs training step {step_ms:.1f} ms ({case['name']}): "
              f"{100 * loader[order] / step_ms:.2f}% of the step", flush=True)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", device_slug(args.device))
    os.makedirs(results, exist_ok=True)
    report = {"benchmark": "data", "env": env_info(args.device), "corpus_mb": corpus_bytes / 1e6,
              "corpus": "embedded Shakespeare repeated with shuffled paragraphs and rotated words, .txt + .jsonl",
              "prepare": rows, "loader_ms": loader, "step_ms": step_ms, "step_case": case["name"],
              "loader_share_of_step": {k: v / step_ms for k, v in loader.items()}}
    path = os.path.join(results, "data.json")
    if args.skip_prepare and os.path.exists(path):
        with open(path) as f:
            report["prepare"] = json.load(f).get("prepare", [])
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
