"""Shard formats (llm.c / modded-nanogpt, nanoGPT), the multi-shard token source, tiktoken
tokenizers offline, and the one-line errors of bad token data."""
import json
import pickle

import numpy as np
import pytest

from fastlm.data import DataError, load_data, tokenizer_from_dict
from fastlm.shards import TokenShards, read_shard, write_shard
from tests.helpers import run_cli, tiny_args

tiktoken = pytest.importorskip("tiktoken")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


# --------------------------------------------------------------------------- writers that follow each project's format

def llmc_write(path, tokens, dtype=np.uint16):
    """llm.c dev/data/data_common.py write_datafile: 256 int32 header, then the tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1] = (20240520, 1) if dtype == np.uint16 else (20240801, 7)
    header[2] = len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=dtype).tobytes())


def modded_nanogpt_read(path):
    """modded-nanogpt's _load_data_shard (numpy instead of torch.from_file)."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520, "magic number mismatch in the data .bin file"
    assert header[1] == 1, "unsupported version"
    num_tokens = int(header[2])
    with open(path, "rb") as f:
        f.seek(256 * 4)
        tokens = np.frombuffer(f.read(), dtype=np.uint16)
    assert len(tokens) == num_tokens, "number of tokens read does not match header"
    return tokens


def nanogpt_write(directory, train, val, chars=None):
    """nanoGPT data/*/prepare.py: raw uint16 train.bin / val.bin, meta.pkl for char vocabularies."""
    np.asarray(train, dtype=np.uint16).tofile(directory / "train.bin")
    np.asarray(val, dtype=np.uint16).tofile(directory / "val.bin")
    if chars is not None:
        meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
        with open(directory / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)


def small_ranks():
    """A small byte-level BPE: the 256 bytes and a few merges, each reachable from lower ranks."""
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"he", b"the", b" t", b" the", b"in", b"er", b" a", b"an", b" an", b"and", b" and"):
        ranks[merge] = len(ranks)
    return ranks


def write_tiktoken_file(ranks, path):
    """The .tiktoken format: one "base64(token) rank" line per token (tiktoken's dump needs blobfile)."""
    import base64

    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


@pytest.fixture
def tiktoken_file(tmp_path):
    """A .tiktoken file of small_ranks() and the Encoding tiktoken builds from the same ranks."""
    path = tmp_path / "small.tiktoken"
    write_tiktoken_file(small_ranks(), path)
    encoding = tiktoken.Encoding(name="small", pat_str=GPT2_PATTERN, mergeable_ranks=small_ranks(),
                                 special_tokens={"<|endoftext|>": 50256})
    return str(path), encoding


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("count", [0, 1, 257])
def test_llmc_shard_round_trip(tmp_path, dtype, count):
    tokens = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, count, dtype=np.int64).astype(dtype)
    ours, theirs = tmp_path / "ours.bin", tmp_path / "theirs.bin"
    write_shard(str(ours), tokens, dtype)
    llmc_write(theirs, tokens, dtype)
    assert ours.read_bytes() == theirs.read_bytes()  # byte for byte what llm.c writes
    assert np.array_equal(read_shard(str(theirs)), tokens)
    if dtype == np.uint16:
        assert np.array_equal(modded_nanogpt_read(ours), tokens)


def test_token_shards_windows_cross_shard_boundaries():
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 500, n).astype(np.uint16) for n in (7, 1, 13, 5)]
    whole = np.concatenate(arrays)
    shards = TokenShards(arrays)
    assert len(shards) == len(whole) == 26
    starts = np.arange(0, len(whole) - 6)
    assert np.array_equal(shards.windows(starts, 6), whole[starts[:, None] + np.arange(6)])
    assert np.array_equal(np.asarray(shards[5:23]), whole[5:23])
    assert shards[8] == whole[8] and shards[-1] == whole[-1]
    assert shards.max() == whole.max()


def test_llmc_and_modded_nanogpt_shards_train_and_val(tmp_path):
    rng = np.random.default_rng(2)
    val = rng.integers(0, 50257, 3000)
    train = [rng.integers(0, 50257, n) for n in (5000, 4001)]
    llmc_write(tmp_path / "fineweb_val_000000.bin", val)
    for i, shard in enumerate(train, 1):
        llmc_write(tmp_path / f"fineweb_train_{i:06d}.bin", shard)
    for data_path in (tmp_path, tmp_path / "fineweb_train_*.bin"):
        data = load_data(str(data_path), "byte", None, 64)
        assert data.tokenizer.kind == "gpt2" and data.vocab_size == 50257  # GPT-2 is what these shards hold
        assert np.array_equal(np.asarray(data.train), np.concatenate(train))
        assert np.array_equal(np.asarray(data.val), val)


def test_llmc_shard_without_val_is_cut_90_10(tmp_path):
    tokens = np.arange(1000) % 300
    llmc_write(tmp_path / "only.bin", tokens)
    data = load_data(str(tmp_path / "only.bin"), "byte", 50304, 16)
    assert len(data.val) == 100 and np.array_equal(np.asarray(data.train), tokens[:900])


def test_nanogpt_char_bins_with_meta(tmp_path):
    chars = "\n !abcdefghij"
    rng = np.random.default_rng(3)
    train, val = rng.integers(0, len(chars), 2000), rng.integers(0, len(chars), 300)
    nanogpt_write(tmp_path, train, val, chars)
    data = load_data(str(tmp_path), "byte", None, 32)
    assert data.tokenizer.kind == "char" and data.vocab_size == len(chars)
    assert np.array_equal(np.asarray(data.train), train) and np.array_equal(np.asarray(data.val), val)
    assert data.tokenizer.decode(data.tokenizer.encode("abc ij")) == "abc ij"
    again = tokenizer_from_dict(data.tokenizer.to_dict())
    assert again.encode("hi!") == data.tokenizer.encode("hi!")
    same = load_data(str(tmp_path / "train.bin"), "byte", None, 32)  # the file alone brings its val.bin
    assert np.array_equal(np.asarray(same.val), val)


def test_nanogpt_meta_pkl_runs_no_code(tmp_path):
    nanogpt_write(tmp_path, np.arange(100), np.arange(100))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"itos": Evil()}, f)
    with pytest.raises(DataError, match="meta.pkl"):
        load_data(str(tmp_path), "byte", None, 8)


# --------------------------------------------------------------------------- bad input

def test_bad_shards_are_one_line_errors(tmp_path):
    good = np.arange(600) % 250
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    llmc_write(wrong / "a_train.bin", good)
    raw = bytearray((wrong / "a_train.bin").read_bytes())
    raw[:4] = np.int32(12345).tobytes()
    (wrong / "a_train.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic 12345"):
        load_data(str(wrong), "byte", None, 8)
    cut = tmp_path / "cut"
    cut.mkdir()
    llmc_write(cut / "a_train.bin", good)
    (cut / "a_train.bin").write_bytes((cut / "a_train.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        load_data(str(cut), "byte", None, 8)
    big = tmp_path / "big"
    big.mkdir()
    llmc_write(big / "a_train.bin", np.append(good, 60000))
    with pytest.raises(DataError, match="token id 60000, out of range for vocab_size 50257"):
        load_data(str(big), "byte", None, 8)
    with pytest.raises(DataError, match="no files match"):
        load_data(str(tmp_path / "nothing_*.bin"), "byte", None, 8)


def test_a_validation_split_alone_is_for_evaluation_only(tmp_path):
    val = np.arange(300) % 250
    llmc_write(tmp_path / "fineweb_val_000000.bin", val)
    with pytest.raises(DataError, match="training needs a train split"):
        load_data(str(tmp_path), "byte", None, 8)
    data = load_data(str(tmp_path), "byte", None, 8, need_train=False)
    assert data.train is None and np.array_equal(np.asarray(data.val), val)


def test_bad_data_through_the_cli(tmp_path):
    (tmp_path / "empty").mkdir()
    magic = tmp_path / "magic"
    magic.mkdir()
    (magic / "x_train.bin").write_bytes(b"\0" * 2048)
    val_only = tmp_path / "val_only"  # nanoGPT's val.bin without its train.bin
    val_only.mkdir()
    (np.arange(300) % 250).astype(np.uint16).tofile(val_only / "val.bin")
    for data, needle in ((tmp_path / "empty", "is empty"), (magic, "not a token shard"),
                         (val_only, "training needs a train split")):
        result = run_cli("fastlm.train", *tiny_args(tmp_path / "o", "--data", data, steps=1))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_tokenizer_mismatch_between_data_and_checkpoint(tmp_path):
    llmc_write(tmp_path / "t_train.bin", np.arange(2000) % 200)
    from fastlm.data import ByteTokenizer

    with pytest.raises(DataError, match="tokenizer mismatch"):
        load_data(str(tmp_path), "byte", 50304, 8, tokenizer=ByteTokenizer())


# --------------------------------------------------------------------------- tiktoken

def test_tiktoken_ids_are_tiktokens_and_round_trip_by_name(tmp_path, tiktoken_file, monkeypatch):
    from fastlm.data import make_tokenizer

    path, encoding = tiktoken_file
    tok = make_tokenizer("gpt2", None, tokenizer_file=path)
    text = "the cat and the hat in the band\n\nthere  and then"
    assert tok.encode(text) == encoding.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    spec = tok.to_dict()
    assert spec == {"kind": "tiktoken", "name": "gpt2", "file": path, "vocab_size": 50257}
    assert json.loads(json.dumps(spec)) == spec  # what checkpoints and manifests store
    again = tokenizer_from_dict(spec)
    assert again.encode(text) == tok.encode(text)


def test_tiktoken_text_data_has_end_of_text_between_documents(tmp_path, tiktoken_file):
    path, encoding = tiktoken_file
    (tmp_path / "d").mkdir()
    docs = ["the band and the ant " * 40, "in the end " * 50]
    for i, doc in enumerate(docs):
        (tmp_path / "d" / f"{i}.txt").write_text(doc)
    data = load_data(str(tmp_path / "d"), "gpt2", None, 16, tokenizer_file=path)
    expected = []
    for doc in docs:
        expected += [50256] + encoding.encode_ordinary(doc)
    assert np.concatenate([data.train, data.val]).tolist() == expected
    assert data.vocab_size == 50257


def test_tiktoken_offline_without_a_file_is_one_line(tmp_path, monkeypatch):
    import tiktoken.load

    def no_network(url):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # nothing loaded earlier in this process
    from fastlm.data import make_tokenizer

    with pytest.raises(DataError) as info:
        make_tokenizer("cl100k_base", None)
    message = str(info.value)
    assert "\n" not in message and "TIKTOKEN_CACHE_DIR" in message and "--tokenizer_file" in message


def test_tiktoken_from_cache_dir(tmp_path, monkeypatch, tiktoken_file):
    """TIKTOKEN_CACHE_DIR holding the BPE file under tiktoken's cache key: no download, no flag."""
    import hashlib

    import tiktoken.load

    from fastlm.data import make_tokenizer

    path, _ = tiktoken_file
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(open(path, "rb").read())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    # The small file is not the real cl100k ranks: accept its hash, and make any download an error.
    monkeypatch.setattr(tiktoken.load, "check_hash", lambda data, expected: True)
    monkeypatch.setattr(tiktoken.load, "read_file", lambda url: (_ for _ in ()).throw(ConnectionError(url)))
    from fastlm.tokenizers import tiktoken_cached

    assert tiktoken_cached("cl100k_base") and not tiktoken_cached("o200k_base")
    tok = make_tokenizer("cl100k_base", None)
    assert tok.vocab_size == 100277 and tok.eot_token == 100257
    assert tok.to_dict()["file"] is None  # a checkpoint names it; the cache provides it again
    assert tok.decode(tok.encode("the band")) == "the band"


# --------------------------------------------------------------------------- training on shards (needs the train.py hooks)

def test_train_on_llmc_shards_takes_gpt2_vocab_and_resumes_sequential_order_exactly(tmp_path, monkeypatch):
    import torch

    from fastlm import train as train_mod
    from tests.test_train import losses, stop_at

    rng = np.random.default_rng(4)
    llmc_write(tmp_path / "fineweb_val_000000.bin", rng.integers(0, 50257, 2000))
    for i in (1, 2):
        llmc_write(tmp_path / f"fineweb_train_{i:06d}.bin", rng.integers(0, 50257, 3001))
    args = ["--data", tmp_path / "fineweb_train_*.bin", "--data_order", "sequential", "--ckpt_interval", "3"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_mod.main(tiny_args(full, *args, steps=6)) == 0
    saved = json.loads((full / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 50257  # from the tokenizer, not the default 256
    assert json.loads((full / "tokenizer.json").read_text())["name"] == "gpt2"
    monkeypatch.setattr(train_mod.Trainer, "_should_stop", stop_at(3))
    train_mod.main(tiny_args(split, *args, steps=6))
    monkeypatch.undo()
    assert train_mod.main(tiny_args(split, *args, "--resume", steps=6)) == 0
    assert losses(full) == losses(split)
    wa = torch.load(full / "ckpt.pt", weights_only=True)
    wb = torch.load(split / "ckpt.pt", weights_only=True)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert wa["rng"][0]["sampler"]["position"] == 6 * 4  # 6 steps of batch 4 windows
