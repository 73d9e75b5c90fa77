import math

import pytest
import torch

from fastlm.config import ConfigError, GPTConfig, KernelConfig
from fastlm.model import GPT, decay_groups, filter_logits
from fastlm.ops import BackendUnavailable


def tiny(**overrides):
    cfg = dict(vocab_size=256, block_size=32, n_layer=2, n_head=4, d_model=64)
    cfg.update(overrides)
    return GPTConfig(**cfg)


@pytest.mark.parametrize("pos_emb,norm,mlp,n_kv_head", [
    ("learned", "layernorm", "gelu", 4),
    ("rope", "rmsnorm", "swiglu", 2),
    ("rope", "layernorm", "gelu", 1),
])
def test_loss_at_init_is_log_vocab(pos_emb, norm, mlp, n_kv_head):
    torch.manual_seed(0)
    model = GPT(tiny(pos_emb=pos_emb, norm=norm, mlp=mlp, n_kv_head=n_kv_head))
    idx, targets = torch.randint(0, 256, (2, 8, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(256)) < 0.1


@pytest.mark.parametrize("fused", [True, False])
def test_overfits_one_batch(fused):
    torch.manual_seed(0)
    model = GPT(tiny(), kernels=KernelConfig(fused_linear_ce=fused))
    idx = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2


def test_fused_and_unfused_loss_agree():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 256, (3, 17))
    _, fused = model(idx, idx)
    logits, plain = model(idx, idx, return_logits=True)
    assert logits.shape == (3, 17, 256)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_explicit_gpu_backends_wait_for_the_move(monkeypatch):
    """Built on the CPU for GPU kernels (as the trainer builds every model), a GPT keeps the explicit
    choice; its ops refuse to run on the CPU, and a strict resolve names the problem."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = KernelConfig(attn_backend="triton", ce_backend="triton")
    model = GPT(tiny(), kernels=kernels).float()  # construction and .to() do not raise
    assert model.backends["causal_attention"] == model.backends["linear_cross_entropy"] == "triton"
    with pytest.raises(BackendUnavailable, match="causal_attention: backend 'triton' cannot run on cpu"):
        model.resolve_backends()
    idx = torch.randint(0, 256, (2, 9))
    with pytest.raises(BackendUnavailable, match="backend 'triton' cannot run on cpu"):
        model(idx, idx)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where triton can run, the strict resolve keeps it
    assert model.resolve_backends()["causal_attention"] == "triton"


def test_forward_without_targets_returns_logits():
    model = GPT(tiny())
    logits, loss = model(torch.randint(0, 256, (2, 5)))
    assert loss is None and logits.shape == (2, 5, 256)


def test_tied_head_and_param_count():
    model = GPT(tiny())
    assert model.lm_head.weight is model.wte.weight
    # Counted by hand for V=256, T=32, 2 layers, d=64, biases, learned positions, GELU MLP; the
    # tied lm_head adds nothing.
    d, V, T = 64, 256, 32
    block = (2 * d + (d * 3 * d + 3 * d) + (d * d + d)      # norm1, qkv, attention proj
             + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d))  # norm2, fc, mlp proj
    assert model.num_params() == V * d + T * d + 2 * block + 2 * d == 118_528
    assert model.num_params(non_embedding=True) == 118_528 - T * d
    assert model.flops_per_token() > 6 * model.num_params(non_embedding=True)


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=128))
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    fc_std = model.blocks[0].mlp.fc.weight.std().item()
    assert abs(fc_std - 0.02) < 0.002
    assert abs(proj_std - 0.02 / math.sqrt(16)) < 0.001


def test_decay_groups_split_by_rank():
    model = GPT(tiny())
    decay, no_decay = decay_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    total = sum(p.numel() for p in decay["params"] + no_decay["params"])
    assert total == model.num_params()


def test_generate_is_deterministic_with_a_generator():
    model = GPT(tiny())
    idx = torch.randint(0, 256, (1, 4))
    outs = [model.generate(idx, 40, temperature=0.9, top_k=10, top_p=0.9,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert outs[0].shape == (1, 44)
    assert torch.equal(outs[0], outs[1])
    greedy = model.generate(idx, 5, temperature=0)
    assert torch.equal(greedy, model.generate(idx, 5, temperature=0))


def test_generate_crops_context_beyond_block_size():
    model = GPT(tiny(block_size=8))
    out = model.generate(torch.randint(0, 256, (2, 8)), 12, top_k=5)
    assert out.shape == (2, 20)


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = torch.softmax(logits, -1)  # about [0.09, 0.64, 0.24, 0.03]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, True, True, False]]
    assert probs[0, 1] < 0.7  # the top token alone does not cover 0.7, so the second stays


@pytest.mark.parametrize("overrides,match", [
    (dict(d_model=30, n_head=4), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(norm="batchnorm"), "norm must be one of"),
])
def test_bad_model_config(overrides, match):
    with pytest.raises(ConfigError, match=match):
        GPT(tiny(**overrides))


def test_bad_dropout():
    with pytest.raises(ConfigError, match="dropout"):
        GPT(tiny(), dropout=1.0)


def test_too_long_sequence_is_rejected():
    model = GPT(tiny(block_size=8))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("idx, targets, error, match", [
    (torch.zeros(8, dtype=torch.long), None, ValueError, r"idx must have shape \(B, T\).*\(8,\)"),
    (torch.zeros(1, 0, dtype=torch.long), None, ValueError, r"T >= 1, got \(1, 0\)"),
    (torch.zeros(1, 4), None, TypeError, "idx must be an int64 or int32 tensor.*float32"),
    (torch.tensor([[1, 2, 300]]), None, ValueError, r"idx must hold token ids in \[0, 300\), got 300"),
    (torch.tensor([[1, 2, -1]]), None, ValueError, r"idx must hold token ids in \[0, 300\), got -1"),
    (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), ValueError,
     r"targets must have the shape of idx \(2, 4\), got \(2, 3\)"),
    # The embedding takes int32 ids, the loss ops int64 targets only.
    (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.int32), TypeError,
     "targets must be an int64 tensor of token ids, got int32"),
    (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), TypeError,
     "targets must be an int64 tensor of token ids, got float32"),
    # 300..319 are padding rows of the vocabulary: the loss kernels would take them silently.
    (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, -100, 310]]), ValueError,
     r"targets must hold token ids in \[0, 300\) or -100, got 310"),
])
def test_bad_token_ids_are_one_line_errors(idx, targets, error, match):
    model = GPT(tiny(vocab_size=300))
    with pytest.raises(error, match=match):
        model(idx, targets)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("prompts", [torch.tensor([[1, 2, 310]]), [[1, 310], [4, 5, 6]]], ids=["batch", "ragged"])
def test_a_prompt_of_bad_ids_is_refused_with_and_without_the_cache(prompts, use_cache):
    """The cached prefill runs the prompts as the uncached path does, so it checks them alike:
    310 is a padding row of the vocabulary (vocab_size 300), never a token."""
    model = GPT(tiny(vocab_size=300))
    with pytest.raises(ValueError, match=r"idx must hold token ids in \[0, 300\), got 310"):
        list(model.stream(prompts, 2, temperature=0, use_cache=use_cache))


def test_vocabulary_is_padded_and_padding_is_never_predicted():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=300))
    assert model.wte.weight.shape[0] == model.lm_head.weight.shape[0] == 320  # next multiple of 64
    idx = torch.randint(0, 300, (2, 9))
    logits, _ = model(idx)
    assert logits.shape == (2, 9, 300)
    with torch.no_grad():
        model.lm_head.weight[300:] = 10.0 * model.lm_head.weight[:20]  # make the padding tempting
    out = model.generate(idx[:, :2], 50, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert int(out.max()) < 300
    _, fused = model(idx, idx)
    logits, plain = model(idx, idx, return_logits=True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert GPT(tiny(vocab_size=300, pad_vocab_to=1)).wte.weight.shape[0] == 300


# --------------------------------------------------------------------------- KV cache

CACHE_ARCHS = [
    dict(pos_emb="learned", norm="layernorm", mlp="gelu", n_kv_head=4),
    dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2),  # GQA
    dict(pos_emb="rope", norm="layernorm", mlp="gelu", n_kv_head=1, bias=False),  # multi-query
]


@pytest.mark.parametrize("arch", CACHE_ARCHS, ids=["learned", "rope-gqa", "rope-mqa"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, 20, 0.9)], ids=["greedy", "sampled"])
def test_cached_generation_matches_uncached(arch, temperature, top_k, top_p):
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=97, **arch))
    idx = torch.randint(0, 97, (3, 5))
    outs = [model.generate(idx, 20, temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(11)) for use_cache in (True, False)]
    assert outs[0].shape == (3, 25)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("arch", CACHE_ARCHS, ids=["learned", "rope-gqa", "rope-mqa"])
def test_cached_logits_match_a_full_forward(arch):
    """Each decode step's logits equal the last position of a full forward (fp32 reordering only)."""
    torch.manual_seed(0)
    model = GPT(tiny(**arch)).eval()
    seq = torch.randint(0, 256, (2, 12))
    from fastlm.model import KVCache

    cache = KVCache(model, seq[:, :4])
    got = [cache.prefill()] + [cache.decode(seq[:, t]) for t in range(4, 11)]
    for t, logits in zip(range(4, 12), got):
        want, _ = model(seq[:, :t])
        torch.testing.assert_close(logits, want[:, -1], rtol=1e-5, atol=1e-5)


def test_ragged_prompts_continue_as_if_alone():
    torch.manual_seed(0)
    model = GPT(tiny(pos_emb="rope", n_kv_head=2))
    prompts = [torch.randint(0, 256, (n,)) for n in (1, 6, 3)]
    together = torch.stack(list(model.stream(prompts, 15, temperature=0)), dim=1)
    uncached = torch.stack(list(model.stream(prompts, 15, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(together, uncached)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 15, temperature=0)[0, len(prompt):]
        assert torch.equal(together[row], alone)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_cache_falls_back_past_block_size(pos_emb):
    """Past block_size the context slides; the cached path recomputes the window like the uncached one."""
    torch.manual_seed(0)
    model = GPT(tiny(block_size=8, pos_emb=pos_emb))
    idx = torch.randint(0, 256, (2, 3))
    outs = [model.generate(idx, 20, top_k=5, use_cache=c, generator=torch.Generator().manual_seed(1))
            for c in (True, False)]
    assert outs[0].shape == (2, 23) and torch.equal(outs[0], outs[1])


def test_generate_stops_at_end_of_text():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 256, (2, 4))
    free = model.generate(idx, 10, temperature=0)
    eos = int(free[0, 6])  # the third new token of row 0 becomes the end of text
    out = model.generate(idx, 10, temperature=0, eos_id=eos)
    assert out[0, 6] == eos and (out[0, 6:] == eos).all()
    row1 = free[1, 4:].tolist()
    if eos not in row1:  # row 1 never emits it: it runs to max_new_tokens
        assert out.shape == (2, 14) and torch.equal(out[1], free[1])


def test_stream_rejects_bad_arguments():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="at least one token"):
        next(model.stream([[1, 2], []], 3))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1)
