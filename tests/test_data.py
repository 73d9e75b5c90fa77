import numpy as np
import pytest
import torch

from fastlm.data import (BatchSampler, ByteTokenizer, DataError, embedded_corpus, load_data, read_token_file,
                         tokenizer_from_dict)
from fastlm.prepare import prepare


def test_embedded_corpus_is_real_text():
    text = embedded_corpus()
    assert len(text) > 500_000
    assert "To be, or not to be" in text
    assert len(set(text.split())) > 20_000  # a real vocabulary, not a repeated string


def test_byte_split_is_90_10():
    data = load_data(None, "byte", 256, 128)
    total = len(data.train) + len(data.val)
    assert len(data.val) == total // 10
    assert data.train.dtype == np.uint16 and int(data.train.max()) < 256


def test_directory_of_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta " * 100)
    data = load_data(str(tmp_path), "byte", 256, 8)
    assert len(data.train) + len(data.val) == 600 + 500


def test_bpe_tokenizer_round_trip_and_checkpoint_form(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(embedded_corpus()[:200_000])
    data = load_data(str(src), "bpe", 512, 32)
    tok = data.tokenizer
    assert tok.vocab_size == 512
    sample = "Good night, sweet prince."
    assert tok.decode(tok.encode(sample)) == sample
    again = tokenizer_from_dict(tok.to_dict())
    assert again.encode(sample) == tok.encode(sample)
    assert len(data.train) + len(data.val) < 200_000 * 0.6  # BPE compresses


@pytest.mark.parametrize("kind,vocab", [("byte", 256), ("bpe", 400)])
def test_prepared_token_file_matches_direct_tokenization(tmp_path, kind, vocab):
    src = tmp_path / "t.txt"
    src.write_text(embedded_corpus()[:50_000])
    out = tmp_path / "t.tok"
    count, tok = prepare(str(src), str(out), kind, vocab)
    tokens, header = read_token_file(str(out))
    assert isinstance(tokens, np.memmap) and header["num_tokens"] == count == len(tokens)
    assert header["vocab_size"] == tok.vocab_size
    assert tokens.tolist() == tok.encode(src.read_text())
    data = load_data(str(out), "byte", vocab, 16)
    assert data.tokenizer.kind == kind and len(data.train) + len(data.val) == count


def test_truncated_token_file_is_rejected(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("some text " * 100)
    out = tmp_path / "t.tok"
    prepare(str(src), str(out))
    out.write_bytes(out.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        load_data(str(out), "byte", 256, 8)


def test_batch_sampler_windows_and_state():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = BatchSampler(tokens, block_size=7, batch_size=5, seed=3)
    x, y = sampler.next()
    assert x.shape == (5, 7) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # targets are inputs shifted by one
    state = sampler.state_dict()
    expected = sampler.next()
    sampler.load_state_dict(state)
    again = sampler.next()
    assert torch.equal(expected[0], again[0])


def test_byte_tokenizer_handles_unicode():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("naïve — ok")) == "naïve — ok"


@pytest.mark.parametrize("source", ["text", "directory", "token_file"])
def test_train_then_val_is_the_token_stream_in_order(tmp_path, source):
    """The split is a cut, not a sample: train followed by val is exactly the tokenized stream,
    so no validation window repeats a training one (a split shifted by even one token fails)."""
    text = embedded_corpus()[:30_000]
    if source == "text":
        (tmp_path / "t.txt").write_text(text)
        path = tmp_path / "t.txt"
    elif source == "directory":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.txt").write_text(text[:12_345])
        (tmp_path / "d" / "b.txt").write_text(text[12_345:])
        path = tmp_path / "d"
    else:
        (tmp_path / "t.txt").write_text(text)
        prepare(str(tmp_path / "t.txt"), str(tmp_path / "t.tok"))
        path = tmp_path / "t.tok"
    data = load_data(str(path), "byte", 256, 16)
    stream = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    assert len(data.train) + len(data.val) == len(stream)
    assert np.array_equal(np.concatenate([data.train, data.val]), stream)
    assert len(data.val) == len(stream) // 10


# --------------------------------------------------------------------------- sampler orders, ranks, eval windows

@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sequential_order_covers_each_window_once_per_epoch_across_ranks(world_size):
    block, batch = 5, 3
    tokens = np.arange(block * 13 + 3, dtype=np.uint16)  # 13 non-overlapping windows and a tail
    samplers = [BatchSampler(tokens, block, batch, seed=0, order="sequential", rank=r, world_size=world_size)
                for r in range(world_size)]
    num_windows = samplers[0].num_windows
    assert num_windows == 13
    steps = -(-num_windows // (batch * world_size))
    seen = []
    for _ in range(steps):
        for sampler in samplers:
            x, y = sampler.next()
            assert torch.equal(y, x + 1)
            seen += (x[:, 0] // block).tolist()
    first_epoch = seen[:num_windows]  # every window exactly once before any repeats
    assert sorted(first_epoch) == list(range(num_windows))
    assert samplers[0].epoch == (steps * batch * world_size) // num_windows


def test_random_draws_are_disjoint_across_ranks_and_rank0_matches_one_process():
    tokens = np.arange(10_000, dtype=np.uint16)
    single = BatchSampler(tokens, 8, 4, seed=5)
    ranks = [BatchSampler(tokens, 8, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        a, b = ranks[0].next()[0], ranks[1].next()[0]
        assert not set(a[:, 0].tolist()) & set(b[:, 0].tolist())
    # one process draws what it drew before ranks existed: the generator and order are unchanged
    reference = torch.Generator().manual_seed(5)
    starts = torch.randint(len(tokens) - 8, (4,), generator=reference)
    assert torch.equal(single.next()[0][:, 0], starts.long())


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_sampler_state_resumes_exactly(order):
    tokens = np.arange(3000, dtype=np.uint16)
    sampler = BatchSampler(tokens, 16, 4, seed=9, order=order)
    for _ in range(7):
        sampler.next()
    state = sampler.state_dict()
    expected = [sampler.next()[0] for _ in range(5)]
    fresh = BatchSampler(tokens, 16, 4, seed=123, order=order)
    fresh.load_state_dict(state)
    assert all(torch.equal(e, fresh.next()[0]) for e in expected)
    legacy = BatchSampler(tokens, 16, 4, seed=123)
    legacy.load_state_dict(state["generator"])  # checkpoints that saved the generator alone
    assert legacy.position == 0


def test_sampler_reads_multi_shard_sources():
    from fastlm.shards import TokenShards

    whole = np.arange(500, dtype=np.uint16)
    shards = TokenShards([whole[:123], whole[123:124], whole[124:]])
    a = BatchSampler(whole, 10, 16, seed=2).next()
    b = BatchSampler(shards, 10, 16, seed=2).next()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_eval_batches_are_fixed_and_spread_over_the_split():
    from fastlm.data import eval_batches

    tokens = np.arange(5000, dtype=np.uint16)
    first = list(eval_batches(tokens, 16, 4, num_batches=3))
    again = list(eval_batches(tokens, 16, 4, num_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    starts = torch.cat([x[:, 0] for x, _ in first])
    assert starts[0] == 0 and starts[-1] == len(tokens) - 17  # from the start of the split to its end
    ranks = [torch.cat([x[:, 0] for x, _ in eval_batches(tokens, 16, 4, 3, rank=r, world_size=2)]) for r in range(2)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
