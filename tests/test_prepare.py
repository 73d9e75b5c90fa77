"""`python -m fastlm.prepare`: mixed inputs, exact tokens, shards + val shard + manifest, workers,
and an interrupted run resuming from its last complete shard."""
import gzip
import json
import os

import numpy as np
import pytest

from fastlm import prepare as prepare_mod
from fastlm.data import ByteTokenizer, DataError, document_tokens, load_data, tokenizer_from_dict
from fastlm.prepare import prepare_shards
from fastlm.shards import read_shard
from tests.helpers import run_cli

WORDS = ("the quick brown fox jumps over a lazy dog and then again the end of it all "
         "naïve café — über 42 1999 can't won't ?!").split()


def make_docs(n, seed, min_words=5, max_words=80):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        words = rng.choice(WORDS, rng.integers(min_words, max_words))
        lines = [" ".join(words[i:i + 9]) for i in range(0, len(words), 9)]
        docs.append("\n".join(lines) + ("\n" if rng.random() < 0.5 else ""))
    return docs


def make_corpus(root, with_parquet=True):
    """A directory tree of .txt, .jsonl, .jsonl.gz (and .parquet) files; returns the documents in
    the order prepare reads them (sorted paths; lines and rows in order)."""
    (root / "b").mkdir(parents=True)
    files = {}
    files[root / "a.txt"] = make_docs(1, 0, 2000, 3000)  # one long document, read in pieces
    files[root / "b" / "c.txt"] = make_docs(1, 1)
    docs = make_docs(30, 2)
    files[root / "b" / "d.jsonl"] = docs
    (root / "b" / "d.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    docs = make_docs(25, 3)
    files[root / "e.jsonl.gz"] = docs
    with gzip.open(root / "e.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    for path in (root / "a.txt", root / "b" / "c.txt"):
        path.write_text(files[path][0])
    if with_parquet:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        docs = make_docs(40, 4)
        files[root / "f.parquet"] = docs
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), root / "f.parquet", row_group_size=7)
    (root / "notes.md").write_text("not an input")
    return [doc for path in sorted(files, key=str) for doc in files[path]]


def shard_stream(out):
    manifest = json.loads((out / "manifest.json").read_text())
    arrays = [np.asarray(read_shard(str(out / s["file"]))) for s in manifest["shards"]]
    return manifest, np.concatenate(arrays)


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(prepare_mod, "PIECE_BYTES", 512)  # many pieces and tasks from a small corpus


@pytest.mark.parametrize("workers", [1, 2])
def test_mixed_inputs_give_the_exact_token_stream(tmp_path, small_pieces, workers):
    docs = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    manifest = prepare_shards(str(tmp_path / "in"), str(out), "byte", shard_tokens=2000, val_tokens=1500,
                              workers=workers)
    manifest, stream = shard_stream(out)
    expected = np.concatenate([document_tokens(ByteTokenizer(), d) for d in docs])
    assert np.array_equal(stream, expected)
    sizes = [s["tokens"] for s in manifest["shards"]]
    assert sizes[0] == 1500 and all(n == 2000 for n in sizes[1:-1]) and 0 < sizes[-1] <= 2000
    assert manifest["shards"][0]["file"] == "val_000000.bin" and manifest["shards"][1]["file"] == "train_000001.bin"
    assert manifest["train_tokens"] + manifest["val_tokens"] == len(expected)
    assert manifest["documents"] == len(docs) and len(manifest["sources"]) == 5
    assert all(s["bytes"] > 0 and len(s["fingerprint"]) == 16 for s in manifest["sources"])
    assert not (out / prepare_mod.STATE_NAME).exists()
    data = load_data(str(out), "byte", None, 32)  # trains from the directory
    assert np.array_equal(np.asarray(data.val), expected[:1500])
    assert np.array_equal(np.asarray(data.train), expected[1500:])


def test_tiktoken_pieces_match_whole_documents(tmp_path, small_pieces):
    """A long text file is tokenized in pieces (by workers) with exactly tiktoken's ids for the
    whole file, and <|endoftext|> starts every document."""
    tiktoken = pytest.importorskip("tiktoken")
    from tests.test_shards import GPT2_PATTERN, small_ranks, write_tiktoken_file

    write_tiktoken_file(small_ranks(), tmp_path / "small.tiktoken")
    encoding = tiktoken.Encoding(name="small", pat_str=GPT2_PATTERN, mergeable_ranks=small_ranks(),
                                 special_tokens={"<|endoftext|>": 50256})
    docs = make_corpus(tmp_path / "in", with_parquet=False)
    # awkward text for piece cuts: runs of blank lines, trailing spaces, indentation
    (tmp_path / "in" / "a.txt").write_text("".join(f"line {i}  \n\n\n   indented\nthe end\n" for i in range(300)))
    docs[0] = (tmp_path / "in" / "a.txt").read_text()
    prepare_shards(str(tmp_path / "in"), str(tmp_path / "out"), "gpt2", tokenizer_file=str(tmp_path / "small.tiktoken"),
                   shard_tokens=3000, val_tokens=1000, workers=2)
    manifest, stream = shard_stream(tmp_path / "out")
    expected = [t for d in docs for t in [50256] + encoding.encode_ordinary(d)]
    assert stream.tolist() == expected
    assert manifest["tokenizer"]["name"] == "gpt2" and manifest["vocab_size"] == 50257
    assert manifest["end_of_text"] == 50256 and manifest["dtype"] == "uint16"


def test_interrupted_prepare_resumes_from_last_complete_shard(tmp_path, small_pieces, monkeypatch):
    make_corpus(tmp_path / "in")
    args = dict(tokenizer_kind="byte", shard_tokens=1000, val_tokens=700, workers=1)
    prepare_shards(str(tmp_path / "in"), str(tmp_path / "whole"), **args)
    written = []
    real_write = prepare_mod.write_shard

    def write_then_die(path, tokens, dtype):
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(os.path.basename(path))
        real_write(path, tokens, dtype)

    monkeypatch.setattr(prepare_mod, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(str(tmp_path / "in"), str(tmp_path / "cut"), **args)
    assert not (tmp_path / "cut" / "manifest.json").exists()
    assert (tmp_path / "cut" / prepare_mod.STATE_NAME).exists()
    written.clear()
    monkeypatch.setattr(prepare_mod, "write_shard", lambda *a: (written.append(os.path.basename(a[0])), real_write(*a)))
    prepare_shards(str(tmp_path / "in"), str(tmp_path / "cut"), **args)
    assert written and written[0] == "train_000004.bin"  # resumed after the four complete shards
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == whole
    for name in whole:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_bpe_prepare_round_trips_its_tokenizer(tmp_path):
    make_corpus(tmp_path / "in", with_parquet=False)
    manifest = prepare_shards(str(tmp_path / "in"), str(tmp_path / "out"), "bpe", vocab_size=300,
                              shard_tokens=5000, val_tokens=500)
    tok = tokenizer_from_dict(manifest["tokenizer"])
    assert tok.vocab_size == 300 and manifest["vocab_size"] == 300
    assert max(s["max_token"] for s in manifest["shards"]) < 300


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    cases = [((tmp_path / "empty", tmp_path / "o1"), "no .txt, .jsonl"),
             ((bad, tmp_path / "o2"), "no field 'text'"),
             ((tmp_path / "missing", tmp_path / "o3"), "not found")]
    for (data, out), needle in cases:
        result = run_cli("fastlm.prepare", "--data", data, "--out", out, "--progress", "false")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr


def test_cli_writes_shards_with_progress(tmp_path):
    make_corpus(tmp_path / "in", with_parquet=False)
    result = run_cli("fastlm.prepare", "--data", tmp_path / "in", "--out", tmp_path / "out", "--workers", "2",
                     "--shard_tokens", "4000", "--val_tokens", "1000")
    assert result.returncode == 0, result.stderr
    assert "MB/s text" in result.stderr and "tok/s" in result.stderr
    assert "shards to" in result.stdout
    again = run_cli("fastlm.prepare", "--data", tmp_path / "in", "--out", tmp_path / "out", "--progress", "false")
    assert again.returncode == 0  # complete already: nothing to do


def test_too_small_for_the_val_shard(tmp_path):
    (tmp_path / "t.txt").write_text("tiny corpus")
    with pytest.raises(DataError, match="val_tokens"):
        prepare_shards(str(tmp_path / "t.txt"), str(tmp_path / "out"), val_tokens=100)
