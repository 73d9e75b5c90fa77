"""`python -m fastlm.prepare`: mixed inputs, exact tokens, shards + val shard + manifest, workers,
and an interrupted run resuming from its last complete shard."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastlm import prepare as prepare_mod
from fastlm.config import ConfigError
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


def write_corpus(path, seed, n=60):
    """A text file of `n` random documents."""
    path.write_text("".join(make_docs(n, seed)))
    return path


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(capsys, *args):
    """`python -m fastlm.prepare args --progress false` in this process: (exit code, stdout, stderr lines)."""
    try:
        code = prepare_mod.main([str(a) for a in args] + ["--progress", "false"])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


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


def test_a_token_file_output_refuses_records_it_would_leave_out(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text("plain text " * 100)
    (corpus / "b.jsonl").write_text(json.dumps({"text": "a record " * 100}) + "\n")
    result = run_cli("fastlm.prepare", "--data", corpus, "--out", tmp_path / "x.tok")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "b.jsonl" in lines[0] and "directory" in lines[0], result.stderr
    assert not (tmp_path / "x.tok").exists()
    (corpus / "b.jsonl").unlink()
    assert run_cli("fastlm.prepare", "--data", corpus, "--out", tmp_path / "x.tok").returncode == 0


def test_a_token_file_output_reads_the_tokenizer_file_given(tmp_path):
    pytest.importorskip("tiktoken")
    from fastlm.data import read_token_file
    from tests.test_shards import small_ranks, write_tiktoken_file

    write_tiktoken_file(small_ranks(), tmp_path / "small.tiktoken")
    (tmp_path / "a.txt").write_text("the band and the tin " * 50)
    result = run_cli("fastlm.prepare", "--data", tmp_path / "a.txt", "--out", tmp_path / "x.tok", "--tokenizer", "gpt2",
                     "--tokenizer_file", tmp_path / "small.tiktoken")
    assert result.returncode == 0, result.stderr
    assert read_token_file(tmp_path / "x.tok")[1]["tokenizer"]["file"] == str(tmp_path / "small.tiktoken")


def test_help_states_each_default_once():
    result = run_cli("fastlm.prepare", "--help")
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert result.returncode == 0, result.stderr
    assert "about 10% of the corpus, at most 10M) --workers" in text  # no "(default: None)" after it
    assert "tiktoken encoding (default: byte)" in text


def test_cli_writes_shards_with_progress(tmp_path):
    make_corpus(tmp_path / "in", with_parquet=False)
    result = run_cli("fastlm.prepare", "--data", tmp_path / "in", "--out", tmp_path / "out", "--workers", "2",
                     "--shard_tokens", "4000", "--val_tokens", "1000")
    assert result.returncode == 0, result.stderr
    assert "MB/s text" in result.stderr and "tok/s" in result.stderr
    assert "shards to" in result.stdout
    again = run_cli("fastlm.prepare", "--data", tmp_path / "in", "--out", tmp_path / "out", "--progress", "false",
                    "--shard_tokens", "4000")
    assert again.returncode == 0 and "already holds" in again.stdout  # complete already: nothing to do


def test_too_small_for_the_val_shard(tmp_path):
    (tmp_path / "t.txt").write_text("tiny corpus")
    with pytest.raises(DataError, match="val_tokens"):
        prepare_shards(str(tmp_path / "t.txt"), str(tmp_path / "out"), val_tokens=100)


@pytest.mark.parametrize("change, differ", [(dict(shard_tokens=900), "--shard_tokens"),
                                            (dict(val_tokens=301), "--val_tokens"),
                                            (dict(tokenizer_kind="bpe", vocab_size=300), "--tokenizer"),
                                            (dict(text_field="body"), "--text_field"),
                                            ("edit the corpus", "the input files")])
def test_finished_prepare_refuses_other_inputs_or_settings(tmp_path, change, differ):
    corpus = write_corpus(tmp_path / "c.txt", 5)
    args = dict(tokenizer_kind="byte", shard_tokens=1000, val_tokens=300)
    prepare_shards(str(corpus), str(tmp_path / "out"), **args)
    before = tree_bytes(tmp_path / "out")
    if change == "edit the corpus":
        write_corpus(corpus, 6)
    else:
        args.update(change)
    with pytest.raises(ConfigError, match=rf"finished prepare of other inputs or settings \(.*{differ}"):
        prepare_shards(str(corpus), str(tmp_path / "out"), **args)
    assert tree_bytes(tmp_path / "out") == before


def test_finished_prepare_with_the_same_settings_is_returned_as_it_is(tmp_path, monkeypatch, capsys):
    corpus = write_corpus(tmp_path / "c.txt", 7)
    out = tmp_path / "out"
    manifest = prepare_shards(str(corpus), str(out), "bpe", vocab_size=300, shard_tokens=2000, val_tokens=500)
    before = tree_bytes(out)
    monkeypatch.setattr(prepare_mod, "write_shard", lambda *a: pytest.fail("wrote a shard again"))
    again = dict(tokenizer_kind="bpe", vocab_size=300, shard_tokens=2000)
    assert prepare_shards(str(corpus), str(out), **again) == manifest  # the val shard's size may be left out
    assert prepare_shards(str(corpus), str(out), **again, val_tokens=500) == manifest
    with pytest.raises(ConfigError, match=r"\(--vocab_size differ\)"):
        prepare_shards(str(corpus), str(out), **{**again, "vocab_size": 320})
    with pytest.raises(ConfigError, match=r"\(--bpe_train_mb differ\)"):
        prepare_shards(str(corpus), str(out), **again, bpe_train_mb=1)
    code, stdout, _ = run_main(capsys, "--data", corpus, "--out", out, "--tokenizer", "bpe", "--vocab-size", "300",
                               "--shard-tokens", "2000")
    assert code == 0 and stdout.startswith(f"{out} already holds {len(manifest['shards'])} shards")
    code, _, err = run_main(capsys, "--data", corpus, "--out", out, "--shard-tokens", "2000")
    assert code == 2 and len(err) == 1 and "--tokenizer," in err[0] and "tokenizer_kind" not in err[0], err
    assert tree_bytes(out) == before


def test_manifest_without_recorded_settings_is_read_off_its_fields(tmp_path):
    """A manifest that an earlier fastlm wrote holds no "settings": a same-settings re-run is still a no-op."""
    corpus = write_corpus(tmp_path / "c.txt", 8)
    prepare_shards(str(corpus), str(tmp_path / "out"), shard_tokens=1500, val_tokens=200)
    path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["settings"]
    path.write_text(json.dumps(manifest))
    assert prepare_shards(str(corpus), str(tmp_path / "out"), shard_tokens=1500) == manifest
    with pytest.raises(ConfigError, match="shard_tokens"):
        prepare_shards(str(corpus), str(tmp_path / "out"), shard_tokens=1400)


def test_bpe_manifest_without_recorded_settings_is_returned_for_any_vocab_it_fits(tmp_path, capsys):
    """An earlier fastlm recorded neither --vocab_size nor --bpe_train_mb: a re-run with any values that
    could have trained this vocabulary returns it untouched; a smaller --vocab_size cannot have."""
    corpus = write_corpus(tmp_path / "c.txt", 8)
    out = tmp_path / "out"
    prepare_shards(str(corpus), str(out), "bpe", vocab_size=300, shard_tokens=2000, val_tokens=500)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["settings"]
    path.write_text(json.dumps(manifest))
    before = tree_bytes(out)
    again = dict(tokenizer_kind="bpe", shard_tokens=2000)
    assert prepare_shards(str(corpus), str(out), **again, vocab_size=300) == manifest
    assert prepare_shards(str(corpus), str(out), **again, vocab_size=8192, bpe_train_mb=1) == manifest
    code, stdout, _ = run_main(capsys, "--data", corpus, "--out", out, "--tokenizer", "bpe", "--shard-tokens", "2000")
    assert code == 0 and stdout.startswith(f"{out} already holds"), stdout
    with pytest.raises(ConfigError, match=r"bpe vocabulary has 300 tokens, more than --vocab_size 299"):
        prepare_shards(str(corpus), str(out), **again, vocab_size=299)
    with pytest.raises(ConfigError, match=r"\(--shard_tokens differ\)"):
        prepare_shards(str(corpus), str(out), tokenizer_kind="bpe", vocab_size=300, shard_tokens=1000)
    assert tree_bytes(out) == before


def test_boolean_flags_parse_as_the_trainer_does(tmp_path, capsys):
    parse = prepare_mod.build_parser().parse_args
    base = ["--data", "d", "--out", "o"]
    assert [parse(base + flag).progress for flag in ([], ["--progress"], ["--progress", "on"], ["--progress", "Yes"])] \
        == [True] * 4
    assert [parse(base + ["--progress", value]).progress for value in ("off", "0", "False")] == [False] * 3
    code, _, err = run_main(capsys, "--data", write_corpus(tmp_path / "c.txt", 9), "--out", tmp_path / "out",
                            "--progress", "maybe")
    assert code == 2 and len(err) == 1 and "expected true or false, got 'maybe'" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--shard-tokens", "0"), ("--shard_tokens", "-3"), ("--val-tokens", "0"),
                                         ("--workers", "0"), ("--vocab-size", "-1"), ("--bpe-train-mb", "0"),
                                         ("--bpe_train_mb", "-0.5"), ("--bpe-train-mb", "nan")])
def test_numeric_flags_must_be_positive(tmp_path, capsys, flag, value):
    code, _, err = run_main(capsys, "--data", write_corpus(tmp_path / "c.txt", 10), "--out", tmp_path / "out",
                            "--tokenizer", "bpe", flag, value)
    assert code == 2 and len(err) == 1 and f"--{flag[2:].replace('-', '_')} must be positive" in err[0], err
    assert not (tmp_path / "out").exists()


def _empty(path):
    path.write_text("")


def _not_utf8(path):
    path.write_bytes(b"\xff" + np.random.default_rng(11).integers(0, 256, 300, dtype=np.uint8).tobytes())


def _bad_json_line(path):
    path.write_text('{"body": "no text field"}\n' + "".join(json.dumps({"text": d}) + "\n" for d in make_docs(9, 12)))


def _empty_documents(path):
    path.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)))


@pytest.mark.parametrize("name, write, extra, needle", [
    ("e.txt", _empty, [], "e.txt is empty"),
    ("b.txt", _not_utf8, [], "is not UTF-8 text"),
    ("c.txt", lambda p: write_corpus(p, 13, 5), ["--val-tokens", "99999999"], "not more than --val_tokens"),
    ("j.jsonl", _bad_json_line, [], "no field 'text'"),
    ("j.jsonl", _empty_documents, [], "holds no text"),
])
@pytest.mark.parametrize("out_existed", [False, True])
def test_failed_prepare_leaves_no_directory_of_its_own(tmp_path, capsys, name, write, extra, needle, out_existed):
    write(tmp_path / name)
    out = tmp_path / "new" / "out"
    if out_existed:
        out.mkdir(parents=True)
    code, _, err = run_main(capsys, "--data", tmp_path / name, "--out", out, *extra)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert out.is_dir() == out_existed and (tmp_path / "new").is_dir() == out_existed
    if out_existed:
        assert list(out.iterdir()) == []


def test_killed_prepare_takes_its_tokenizer_processes_with_it(tmp_path):
    """kill -9 of prepare (or the OOM killer) ends its workers at once and in silence: none lives on
    to print a BrokenPipeError traceback for each task it finishes."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(make_docs(40_000, 3)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fastlm.prepare", "--data", str(corpus), "--out", str(out),
                             "--workers", "2", "--tokenizer", "bpe", "--vocab-size", "400", "--bpe-train-mb", "0.2",
                             "--val-tokens", "1000", "--shard-tokens", "20000", "--progress", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("train_*.bin")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the workers are busy
    assert proc.poll() is None, "prepare finished before it could be killed: give it more text"
    proc.kill()
    stderr = proc.stderr.read()  # EOF once every process holding the pipe (the workers too) has ended
    proc.wait()
    assert stderr == "", stderr


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".parquet", ".txt"])
def test_the_default_val_shard_is_about_a_tenth_of_compressed_inputs_too(tmp_path, suffix):
    """The default --val_tokens comes from the inputs' text bytes: a .gz file's recorded uncompressed
    size and a parquet file's text column, not their compressed file sizes."""
    docs = make_docs(1200, 5)  # words of a small vocabulary: gzip and parquet compress them several times over
    path = tmp_path / f"c{suffix}"
    if suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path, compression="gzip")
    elif suffix == ".jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    else:
        path.write_text("".join(docs))
    assert path.stat().st_size < len("".join(docs)) / 3 or suffix == ".txt"
    manifest = prepare_shards(str(path), str(tmp_path / "out"), shard_tokens=10**6)
    fraction = manifest["val_tokens"] / (manifest["val_tokens"] + manifest["train_tokens"])
    assert 0.08 < fraction < 0.14, fraction  # JSON's quotes, keys and escapes count as text bytes
