"""`python -m fastlm.prepare`: tokenize a corpus once into token shards for training.

    python -m fastlm.prepare --data corpus/ --tokenizer gpt2 --out data/corpus --workers 8
    python -m fastlm.train --data data/corpus --tokenizer gpt2 ...

Inputs: a text file, or a directory tree of .txt, .jsonl / .jsonl.gz (one JSON object per line,
the text under --text_field) and .parquet files (Hugging Face datasets; needs pyarrow), any mix.
Each .txt file, JSON line or parquet row is one document; tokenizers with an end-of-text token
(tiktoken's) put it before every document, as llm.c and modded-nanogpt do.

Streaming: files are read piece by piece (text files at line breaks where no tokenizer can merge
across), the pieces are tokenized in --workers processes with a bounded queue, and tokens go
straight to shards of --shard_tokens tokens in the llm.c format (fastlm.shards): first the
validation shard val_000000.bin (--val_tokens tokens), then train_000001.bin, ... Memory holds
one shard and a few pieces, whatever the corpus size. manifest.json, written last, records the
tokenizer, vocabulary, token counts, each shard's largest id and the source files with their
sizes and fingerprints.

Interrupted, a re-run with the same arguments resumes after the last complete shard: after each
shard a small state file records where in the input the next piece starts and the tokens already
read past the shard. Finished, a re-run with the same inputs and settings only returns the
manifest; one with other inputs or settings stops with an error and leaves the shards alone.

`--out FILE.tok` still writes the single token file of earlier versions.
"""
import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time

import numpy as np

from fastlm.config import ConfigError, OneLineParser, fail, one_line_warnings, parse_bool
from fastlm.data import (STRUCTURED_SUFFIXES, BPETokenizer, ByteTokenizer, DataError, _read_text_file,
                         document_tokens, make_tokenizer, text_files, tokenizer_from_dict, write_token_file)
from fastlm.files import atomic_write, atomic_write_text
from fastlm.shards import MANIFEST_FORMAT, MANIFEST_NAME, shard_dtype, write_shard
from fastlm.tokenizers import TIKTOKEN_NAMES

PROG = "python -m fastlm.prepare"
INPUT_SUFFIXES = (".txt", *STRUCTURED_SUFFIXES)
STATE_NAME = ".prepare-state.json"
CARRY_NAME = ".prepare-carry.npy"
PIECE_BYTES = 1 << 20  # text per task sent to a worker
_WHITESPACE = b" \t\n\r\x0b\x0c"


def build_parser():
    p = OneLineParser(prog=PROG, description="Tokenize text into token shards (llm.c format) for fastlm.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="text file, or directory of .txt/.jsonl/.jsonl.gz/.parquet files")
    p.add_argument("--out", required=True, help="output directory for the shards (or a FILE.tok token file)")
    p.add_argument("--tokenizer", choices=("byte", "bpe", *TIKTOKEN_NAMES), default="byte",
                   help="byte, bpe (trained here) or a tiktoken encoding")
    p.add_argument("--tokenizer-file", "--tokenizer_file", dest="tokenizer_file", default=None,
                   help="local .tiktoken file for a tiktoken encoding (no download)")
    p.add_argument("--vocab-size", "--vocab_size", type=int, default=4096, dest="vocab_size",
                   help="BPE vocabulary size to train (bpe only)")
    p.add_argument("--bpe-train-mb", "--bpe_train_mb", type=float, default=200, dest="bpe_train_mb",
                   help="train the BPE on the first this many MB of text")
    p.add_argument("--text-field", "--text_field", default="text", dest="text_field",
                   help="field holding the text in .jsonl and .parquet inputs")
    p.add_argument("--shard-tokens", "--shard_tokens", type=int, default=100_000_000, dest="shard_tokens",
                   help="tokens per shard (llm.c uses 1e8)")
    # The default is said in the help: SUPPRESS keeps argparse from adding "(default: None)" after it.
    p.add_argument("--val-tokens", "--val_tokens", type=int, default=argparse.SUPPRESS, dest="val_tokens",
                   help="tokens in the validation shard (default: about 10%% of the corpus, at most 10M)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--progress", type=parse_bool, nargs="?", const=True, default=True, metavar="BOOL",
                   help="show the progress bar")
    return p


# --------------------------------------------------------------------------- inputs

def input_files(path):
    """The input files under `path` (sorted), or `path` itself."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if name.endswith(INPUT_SUFFIXES))
        if not files:
            raise DataError(f"no .txt, .jsonl, .jsonl.gz or .parquet files in {path}")
        return files
    if not os.path.isfile(path):
        raise DataError(f"data path not found: {path}")
    return [path]


def fingerprint(path, edge=1 << 20):
    """A cheap content fingerprint: sha256 of the size and the first and last MiB."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            digest.update(f.read(edge))
    return digest.hexdigest()[:16]


def _safe_cut(data):
    """The last offset in `data` where a text file can be cut without changing its tokens: after a
    newline between two non-space ASCII characters (no regex pre-tokenizer of byte-level BPE,
    GPT-2 or cl100k/o200k builds a piece across such a line break). 0 when there is none."""
    pos = len(data)
    while True:
        pos = data.rfind(b"\n", 0, pos)
        if pos <= 0 or pos + 1 >= len(data):
            return 0
        before, after = data[pos - 1], data[pos + 1]
        if before not in _WHITESPACE and before < 0x80 and 0x20 < after < 0x7f:
            return pos + 1


def _text_pieces(path, start, piece_bytes):
    """(text, starts_document, position after) pieces of a text file from byte offset `start`."""
    with open(path, "rb") as f:
        f.seek(start)
        pending, offset = b"", start
        while True:
            chunk = f.read(piece_bytes)
            data = pending + chunk
            if not chunk:
                if data:
                    yield _decode(data, path, offset), offset == 0, offset + len(data)
                return
            cut = _safe_cut(data) if len(data) < 16 * piece_bytes else (data.rfind(b"\n") + 1 or len(data))
            if cut == 0:
                pending = data
                continue
            yield _decode(data[:cut], path, offset), offset == 0, offset + cut
            pending, offset = data[cut:], offset + cut


def _decode(data, path, offset):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {offset + exc.start})") from None


def _json_text(line, path, number, text_field):
    where = f"{path}:{number + 1 if isinstance(number, int) else number}"
    try:
        value = json.loads(line)[text_field]
    except (ValueError, TypeError):
        raise DataError(f"{where}: not a JSON object") from None
    except KeyError:
        raise DataError(f"{where}: no field {text_field!r} (choose it with --text_field)") from None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is not a string")
    return value


def _jsonl_documents(path, start, text_field):
    """(text, position after) per line; position = byte offset (plain) or line number (.gz)."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            for number, line in enumerate(f):
                if number >= start and line.strip():
                    yield _json_text(line, path, number, text_field), number + 1
        return
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        for number, line in enumerate(f):
            offset += len(line)
            if line.strip():
                yield _json_text(line, path, number if start == 0 else f"byte {offset}", text_field), offset


def _parquet_documents(path, start, text_field):
    """(text, rows read) per row, from row `start`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow (or fastlm[data])") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path} is not a parquet file ({type(exc).__name__})") from None
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (choose it with --text_field; columns: "
                        f"{', '.join(table.schema_arrow.names[:8])})")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
        if row + batch.num_rows <= start:
            row += batch.num_rows
            continue
        for text in batch.column(0).to_pylist()[max(0, start - row):]:
            row = max(row, start) + 1
            yield text or "", row


def read_pieces(files, cursor, text_field, piece_bytes=None):
    """Tasks for the tokenizer workers, from `cursor` = (file index, position) on.

    Yields (pieces, cursor after, text bytes), pieces a list of (text, starts_document).
    """
    piece_bytes = piece_bytes or PIECE_BYTES
    file_index, position = cursor
    for index in range(file_index, len(files)):
        path, start = files[index], (position if index == file_index else 0)
        if path.endswith(".parquet") or path.endswith((".jsonl", ".jsonl.gz")):
            source = (_parquet_documents(path, start, text_field) if path.endswith(".parquet")
                      else _jsonl_documents(path, start, text_field))
            batch, size = [], 0
            for text, after in source:
                batch.append((text, True))
                size += len(text)
                if size >= piece_bytes:
                    yield batch, (index, after), size
                    batch, size = [], 0
            if batch:
                yield batch, (index + 1, 0), size
        else:
            for text, starts_document, after in _text_pieces(path, start, piece_bytes):
                yield [(text, starts_document)], (index, after), len(text)
        position = 0
    return


# --------------------------------------------------------------------------- tokenizing

_worker_tokenizer = None


def _init_worker(spec):
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_dict(spec)


def _init_pool_worker(spec, parent_pid):
    """A tokenizer process: it dies with prepare (on Linux), instead of living on to print a BrokenPipeError
    traceback per task when prepare is killed (kill -9, the OOM killer)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent_pid:  # prepare died before the line above took effect
            os._exit(1)
    _init_worker(spec)


def _tokenize(pieces):
    """Token ids (the shard dtype) of the pieces of one task, and the number of documents they start."""
    arrays = [document_tokens(_worker_tokenizer, text) if starts else _worker_tokenizer.encode_array(text)
              for text, starts in pieces]
    dtype = shard_dtype(_worker_tokenizer.vocab_size)  # half the bytes back from the worker for uint16
    ids = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return ids, sum(1 for _, starts in pieces if starts)


def _tokenized(tasks, spec, workers):
    """(ids, documents, cursor, text bytes) per task, in input order; at most 2 * workers tasks in flight."""
    if workers <= 1:
        _init_worker(spec)
        for pieces, cursor, size in tasks:
            yield (*_tokenize(pieces), cursor, size)
        return
    from collections import deque

    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_pool_worker, initargs=(spec, os.getpid())) as pool:
        pending = deque()
        for pieces, cursor, size in tasks:
            pending.append((pool.apply_async(_tokenize, (pieces,)), cursor, size))
            if len(pending) >= 2 * workers:
                result, c, s = pending.popleft()
                yield (*result.get(), c, s)
        while pending:
            result, c, s = pending.popleft()
            yield (*result.get(), c, s)


# --------------------------------------------------------------------------- shards

class ShardWriter:
    """Cuts a token stream into val_000000.bin (val_tokens) then train_NNNNNN.bin (shard_tokens each)."""

    def __init__(self, out, val_tokens, shard_tokens, dtype, shards=(), carry=None):
        self.out, self.val_tokens, self.shard_tokens, self.dtype = out, val_tokens, shard_tokens, dtype
        self.shards = list(shards)  # manifest entries of the complete shards
        self.buffer = [carry] if carry is not None and len(carry) else []
        self.buffered = sum(len(b) for b in self.buffer)

    def _next_size(self):
        return self.val_tokens if not self.shards else self.shard_tokens

    def add(self, ids, documents):
        """Append tokens; write every shard they complete. Returns whether one was written."""
        self.buffer.append(ids)
        self.buffered += len(ids)
        wrote = False
        while self.buffered >= self._next_size():
            self._write(self._next_size())
            wrote = True
        return wrote

    def _write(self, count):
        tokens = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        shard, rest = tokens[:count], tokens[count:]
        index = len(self.shards)
        name = f"{'val' if index == 0 else 'train'}_{index:06d}.bin"
        write_shard(os.path.join(self.out, name), shard, self.dtype)
        self.shards.append({"file": name, "split": "val" if index == 0 else "train", "tokens": int(len(shard)),
                            "max_token": int(shard.max()) if len(shard) else 0})
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def carry(self):
        return np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.uint32)

    def finish(self):
        if self.buffered:
            self._write(self.buffered)


def _default_val_tokens(files, tokenizer, text_field):
    """About a tenth of the corpus (estimated from its text bytes), at most 10M tokens, at least 1."""
    per_token = 1 if isinstance(tokenizer, ByteTokenizer) else 4
    estimate = sum(_text_bytes_estimate(p, text_field) for p in files) // per_token
    return int(max(1, min(10_000_000, estimate // 10)))


def _text_bytes_estimate(path, text_field):
    """Bytes of text in `path` without reading it: a .gz file's recorded uncompressed size, a parquet
    file's uncompressed size of the text column; the file size for the rest."""
    size = os.path.getsize(path)
    if path.endswith(".gz"):
        # gzip ends with the uncompressed size mod 2**32: trusted below 512 MiB compressed (at most 8x)
        if 18 <= size < 512 * 2**20:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                uncompressed = int.from_bytes(f.read(4), "little")
            if uncompressed >= size:
                return uncompressed
        return 3 * size
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
            sizes = [g.column(j).total_uncompressed_size for g in groups for j in range(g.num_columns)
                     if g.column(j).path_in_schema == text_field]
            if sizes:
                return sum(sizes)
        except Exception:  # no pyarrow, or not a parquet file: reading it says so
            pass
        return 2 * size
    return size


def _bpe_training_texts(files, text_field, limit_bytes):
    size = 0
    for pieces, _, piece_size in read_pieces(files, (0, 0), text_field):
        yield from (text for text, _ in pieces)
        size += piece_size
        if size >= limit_bytes:
            return


def prepare_shards(data, out, tokenizer_kind="byte", vocab_size=4096, tokenizer_file=None, text_field="text",
                   shard_tokens=100_000_000, val_tokens=None, workers=1, progress=False, bpe_train_mb=200):
    """Tokenize `data` into shards in the directory `out`; resumes an interrupted run there.

    Returns the manifest (dict); a finished prepare in `out` of the same inputs and settings is
    returned as it is. Raises DataError / ConfigError for unusable input or settings, or for a
    prepare in `out` of other ones; a run that fails before its first shard removes the
    directories it created.
    """
    _check_positive(shard_tokens=shard_tokens, val_tokens=val_tokens, workers=workers, vocab_size=vocab_size,
                    bpe_train_mb=bpe_train_mb)
    files = input_files(data)
    sources = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "fingerprint": fingerprint(p)}
               for p in files]
    if not any(s["bytes"] for s in sources):
        raise DataError(f"{data} is empty")
    if os.path.isfile(out):
        raise ConfigError(f"--out {out} is a file; give a directory for shards (or FILE.tok for a token file)")
    settings = {"tokenizer_kind": tokenizer_kind, "text_field": text_field, "shard_tokens": shard_tokens,
                "sources": sources}
    if tokenizer_kind == "bpe":  # the trained vocabulary depends on them too
        settings.update(vocab_size=vocab_size, bpe_train_mb=bpe_train_mb)
    manifest_path, state_path = os.path.join(out, MANIFEST_NAME), os.path.join(out, STATE_NAME)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        recorded, unrecorded = _manifest_settings(manifest)
        _check_same_settings(out, "a finished", recorded, manifest["val_tokens"],
                             {k: v for k, v in settings.items() if k not in unrecorded}, val_tokens)
        if tokenizer_kind == "bpe" and unrecorded and manifest["vocab_size"] > vocab_size:
            # a trained vocabulary never exceeds the size asked for: this one was asked larger
            raise ConfigError(f"{out} holds a finished prepare of other inputs or settings (its bpe vocabulary has "
                              f"{manifest['vocab_size']} tokens, more than --vocab_size {vocab_size}); "
                              "remove the directory to start afresh, or choose another --out")
        return manifest  # already complete
    state = _read_state(state_path)
    if state is not None:
        _check_same_settings(out, "an interrupted", state["settings"], state["val_tokens"], settings, val_tokens)
        tokenizer = tokenizer_from_dict(state["tokenizer"])
        if tokenizer_file and hasattr(tokenizer, "file"):
            tokenizer.file = os.path.abspath(tokenizer_file)
        carry = np.load(os.path.join(out, CARRY_NAME))
    else:
        # a run killed before its first resume point leaves at most half-written temporaries
        if os.path.isdir(out) and any(".tmp-" not in name for name in os.listdir(out)):
            raise ConfigError(f"--out {out} exists and is not empty; choose a new directory")
        if tokenizer_kind == "bpe":
            texts = _bpe_training_texts(files, text_field, bpe_train_mb * 1e6)
            tokenizer = BPETokenizer.train(texts, vocab_size)
        else:
            tokenizer = make_tokenizer(tokenizer_kind, vocab_size, tokenizer_file=tokenizer_file)
        state = {"settings": settings, "tokenizer": tokenizer.to_dict(),
                 "val_tokens": val_tokens or _default_val_tokens(files, tokenizer, text_field),
                 "shards": [], "cursor": [0, 0], "documents": 0, "text_bytes": 0}
        carry = None
    if getattr(tokenizer, "file", None) is None and hasattr(tokenizer, "encoding"):
        tokenizer.encoding  # a missing tiktoken file is one line now, not one per worker
    created = _missing_dirs(out)
    os.makedirs(out, exist_ok=True)
    try:
        return _write_shards(data, out, files, tokenizer, state, carry, workers, progress)
    except BaseException:
        _remove_dirs_if_empty(created)  # a run that stops before its first shard leaves no directory behind
        raise


def _check_positive(**options):
    for name, value in options.items():
        if value is not None and not value > 0:  # `not >` also refuses nan
            raise ConfigError(f"--{name} must be positive, got {value}")


def _manifest_settings(manifest):
    """The settings a finished prepare ran with, and the names of those it did not record.

    A manifest that an earlier fastlm wrote holds no settings; they are read off its fields, and the
    bpe vocabulary settings (vocab_size, bpe_train_mb) are then unknown: the caller cannot compare them."""
    spec = manifest["tokenizer"]
    if manifest.get("settings"):
        return {**manifest["settings"], "sources": manifest["sources"]}, frozenset()
    settings = {"tokenizer_kind": spec.get("name", spec["kind"]), "text_field": manifest["text_field"],
                "shard_tokens": manifest["shard_tokens"], "sources": manifest["sources"]}
    return settings, frozenset({"vocab_size", "bpe_train_mb"})


def _check_same_settings(out, which, recorded, recorded_val_tokens, settings, val_tokens):
    """ConfigError unless a prepare recorded in `out` used these inputs and settings (and this
    --val_tokens, where one is given)."""
    differ = sorted(key for key in recorded.keys() | settings.keys() if recorded.get(key) != settings.get(key))
    if val_tokens is not None and val_tokens != recorded_val_tokens:
        differ.append("val_tokens")
    if differ:
        # named as the user gave them: the flags, and the input files for their sizes and fingerprints
        names = ["the input files" if key == "sources" else "--" + key.replace("_kind", "") for key in differ]
        raise ConfigError(f"{out} holds {which} prepare of other inputs or settings ({', '.join(names)} differ); "
                          "remove the directory to start afresh, or choose another --out")


def _missing_dirs(path):
    """The directories that os.makedirs(path) would create, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_dirs_if_empty(directories):
    for path in directories:
        try:
            os.rmdir(path)  # only ever removes an empty directory
        except OSError:
            return


def _write_shards(data, out, files, tokenizer, state, carry, workers, progress):
    """Tokenize `files` from the state's cursor on into shards in `out`, then write the manifest."""
    settings, val_tokens = state["settings"], state["val_tokens"]
    shard_tokens, sources = settings["shard_tokens"], settings["sources"]
    dtype = shard_dtype(tokenizer.vocab_size)
    writer = ShardWriter(out, val_tokens, shard_tokens, dtype, state["shards"], carry)
    spec = tokenizer.to_dict()
    documents, text_bytes = state["documents"], state["text_bytes"]
    bar = _progress_bar(sources, state["cursor"], progress)
    started, done_bytes, new_tokens = time.perf_counter(), 0, 0
    tasks = read_pieces(files, tuple(state["cursor"]), settings["text_field"])
    try:
        for ids, docs, cursor, size in _tokenized(tasks, spec, workers):
            if len(ids) and int(ids.max()) >= tokenizer.vocab_size:
                raise DataError(f"token id {int(ids.max())} beyond the tokenizer's vocabulary {tokenizer.vocab_size}")
            documents += docs
            text_bytes += size
            new_tokens += len(ids)
            if writer.add(ids.astype(dtype), docs):
                _save_state(out, state, writer, cursor, documents, text_bytes)
            done_bytes += size
            if bar is not None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.n = _consumed_bytes(sources, cursor)
                bar.set_postfix_str(f"{done_bytes / elapsed / 1e6:.1f} MB/s text, "
                                    f"{new_tokens / elapsed / 1e6:.2f}M tok/s, {len(writer.shards)} shards",
                                    refresh=False)
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    total = sum(s["tokens"] for s in writer.shards) + writer.buffered
    if total == 0:
        raise DataError(f"{data} holds no text (its documents are empty)")
    if total <= val_tokens:
        raise DataError(f"{data} gives {total:,} tokens, not more than --val_tokens {val_tokens:,}: no training "
                        "tokens would be left (lower --val_tokens)")
    writer.finish()
    manifest = {
        "format": MANIFEST_FORMAT, "tokenizer": spec, "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name, "shard_tokens": shard_tokens, "text_field": settings["text_field"],
        "val_tokens": writer.shards[0]["tokens"], "train_tokens": total - writer.shards[0]["tokens"],
        "documents": documents, "text_bytes": text_bytes,
        "end_of_text": getattr(tokenizer, "eot_token", None) if hasattr(tokenizer, "encoding") else None,
        "shards": writer.shards, "sources": sources,
        "settings": {key: value for key, value in settings.items() if key != "sources"},  # checked on a re-run
    }
    atomic_write_text(os.path.join(out, MANIFEST_NAME), json.dumps(manifest, indent=1) + "\n")
    for name in (STATE_NAME, CARRY_NAME):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    return manifest


def _read_state(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _save_state(out, state, writer, cursor, documents, text_bytes):
    """Record the resume point: complete shards, the input position after the last task, and the
    tokens of that task past the last shard (the carry). The carry is written before the state."""
    with atomic_write(os.path.join(out, CARRY_NAME)) as f:
        np.save(f, writer.carry())
    state.update(shards=writer.shards, cursor=list(cursor), documents=documents, text_bytes=text_bytes)
    atomic_write_text(os.path.join(out, STATE_NAME), json.dumps(state) + "\n")


def _consumed_bytes(sources, cursor):
    index, position = cursor
    done = sum(s["bytes"] for s in sources[:index])
    if index < len(sources) and not sources[index]["path"].endswith((".gz", ".parquet")):
        done += position
    return done


def _progress_bar(sources, cursor, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=sum(s["bytes"] for s in sources), initial=_consumed_bytes(sources, cursor), unit="B",
                unit_scale=True, dynamic_ncols=True, file=sys.stderr, desc="prepare")


# --------------------------------------------------------------------------- the single token file

def prepare(data, out, tokenizer_kind="byte", vocab_size=4096, tokenizer_file=None):
    """Tokenize `data` into the single token file `out` (the earlier format); returns (count, tokenizer).
    It reads .txt files only: records (.jsonl, .parquet) need the shards of prepare_shards."""
    records = [p for p in input_files(data) if p.endswith(STRUCTURED_SUFFIXES)] if os.path.isdir(data) else []
    if records:
        raise ConfigError(f"{data} holds .jsonl/.parquet files ({os.path.basename(records[0])}, ...) that a FILE.tok "
                          "output would leave out: it takes .txt files only; give --out a directory for shards")
    files = text_files(data)
    if tokenizer_kind == "bpe":
        tokenizer = BPETokenizer.train((_read_text_file(p) for p in files), vocab_size)
    else:
        tokenizer = make_tokenizer(tokenizer_kind, vocab_size, tokenizer_file=tokenizer_file)
    count = write_token_file(out, (document_tokens(tokenizer, _read_text_file(p)) for p in files), tokenizer)
    return count, tokenizer


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.val_tokens = getattr(args, "val_tokens", None)
    try:
        if args.out.endswith(".tok"):
            count, tokenizer = prepare(args.data, args.out, args.tokenizer, args.vocab_size, args.tokenizer_file)
            print(f"wrote {count:,} tokens ({tokenizer.kind} tokenizer, vocab {tokenizer.vocab_size}) to {args.out}")
            return 0
        started, finished_before = time.perf_counter(), os.path.isfile(os.path.join(args.out, MANIFEST_NAME))
        manifest = prepare_shards(args.data, args.out, args.tokenizer, args.vocab_size, args.tokenizer_file,
                                  args.text_field, args.shard_tokens, args.val_tokens, args.workers,
                                  args.progress, args.bpe_train_mb)
    except (ConfigError, OSError) as exc:
        fail(PROG, str(exc) if isinstance(exc, ConfigError) else f"{exc.strerror}: {exc.filename}")
    except KeyboardInterrupt:
        fail(PROG, f"interrupted; run the same command again to resume from the last complete shard in {args.out}",
             code=130)
    seconds = time.perf_counter() - started
    shards = f"{len(manifest['shards'])} shards"
    done = f"{args.out} already holds {shards}" if finished_before else f"wrote {shards} to {args.out}"
    print(f"{done}: {manifest['train_tokens']:,} train + "
          f"{manifest['val_tokens']:,} val tokens from {manifest['documents']:,} documents "
          f"({manifest['text_bytes'] / 1e6:.1f} MB of text; vocab {manifest['vocab_size']}; {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    one_line_warnings(PROG)  # the command line only: main() called in-process leaves warnings as they are
    sys.exit(main())
