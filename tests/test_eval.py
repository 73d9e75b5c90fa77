"""python -m fastlm.eval: perplexity / bits per byte, HellaSwag scoring, on small files written here."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastlm import eval as eval_mod
from fastlm.config import ConfigError, GPTConfig
from fastlm.data import ByteTokenizer
from fastlm.model import GPT


def tiny_model(block_size=8):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, block_size=block_size, n_layer=1, n_head=2, d_model=32)).eval()


def test_uniform_model_scores_eight_bits_per_byte():
    model = tiny_model()
    with torch.no_grad():
        model.wte.weight.zero_()  # tied head: every logit 0, a uniform prediction over 256 bytes
    tokens = np.frombuffer("héllo wörld, 25 bytes.".encode(), dtype=np.uint8).astype(np.int64)
    result = eval_mod.evaluate_lm(model, ByteTokenizer(), tokens)
    assert result["loss"] == pytest.approx(math.log(256), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)
    assert result["tokens"] == result["bytes"] == len(tokens) - 1


@pytest.mark.parametrize("length", [9, 30, 2])  # one full window, a tail, the least there is
def test_every_token_but_the_first_is_predicted_once(length):
    model = tiny_model(block_size=8)
    tokens = torch.randint(0, 256, (length,)).numpy()
    result = eval_mod.evaluate_lm(model, ByteTokenizer(), tokens, batch_size=2)
    assert result["tokens"] == length - 1
    total = 0.0
    for start in range(0, length - 1, 8):  # the windows, one at a time
        w = torch.from_numpy(tokens[start:start + 9])
        logits, _ = model(w[None, :-1])
        total += F.cross_entropy(logits[0], w[1:], reduction="sum").item()
    assert result["loss"] == pytest.approx(total / (length - 1), rel=1e-5)


def write_hellaswag(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"ctx": "A man is sitting on a roof. he", "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing.",
                                                          "is ripping level tiles off.", "holds a rubik's cube."], "label": 3},
    {"ctx_a": "A woman walks", "ctx_b": "then she", "endings": ["a", "b", "c", "d"], "label": 0},
]


def test_read_hellaswag_formats_and_errors(tmp_path):
    examples = eval_mod.read_hellaswag(write_hellaswag(tmp_path / "h.jsonl", RECORDS))
    assert examples[0][2] == 3 and examples[1][0] == "A woman walks Then she"
    bad = write_hellaswag(tmp_path / "bad.jsonl", [{"ctx": "x", "endings": ["a", "b"], "label": 5}])
    with pytest.raises(ConfigError, match="bad.jsonl:1: label 5"):
        eval_mod.read_hellaswag(bad)
    # Nothing before the ending (its first token could not be scored), or endings that are not text.
    for n, record in enumerate([{"ctx": "", "endings": ["a", "b"], "label": 0},
                                {"ctx_a": "", "ctx_b": "", "endings": ["a", "b"], "label": 0},
                                {"ctx": "x", "endings": ["a", 2], "label": 0}]):
        bad = write_hellaswag(tmp_path / f"bad{n}.jsonl", [record])
        with pytest.raises(ConfigError, match=f"bad{n}.jsonl:1: "):
            eval_mod.read_hellaswag(bad)


def test_score_endings_is_the_loss_of_the_ending_tokens():
    model = tiny_model(block_size=32)
    tok = ByteTokenizer()
    totals, means = eval_mod.score_endings(model, tok, "ctx", ["ab", "xyz!"])
    for ending, total, mean in zip(["ab", "xyz!"], totals, means):
        ids = torch.tensor(tok.encode("ctx" + " " + ending))
        logits, _ = model(ids[None, :-1])
        n = len(" " + ending)
        want = F.cross_entropy(logits[0, -n:], ids[-n:], reduction="sum").item()
        assert total == pytest.approx(want, rel=1e-5) and mean == pytest.approx(want / n, rel=1e-5)


def test_long_context_is_cut_from_the_left():
    model = tiny_model(block_size=8)
    totals, _ = eval_mod.score_endings(model, ByteTokenizer(), "a long context " * 5, ["end"])
    assert math.isfinite(totals[0])


def test_acc_takes_the_lowest_total_and_acc_norm_the_lowest_mean(monkeypatch):
    # Ending 0: total 4 over 4 tokens (mean 1); ending 1: total 3 over 1 token (mean 3).
    monkeypatch.setattr(eval_mod, "score_endings", lambda m, t, c, e: ([4.0, 3.0], [1.0, 3.0]))
    model = tiny_model()
    examples = [("c", ["long", "x"], 1), ("c", ["long", "x"], 0)]
    assert eval_mod.evaluate_hellaswag(model, ByteTokenizer(), examples) == {"acc": 0.5, "acc_norm": 0.5, "examples": 2}
    result = eval_mod.evaluate_hellaswag(model, ByteTokenizer(), examples[:1])
    assert result["acc"] == 1.0 and result["acc_norm"] == 0.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fastlm import train as train_mod
    from tests.helpers import tiny_args

    out = tmp_path_factory.mktemp("eval") / "run"
    assert train_mod.main(tiny_args(out, steps=2)) == 0
    return out


def test_cli_lm_and_hellaswag(checkpoint, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    assert eval_mod.main(["--ckpt", str(checkpoint), "--data", str(text), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == result["bytes"] == len(text.read_bytes()) - 1
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))  # bytes are tokens here
    data = write_hellaswag(tmp_path / "h.jsonl", RECORDS)
    assert eval_mod.main(["--ckpt", str(checkpoint), "--task", "hellaswag", "--data", str(data)]) == 0
    assert capsys.readouterr().out.startswith("hellaswag acc ")


def one_line_error(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        eval_mod.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys):
    for args, needle in ((["--task", "hellaswag"], "needs --data"), (["--data", str(tmp_path / "no")], "not found")):
        one_line_error(capsys, ["--ckpt", str(checkpoint), *args], needle)


@pytest.mark.parametrize("args,needle", [
    (["--max-tokens", "-4"], "--max-tokens must be positive"),
    (["--max-tokens", "0"], "--max-tokens must be positive"),
    (["--limit", "3"], "--limit applies to --task hellaswag"),
    (["--task", "hellaswag", "--limit", "-1"], "--limit must be positive"),
    (["--task", "hellaswag", "--limit", "0"], "--limit must be positive"),
    (["--task", "hellaswag", "--max-tokens", "5"], "--max-tokens applies to --task lm"),
])
def test_bad_counts_are_one_line_errors(checkpoint, tmp_path, capsys, args, needle):
    data = write_hellaswag(tmp_path / "h.jsonl", RECORDS) if "hellaswag" in args else tmp_path / "t.txt"
    if "hellaswag" not in args:
        data.write_text("some text to score " * 3)
    one_line_error(capsys, ["--ckpt", str(checkpoint), "--data", str(data), *args], needle)


def test_max_tokens_counts_the_scored_tokens(checkpoint, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(c) for c in np.random.default_rng(0).integers(97, 123, 50)))
    for n in (1, 7):
        assert eval_mod.main(["--ckpt", str(checkpoint), "--data", str(text), "--max-tokens", str(n), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["tokens"] == n


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A fastlm.prepare directory (byte tokenizer) of random text: (directory, its text)."""
    from fastlm import prepare

    root = tmp_path_factory.mktemp("shards")
    text = "".join(chr(c) for c in np.random.default_rng(1).integers(32, 127, 3000))
    (root / "corpus.txt").write_text(text)
    assert prepare.main(["--data", str(root / "corpus.txt"), "--out", str(root / "prepared"), "--tokenizer", "byte",
                         "--val-tokens", "301", "--progress", "false"]) == 0
    return root / "prepared", text


def test_prepared_shards_are_scored_on_their_validation_split(checkpoint, shards):
    from fastlm.data import ByteTokenizer
    from fastlm.shards import read_shard

    directory, text = shards
    val, train = (np.asarray(read_shard(directory / name)) for name in ("val_000000.bin", "train_000001.bin"))
    assert len(val) == 301 and len(val) + len(train) == len(text)
    tok = ByteTokenizer()
    for data, want in ((directory, val), (str(directory / "*.bin"), val), (directory / "val_000000.bin", val),
                       (directory / "train_000001.bin", train)):  # one shard file is scored whole
        np.testing.assert_array_equal(eval_mod.load_eval_tokens(str(data), tok), want)


def test_cli_scores_shards_and_rejects_another_tokenizer_s(checkpoint, shards, tmp_path, capsys):
    directory, _ = shards
    assert eval_mod.main(["--ckpt", str(checkpoint), "--data", str(directory), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 300
    nanogpt = tmp_path / "nanogpt"  # raw uint16 train.bin/val.bin without meta.pkl: GPT-2 ids, as nanoGPT assumes
    nanogpt.mkdir()
    for name in ("train.bin", "val.bin"):
        np.random.default_rng(2).integers(0, 50257, 100).astype(np.uint16).tofile(nanogpt / name)
    one_line_error(capsys, ["--ckpt", str(checkpoint), "--data", str(nanogpt / "val.bin")], "tokenizer mismatch")


@pytest.mark.filterwarnings("ignore:the gpt2 tokenizer's BPE file")  # ids are all eval reads here
@pytest.mark.parametrize("layout", ["nanogpt", "llm.c"])
def test_a_validation_split_alone_is_scored(tmp_path, layout):
    """nanoGPT's val.bin or llm.c's *_val_*.bin without training shards beside them: eval needs no train split."""
    from fastlm.shards import write_shard
    from fastlm.tokenizers import TiktokenTokenizer

    val = np.random.default_rng(3).integers(0, 50257, 257)
    if layout == "nanogpt":
        val.astype(np.uint16).tofile(tmp_path / "val.bin")
        paths = (tmp_path, tmp_path / "val.bin")
    else:
        write_shard(tmp_path / "fineweb_val_000000.bin", val)
        paths = (tmp_path, tmp_path / "*_val_*.bin")
    for path in paths:
        np.testing.assert_array_equal(eval_mod.load_eval_tokens(str(path), TiktokenTokenizer("gpt2")), val)


def test_cli_scores_prepared_val_shards_alone(checkpoint, shards, tmp_path, capsys):
    import shutil

    directory, _ = shards
    for name in ("val_000000.bin", "manifest.json"):  # the training shards left behind
        shutil.copy(directory / name, tmp_path / name)
    assert eval_mod.main(["--ckpt", str(checkpoint), "--data", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 300


def test_hf_export_of_a_byte_model_is_scored_with_bytes(checkpoint, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from fastlm import export

    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be: that is the question. " * 3)
    assert export.main(["--ckpt", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    results = []
    for ckpt in (checkpoint, tmp_path / "hf"):
        assert eval_mod.main(["--ckpt", str(ckpt), "--data", str(text), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
    # A larger vocabulary without tokenizer files (a GPT-2 directory missing them) is not bytes.
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({**config, "vocab_size": 320}))
    weights = export._safetensors().load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights["transformer.wte.weight"] = torch.cat([weights["transformer.wte.weight"]] * 2)[:320]
    export.save_safetensors(weights, str(wide / "model.safetensors"), {"format": "pt"})
    one_line_error(capsys, ["--ckpt", str(wide), "--data", str(text)], "comes without a tokenizer")


def test_a_tokenizer_larger_than_the_model_is_a_one_line_error(checkpoint, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from fastlm import export
    from fastlm.data import BPETokenizer

    hf = tmp_path / "hf"
    assert export.main(["--ckpt", str(checkpoint), "--format", "hf", "--out", str(hf)]) == 0
    BPETokenizer.train(["the quick brown fox jumps over the lazy dog " * 20], 300)._tok.save(str(hf / "tokenizer.json"))
    one_line_error(capsys, ["--ckpt", str(hf)], "ids but the model's vocabulary is 256")
