"""Triton kernels for causal attention, FlashAttention-2 style (forward and backward).

Layout: q, dq, o, do are (B, H, T, D); k, v, dk, dv are (B, H_kv, T, D); the last dimension
must be contiguous, other strides are free. Query head h reads key/value head h // GROUP.

Forward: one program per (query block, batch*head). It walks the key blocks strictly below the
diagonal without any mask, then the diagonal block(s) with the causal mask; blocks above the
diagonal are never touched. Softmax is online, in fp32, in base 2 (exp2 is what the hardware
has): scores are pre-multiplied by scale * log2(e). It writes O and lse2 = the base-2
log-sum-exp of each row's scaled scores, (B, H, T) fp32.

Backward: P is recomputed from lse2, so no T x T matrix is stored.
  1. delta = rowsum(dO * O)                               (one pass, fp32)
  2. dK, dV: one program per (key block, batch*kv head). It loops over the GROUP query heads
     sharing that kv head and over the query blocks at or after its diagonal, so the group sum
     happens in registers and dK/dV are written once, without atomics.
  3. dQ: one program per (query block, batch*head), looping over key blocks up to the diagonal.
Separate dK/dV and dQ passes cost one extra Q K^T recompute, but avoid fp32 atomics and their
non-determinism.

Block sizes: autotuned per (D, T bucket, GROUP) on CUDA; fixed and small on CPU tensors, which
only run under the interpreter (TRITON_INTERPRET=1) and only need to be correct.
"""
import contextlib

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Under the interpreter the cost is per Python-level block op, so smallish blocks of unequal
# sizes are used: a ratio of 2 exercises the multi-block diagonal logic of every kernel.
INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16), "delta": 32}


def _t_bucket(T):
    return max(16, triton.next_power_of_2(T))


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":
        # The interpreter multiplies bf16 tiles wrongly; fp32 tiles holding the same bf16
        # values give the exact products a GPU's bf16 MMA accumulates in fp32.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m,
                   offs_n, offs_d, T, qk_scale, CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    cols = start_n + offs_n
    if BOUNDS_MASK:
        k_t = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=cols[None, :] < T, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
    else:
        k_t = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
    s = _dot(q, k_t, None, DOT_PRECISION) * qk_scale
    if CAUSAL_MASK:
        s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
    # Every row has seen at least one unmasked key by the end of its diagonal block, and the
    # first block it sees has one too, so m_new is finite and alpha = exp2(-inf) = 0 at start.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              H, T, T_BUCKET, qk_scale,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUP
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Keys before start_m are all < T and all visible to every row of the block: no masks.
    for start_n in range(0, start_m, BLOCK_N):
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start_n,
                                       offs_m, offs_n, offs_d, T, qk_scale, False, False, DOT_PRECISION)
    diag_end = tl.minimum(start_m + BLOCK_M, T)
    for start_n in range(start_m, diag_end, BLOCK_N):
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start_n,
                                       offs_m, offs_n, offs_d, T, qk_scale, True, True, DOT_PRECISION)

    acc = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                    H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                      start_m, offs_n, offs_d, T, qk_scale, CAUSAL_MASK: tl.constexpr,
                      BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q_t = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    # lse2 = +inf past T makes those columns of P exactly 0 (q is 0 there, so s is finite).
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    s_t = _dot(k, q_t, None, DOT_PRECISION) * qk_scale
    if CAUSAL_MASK:
        # Masking before exp2 keeps future scores, unbounded by lse2, from overflowing.
        s_t = tl.where(offs_m[None, :] >= offs_n[:, None], s_t, float("-inf"))
    p_t = tl.exp2(s_t - lse[None, :])
    dv = _dot(p_t.to(do.dtype), do, dv, DOT_PRECISION)
    dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt,
                   H, H_KV, T, T_BUCKET, scale, qk_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // H_KV).to(tl.int64)
    h_kv = (pid_bkv % H_KV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    for g in range(GROUP):
        h = h_kv * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * T
        for start_m in range(start_n, diag_end, BLOCK_M):
            dk, dv = _dkdv_query_block(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                                       stride_qt, stride_dot, start_m, offs_n, offs_d, T, qk_scale,
                                       True, BLOCK_M, DOT_PRECISION)
        for start_m in range(start_n + BLOCK_N, T, BLOCK_M):
            dk, dv = _dkdv_query_block(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                                       stride_qt, stride_dot, start_m, offs_n, offs_d, T, qk_scale,
                                       False, BLOCK_M, DOT_PRECISION)
    # Scores were scaled by `scale` in the forward, so dK picks it up once here.
    dk = dk * scale
    out = b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_key_block(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_n,
                  offs_d, T, qk_scale, CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    cols = start_n + offs_n
    if CAUSAL_MASK:
        k_t = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=cols[None, :] < T, other=0.0)
        v_t = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None], mask=cols[None, :] < T, other=0.0)
    else:
        k_t = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
        v_t = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None])
    s = _dot(q, k_t, None, DOT_PRECISION) * qk_scale
    if CAUSAL_MASK:
        s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    dp = _dot(do, v_t, None, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = _dot(ds.to(k_t.dtype), tl.trans(k_t), dq, DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 H, T, T_BUCKET, scale, qk_scale,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUP
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    row_base = pid_bh.to(tl.int64) * T
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, start_m, BLOCK_N):
        dq = _dq_key_block(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m,
                           offs_n, offs_d, T, qk_scale, False, DOT_PRECISION)
    diag_end = tl.minimum(start_m + BLOCK_M, T)
    for start_n in range(start_m, diag_end, BLOCK_N):
        dq = _dq_key_block(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m,
                           offs_n, offs_d, T, qk_scale, True, DOT_PRECISION)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------
# autotuned variants (CUDA only). Forward and dQ need BLOCK_M % BLOCK_N == 0, dK/dV needs
# BLOCK_N % BLOCK_M == 0, so the diagonal is covered by whole sub-blocks. Configs that do not
# fit in shared memory are dropped by the autotuner itself.

_TUNE_KEY = ["HEAD_DIM", "T_BUCKET", "GROUP"]


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 128, 8, 3),
                         (64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 4, 4), (64, 64, 4, 2)])
_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3),
                          (32, 128, 4, 2), (16, 64, 4, 4)])
_DQ_CONFIGS = _configs([(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3),
                        (128, 32, 4, 2), (64, 16, 4, 4)])

_attn_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY)(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dq)


# ---------------------------------------------------------------------------------------------
# launchers


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(t):
    # fp32 inputs get true fp32 products: tf32 would miss the fp32 tolerance by orders of magnitude.
    if t.dtype == torch.float32:
        return "ieee"
    return "upcast" if t.device.type != "cuda" and t.dtype == torch.bfloat16 else "tf32"


def _device_guard(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def attention_forward(q, k, v, scale):
    """O (B, H, T, D) in q's dtype and lse2 (B, H, T) fp32, the base-2 log-sum-exp of scale*q k^T."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, T, D = q.shape
    group = H // k.shape[1]
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    args = (q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, T, _t_bucket(T), scale * LOG2E)
    common = dict(GROUP=group, HEAD_DIM=D, DOT_PRECISION=_dot_precision(q))
    with _device_guard(q):
        if q.device.type == "cuda":
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
            _attn_fwd_tuned[grid](*args, **common)
        else:
            block_m, block_n = INTERPRET_BLOCKS["fwd"]
            _attn_fwd[(triton.cdiv(T, block_m), B * H)](*args, **common, BLOCK_M=block_m, BLOCK_N=block_n)
    return o, lse


def attention_backward(do, q, k, v, o, lse, scale):
    """(dq, dk, dv) for O = attention_forward(q, k, v, scale); dk, dv summed over each group."""
    do, q, k, v, o = (_last_dim_contiguous(t) for t in (do, q, k, v, o))
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    group = H // H_kv
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H_kv, T, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H_kv, T, D), dtype=v.dtype, device=v.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    common = dict(GROUP=group, HEAD_DIM=D, DOT_PRECISION=_dot_precision(q))
    t_bucket = _t_bucket(T)
    qk_scale = scale * LOG2E
    on_cuda = q.device.type == "cuda"
    with _device_guard(q):
        delta_block = 64 if on_cuda else INTERPRET_BLOCKS["delta"]
        _attn_bwd_delta[(triton.cdiv(T, delta_block), B * H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T, HEAD_DIM=D, BLOCK_M=delta_block)

        dkdv_args = (q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride()[:3], H, H_kv, T, t_bucket,
                     scale, qk_scale)
        dq_args = (q, k, v, do, lse, delta, dq, *strides, *dq.stride()[:3], H, T, t_bucket, scale, qk_scale)
        if on_cuda:
            _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H_kv)](*dkdv_args, **common)
            _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](*dq_args, **common)
        else:
            block_m, block_n = INTERPRET_BLOCKS["dkdv"]
            _attn_bwd_dkdv[(triton.cdiv(T, block_n), B * H_kv)](*dkdv_args, **common, BLOCK_M=block_m,
                                                                  BLOCK_N=block_n)
            block_m, block_n = INTERPRET_BLOCKS["dq"]
            _attn_bwd_dq[(triton.cdiv(T, block_m), B * H)](*dq_args, **common, BLOCK_M=block_m, BLOCK_N=block_n)
    return dq, dk, dv

