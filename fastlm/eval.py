"""`python -m fastlm.eval`: perplexity and bits per byte on any data, and HellaSwag accuracy.

    python -m fastlm.eval --ckpt out/ --data valid.txt            # loss, perplexity, bits per byte
    python -m fastlm.eval --ckpt out/ --task hellaswag --data hellaswag_val.jsonl

Language modelling (--task lm, the default): the data (a UTF-8 text file, a directory of .txt
files, a token file, token shards as training reads them -- a directory or glob from fastlm.prepare,
llm.c or nanoGPT, scored on their validation split, or one shard file, scored whole -- or nothing
for the embedded corpus's validation split) is cut into windows of block_size + 1 tokens that
overlap by one token, so every token but the first is predicted once, from the context since its
window began. Perplexity is per token of the model's own tokenizer; bits per byte (total loss in
bits / UTF-8 bytes of the predicted text) does not depend on the tokenizer, so models with
different tokenizers compare fairly on it.

HellaSwag (--task hellaswag): the jsonl file as published (one object per line with "ctx" (or
"ctx_a"/"ctx_b"), four "endings" and a "label"). Each ending is scored by the model's loss on its
tokens after the context (" " + ending): acc takes the ending of lowest total loss, acc_norm the
lowest mean loss per token (length-normalised), as llm.c and nanoGPT-style trainers report them.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from fastlm.config import ConfigError, OneLineParser, fail, one_line_warnings
from fastlm.export import MODEL_PATH_HELP, load_model

PROG = "python -m fastlm.eval"


# --------------------------------------------------------------------------- perplexity, bits per byte

def load_eval_tokens(path, tokenizer):
    """Token ids (1-D int64 numpy) of the data at `path` in `tokenizer`'s vocabulary.

    A token file written with another tokenizer is decoded and re-encoded; token shards must come
    from the same tokenizer (a DataError otherwise). Shards are read by the training loader, which
    checks them: a directory or glob gives its validation split (it may hold nothing else: nanoGPT's
    val.bin alone, llm.c's *_val_*.bin, fastlm.prepare's val shards), one shard file all of its tokens.
    No path means the validation split (last 10%) of the embedded corpus, as training holds it out.
    """
    from fastlm.data import (_read_text_file, embedded_corpus, is_token_file, load_data, read_token_file,
                             text_files, tokenizer_from_dict)
    from fastlm.shards import looks_like_shards

    if path is None:
        ids = np.asarray(tokenizer.encode(embedded_corpus()), dtype=np.int64)
        return ids[len(ids) - len(ids) // 10:]
    if is_token_file(path):
        tokens, header = read_token_file(path)
        if header["tokenizer"] == tokenizer.to_dict():
            return np.asarray(tokens, dtype=np.int64)
        text = tokenizer_from_dict(header["tokenizer"]).decode(np.asarray(tokens).tolist())
    elif looks_like_shards(path):
        # block_size 1: evaluation pads its last window, so each split needs only 2 tokens.
        data = load_data(path, tokenizer.kind, None, 1, tokenizer=tokenizer, need_train=False)
        one_file = os.path.isfile(path) and os.path.basename(path) not in ("train.bin", "val.bin")
        splits = (data.train, data.val) if one_file else (data.val,)  # a lone shard is split 90/10 for training
        return np.concatenate([np.asarray(split, dtype=np.int64) for split in splits])
    else:
        text = "".join(_read_text_file(p) for p in text_files(path))
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(ids) < 2:
        raise ConfigError(f"{path} holds {len(ids)} token(s); evaluation needs at least 2")
    return ids


@torch.no_grad()
def evaluate_lm(model, tokenizer, tokens, batch_size=8, max_tokens=None):
    """Loss of `model` on token ids (1-D) in windows of block_size + 1 overlapping by one token.

    Returns {"loss" (nats/token), "ppl", "bits_per_byte", "tokens", "bytes"}.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if max_tokens is not None:
        tokens = tokens[:max_tokens + 1]
    if len(tokens) < 2:
        raise ConfigError(f"evaluation needs at least 2 tokens, got {len(tokens)}")
    device = model.wte.weight.device
    T = model.config.block_size
    was_training = model.training
    model.eval()
    starts = list(range(0, len(tokens) - 1, T))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        windows = [tokens[s:s + T + 1] for s in starts[i:i + batch_size]]
        width = max(len(w) for w in windows)
        x = torch.zeros(len(windows), width - 1, dtype=torch.long)
        y = torch.full((len(windows), width - 1), -100, dtype=torch.long)  # ignore_index pads the last window
        for row, w in enumerate(windows):
            x[row, :len(w) - 1] = torch.from_numpy(w[:-1])
            y[row, :len(w) - 1] = torch.from_numpy(w[1:])
        logits, _ = model(x.to(device))
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    model.train(was_training)
    n_bytes = len(tokenizer.decode(tokens[1:].tolist()).encode("utf-8"))
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
            "tokens": count, "bytes": n_bytes}


# --------------------------------------------------------------------------- HellaSwag

def read_hellaswag(path, limit=None):
    """[(context, [four endings], label)] from a HellaSwag jsonl file."""
    if not os.path.isfile(path):
        raise ConfigError(f"HellaSwag file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ctx = item["ctx"] if "ctx" in item else f"{item['ctx_a']} {item['ctx_b'].capitalize()}".strip()
                endings, label = list(item["endings"]), int(item["label"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{n}: not a HellaSwag record ({type(exc).__name__}: {exc})") from None
            if not (isinstance(ctx, str) and ctx.strip() and all(isinstance(e, str) for e in endings)):
                # An ending after no context would have a first token that nothing predicts.
                raise ConfigError(f"{path}:{n}: a HellaSwag record needs a non-empty context and text endings")
            if not 0 <= label < len(endings):
                raise ConfigError(f"{path}:{n}: label {label} is not the index of one of {len(endings)} endings")
            examples.append((ctx, endings, label))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ConfigError(f"{path} holds no HellaSwag records")
    return examples


@torch.no_grad()
def score_endings(model, tokenizer, context, endings):
    """(total loss, mean loss per token) of each ending's tokens after the context, lists of floats."""
    device = model.wte.weight.device
    T = model.config.block_size
    ctx_ids = tokenizer.encode(context)
    rows = []
    for ending in endings:
        end_ids = tokenizer.encode(" " + ending)[:T]
        ids = (ctx_ids + end_ids)[-(T + 1):]  # keep the ending whole, drop context from the left
        rows.append((ids, len(end_ids)))
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (ids, n_end) in enumerate(rows):
        x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[r, len(ids) - 1 - n_end:len(ids) - 1] = torch.tensor(ids[-n_end:])  # only the ending's tokens count
    logits, _ = model(x.to(device))
    losses = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), ignore_index=-100, reduction="none")
    totals = losses.sum(dim=1)
    counts = (y != -100).sum(dim=1).clamp(min=1).to(totals.device)
    return totals.tolist(), (totals / counts).tolist()


def evaluate_hellaswag(model, tokenizer, examples):
    """{"acc", "acc_norm", "examples"} of `model` on [(context, endings, label)]."""
    was_training = model.training
    model.eval()
    right = right_norm = 0
    for context, endings, label in examples:
        totals, means = score_endings(model, tokenizer, context, endings)
        right += int(min(range(len(endings)), key=totals.__getitem__) == label)
        right_norm += int(min(range(len(endings)), key=means.__getitem__) == label)
    model.train(was_training)
    return {"acc": right / len(examples), "acc_norm": right_norm / len(examples), "examples": len(examples)}


def hellaswag_metrics(model, tokenizer, examples):
    """{"hellaswag_acc", "hellaswag_acc_norm"}: the columns a training run's eval record gets."""
    result = evaluate_hellaswag(model, tokenizer, examples)
    return {"hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]}


# --------------------------------------------------------------------------- command line

def build_parser():
    p = OneLineParser(prog=PROG, description="Evaluate a fastlm checkpoint.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help=MODEL_PATH_HELP)
    p.add_argument("--task", choices=("lm", "hellaswag"), default="lm")
    p.add_argument("--data", default=None,
                   help="lm: text file, directory of .txt files, token file, or token shards (a directory or glob: "
                        "their validation split; one shard file: all of it) (default: the embedded corpus's "
                        "validation split); hellaswag: the jsonl file")
    p.add_argument("--batch-size", "--batch_size", type=int, default=8, dest="batch_size")
    p.add_argument("--max-tokens", "--max_tokens", type=int, default=None, dest="max_tokens",
                   help="lm: score only the first this many predicted tokens")
    p.add_argument("--limit", type=int, default=None, help="hellaswag: only the first this many examples")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def check_args(args):
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise ConfigError(f"--max-tokens must be positive (the number of tokens to score), got {args.max_tokens}")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be positive (the number of HellaSwag examples), got {args.limit}")
    if args.task == "lm" and args.limit is not None:
        raise ConfigError("--limit applies to --task hellaswag; for --task lm use --max-tokens")
    if args.task == "hellaswag" and args.max_tokens is not None:
        raise ConfigError("--max-tokens applies to --task lm; for --task hellaswag use --limit")
    if args.task == "hellaswag" and args.data is None:
        raise ConfigError("--task hellaswag needs --data FILE (the HellaSwag jsonl file)")


def main(argv=None):
    from fastlm.distributed import resolve_device

    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        device = resolve_device(args.device)
        model, tokenizer = load_model(args.ckpt, device)
        if args.task == "lm":
            tokens = load_eval_tokens(args.data, tokenizer)
            result = evaluate_lm(model, tokenizer, tokens, batch_size=args.batch_size, max_tokens=args.max_tokens)
            line = (f"loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | bits/byte {result['bits_per_byte']:.4f} "
                    f"| {result['tokens']:,} tokens, {result['bytes']:,} bytes")
        else:
            result = evaluate_hellaswag(model, tokenizer, read_hellaswag(args.data, args.limit))
            line = f"hellaswag acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} | {result['examples']} examples"
    except ConfigError as exc:
        fail(PROG, str(exc))
    print(json.dumps({"task": args.task, **result}) if args.json else line)
    return 0


if __name__ == "__main__":
    one_line_warnings(PROG)  # the command line only: main() called in-process leaves warnings as they are
    sys.exit(main())
