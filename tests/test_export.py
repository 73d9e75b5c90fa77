"""Hugging Face GPT-2 weights in and out, and plain safetensors files; no download (random models)."""
import json

import pytest
import torch

from fastlm import export
from fastlm.config import ConfigError, GPTConfig
from fastlm.model import GPT

pytest.importorskip("safetensors")


def gpt2_dir(tmp_path, activation="gelu", vocab=101, prefix=True):
    """A small random GPT2LMHeadModel saved in HF format (every tensor perturbed, so a wrong
    mapping of biases or norms shows); returns (dir, model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                  activation_function=activation)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return path, model


def fastlm_from(config, state):
    model = GPT(config)
    model.load_state_dict(state)
    return model.eval()


def test_imported_gpt2_gives_transformers_logits(tmp_path):
    path, hf_model = gpt2_dir(tmp_path)
    config, state, tokenizer = export.load_hf_gpt2(path)
    assert (config.vocab_size, config.block_size, config.d_model, config.padded_vocab_size) == (101, 24, 32, 101)
    assert tokenizer is None
    model = fastlm_from(config, state)
    idx = torch.randint(0, 101, (3, 24))
    want = hf_model(idx).logits
    got, _ = model(idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_import_pads_the_vocabulary_when_asked(tmp_path):
    path, hf_model = gpt2_dir(tmp_path)
    config, state, _ = export.load_hf_gpt2(path, pad_vocab_to=64)
    assert config.padded_vocab_size == 128
    idx = torch.randint(0, 101, (2, 9))
    torch.testing.assert_close(fastlm_from(config, state)(idx)[0], hf_model(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, bias):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, d_model=32, bias=bias)  # 320 rows
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    written = export.export_hf(config, model.state_dict(), None, tmp_path / "out")
    assert written == ["config.json", "model.safetensors"]
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(hf_model(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)


def test_bpe_tokenizer_goes_with_the_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastlm.data import BPETokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 50
    tok = BPETokenizer.train([text], 300)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=32)
    export.export_hf(config, GPT(config).state_dict(), tok, tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok("the lazy fox")["input_ids"] == tok.encode("the lazy fox")
    _, _, back = export.load_hf_gpt2(tmp_path / "out")
    assert back.encode("the lazy fox") == tok.encode("the lazy fox")


def random_bpe_model(vocab=300):
    from fastlm.data import BPETokenizer

    words = ["".join(chr(c) for c in torch.randint(97, 123, (5,)).tolist()) for _ in range(200)]
    tok = BPETokenizer.train([" ".join(words)], vocab)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=32)
    return config, GPT(config).state_dict(), tok


def test_exporting_again_leaves_a_directory_of_the_new_model_alone(tmp_path):
    from fastlm.data import ByteTokenizer

    out = tmp_path / "out"
    written = export.export_hf(*random_bpe_model(), out)
    assert "tokenizer.json" in written
    (out / "README.md").write_text("mine")
    byte_config = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, d_model=32)
    export.export_hf(byte_config, GPT(byte_config).state_dict(), ByteTokenizer(), out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config, _, tokenizer = export.load_pretrained(str(out))
    assert config.vocab_size == 256 and tokenizer is None
    model, tokenizer = export.load_model(str(out))
    assert tokenizer.kind == "byte" and model.config.vocab_size == 256


def test_export_refuses_a_directory_whose_other_tokenizer_would_be_read(tmp_path):
    out = tmp_path / "gpt2"
    out.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (out / name).write_text("{}")
    config = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, d_model=32)
    with pytest.raises(ConfigError, match="vocab.json and merges.txt"):
        export.export_hf(config, GPT(config).state_dict(), None, out)
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "vocab.json"]


@pytest.mark.parametrize("fmt,kind,needle", [("hf", "file", "is a file"), ("safetensors", "dir", "is a directory")])
def test_out_of_the_wrong_kind_is_a_one_line_error_and_left_alone(checkpoint, tmp_path, capsys, fmt, kind, needle):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("keep")
    else:
        out.mkdir()
        (out / "x").write_text("keep")
    with pytest.raises(SystemExit) as info:
        export.main(["--ckpt", str(checkpoint), "--format", fmt, "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert (out if kind == "file" else out / "x").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_never_writes_over_a_run_s_files(checkpoint, tmp_path, capsys):
    """--out pointing into the run (its out_dir, its ckpt.pt, its config.json) is a one-line error, and
    the run's files are left as they were: the hf config.json would replace the run's settings."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for fmt, out, needle in (("hf", run, "not a Hugging Face config"),
                             ("safetensors", run / "ckpt.pt", "ending in .safetensors"),
                             ("safetensors", run / "config.json", "ending in .safetensors")):
        with pytest.raises(SystemExit) as info:
            export.main(["--ckpt", str(run), "--format", fmt, "--out", str(out)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_an_unwritable_out_is_a_one_line_error(checkpoint, tmp_path, capsys, fmt):
    blocker = tmp_path / "file"
    blocker.write_text("keep")  # a file where a directory would have to be made
    out = blocker / ("hf" if fmt == "hf" else "w.safetensors")
    with pytest.raises(SystemExit) as info:
        export.main(["--ckpt", str(checkpoint), "--format", fmt, "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1, err
    assert blocker.read_text() == "keep"


def test_the_note_on_a_missing_tokenizer_names_what_to_encode_with():
    from fastlm.data import ByteTokenizer
    from fastlm.tokenizers import TiktokenTokenizer

    assert "UTF-8 bytes" in export.missing_tokenizer_note(ByteTokenizer())
    note = export.missing_tokenizer_note(TiktokenTokenizer("gpt2"))  # never loads the encoding
    assert "gpt2 tokenizer" in note and "UTF-8" not in note


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_have_the_permissions_the_umask_gives(checkpoint, tmp_path, capsys, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        export.main(["--ckpt", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")])
        export.main(["--ckpt", str(checkpoint), "--format", "safetensors", "--out", str(tmp_path / "w.safetensors")])
    finally:
        os.umask(old)
    files = [*(tmp_path / "hf").iterdir(), tmp_path / "w.safetensors"]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o666 & ~umask for f in files}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fastlm import train as train_mod
    from tests.helpers import tiny_args

    out = tmp_path_factory.mktemp("export") / "run"
    assert train_mod.main(tiny_args(out, steps=2)) == 0
    return out


@pytest.mark.parametrize("overrides,needle", [
    (dict(pos_emb="rope"), "pos_emb=rope"),
    (dict(norm="rmsnorm"), "norm=rmsnorm"),
    (dict(mlp="swiglu"), "mlp=swiglu"),
    (dict(n_kv_head=1), "grouped-query"),
])
def test_architectures_gpt2_cannot_express_are_one_line_errors(overrides, needle):
    config = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, d_model=32, **overrides)
    with pytest.raises(ConfigError, match=needle) as info:
        export.gpt2_config(config)
    assert "\n" not in str(info.value)


def test_non_gpt2_directory_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="only GPT-2"):
        export.load_hf_gpt2(tmp_path)


def test_fine_tuning_from_an_import_lowers_the_loss(tmp_path):
    from fastlm.optim import AdamW

    path, _ = gpt2_dir(tmp_path)
    config, state, _ = export.load_hf_gpt2(path)
    model = GPT(config)
    model.load_state_dict(state)
    batch = torch.randint(0, 101, (4, 24))
    opt = AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("overrides", [dict(), dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1)])
def test_safetensors_round_trip(tmp_path, overrides):
    from fastlm.data import ByteTokenizer

    config = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, d_model=32, **overrides)
    model = GPT(config).eval()
    export.export_safetensors(config, model.state_dict(), ByteTokenizer(), tmp_path / "m.safetensors")
    back_config, state, tok = export.load_safetensors(tmp_path / "m.safetensors")
    assert back_config == config and tok.kind == "byte"
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(fastlm_from(back_config, state)(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_cli_exports_a_trained_checkpoint(tmp_path, capsys):
    from fastlm import train as train_mod
    from tests.helpers import tiny_args

    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    assert train_mod.main(tiny_args(run, "--dropout", "0", steps=3)) == 0
    capsys.readouterr()
    assert export.main(["--ckpt", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "no Hugging Face form" in capsys.readouterr().out
    assert export.main(["--ckpt", str(run), "--format", "safetensors", "--out", str(tmp_path / "w.safetensors")]) == 0
    config, state, _ = export.load_pretrained(str(run))
    model = fastlm_from(config, state)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(hf_model(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)
    for source in (tmp_path / "hf", tmp_path / "w.safetensors"):
        config2, state2, _ = export.load_pretrained(str(source))
        torch.testing.assert_close(fastlm_from(config2, state2)(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-5)


def test_reading_a_safetensors_file_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"not read")
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import` sees where the package is missing
    with pytest.raises(ConfigError, match="needs the safetensors package"):
        export.load_pretrained(str(path))


@pytest.mark.parametrize("damage", ["junk file", "truncated file", "hf config.json", "hf weights"])
def test_corrupt_weights_are_a_one_line_error(tmp_path, damage):
    config = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, d_model=32)
    state = GPT(config).state_dict()
    if damage.startswith("hf"):
        path = tmp_path / "hf"
        export.export_hf(config, state, None, path)
        name = "config.json" if damage == "hf config.json" else "model.safetensors"
        (path / name).write_bytes((path / name).read_bytes()[:40])
    else:
        path = tmp_path / "m.safetensors"
        export.export_safetensors(config, state, None, path)
        path.write_bytes(b"not safetensors" if damage == "junk file" else path.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="is corrupt or unreadable"):
        export.load_pretrained(str(path))


def test_cli_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        export.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- --init_from in training

TRAIN = ["--batch_size", "2", "--eval_iters", "2", "--sample_tokens", "0", "--progress", "false",
         "--warmup_steps", "1", "--log_interval", "1", "--dropout", "0"]


def test_training_starts_from_an_hf_directory(tmp_path):
    from fastlm import train as train_mod
    from fastlm.checkpoint import load_checkpoint, model_config_from_checkpoint

    path, _ = gpt2_dir(tmp_path, vocab=256)  # no tokenizer files: the byte tokenizer, ids 0-255
    out = tmp_path / "run"
    assert train_mod.main([*TRAIN, "--init_from", str(path), "--max_steps", "3", "--eval_interval", "3",
                           "--out_dir", str(out)]) == 0
    config = model_config_from_checkpoint(load_checkpoint(out))
    assert (config.block_size, config.n_head, config.pad_vocab_to) == (24, 4, 1)


def test_init_from_rejects_a_different_architecture(tmp_path, capsys):
    from fastlm import train as train_mod

    path, _ = gpt2_dir(tmp_path, vocab=256)
    capsys.readouterr()  # transformers' save progress bar
    with pytest.raises(SystemExit) as info:
        train_mod.main([*TRAIN, "--init_from", str(path), "--n_head", "2", "--out_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "n_head=2" in err and len(err.strip().splitlines()) == 1


def test_init_from_weights_whose_tokenizer_outgrows_the_model_is_a_one_line_error(tmp_path, capsys):
    from fastlm import train as train_mod
    from fastlm.data import ByteTokenizer

    config = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, d_model=32)
    stale = tmp_path / "stale"  # a byte model's export beside an earlier BPE export's tokenizer.json
    export.export_hf(config, GPT(config).state_dict(), ByteTokenizer(), stale)
    _, _, bpe = random_bpe_model()
    bpe._tok.save(str(stale / "tokenizer.json"))
    small = tmp_path / "small"  # no tokenizer files: training reads the data with the byte tokenizer
    config = GPTConfig(vocab_size=101, block_size=16, n_layer=1, n_head=2, d_model=32, pad_vocab_to=1)
    export.export_hf(config, GPT(config).state_dict(), None, small)
    for path, needle in ((stale, "ids but the model's vocabulary is 256"), (small, "vocab_size is 101")):
        out = tmp_path / f"run-{path.name}"
        with pytest.raises(SystemExit) as info:
            train_mod.main([*TRAIN, "--init_from", str(path), "--max_steps", "1", "--out_dir", str(out)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_init_from_a_checkpoint_keeps_the_weights_and_restarts_the_optimizer(tmp_path):
    from fastlm import train as train_mod
    from fastlm.metrics import read_metrics
    from tests.helpers import tiny_args

    first, second = tmp_path / "first", tmp_path / "second"
    assert train_mod.main(tiny_args(first, steps=3)) == 0
    # The same batch size and seed as the first run: the same eval batches.
    assert train_mod.main([*TRAIN, "--batch_size", "4", "--init_from", str(first), "--max_steps", "2",
                           "--eval_interval", "2", "--out_dir", str(second)]) == 0
    end = [r for r in read_metrics(first / "metrics.jsonl") if r["type"] == "eval"][-1]
    start = [r for r in read_metrics(second / "metrics.jsonl") if r["type"] == "eval"][0]
    assert start["step"] == 0 and start["val_loss"] == pytest.approx(end["val_loss"], rel=1e-6)


def test_gpt2_tanh_gelu_imports_exactly(tmp_path):
    """The original GPT-2 uses gelu_new (the tanh approximation): fastlm's mlp=gelu_tanh."""
    path, hf_model = gpt2_dir(tmp_path, activation="gelu_new")
    config, state, _ = export.load_hf_gpt2(path)
    assert config.mlp == "gelu_tanh"
    idx = torch.randint(0, 101, (2, 24))
    torch.testing.assert_close(fastlm_from(config, state)(idx)[0], hf_model(idx).logits, rtol=1e-5, atol=1e-5)
    export.export_hf(config, state, None, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["activation_function"] == "gelu_new"
