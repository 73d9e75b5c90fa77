"""Corpus, tokenizers and batches.

The embedded default corpus is twelve works of Shakespeare (about 1.5 MB of plain English,
from the public-domain Project Gutenberg texts), shipped gzipped inside the package so that
training needs no download.

Data can be: nothing (the embedded corpus), a UTF-8 text file, a directory of .txt files, a
directory or glob of token shards (written by `python -m fastlm.prepare`, llm.c or
modded-nanogpt; nanoGPT's train.bin/val.bin), or a single token file from older versions of
`fastlm.prepare` (a JSON header followed by uint16/uint32 ids). Tokens on disk are read through
memory maps (fastlm.shards), so large corpora are never loaded whole.
Text is split 90/10 train/val; shards bring their own val shard (else the same 90/10 cut).
Batches are random windows (or an epoch-ordered sequence) drawn from a seeded torch.Generator
whose state and position go into the checkpoint, so a resumed run sees the same batches. Every
source has a content fingerprint, which the checkpoint records so that a run never resumes on
other data.
"""
import glob
import gzip
import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fastlm.config import ConfigError
from fastlm.files import atomic_write
from fastlm.shards import TokenShards, find_shards, gather_windows, looks_like_shards, open_shards

CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "shakespeare.txt.gz")
TOKEN_FILE_MAGIC = b"FASTLMTK"
_HEADER_ALIGN = 64


class DataError(ConfigError):
    """Unusable data: missing, empty, not UTF-8, too short, or token ids out of range."""


# --------------------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless, no training."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_array(self, text):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids):
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"kind": "byte"}


class BPETokenizer:
    """Byte-level BPE (the `tokenizers` library) trained on the corpus itself."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @classmethod
    def train(cls, texts, vocab_size):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ConfigError(f"a bpe tokenizer needs vocab_size > 256 (the byte alphabet), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size()

    def encode(self, text):
        return self._tok.encode(text).ids

    def encode_array(self, text):
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids])

    def to_dict(self):
        return {"kind": "bpe", "json": self._tok.to_str()}


def tokenizer_from_dict(spec):
    """The tokenizer that `tokenizer.to_dict()` describes (as saved in checkpoints and manifests)."""
    from fastlm.tokenizers import CharTokenizer, TiktokenTokenizer

    if not isinstance(spec, dict) or spec.get("kind") not in ("byte", "bpe", "tiktoken", "char"):
        raise DataError(f"unknown tokenizer description: {str(spec)[:80]}")
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] == "tiktoken":
        return TiktokenTokenizer.from_dict(spec)
    if spec["kind"] == "char":
        return CharTokenizer(spec["chars"])
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_str(spec["json"]))


def make_tokenizer(kind, vocab_size, texts=(), tokenizer_file=None):
    """A new tokenizer of `kind`: byte, bpe (trained on `texts` to vocab_size) or a tiktoken name."""
    from fastlm.tokenizers import TIKTOKEN_NAMES, TiktokenTokenizer

    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if vocab_size is None:
            raise ConfigError("--tokenizer bpe needs --vocab_size (the vocabulary to train, > 256)")
        return BPETokenizer.train(texts, vocab_size)
    if kind in TIKTOKEN_NAMES:
        tok = TiktokenTokenizer(kind, tokenizer_file)
        tok.encoding  # load now: a missing BPE file is reported before any work
        return tok
    raise ConfigError(f"unknown tokenizer {kind!r}: byte, bpe or one of {', '.join(TIKTOKEN_NAMES)}")


def same_tokenizer(a, b):
    """Whether two tokenizers give the same ids (a tiktoken file's path may differ)."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("file", None)
    db.pop("file", None)
    return da == db


def document_tokens(tokenizer, text):
    """Token ids of one document: tokenizers with an end-of-text token put it before each document
    (as llm.c and modded-nanogpt do), so a document's first token is never predicted from another's."""
    ids = tokenizer.encode_array(text)
    eot = getattr(tokenizer, "eot_token", None)
    if eot is None:
        return ids
    return np.concatenate([np.array([eot], dtype=ids.dtype), ids])


# --------------------------------------------------------------------------- text sources

def embedded_corpus():
    with gzip.open(CORPUS_PATH, "rb") as f:
        return f.read().decode("utf-8")


def _read_text_file(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from None


# Inputs of fastlm.prepare that are records (a text field each), not text to train on as it is.
STRUCTURED_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def text_files(path):
    """The text files that `path` names: itself, or the sorted .txt files of a directory."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            others = [p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p)]
            if not others:
                raise DataError(f"data directory {path} is empty (no .txt files)")
            if any(p.endswith(STRUCTURED_SUFFIXES) for p in others):
                raise DataError(f"no .txt files in directory {path}; for .jsonl/.parquet run "
                                f"python -m fastlm.prepare --data {path} --out DIR, then train with --data DIR")
            raise DataError(f"no .txt files in directory {path}")
        return files
    if not os.path.exists(path):
        raise DataError(f"data path not found: {path}")
    if path.endswith(STRUCTURED_SUFFIXES):  # read as text, its JSON or Parquet syntax would be trained on
        raise DataError(f"{path} holds records, not plain text; run python -m fastlm.prepare --data {path} "
                        "--out DIR, then train with --data DIR")
    return [path]


def is_token_file(path):
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(len(TOKEN_FILE_MAGIC)) == TOKEN_FILE_MAGIC


# --------------------------------------------------------------------------- token files

def write_token_file(path, chunks, tokenizer):
    """Write token id arrays (an iterable of 1-D integer arrays) as a token file; atomic."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    count = 0
    header_space = 1 << 20  # rewritten once the count is known; the tokenizer JSON fits in it
    spec = tokenizer.to_dict()
    if len(json.dumps(spec)) > header_space - 1024:
        header_space = ((len(json.dumps(spec)) + 4096) // _HEADER_ALIGN + 1) * _HEADER_ALIGN
    with atomic_write(path) as f:
        f.write(b"\0" * header_space)
        for chunk in chunks:
            arr = np.asarray(chunk)
            if arr.size and (arr.min() < 0 or arr.max() >= tokenizer.vocab_size):
                raise DataError("token id out of the tokenizer's range while writing a token file")
            f.write(arr.astype(dtype).tobytes())
            count += arr.size
        if count == 0:
            raise DataError(f"no tokens to write to {path}: the input holds no text")
        header = json.dumps({"tokenizer": spec, "vocab_size": tokenizer.vocab_size,
                             "dtype": np.dtype(dtype).name, "num_tokens": count,
                             "data_offset": header_space}).encode()
        f.seek(0)
        f.write(TOKEN_FILE_MAGIC + struct.pack("<I", len(header)) + header)
    return count


def read_token_file(path):
    """(memmap of token ids, header dict) of a token file from `fastlm.prepare`."""
    with open(path, "rb") as f:
        head = f.read(len(TOKEN_FILE_MAGIC) + 4)
        if len(head) < len(TOKEN_FILE_MAGIC) + 4 or head[:len(TOKEN_FILE_MAGIC)] != TOKEN_FILE_MAGIC:
            raise DataError(f"{path} is not a fastlm token file")
        (length,) = struct.unpack("<I", head[len(TOKEN_FILE_MAGIC):])
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise DataError(f"{path}: corrupt token file header") from None
    expected = header["data_offset"] + header["num_tokens"] * np.dtype(header["dtype"]).itemsize
    if os.path.getsize(path) != expected:
        raise DataError(f"{path}: truncated token file ({os.path.getsize(path)} bytes, expected {expected})")
    tokens = np.memmap(path, dtype=header["dtype"], mode="r", offset=header["data_offset"],
                       shape=(header["num_tokens"],))
    return tokens, header


# --------------------------------------------------------------------------- datasets

@dataclass
class TokenData:
    train: np.ndarray  # None for shards holding only a validation split, loaded with need_train=False
    val: np.ndarray
    tokenizer: object
    source: str
    fingerprint: str = ""  # of the source's content: see text_fingerprint / file_fingerprint

    @property
    def vocab_size(self):
        return self.tokenizer.vocab_size


def split_tokens(tokens, block_size, source):
    """90/10 train/val split; both halves must hold at least one window of block_size + 1."""
    n_val = len(tokens) // 10
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    need = block_size + 1
    if len(val) < need:
        raise DataError(f"corpus {source} is too short: {len(tokens)} tokens give a validation split of "
                        f"{len(val)}, need at least block_size + 1 = {need} (use more text or a smaller block_size)")
    return train, val


def load_data(path, tokenizer_kind, vocab_size, block_size, tokenizer=None, tokenizer_file=None, fit_vocab=False,
              need_train=True):
    """Load (and for text, tokenize) the training data.

    tokenizer: an existing tokenizer (from a checkpoint) to reuse instead of building one; data
    that brings its own (shards, token files) must match it. vocab_size: the run's vocabulary
    (None: the tokenizer's); fit_vocab: use the tokenizer's instead (vocab_size was a default, not
    a choice: gpt2 raises it to 50257, a nanoGPT character vocabulary lowers it to its size).
    tokenizer_file: a local .tiktoken file for tiktoken names.
    need_train=False (evaluation): token shards may hold only a validation split; train is then None.
    Returns TokenData (train/val: 1-D arrays or TokenShards); raises DataError for unusable data.
    """
    if path is not None and looks_like_shards(path):
        return _load_shards(path, tokenizer_kind, vocab_size, block_size, tokenizer, tokenizer_file, fit_vocab,
                            need_train)
    if path is not None and is_token_file(path):
        tokens, header = read_token_file(path)
        tok = tokenizer_from_dict(header["tokenizer"])
        _check_same_tokenizer(tokenizer, tok, path)
        vocab_size = run_vocab_size(vocab_size, tok, fit_vocab)
        if header["vocab_size"] > vocab_size:
            raise DataError(f"{path} was tokenized with vocabulary {header['vocab_size']}, larger than the "
                            f"model's vocab_size {vocab_size}")
        source, fingerprint = path, file_fingerprint(path)
    else:
        if path is None:
            texts, source = [embedded_corpus()], "the embedded corpus"
        else:
            texts, source = [_read_text_file(p) for p in text_files(path)], path
        if not any(texts):
            raise DataError(f"{source} is empty")
        fingerprint = text_fingerprint("".join(texts))
        tok = tokenizer if tokenizer is not None else make_tokenizer(tokenizer_kind, vocab_size, texts, tokenizer_file)
        tokens = np.concatenate([document_tokens(tok, t) for t in texts if t])
    vocab_size = run_vocab_size(vocab_size, tok, fit_vocab)
    if len(tokens) == 0:
        raise DataError(f"{source} holds no tokens")
    if tok.vocab_size > vocab_size:
        raise DataError(f"the {tok.kind} tokenizer has {tok.vocab_size} tokens but vocab_size is {vocab_size}")
    check_token_range(tokens, vocab_size, source)
    train, val = split_tokens(tokens, block_size, source)
    return TokenData(train=train, val=val, tokenizer=tok, source=source, fingerprint=fingerprint)


# Token files up to this size are hashed whole (about a second per GiB); larger ones by their
# size, header and evenly spaced blocks, so a resume never reads terabytes to check them.
FULL_HASH_MAX_BYTES = 1 << 30
_SAMPLED_BLOCKS, _BLOCK_BYTES = 256, 1 << 20


def text_fingerprint(text):
    """'sha256:<hex>' of the UTF-8 text (the concatenation, for a directory of files)."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_fingerprint(path):
    """'sha256:<hex>' of the file's bytes, or for files over FULL_HASH_MAX_BYTES
    'sampled-sha256:<hex>' of its size and 256 evenly spaced 1 MiB blocks (first and last included)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_MAX_BYTES:
            for block in iter(lambda: f.read(_BLOCK_BYTES), b""):
                digest.update(block)
            return "sha256:" + digest.hexdigest()
        digest.update(str(size).encode())
        last = size - _BLOCK_BYTES
        for i in range(_SAMPLED_BLOCKS):
            f.seek(last * i // (_SAMPLED_BLOCKS - 1))
            digest.update(f.read(_BLOCK_BYTES))
    return "sampled-sha256:" + digest.hexdigest()


def shards_fingerprint(paths):
    """'shards-sha256:<hex>' of every shard's name, size, first and last 1 MiB: cheap enough to
    check a corpus of many GB at every resume, and it changes when a shard is replaced."""
    digest = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        digest.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_BLOCK_BYTES))
            f.seek(max(0, size - _BLOCK_BYTES))
            digest.update(f.read(_BLOCK_BYTES))
    return "shards-sha256:" + digest.hexdigest()


def run_vocab_size(vocab_size, tokenizer, fit_vocab=False):
    """The vocabulary the run checks ids against: vocab_size, or the tokenizer's where that is None
    or fit_vocab. The model pads its rows further (GPTConfig.pad_vocab_to)."""
    if vocab_size is None or fit_vocab:
        return tokenizer.vocab_size
    return vocab_size


def _check_same_tokenizer(run_tokenizer, data_tokenizer, source):
    if run_tokenizer is not None and not same_tokenizer(run_tokenizer, data_tokenizer):
        raise DataError(f"tokenizer mismatch: {source} was tokenized with {data_tokenizer.kind} "
                        f"(vocab {data_tokenizer.vocab_size}) but the checkpoint's tokenizer is "
                        f"{run_tokenizer.kind} (vocab {run_tokenizer.vocab_size})")


def _shards_tokenizer(flavour, manifest, directory, tokenizer_kind, tokenizer_file):
    """The tokenizer of a shard set: the manifest's; nanoGPT's meta.pkl (else GPT-2, as nanoGPT
    assumes); for llm.c / modded-nanogpt shards GPT-2 unless --tokenizer names another encoding."""
    from fastlm.tokenizers import TIKTOKEN_NAMES, CharTokenizer, TiktokenTokenizer

    if manifest is not None:
        tok = tokenizer_from_dict(manifest["tokenizer"])
        if tokenizer_file and getattr(tok, "file", 1) is None:
            tok.file = os.path.abspath(tokenizer_file)
        return tok
    meta = os.path.join(directory, "meta.pkl")
    if flavour == "nanogpt" and os.path.isfile(meta):
        return CharTokenizer.from_meta_pkl(meta)
    return TiktokenTokenizer(tokenizer_kind if tokenizer_kind in TIKTOKEN_NAMES else "gpt2", tokenizer_file)


def _load_shards(path, tokenizer_kind, vocab_size, block_size, tokenizer, tokenizer_file, fit_vocab, need_train):
    train_files, val_files, manifest, flavour = find_shards(path, need_train)
    directory = os.path.dirname((train_files + val_files)[0])
    tok = _shards_tokenizer(flavour, manifest, directory, tokenizer_kind, tokenizer_file)
    _check_same_tokenizer(tokenizer, tok, path)
    if tokenizer is not None:
        tok = tokenizer
    vocab_size = run_vocab_size(vocab_size, tok, fit_vocab)
    if tok.vocab_size > vocab_size:
        raise DataError(f"{path} was tokenized with vocabulary {tok.vocab_size} ({tok.kind}), larger than the "
                        f"model's vocab_size {vocab_size}")
    train = open_shards(train_files) if train_files else None  # None: a validation split alone (need_train=False)
    val = open_shards(val_files) if val_files else None
    for tokens, what in ((train, "training shards"), (val, "validation shards")):
        if tokens is not None and len(tokens) == 0:
            raise DataError(f"{path}: the {what} hold no tokens")
    known_max = _manifest_max_token(manifest, train_files + val_files)
    if known_max is not None:
        if known_max >= vocab_size:
            raise DataError(f"{path} holds token id {known_max}, out of range for vocab_size {vocab_size}")
    else:
        for tokens in (train, val):
            if tokens is not None:
                check_token_range(tokens, vocab_size, path)
    if val is None:
        train, val = split_tokens(train, block_size, path)
    for tokens, what in ((train, "training"), (val, "validation")):
        if tokens is not None and len(tokens) < block_size + 1:
            raise DataError(f"{path}: the {what} tokens ({len(tokens)}) are fewer than block_size + 1 = {block_size + 1}")
    if hasattr(tok, "can_load_offline") and not tok.can_load_offline():
        # Training needs only the ids; decoding (the end-of-run sample, fastlm.sample) needs the file.
        warnings.warn(f"the {tok.kind} tokenizer's BPE file is neither cached nor given: training works, "
                      "sampling will try to download it (set TIKTOKEN_CACHE_DIR, pass --tokenizer_file, "
                      "or --sample_tokens 0)", stacklevel=2)
    source = f"{path} ({flavour} shards: {len(train_files)} train, {len(val_files)} val)"
    return TokenData(train=train, val=val, tokenizer=tok, source=source,
                     fingerprint=shards_fingerprint(train_files + val_files))


def _manifest_max_token(manifest, files):
    """The largest token id in `files` as the manifest records it (checked when written), or None."""
    if manifest is None:
        return None
    recorded = {entry["file"]: entry.get("max_token") for entry in manifest.get("shards", [])}
    values = [recorded.get(os.path.basename(f)) for f in files]
    return None if any(v is None for v in values) else max(values)


def check_token_range(tokens, vocab_size, source, chunk=1 << 24):
    """Raise DataError when any token id is >= vocab_size (scans in chunks: memmaps stay lazy)."""
    for array in (tokens.arrays if isinstance(tokens, TokenShards) else [tokens]):
        if np.iinfo(array.dtype).max < vocab_size:
            continue  # the dtype cannot hold an id out of range
        for start in range(0, len(array), chunk):
            top = int(array[start:start + chunk].max())
            if top >= vocab_size:
                raise DataError(f"{source} holds token id {top}, out of range for vocab_size {vocab_size}")


class BatchSampler:
    """(x, y) windows of one split: random (with replacement) or, with order="sequential", the
    non-overlapping windows in corpus order, epoch after epoch.

    Under DDP every rank builds its sampler with the same seed and its own rank: each step draws
    batch_size * world_size windows and a rank takes its own slice, so ranks never draw the same
    window at the same step (and, sequentially, split each epoch disjointly). The generator and
    the position (windows drawn so far) are the state a checkpoint keeps.
    """

    def __init__(self, tokens, block_size, batch_size, seed, device="cpu", order="random", rank=0, world_size=1):
        if order not in ("random", "sequential"):
            raise ValueError(f"order must be random or sequential, got {order!r}")
        if len(tokens) < block_size + 1:
            raise DataError(f"{len(tokens)} tokens are fewer than block_size + 1 = {block_size + 1}")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.order, self.rank, self.world_size = order, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # windows drawn by all ranks together
        self.num_windows = (len(tokens) - 1) // block_size  # sequential: non-overlapping windows

    @property
    def epoch(self):
        return self.position // self.num_windows if self.order == "sequential" else None

    def next_starts(self):
        """Start offsets of this rank's next batch (advances the state)."""
        per_step = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        if self.order == "random":
            starts = torch.randint(len(self.tokens) - self.block_size, (per_step,), generator=self.generator)
            starts = starts.numpy()[mine]
        else:
            index = (self.position + np.arange(per_step)[mine]) % self.num_windows
            starts = index * self.block_size
        self.position += per_step
        return starts

    def next(self):
        windows = gather_windows(self.tokens, self.next_starts(), self.block_size + 1)  # (batch, block + 1)
        return _to_device(windows, self.device)

    def state_dict(self):
        return {"generator": self.generator.get_state(), "position": self.position}

    def load_state_dict(self, state):
        if isinstance(state, torch.Tensor):  # checkpoints that saved the generator alone
            state = {"generator": state}
        self.generator.set_state(state["generator"])
        self.position = int(state.get("position", 0))


def _to_device(windows, device):
    windows = torch.from_numpy(windows.astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.contiguous(), y.contiguous()


def eval_batches(tokens, block_size, batch_size, num_batches, device="cpu", rank=0, world_size=1):
    """The fixed validation batches: num_batches * batch_size * world_size windows spread evenly
    over the split, the same at every eval and for every seed, so loss curves are comparable.
    Yields (x, y) for this rank's share."""
    total = num_batches * batch_size * world_size
    starts = np.linspace(0, len(tokens) - block_size - 1, total).astype(np.int64)
    device = torch.device(device)
    for b in range(num_batches):
        first = (b * world_size + rank) * batch_size
        yield _to_device(gather_windows(tokens, starts[first:first + batch_size], block_size + 1), device)
