"""Token shards on disk: the llm.c / modded-nanogpt format, nanoGPT's raw .bin files, and a
token source that reads many shards through memory maps as one stream.

llm.c shard (dev/data/data_common.py, read by modded-nanogpt's `_load_data_shard` too):
a header of 256 little-endian int32 -- magic, version, token count, then zeros -- followed by
the tokens. Magic 20240520 / version 1 means uint16 tokens (GPT-2 vocabularies); llm.c writes
uint32 tokens as magic 20240801 / version 7 (its Llama-3 format), which we use for vocabularies
over 65,536. nanoGPT's train.bin / val.bin are raw uint16 with no header (a `meta.pkl` beside
them holds a character vocabulary when there is one).

A prepared directory (`python -m fastlm.prepare`) holds val_000000.bin, train_000001.bin, ...
and manifest.json (tokenizer, vocabulary, counts, largest token id of each shard, sources).
"""
import glob
import json
import os

import numpy as np

from fastlm.files import atomic_write

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype
SHARD_FORMATS = {(20240520, 1): np.dtype(np.uint16), (20240801, 7): np.dtype(np.uint32)}
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fastlm-shards-1"
GLOB_CHARS = "*?["


def _error(message):
    from fastlm.data import DataError

    return DataError(message)


def shard_dtype(vocab_size):
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_header(num_tokens, dtype):
    magic, version = next(k for k, v in SHARD_FORMATS.items() if v == np.dtype(dtype))
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, num_tokens
    return header


def write_shard(path, tokens, dtype=np.uint16):
    """Write one llm.c shard atomically: the header, then `tokens` as `dtype` (uint16 or uint32)."""
    tokens = np.asarray(tokens)
    dtype = np.dtype(dtype)
    if tokens.size and int(tokens.max()) > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(tokens.max())} does not fit shard dtype {dtype.name}")
    with atomic_write(path) as f:
        f.write(shard_header(tokens.size, dtype).tobytes())
        f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())


def read_shard(path):
    """Memmap of the tokens of one llm.c shard; DataError on a wrong magic or a truncated file."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise _error(f"{path}: truncated shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    dtype = SHARD_FORMATS.get((magic, version))
    if dtype is None:
        raise _error(f"{path}: not a token shard (magic {magic}, version {version}; expected 20240520 v1 "
                     "or 20240801 v7)")
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        raise _error(f"{path}: truncated shard ({size} bytes, the header promises {count:,} tokens = {expected} bytes)")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(count,))


def read_nanogpt_bin(path):
    """Memmap of nanoGPT's raw uint16 token file (train.bin / val.bin)."""
    size = os.path.getsize(path)
    if size % 2:
        raise _error(f"{path}: truncated nanoGPT token file (odd size {size}, expected uint16 tokens)")
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r")


class TokenShards:
    """Several 1-D token arrays (memmaps) read as one stream, never loaded whole.

    Supports len(), slicing (a view, still memory-mapped), and `windows(starts, length)`, the
    (n, length) gather that BatchSampler uses; a window may cross a shard boundary.
    """

    def __init__(self, arrays, names=()):
        self.arrays = [a for a in arrays if len(a)]
        self.names = list(names)
        self.bounds = np.cumsum([0] + [len(a) for a in self.arrays])
        self.dtype = np.result_type(*[a.dtype for a in self.arrays]) if self.arrays else np.dtype(np.uint16)

    def __len__(self):
        return int(self.bounds[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("TokenShards slices take step 1")
            pieces = []
            for i, a in enumerate(self.arrays):
                lo, hi = max(start, self.bounds[i]), min(stop, self.bounds[i + 1])
                if lo < hi:
                    pieces.append(a[lo - self.bounds[i]:hi - self.bounds[i]])
            return TokenShards(pieces, self.names)
        if isinstance(index, (int, np.integer)):
            index = int(index) + (len(self) if index < 0 else 0)
            i = int(np.searchsorted(self.bounds, index, side="right")) - 1
            return self.arrays[i][index - self.bounds[i]]
        return self.windows(np.asarray(index).reshape(-1), 1).reshape(np.shape(index))

    def windows(self, starts, length):
        """(len(starts), length) array: tokens[s:s + length] for each start s."""
        out = np.empty((len(starts), length), dtype=self.dtype)
        for row, start in enumerate(np.asarray(starts, dtype=np.int64)):
            i = int(np.searchsorted(self.bounds, start, side="right")) - 1
            local = start - self.bounds[i]
            if local + length <= len(self.arrays[i]):  # the usual case: inside one shard
                out[row] = self.arrays[i][local:local + length]
            else:
                out[row] = self[int(start):int(start) + length].to_array()
        return out

    def to_array(self):
        return np.concatenate(self.arrays) if self.arrays else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):
        arr = self.to_array()
        return arr.astype(dtype) if dtype is not None else arr

    def max(self):
        return max(int(a.max()) for a in self.arrays)


def gather_windows(tokens, starts, length):
    """tokens[s:s + length] for each start: TokenShards gathers per shard, arrays by fancy index."""
    if isinstance(tokens, TokenShards):
        return tokens.windows(starts, length)
    return tokens[np.asarray(starts)[:, None] + np.arange(length)]


# --------------------------------------------------------------------------- finding shards

def is_glob(path):
    return any(c in path for c in GLOB_CHARS)


def looks_like_shards(path):
    """Whether `--data path` names token shards (a glob, a .bin file, or a directory of them)."""
    if is_glob(path):
        return True
    if os.path.isfile(path):
        return path.endswith(".bin")
    if os.path.isdir(path):
        return (os.path.isfile(os.path.join(path, MANIFEST_NAME))
                or bool(glob.glob(os.path.join(path, "*.bin"))))
    return False


def _is_nanogpt_bin(path):
    return os.path.basename(path) in ("train.bin", "val.bin")


def _open(path):
    return read_nanogpt_bin(path) if _is_nanogpt_bin(path) else read_shard(path)


def _split_files(files):
    val = [f for f in files if "val" in os.path.basename(f)]
    return [f for f in files if f not in val], val


def read_manifest(directory):
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError:
        raise _error(f"{path}: corrupt manifest (not JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise _error(f"{path} is not a fastlm shard manifest")
    return manifest


def find_shards(path, need_train=True):
    """The shard files `path` names, as (train files, val files, manifest or None, flavour).

    path: a directory (its *.bin files), a glob (val shards: the same glob with "train" -> "val"),
    or one .bin file (nanoGPT's train.bin brings its val.bin). flavour: "fastlm", "llm.c" or "nanogpt".
    need_train: a path without training shards is a DataError; False (evaluation) accepts one that
    holds only validation shards, and gives no train files.
    """
    if is_glob(path):
        files = sorted(glob.glob(path))
        if not files:
            raise _error(f"no files match {path}")
        train, val = _split_files(files)
        head, tail = os.path.split(path)
        if not val and "train" in tail:
            val = sorted(glob.glob(os.path.join(head, tail.replace("train", "val"))))
        directory = os.path.dirname(files[0])
    elif os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.bin")))
        if not files:
            raise _error(f"{path} holds no .bin shards")
        train, val = _split_files(files)
        directory = path
    else:
        directory = os.path.dirname(path) or "."
        train, val = [path], []
        if _is_nanogpt_bin(path):
            sibling = os.path.join(directory, "val.bin" if path.endswith("train.bin") else "train.bin")
            if os.path.basename(path) == "val.bin":
                train, val = ([sibling] if os.path.isfile(sibling) else []), [path]
            elif os.path.isfile(sibling):
                val = [sibling]
    if not train and need_train:
        raise _error(f"{path} holds no training shards (file names with 'train', or other than 'val'); "
                     "training needs a train split beside the validation one")
    manifest = read_manifest(directory)
    nanogpt = [f for f in train + val if _is_nanogpt_bin(f)]
    flavour = "fastlm" if manifest else ("nanogpt" if nanogpt else "llm.c")
    return train, val, manifest, flavour


def open_shards(files):
    return TokenShards([_open(f) for f in files], names=files)
