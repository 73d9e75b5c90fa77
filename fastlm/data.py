"""Corpus, tokenizers and batches.

The embedded default corpus is twelve works of Shakespeare (about 1.5 MB of plain English,
from the public-domain Project Gutenberg texts), shipped gzipped inside the package so that
training needs no download.

Data can be: nothing (the embedded corpus), a UTF-8 text file, a directory of .txt files, or a
token file written by `python -m fastlm.prepare` (a small JSON header followed by uint16/uint32
token ids, read through a memmap so large corpora are never loaded whole).
The split is 90/10 train/val; batches are random windows drawn from a seeded torch.Generator
whose state goes into the checkpoint, so a resumed run sees the same batches. Every source has a
content fingerprint, which the checkpoint records so that a run never resumes on other data.
"""
import glob
import gzip
import hashlib
import json
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from fastlm.config import ConfigError
from fastlm.files import atomic_write

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
    if not isinstance(spec, dict) or spec.get("kind") not in ("byte", "bpe"):
        raise DataError(f"unknown tokenizer description: {str(spec)[:80]}")
    if spec["kind"] == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_str(spec["json"]))


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


def text_files(path):
    """The text files that `path` names: itself, or the sorted .txt files of a directory."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise DataError(f"no .txt files in directory {path}")
        return files
    if not os.path.exists(path):
        raise DataError(f"data path not found: {path}")
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
    train: np.ndarray
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


def load_data(path, tokenizer_kind, vocab_size, block_size, tokenizer=None):
    """Load and tokenize the training data.

    tokenizer: an existing tokenizer (from a checkpoint) to reuse instead of building one.
    Returns TokenData with 1-D integer arrays; raises DataError for unusable data.
    """
    if path is not None and is_token_file(path):
        tokens, header = read_token_file(path)
        tok = tokenizer_from_dict(header["tokenizer"])
        if header["vocab_size"] > vocab_size:
            raise DataError(f"{path} was tokenized with vocabulary {header['vocab_size']}, larger than the "
                            f"model's vocab_size {vocab_size}")
        source, fingerprint = path, file_fingerprint(path)
    else:
        if path is None:
            text, source = embedded_corpus(), "the embedded corpus"
        else:
            text, source = "".join(_read_text_file(p) for p in text_files(path)), path
        if not text:
            raise DataError(f"{source} is empty")
        fingerprint = text_fingerprint(text)
        if tokenizer is not None:
            tok = tokenizer
        elif tokenizer_kind == "byte":
            tok = ByteTokenizer()
        else:
            tok = BPETokenizer.train([text], vocab_size)
        tokens = tok.encode_array(text)
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


def check_token_range(tokens, vocab_size, source, chunk=1 << 24):
    """Raise DataError when any token id is >= vocab_size (scans in chunks: memmaps stay lazy)."""
    for start in range(0, len(tokens), chunk):
        top = int(tokens[start:start + chunk].max())
        if top >= vocab_size:
            raise DataError(f"{source} holds token id {top}, out of range for vocab_size {vocab_size}")


class BatchSampler:
    """Random (x, y) windows of one split, drawn from its own seeded generator."""

    def __init__(self, tokens, block_size, batch_size, seed, device="cpu"):
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)

    def next(self):
        starts = torch.randint(len(self.tokens) - self.block_size, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts.numpy()[:, None] + self._offsets]  # (batch, block + 1) gather
        windows = torch.from_numpy(windows.astype(np.int64))
        x, y = windows[:, :-1], windows[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
