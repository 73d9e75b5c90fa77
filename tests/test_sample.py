import pytest
import torch

from fastlm import train as train_mod
from fastlm.export import load_model
from fastlm.model import KVCache
from tests.helpers import run_cli, tiny_args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "run"
    assert train_mod.main(tiny_args(out, steps=3)) == 0
    return out


def test_sampling_is_deterministic_with_a_seed(checkpoint):
    args = ["--ckpt", checkpoint, "--prompt", "To be", "--max-new-tokens", "30", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    first, second = run_cli("fastlm.sample", *args), run_cli("fastlm.sample", *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("To be")
    other = run_cli("fastlm.sample", *args[:-1], "4")
    assert other.stdout != first.stdout


def test_sample_accepts_the_checkpoint_file(checkpoint):
    result = run_cli("fastlm.sample", "--ckpt", checkpoint / "ckpt.pt", "--max-new-tokens", "5", "--seed", "0",
                     "--num-samples", "2")
    assert result.returncode == 0, result.stderr
    assert "-" * 40 in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "0"], "--top-k"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--benchmark", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_sampling_arguments(checkpoint, args, needle):
    result = run_cli("fastlm.sample", "--ckpt", checkpoint, *args)
    assert result.returncode == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_checkpoint(tmp_path):
    result = run_cli("fastlm.sample", "--ckpt", tmp_path)
    assert result.returncode == 2 and "no checkpoint" in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--stop", "x", "--stop", ""], "--stop needs a non-empty string"),
    # Bytes that are not UTF-8 reach argv as surrogates (Python's surrogateescape).
    (["--prompt", "\udcff\udcfe"], "is not valid UTF-8 text"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_prompt_stop_and_device_are_one_line_errors(checkpoint, capsys, args, needle):
    with pytest.raises(SystemExit) as info:
        sample_mod.main(["--ckpt", str(checkpoint), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_a_prompt_the_tokenizer_cannot_encode_is_a_one_line_error(checkpoint, capsys, monkeypatch):
    from fastlm.tokenizers import CharTokenizer

    model, _ = load_model(str(checkpoint))
    # A nanoGPT character vocabulary has no 'Z'.
    monkeypatch.setattr(sample_mod, "load_model", lambda path, device: (model, CharTokenizer("ab \n")))
    with pytest.raises(SystemExit) as info:
        sample_mod.main(["--ckpt", str(checkpoint), "--prompt", "Zebra"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "'Z' is not in the character vocabulary" in err, err
    assert len(err.strip().splitlines()) == 1, err
    # No prompt, or an empty one, means a newline, which this character set lacks.
    monkeypatch.setattr(sample_mod, "load_model", lambda path, device: (model, CharTokenizer("ab ")))
    for prompt in ([], ["--prompt", ""]):
        with pytest.raises(SystemExit) as info:
            sample_mod.main(["--ckpt", str(checkpoint), *prompt])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "has no newline" in err and len(err.strip().splitlines()) == 1, err


def test_help_shows_no_default_beside_the_switches_that_turn_things_off(capsys):
    with pytest.raises(SystemExit):
        sample_mod.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--no-cache, --no_cache", "--no-stream, --no_stream"):
        entry = help_text[help_text.index(flag):]
        entry = entry[:entry.index(" --", len(flag))]
        assert "(default: True)" not in entry, entry
    args = sample_mod.build_parser().parse_args(["--ckpt", "x"])
    assert args.use_cache and args.stream
    args = sample_mod.build_parser().parse_args(["--ckpt", "x", "--no-cache", "--no_stream"])
    assert not args.use_cache and not args.stream


@pytest.mark.parametrize("form", ["safetensors", "hf"])
def test_samples_from_exported_weights_equal_the_checkpoint_s(checkpoint, tmp_path, capsys, form):
    pytest.importorskip("safetensors")
    from fastlm import export

    out = tmp_path / ("w.safetensors" if form == "safetensors" else "hf")
    assert export.main(["--ckpt", str(checkpoint), "--format", form, "--out", str(out)]) == 0
    capsys.readouterr()
    args = ["--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0"]
    assert sample_mod.main(["--ckpt", str(checkpoint), *args]) == 0
    want = capsys.readouterr().out
    assert sample_mod.main(["--ckpt", str(out), *args]) == 0  # hf: no tokenizer file, the byte tokenizer
    assert capsys.readouterr().out == want


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning_for_the_caller(checkpoint, tmp_path, capsys):
    import shutil

    from fastlm.checkpoint import checkpoint_files

    newest = checkpoint_files(checkpoint)[0]
    shutil.copy(newest, tmp_path)
    (tmp_path / "ckpt-000999.pt").write_bytes(b"not a zip archive")
    assert sample_mod.main(["--ckpt", str(tmp_path), "--max-new-tokens", "3", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipped ckpt-000999.pt, loading ckpt-" in err and "resuming" not in err


@pytest.mark.parametrize("temperature", ["0.8", "0"])
def test_a_checkpoint_whose_logits_are_nan_is_a_one_line_error(checkpoint, tmp_path, capsys, temperature):
    state = torch.load(checkpoint / "ckpt.pt", weights_only=True)
    state["model"]["wte.weight"][0, 0] = float("nan")  # a diverged run's weights
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as info:
        sample_mod.main(["--ckpt", str(tmp_path), "--max-new-tokens", "3", "--temperature", temperature])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "NaN or inf" in err, err
    with pytest.raises(SystemExit) as info:
        sample_mod.main(["--ckpt", str(tmp_path), "--max-new-tokens", "3", "--benchmark"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "NaN or inf" in err, err


# --------------------------------------------------------------------------- streaming, stops, batches

from fastlm import sample as sample_mod  # noqa: E402
from fastlm.data import ByteTokenizer  # noqa: E402


class Letters:
    """A tokenizer of single characters, so tests can write token sequences as strings."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def feed(stream, text):
    return [stream.push(ord(c)) for c in text]


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_it():
    stream = sample_mod.TextStream(Letters(), stop=["END"])
    pieces = feed(stream, "abEcEN")
    assert "".join(pieces) == "abEc" and pieces[-1] == ""  # "EN" may still become "END"
    assert stream.push(ord("D")) == "" and stream.done and stream.text == "abEc"
    assert stream.push(ord("x")) == ""


def test_text_stream_releases_a_held_back_tail_at_the_end():
    stream = sample_mod.TextStream(Letters(), stop=["\n\n"])
    assert "".join(feed(stream, "hi\n")) == "hi"
    assert stream.finish() == "\n" and not stream.done


def test_text_stream_waits_for_complete_utf8_characters():
    stream = sample_mod.TextStream(ByteTokenizer())
    first, second = list("é".encode())
    assert stream.push(first) == "" and stream.push(second) == "é"


def test_streamed_pieces_are_the_returned_text(checkpoint):
    model, tok = load_model(str(checkpoint))
    pieces = []
    texts = sample_mod.generate_texts(model, tok, ["To be", "A"], 40, seed=1, on_text=lambda r, p: pieces.append((r, p)))
    for row, text in enumerate(texts):
        assert "".join(p for r, p in pieces if r == row) == text
    # A batch gives each prompt the continuation it gets alone (greedy: no shared random stream).
    batch = sample_mod.generate_texts(model, tok, ["To be", "A"], 30, temperature=0)
    alone = [sample_mod.generate_texts(model, tok, [p], 30, temperature=0)[0] for p in ("To be", "A")]
    assert batch == alone
    stop = batch[0][3:5]
    cut = sample_mod.generate_texts(model, tok, ["To be"], 30, temperature=0, stop=[stop])[0]
    assert cut == batch[0][:batch[0].find(stop)]
    # An end-of-text id ends a row: the tokens before it are kept.
    ids = tok.encode(batch[0])
    ended = sample_mod.generate_texts(model, tok, ["To be"], 30, temperature=0, eos_id=ids[2])[0]
    assert ended == tok.decode(ids[:ids.index(ids[2])])


def test_a_tiktoken_model_s_end_of_text_ends_the_sample():
    tiktoken = pytest.importorskip("tiktoken")
    from fastlm.tokenizers import TiktokenTokenizer

    encoding = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    assert sample_mod.end_of_text_id(TiktokenTokenizer("gpt2", encoding=encoding)) == 256
    assert sample_mod.end_of_text_id(ByteTokenizer()) is None


def test_cli_batch_stop_and_benchmark(checkpoint, capsys):
    assert sample_mod.main(["--ckpt", str(checkpoint), "--prompt", "To", "--prompt", "Be", "--max-new-tokens", "8",
                            "--seed", "0", "--stop", "zzz", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To") and "\n" + "-" * 40 + "\nBe" in out
    assert sample_mod.main(["--ckpt", str(checkpoint), "--max-new-tokens", "6", "--benchmark"]) == 0
    assert "cached" in capsys.readouterr().out


# --------------------------------------------------------------------------- on a CUDA device

@pytest.fixture(scope="module")
def cuda_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_run") / "run"
    assert train_mod.main(tiny_args(out, "--device", "cuda", "--dtype", "bfloat16", "--block_size", "64",
                                    "--d_model", "128", "--n_head", "2", "--lr", "3e-3", steps=30)) == 0
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_cuda_checkpoint_samples_on_either_device(cuda_checkpoint, device):
    """A checkpoint trained on the GPU samples there and on a CPU-only setup (its tensors load to
    the CPU first), the same text for the same seed on each device from one process to the next."""
    cmd = ["--ckpt", cuda_checkpoint, "--prompt", "To be", "--max-new-tokens", "40", "--seed", "3",
           "--device", device]
    first, second = run_cli("fastlm.sample", *cmd), run_cli("fastlm.sample", *cmd)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("To be") and len(first.stdout) > len("To be\n")
    assert first.stdout == second.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cached_decoding_matches_a_full_forward(cuda_checkpoint, dtype):
    """KV-cached decoding on the GPU: each step's logits are the last position of a full forward,
    within the dtype's rounding (the cached path attends one query to the cache, the full one runs
    the causal kernel)."""
    model = load_model(str(cuda_checkpoint), torch.device("cuda"))[0].to(dtype)
    seq = torch.randint(0, 256, (3, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        cache = KVCache(model, seq[:, :8])
        got = [cache.prefill()] + [cache.decode(seq[:, t]) for t in range(8, 39)]
        for t, logits in zip(range(8, 40), got):
            want, _ = model(seq[:, :t])
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(logits.float(), want[:, -1].float(), rtol=tol, atol=tol)
