"""The GPT: a decoder-only transformer with pre-norm blocks.

token embedding (+ learned positions, or RoPE inside attention) -> n_layer x [norm -> causal
self-attention (grouped-query heads) -> residual, norm -> MLP -> residual] -> final norm ->
lm_head tied to the token embedding. Attention, the norms and the loss go through fastlm.ops;
their backends (KernelConfig) are resolved once, when the model is built and whenever it is moved
(`model.to(...)`), and are listed in `model.backends`. An explicit backend that cannot run on the
device the model is built on (triton, for a model built on the CPU to be moved to a GPU) is kept
until the move; `model.resolve_backends()` checks the choices where the model is.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlm.config import ConfigError, GPTConfig, KernelConfig
from fastlm.ops import (BackendUnavailable, causal_attention, cross_entropy, layer_norm, linear_cross_entropy,
                        resolve_backend, rms_norm)
from fastlm.ops.checks import dtype_name

IGNORE_INDEX = -100


class Dropout(nn.Module):
    """Inverted dropout drawing its mask with torch.rand (uniform) instead of bernoulli_.

    The same distribution as nn.Dropout, from the same global generator; on CPU uniform
    sampling is about twice as fast, which matters at the 9 dropouts of every training step.
    """

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, device=x.device).ge_(self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep

    def extra_repr(self):
        return f"p={self.p}"


def _autocast_dtype(x):
    """The dtype autocast gives matmuls on x's device, or None outside autocast."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _FusedNormBackend:
    """What LayerNorm and RMSNorm below share. backend: what runs in eager mode; compiled_backend:
    what runs under torch.compile, where an "auto" choice is PyTorch's norm, which inductor fuses
    with the residual add and the casts around it (an opaque fused kernel would split that
    fusion). Both set by GPT.resolve_backends."""

    backend = compiled_backend = "auto"

    def _current_backend(self):
        return self.compiled_backend if torch.compiler.is_compiling() else self.backend


class LayerNorm(_FusedNormBackend, nn.LayerNorm):
    """nn.LayerNorm (same parameters, state dict and init) computed by fastlm.ops.layer_norm. Under
    autocast its output is already in the autocast dtype, which every consumer here (a matmul)
    would cast it to: the same values without the cast's extra pass (see fastlm/ops/norm.py)."""

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, eps=self.eps, out_dtype=_autocast_dtype(x),
                          backend=self._current_backend())


class RMSNorm(_FusedNormBackend, nn.RMSNorm):
    """nn.RMSNorm computed by fastlm.ops.rms_norm, as LayerNorm above."""

    def forward(self, x):
        return rms_norm(x, self.weight, eps=self.eps, out_dtype=_autocast_dtype(x), backend=self._current_backend())


NORM_OPS = {"layernorm": "layer_norm", "rmsnorm": "rms_norm"}


def make_norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=1e-5)
    return LayerNorm(config.d_model, bias=config.bias)


def rope_tables(head_dim, length, theta, device):
    """cos/sin tables of shape (length, head_dim / 2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (first half, second half) of the last dim of x (B, H, T, D) by position."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, dropout):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.d_model, (config.n_head + 2 * config.n_kv_head) * config.head_dim,
                             bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.residual_projection = True
        self.dropout = Dropout(dropout)
        self.backend = "auto"  # set by GPT.resolve_backends

    def forward(self, x, rope=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = causal_attention(q, k, v, backend=self.backend)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.dropout(self.proj(y))


def mlp_width(config):
    """Hidden width of the MLP: 4x, or for SwiGLU 2/3 of that rounded up to a multiple of 64,
    which keeps the parameter count of the GELU MLP (three matrices instead of two)."""
    if config.mlp == "swiglu":
        return 64 * math.ceil(int(8 * config.d_model / 3) / 64)
    return 4 * config.d_model


class MLP(nn.Module):
    def __init__(self, config, dropout):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.gelu_approximate = "tanh" if config.mlp == "gelu_tanh" else "none"  # gelu_tanh: GPT-2's gelu_new
        hidden = mlp_width(config)
        if self.swiglu:
            self.gate = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.fc = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.proj.residual_projection = True
        self.dropout = Dropout(dropout)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.fc(x) if self.swiglu else F.gelu(self.fc(x), approximate=self.gelu_approximate)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, config, dropout):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, dropout)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config, dropout)

    def forward(self, x, rope=None):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """GPT(config, dropout=0.0, kernels=KernelConfig(), compute_dtype=None).

    compute_dtype: the dtype the ops will see (the autocast dtype when training under autocast;
    default: the parameters' dtype); with the device, it decides what "auto" backends resolve to.
    """

    def __init__(self, config: GPTConfig, dropout=0.0, kernels=None, compute_dtype=None):
        super().__init__()
        config.validate()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.config = config
        self.kernels = kernels or KernelConfig()
        self.compute_dtype = compute_dtype
        # Padded rows (config.pad_vocab_to) keep the lm_head matmul and the loss kernels aligned;
        # no input uses them, the loss pushes their logits down, and generate never samples them.
        self.wte = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model) if config.pos_emb == "learned" else None
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(config, dropout) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        if config.pos_emb == "rope":
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta, "cpu")
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        self.resolve_backends(strict=False)

    def resolve_backends(self, strict=True):
        """Pick the concrete backend of attention, the norms and the loss for the current device and
        compute dtype (one choice per model, not per call); an unusable explicit choice raises here.

        strict=False (construction, .to()) keeps an explicit choice that cannot run on the current
        device as it is: a model built on the CPU for a GPU backend is usable once moved, and until
        then its op raises BackendUnavailable at the first call, before any kernel runs."""
        device, dtype = self.wte.weight.device, self.compute_dtype or self.wte.weight.dtype
        loss_op = "linear_cross_entropy" if self.kernels.fused_linear_ce else "cross_entropy"
        norm_op = NORM_OPS[self.config.norm]

        def resolve(op, backend, **kwargs):
            try:
                return resolve_backend(op, device, backend, **kwargs)
            except BackendUnavailable:
                if strict:
                    raise
                return backend

        self.backends = {
            "causal_attention": resolve("causal_attention", self.kernels.attn_backend,
                                        dtype=dtype, head_dim=self.config.head_dim),
            # The norms read the residual stream, which is in the parameters' dtype (fp32 under autocast).
            norm_op: resolve(norm_op, self.kernels.norm_backend, dtype=self.wte.weight.dtype),
            loss_op: resolve(loss_op, self.kernels.ce_backend, dtype=dtype),
        }
        # The unfused loss (forward with return_logits) runs on the same backend as the fused one.
        self.loss_backend = self.backends[loss_op]
        for block in self.blocks:
            block.attn.backend = self.backends["causal_attention"]
        compiled_norm = "torch" if self.kernels.norm_backend == "auto" else self.backends[norm_op]
        for module in self.modules():
            if isinstance(module, _FusedNormBackend):
                module.backend, module.compiled_backend = self.backends[norm_op], compiled_norm
        return self.backends

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half(), ...: the backends follow the parameters' new device and dtype.
        module = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "backends"):
            self.resolve_backends(strict=False)
        return module

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            # Residual projections are scaled so the residual stream's variance does not grow with depth.
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual_projection", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameter count (tied weights once); non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward): 6N plus the attention scores' 12*L*d*T."""
        T = seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * self.config.n_layer * self.config.d_model * T

    def embed(self, idx):
        """Token embeddings of idx (B, T) plus learned positions 0..T-1, and the RoPE tables
        (None with learned positions): what every block sequence starts from."""
        x = self.wte(idx)
        if self.wpe is not None:
            return x + self.wpe(torch.arange(idx.shape[1], device=idx.device)), None
        return x, (self.rope_cos, self.rope_sin)

    def hidden_states(self, idx):
        """Final-norm hidden states (B, T, d_model) for token ids idx (B, T)."""
        self._check_ids("idx", idx)
        x, rope = self.embed(idx)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm_f(x)

    def _check_ids(self, name, ids, ignore_index=None, dtypes=(torch.int64, torch.int32)):
        """TypeError/ValueError (one line) for token ids that are not (B, T) integers of `dtypes`
        (the embedding takes int64 and int32, the loss int64 only) in [0, vocab_size) (or
        ignore_index) with 1 <= T <= block_size. The range is checked where it costs no device sync
        (CPU, eager), as the loss ops do; elsewhere the data path has checked every id at load. Ids
        of the padded vocabulary rows are refused: no input may use them."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in dtypes:
            what = dtype_name(ids.dtype) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"{name} must be an {' or '.join(map(dtype_name, dtypes))} tensor of token ids, got {what}")
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"{name} must have shape (B, T) with T >= 1, got {tuple(ids.shape)}")
        if ids.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds block_size {self.config.block_size}")
        if ids.device.type != "cpu" or torch.compiler.is_compiling() or not ids.numel():
            return
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if ignore_index is not None:
            bad &= ids != ignore_index
        if bool(bad.any()):
            raise ValueError(f"{name} must hold token ids in [0, {self.config.vocab_size})"
                             f"{'' if ignore_index is None else f' or {ignore_index}'}, got {int(ids[bad][0])}")

    def forward(self, idx, targets=None, return_logits=False, grad_scale=None):
        """idx, targets: (B, T) int64. Returns (logits (B, T, vocab_size) or None, loss or None).

        With targets, logits are returned only when return_logits=True (a fused loss overwrites
        the logits it is given with their gradient, so then the loss runs on the reference
        backend); otherwise kernels.fused_linear_ce decides whether the loss is
        linear_cross_entropy (no full logits ever exist) or lm_head + cross_entropy. grad_scale: the
        factor the loss will be multiplied by before backward (a GradScaler's scale), so that the
        fused loss stores its fp16 gradient already scaled (see fastlm.ops.loss).
        """
        if targets is not None:
            if isinstance(targets, torch.Tensor) and isinstance(idx, torch.Tensor) and targets.shape != idx.shape:
                raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
            self._check_ids("targets", targets, ignore_index=IGNORE_INDEX, dtypes=(torch.int64,))
        h = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(h)[..., :self.config.vocab_size], None
        if self.kernels.fused_linear_ce and not return_logits:
            loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1),
                                        ignore_index=IGNORE_INDEX, grad_scale=grad_scale, backend=self.loss_backend)
            return None, loss
        logits = self.lm_head(h)
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                             grad_scale=grad_scale, backend="torch" if return_logits else self.loss_backend)
        return (logits[..., :self.config.vocab_size] if return_logits else None), loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 use_cache=True, eos_id=None):
        """Append up to max_new_tokens sampled tokens to idx (B, T); temperature 0 means greedy.

        use_cache: decode with a KV cache (see `stream`); the tokens are the same as without it.
        eos_id: a row that emits it is finished (it is padded with eos_id from then on) and the
        loop ends early when every row is finished, so the result may be shorter than T + max_new_tokens.
        """
        rows = [idx]
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for next_id in self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache):
            if eos_id is not None:
                next_id = next_id.masked_fill(finished, eos_id)
                finished |= next_id == eos_id
            rows.append(next_id[:, None])
            if eos_id is not None and bool(finished.all()):
                break
        return torch.cat(rows, dim=1)

    @torch.no_grad()
    def stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
               use_cache=True):
        """Yield the next token of every row, (B,) int64, one step at a time, max_new_tokens times.

        prompts: (B, T) token ids, or a list of B 1-D id sequences of different lengths (each row
        then continues its own prompt as if it were alone). The consumer stops early by leaving the
        loop (stop strings, end of text). With use_cache the prompts are prefilled through the
        training attention op (`causal_attention`), then each new token attends to the cached keys
        and values; once a row's context would pass block_size, every step recomputes the last
        block_size tokens, exactly as without the cache (learned positions cannot slide).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        device = self.wte.weight.device
        if torch.is_tensor(prompts) and prompts.dim() == 2:
            seqs, ragged = prompts.to(device), False
        else:
            seqs = [torch.as_tensor(p, dtype=torch.long, device=device).reshape(-1) for p in prompts]
            if not seqs or min(len(s) for s in seqs) == 0:
                raise ValueError("every prompt needs at least one token")
            ragged = len({len(s) for s in seqs}) > 1
            seqs = seqs if ragged else torch.stack(seqs)
        was_training = self.training
        self.eval()
        try:
            cache = None
            for step in range(max_new_tokens):
                lengths = [len(s) for s in seqs] if ragged else [seqs.shape[1]] * seqs.shape[0]
                if use_cache and max(lengths) < self.config.block_size:
                    if cache is None:
                        cache = KVCache(self, seqs)
                        logits = cache.prefill()
                    else:
                        logits = cache.decode(next_id)
                else:
                    logits = self._last_logits(seqs, ragged)
                if step == 0 and not torch.isfinite(logits).all():
                    # Weights of a diverged run: a clear error, not a meaningless argmax or a RuntimeError
                    # (a device-side assert on CUDA) from torch.multinomial. Checked once (one host sync).
                    raise ValueError("the model's logits are NaN or inf: its weights are broken (a run that diverged?)")
                next_id = sample_next(logits.float(), temperature, top_k, top_p, generator)
                if ragged:
                    seqs = [torch.cat((s, t)) for s, t in zip(seqs, next_id[:, None])]
                else:
                    seqs = torch.cat((seqs, next_id[:, None]), dim=1)
                yield next_id
        finally:
            self.train(was_training)

    def _last_logits(self, seqs, ragged):
        """Logits (B, vocab_size) of the next token, recomputed from each row's last block_size tokens."""
        block = self.config.block_size
        if not ragged:
            return self.lm_head(self.hidden_states(seqs[:, -block:])[:, -1, :])[:, :self.config.vocab_size]
        hidden = torch.cat([self.hidden_states(s[None, -block:])[:, -1, :] for s in seqs])
        return self.lm_head(hidden)[:, :self.config.vocab_size]


class KVCache:
    """Keys and values of every layer for incremental decoding: (B, n_kv_head, block_size, head_dim)
    per layer and per row, with each row's own length (rows may hold prompts of different lengths)."""

    def __init__(self, model, seqs):
        self.model = model
        cfg = model.config
        self.seqs = seqs
        self.shape = (len(seqs), cfg.n_kv_head, cfg.block_size, cfg.head_dim)
        self.k, self.v = [None] * cfg.n_layer, [None] * cfg.n_layer  # allocated at the first write, in k's dtype
        self.host_lengths = [len(s) for s in seqs]  # also kept on the host: no device sync per token
        self.lengths = torch.tensor(self.host_lengths, dtype=torch.long, device=model.wte.weight.device)

    def prefill(self):
        """Run the prompts through the model with the training attention op, filling the cache;
        returns the logits (B, vocab_size) of each row's next token."""
        model = self.model
        if torch.is_tensor(self.seqs):
            hidden = self._prefill_rows(self.seqs, slice(None))
        else:  # different lengths: one prefill per row (no padding, no mask: the training op as is)
            hidden = torch.cat([self._prefill_rows(s[None], slice(i, i + 1)) for i, s in enumerate(self.seqs)])
        self.seqs = None
        return model.lm_head(hidden)[:, :model.config.vocab_size]

    def _prefill_rows(self, idx, rows):
        model = self.model
        model._check_ids("idx", idx)  # as the uncached path (hidden_states) checks the same prompts
        T = idx.shape[1]
        x, rope = model.embed(idx)
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn_qkv(attn, block.norm1(x))
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if self.k[layer] is None:
                self.k[layer], self.v[layer] = (torch.zeros(self.shape, dtype=k.dtype, device=k.device) for _ in "kv")
            self.k[layer][rows, :, :T] = k
            self.v[layer][rows, :, :T] = v
            y = causal_attention(q, k, v, backend=attn.backend)
            x = x + attn.proj(y.transpose(1, 2).reshape(idx.shape[0], T, attn.n_head * attn.head_dim))
            x = x + block.mlp(block.norm2(x))
        return model.norm_f(x)[:, -1, :]

    def decode(self, token):
        """Append one token per row, token (B,), at each row's position; returns the next logits (B, vocab_size)."""
        model = self.model
        B = token.shape[0]
        pos = self.lengths  # (B,): the position of the new token in each row
        rows = torch.arange(B, device=token.device)
        x = model.wte(token[:, None])
        rope = None
        if model.wpe is not None:
            x = x + model.wpe(pos[:, None])
        else:
            rope = (model.rope_cos[pos][:, None, None, :], model.rope_sin[pos][:, None, None, :])  # (B, 1, 1, D/2)
        kv_len = max(self.host_lengths) + 1
        # Keys past a row's own length are stale zeros of a shorter row: mask them (not needed when all agree).
        mask = None
        if min(self.host_lengths) + 1 != kv_len:
            mask = (torch.arange(kv_len, device=token.device)[None, :] <= pos[:, None])[:, None, None, :]
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn_qkv(attn, block.norm1(x))
            if rope is not None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            self.k[layer][rows, :, pos] = k[:, :, 0]
            self.v[layer][rows, :, pos] = v[:, :, 0]
            keys, values = self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]
            # One query against every cached key: no causal mask, GQA through enable_gqa.
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=False,
                                               enable_gqa=attn.n_kv_head != attn.n_head)
            x = x + attn.proj(y.transpose(1, 2).reshape(B, 1, attn.n_head * attn.head_dim))
            x = x + block.mlp(block.norm2(x))
        self.lengths = pos + 1
        self.host_lengths = [n + 1 for n in self.host_lengths]
        return model.lm_head(model.norm_f(x)[:, -1, :])[:, :model.config.vocab_size]


def attn_qkv(attn, x):
    """q (B, H, T, D), k and v (B, H_kv, T, D) of a CausalSelfAttention for input x (B, T, C)."""
    B, T, _ = x.shape
    q, k, v = attn.qkv(x).split(
        [attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim, attn.n_kv_head * attn.head_dim], dim=-1)
    return (q.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2),
            k.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2),
            v.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2))


def rotate(x, cos, sin):
    """apply_rope with cos/sin already gathered at each row's position, broadcastable to x's (..., D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def sample_next(logits, temperature, top_k=None, top_p=None, generator=None):
    """The next token (B,) from logits (B, V): argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top_k and outside the top_p nucleus (rows of (B, V))."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop_sorted = (cumulative - F.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def decay_groups(model, weight_decay):
    """AdamW parameter groups: tensors with dim >= 2 (matrices, embeddings) decay, others do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
