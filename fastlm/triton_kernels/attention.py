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
     Not done: when B * H_kv * cdiv(T, BLOCK_N) is below the SM count (few kv heads, short T),
     this pass leaves SMs idle. Splitting a kv head's query heads across programs would need
     fp32 atomics (non-deterministic) or per-query-head partial dK/dV, (B, H, T, D) in fp32,
     summed in a second pass: GROUP times the memory. Worth it only where a GPU measures it.
  3. dQ: one program per (query block, batch*head), looping over key blocks up to the diagonal.
Separate dK/dV and dQ passes cost one extra Q K^T recompute, but avoid fp32 atomics and their
non-determinism.

Grid: one axis of cdiv(T, BLOCK) * B * heads programs (launch_grid), so B * H is bounded by
2**31 - 1 programs in all rather than by the 65535 of grid axis 1. Consecutive programs share a
head (its K/V stay in L2), and within a head the causal work is launched heaviest first: the
forward and dQ walk their query blocks from the last (which sees every key) to the first; dK/dV
key blocks already are heaviest first in natural order. The programs launched last are then
the cheap ones, which keeps the SMs busy to the end.

Offsets: every row offset (row index x row stride) is computed in int64, like the batch and head
offsets: v is a strided view of the qkv projection, so T x stride_t passes 2**31 near T = 175K
at d_model 4096.

Block sizes: autotuned per (D, T bucket, GROUP, dtype) on CUDA, the winners cached on disk
(FASTLM_AUTOTUNE=0: one fixed config per kernel, DEFAULT_CONFIGS); fixed and small on CPU tensors,
which only run under the interpreter (TRITON_INTERPRET=1) and only need to be correct.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl
import triton.testing

from fastlm.triton_kernels._launch import LAUNCH_OPTIONS, attention_output_like, cdiv, device_guard, next_power_of_2

LOG2E = 1.4426950408889634

# Under the interpreter the cost is per Python-level block op, so smallish blocks of unequal
# sizes are used: a ratio of 2 exercises the multi-block diagonal logic of every kernel.
INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16), "delta": 32}


# CUDA grid limits: axis 0 up to 2**31 - 1, axes 1 and 2 up to 65535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def _t_bucket(T):
    return max(16, next_power_of_2(T))


def launch_grid(T, block, heads):
    """Grid of a kernel that runs one program per (block of `block` rows of T, head of `heads`)."""
    programs = cdiv(T, block) * heads
    if programs > MAX_GRID[0]:
        raise ValueError(f"attention: {programs} programs (T={T}, block {block}, {heads} batch x heads) "
                         f"exceed the CUDA grid limit {MAX_GRID[0]}")
    return (programs,)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":
        # The interpreter multiplies bf16 tiles wrongly; fp32 tiles holding the same bf16
        # values give the exact products a GPU's bf16 MMA accumulates in fp32.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _block_and_head(T, BLOCK: tl.constexpr, LAST_BLOCK_FIRST: tl.constexpr):
    """(block index along T, batch*head index) of this program in a launch_grid grid."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(T, BLOCK)
    block = pid % n_blocks
    if LAST_BLOCK_FIRST:
        # Causal work grows with the block index here: launch the last block first.
        block = n_blocks - 1 - block
    return block, pid // n_blocks


@triton.jit
def _tile_ptrs(base, rows, stride, offs_d, TRANSPOSED: tl.constexpr):
    """Pointers to rows x offs_d (or its transpose) of a (T, HEAD_DIM) matrix with row stride
    `stride` at `base`; the row offsets are int64 (see the module doc)."""
    rows = rows.to(tl.int64)
    if TRANSPOSED:
        ptrs = base + rows[None, :] * stride + offs_d[:, None]
    else:
        ptrs = base + rows[:, None] * stride + offs_d[None, :]
    return ptrs


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _query_block(Q, K, V, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_vb, stride_vh, H, T,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The setup of a program that owns one query block (forward, dQ): its batch and head, the
    bases of its kv head's K and V, the row/column/feature offsets, the rows inside T, and the
    Q tile (zeros past T). Query blocks are launched last block first (see the module doc)."""
    pid_m, pid_bh = _block_and_head(T, BLOCK_M, True)
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
    q = tl.load(_tile_ptrs(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, False),
                mask=row_ok[:, None], other=0.0)
    return pid_bh, b, h, k_base, v_base, start_m, offs_m, offs_n, offs_d, row_ok, q


@triton.jit
def _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m,
                   offs_n, offs_d, T, qk_scale, CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = _tile_ptrs(k_base, cols, stride_kt, offs_d, True)
    v_ptrs = _tile_ptrs(v_base, cols, stride_vt, offs_d, False)
    if BOUNDS_MASK:
        k_t = tl.load(k_ptrs, mask=cols[None, :] < T, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < T, other=0.0)
    else:
        k_t = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
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
    pid_bh, b, h, k_base, v_base, start_m, offs_m, offs_n, offs_d, row_ok, q = _query_block(
        Q, K, V, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_vb, stride_vh, H, T,
        GROUP, HEAD_DIM, BLOCK_M, BLOCK_N)
    o_base = O + b * stride_ob + h * stride_oh

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
    tl.store(_tile_ptrs(o_base, offs_m, stride_ot, offs_d, False), acc.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                    H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_bh = _block_and_head(T, BLOCK_M, False)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < T
    o = tl.load(_tile_ptrs(O + b * stride_ob + h * stride_oh, offs_m, stride_ot, offs_d, False),
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_tile_ptrs(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, offs_d, False),
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, H, stride_qb, stride_qh, stride_qt,
                      stride_dob, stride_doh, stride_dot, start_m, offs_n, offs_d, T, qk_scale,
                      CAUSAL_MASK: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + (b * H + h) * T
    delta_base = DELTA + (b * H + h) * T
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q_t = tl.load(_tile_ptrs(q_base, offs_m, stride_qt, offs_d, True), mask=row_ok[None, :], other=0.0)
    do = tl.load(_tile_ptrs(do_base, offs_m, stride_dot, offs_d, False), mask=row_ok[:, None], other=0.0)
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
    # Key block n meets the T - n * BLOCK_N queries after it: natural order is heaviest first.
    pid_n, pid_bkv = _block_and_head(T, BLOCK_N, False)
    b = (pid_bkv // H_KV).to(tl.int64)
    h_kv = (pid_bkv % H_KV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    k = tl.load(_tile_ptrs(K + b * stride_kb + h_kv * stride_kh, offs_n, stride_kt, offs_d, False),
                mask=col_ok[:, None], other=0.0)
    v = tl.load(_tile_ptrs(V + b * stride_vb + h_kv * stride_vh, offs_n, stride_vt, offs_d, False),
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Query blocks on the diagonal (causal mask) then after it, for each of the GROUP query heads
    # of this kv head. Each head x block pair is one step of a single loop: a nested loop over
    # the heads spilled registers at D=128 on sm_90 (the pipeliner and register allocator do
    # best on one loop level, as with GROUP = 1).
    n_diag = tl.cdiv(tl.minimum(start_n + BLOCK_N, T) - start_n, BLOCK_M)
    for step in range(0, GROUP * n_diag):
        start_m = start_n + (step % n_diag) * BLOCK_M
        dk, dv = _dkdv_query_block(dk, dv, k, v, Q, DO, LSE, DELTA, b, h_kv * GROUP + step // n_diag, H,
                                   stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
                                   start_m, offs_n, offs_d, T, qk_scale, True, BLOCK_M, DOT_PRECISION)
    n_after = tl.cdiv(tl.maximum(T - start_n - BLOCK_N, 0), BLOCK_M)
    for step in range(0, GROUP * n_after):
        start_m = start_n + BLOCK_N + (step % n_after) * BLOCK_M
        dk, dv = _dkdv_query_block(dk, dv, k, v, Q, DO, LSE, DELTA, b, h_kv * GROUP + step // n_after, H,
                                   stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
                                   start_m, offs_n, offs_d, T, qk_scale, False, BLOCK_M, DOT_PRECISION)
    # Scores were scaled by `scale` in the forward, so dK picks it up once here.
    dk = dk * scale
    out = _tile_ptrs(b * stride_dkb + h_kv * stride_dkh, offs_n, stride_dkt, offs_d, False)
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_key_block(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_n,
                  offs_d, T, qk_scale, CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = _tile_ptrs(k_base, cols, stride_kt, offs_d, True)
    v_ptrs = _tile_ptrs(v_base, cols, stride_vt, offs_d, True)
    if CAUSAL_MASK:
        k_t = tl.load(k_ptrs, mask=cols[None, :] < T, other=0.0)
        v_t = tl.load(v_ptrs, mask=cols[None, :] < T, other=0.0)
    else:
        k_t = tl.load(k_ptrs)
        v_t = tl.load(v_ptrs)
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
    pid_bh, b, h, k_base, v_base, start_m, offs_m, offs_n, offs_d, row_ok, q = _query_block(
        Q, K, V, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_vb, stride_vh, H, T,
        GROUP, HEAD_DIM, BLOCK_M, BLOCK_N)
    do = tl.load(_tile_ptrs(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, offs_d, False),
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
    tl.store(_tile_ptrs(DQ + b * stride_dqb + h * stride_dqh, offs_m, stride_dqt, offs_d, False),
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------
# autotuned variants (CUDA only). Forward and dQ need BLOCK_M % BLOCK_N == 0, dK/dV needs
# BLOCK_N % BLOCK_M == 0, so the diagonal is covered by whole sub-blocks.
#
# Each config row is (BLOCK_M, BLOCK_N, num_warps, num_stages, largest HEAD_DIM it is tried at).
# The lists are checked by compiling them for sm_90 (python -m fastlm.triton_kernels.compile_report,
# tests/test_triton_compile.py): a config that spills registers or sits at the shared-memory
# limit at some head size is not tried there, so tuning time goes to configs that can win.

_TUNE_KEY = ["HEAD_DIM", "T_BUCKET", "GROUP"]


def _configs(rows):
    return [(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s), max_head_dim)
            for m, n, w, s, max_head_dim in rows]


# Comments give what the ahead-of-time compile for sm_90 found at the head sizes a config is not
# tried at (bf16/fp16, GROUP 1 and 4, with the ptxas of Triton 3.6 (12.8) and 3.9 (13.x)).
_FWD_CONFIGS = _configs([
    (128, 64, 4, 3, 64),    # D=128: spills 150-180 B
    (128, 64, 4, 4, 64),    # D=128: spills 120-160 B
    (128, 32, 4, 3, 64),    # D=128: 255 registers, spills with ptxas 13
    (128, 128, 8, 3, 64),   # D=128: 224 KiB of shared memory, at the 227 KiB limit
    (128, 64, 8, 3, 128), (128, 64, 8, 2, 128), (128, 32, 8, 3, 128),
    (64, 64, 4, 3, 128), (64, 64, 4, 2, 128), (64, 32, 4, 4, 128),
])
_DKDV_CONFIGS = _configs([
    (64, 128, 8, 3, 64),    # D=128: 248-254 registers, spills 40-50 B with ptxas 13
    (64, 64, 4, 3, 64),     # D=128: spills 100-130 B
    (32, 128, 8, 3, 128), (16, 128, 8, 3, 128), (32, 64, 8, 3, 128), (32, 64, 4, 3, 128),
    (16, 64, 4, 4, 128),
    # Dropped: (32, 128, 8, 4), (64, 64, 8, 3) and (32, 128, 8, 2), clean at D=128, tried for the
    # D=128 backward that keeps hd128 short of its bar: on an H200 the tuner picked none of them at
    # any of the attention benchmark's 16 shapes (2026-11-27 09:18 run, "configs" in attention.json).
    # (32, 128, 4, 2) spills at D=128 (830-960 B) and, with ptxas 13, at D=64 (40 B);
    # (32, 128, 4, 3) at D=128 (820-970 B); (64, 128, 8, 2) at D=128 with ptxas 13 (40-56 B).
])
_DQ_CONFIGS = _configs([
    (128, 32, 4, 2, 64),    # D=128: spills 200-260 B
    (128, 32, 8, 3, 128), (128, 64, 8, 3, 128), (64, 32, 4, 3, 128), (64, 64, 4, 3, 128),
    (64, 16, 4, 4, 128),
    # Dropped: (128, 64, 8, 2), (128, 32, 8, 2) and (64, 64, 8, 3), never picked (as for dK/dV);
    # (128, 32, 4, 3) spills at D=128 (180-260 B).
])
# The delta kernel is not tuned: one config, used by the launcher and by compile_report.
_DELTA_CONFIG = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)


def _configs_for(table, head_dim):
    return [config for config, max_head_dim in table if head_dim <= max_head_dim]


def _tuning_bench(kernel_call, quantiles):
    # Short timing per config (Triton's default is 25 ms warm-up + 100 ms): these kernels run
    # 0.05-10 ms, so 25 ms of repeats ranks configs as well and tuning costs a fifth.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _autotune(kernel, table):
    def prune(configs, named_args, **kwargs):
        return _configs_for(table, kwargs["HEAD_DIM"])

    # cache_results: the winner per key is kept on disk beside Triton's compile cache, so a
    # second process (the next benchmark, the trainer after the tests) does not tune again.
    return triton.autotune([config for config, _ in table], key=_TUNE_KEY, do_bench=_tuning_bench,
                           cache_results=True, prune_configs_by={"early_config_prune": prune})(kernel)


_attn_fwd_tuned = _autotune(_attn_fwd, _FWD_CONFIGS)
_attn_bwd_dkdv_tuned = _autotune(_attn_bwd_dkdv, _DKDV_CONFIGS)
_attn_bwd_dq_tuned = _autotune(_attn_bwd_dq, _DQ_CONFIGS)


def _find(table, block_m, block_n, num_warps, num_stages):
    """The config of `table` with these tile sizes, warps and stages (it must be one of them)."""
    for config, max_head_dim in table:
        kw = config.kwargs
        if (kw["BLOCK_M"], kw["BLOCK_N"], config.num_warps, config.num_stages) == (block_m, block_n, num_warps,
                                                                                   num_stages):
            assert max_head_dim >= 128, "a default config must be valid for every head size"
            return config
    raise LookupError(f"no config {(block_m, block_n, num_warps, num_stages)} in the table")


# With FASTLM_AUTOTUNE=0 every CUDA launch uses these (valid for every D up to 128, no spills at
# D = 128): no tuning and one compile per kernel and specialisation, for a fast start and for
# test suites, at some cost in speed. tests/conftest.py sets it; the tuned path has its own test.
DEFAULT_CONFIGS = {"fwd": _find(_FWD_CONFIGS, 64, 64, 4, 3), "dkdv": _find(_DKDV_CONFIGS, 32, 64, 4, 3),
                   "dq": _find(_DQ_CONFIGS, 64, 32, 4, 3)}
_forced_configs = None


def autotune_enabled():
    return os.environ.get("FASTLM_AUTOTUNE", "1") != "0"


@contextlib.contextmanager
def forced_configs(fwd=None, dkdv=None, dq=None):
    """Launch the CUDA kernels with these triton.Configs (the defaults where None) instead of
    tuning, inside the block: how the tests run every config once."""
    global _forced_configs
    saved = _forced_configs
    _forced_configs = {"fwd": fwd or DEFAULT_CONFIGS["fwd"], "dkdv": dkdv or DEFAULT_CONFIGS["dkdv"],
                       "dq": dq or DEFAULT_CONFIGS["dq"]}
    try:
        yield
    finally:
        _forced_configs = saved


def _launch_cuda(name, tuned, kernel, grid_of, args, common):
    """Launch `kernel` on CUDA: the autotuned variant, or one fixed config (forced or default)."""
    if _forced_configs:
        config = _forced_configs[name]
    else:
        config = None if autotune_enabled() else DEFAULT_CONFIGS[name]
    if config is None:
        tuned[grid_of](*args, **common, **LAUNCH_OPTIONS)
    else:
        kernel[grid_of(config.kwargs)](*args, **common, **config.kwargs, num_warps=config.num_warps,
                                       num_stages=config.num_stages, **LAUNCH_OPTIONS)


def config_label(config):
    """"BLOCK_MxBLOCK_N wWARPS sSTAGES" of an attention triton.Config ("BLOCK_M w.. s.." for the
    delta kernel's), the name the compile report and the benchmark give it."""
    blocks = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N") if k in config.kwargs)
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


_TUNED = {"fwd": _attn_fwd_tuned, "dkdv": _attn_bwd_dkdv_tuned, "dq": _attn_bwd_dq_tuned}


def forget_tuned_picks():
    """Clear what tuned_picks reports, e.g. before timing a new shape."""
    for tuned in _TUNED.values():
        tuned.best_config = None


def tuned_picks():
    """{kernel: config label} of the config each autotuned kernel launched last (None if it has not
    launched through the tuner since forget_tuned_picks): the tuner's pick for the latest shape."""
    return {name: None if getattr(tuned, "best_config", None) is None else config_label(tuned.best_config)
            for name, tuned in _TUNED.items()}


def cuda_kernels(head_dim):
    """{name: (kernel, configs)}: every attention kernel launched on CUDA with the configs it may
    run with at this head size (for fastlm.triton_kernels.compile_report)."""
    return {"fwd": (_attn_fwd, _configs_for(_FWD_CONFIGS, head_dim)),
            "bwd_delta": (_attn_bwd_delta, [_DELTA_CONFIG]),
            "bwd_dkdv": (_attn_bwd_dkdv, _configs_for(_DKDV_CONFIGS, head_dim)),
            "bwd_dq": (_attn_bwd_dq, _configs_for(_DQ_CONFIGS, head_dim))}


# ---------------------------------------------------------------------------------------------
# launchers


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def dot_precision(dtype, device_type):
    """DOT_PRECISION for tensors of `dtype` on `device_type` ("cuda", or "cpu" = interpreter)."""
    # fp32 inputs get true fp32 products: tf32 would miss the fp32 tolerance by orders of magnitude.
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if device_type != "cuda" and dtype == torch.bfloat16 else "tf32"


def attention_forward(q, k, v, scale):
    """O (B, H, T, D) in q's dtype and lse2 (B, H, T) fp32, the base-2 log-sum-exp of scale*q k^T."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, T, D = q.shape
    group = H // k.shape[1]
    o = attention_output_like(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    args = (q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, T, _t_bucket(T), scale * LOG2E)
    common = dict(GROUP=group, HEAD_DIM=D, DOT_PRECISION=dot_precision(q.dtype, q.device.type))
    with device_guard(q):
        if q.device.type == "cuda":
            _launch_cuda("fwd", _attn_fwd_tuned, _attn_fwd, lambda meta: launch_grid(T, meta["BLOCK_M"], B * H),
                         args, common)
        else:
            block_m, block_n = INTERPRET_BLOCKS["fwd"]
            _attn_fwd[launch_grid(T, block_m, B * H)](*args, **common, BLOCK_M=block_m, BLOCK_N=block_n)
    return o, lse


def attention_backward(do, q, k, v, o, lse, scale):
    """(dq, dk, dv) for O = attention_forward(q, k, v, scale); dk, dv summed over each group."""
    do, q, k, v, o = (_last_dim_contiguous(t) for t in (do, q, k, v, o))
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    group = H // H_kv
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    # In the inputs' memory order, as the forward's output (the gradients' way back to the qkv
    # projection is then a cheaper copy); dk and dv alike, as the kernel writes both with dk's strides.
    dq, dk, dv = attention_output_like(q), attention_output_like(k), attention_output_like(k)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    common = dict(GROUP=group, HEAD_DIM=D, DOT_PRECISION=dot_precision(q.dtype, q.device.type))
    t_bucket = _t_bucket(T)
    qk_scale = scale * LOG2E
    on_cuda = q.device.type == "cuda"
    with device_guard(q):
        delta_args = (o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T)
        if on_cuda:
            block_m = _DELTA_CONFIG.kwargs["BLOCK_M"]
            _attn_bwd_delta[launch_grid(T, block_m, B * H)](*delta_args, HEAD_DIM=D, BLOCK_M=block_m,
                                                             num_warps=_DELTA_CONFIG.num_warps,
                                                             num_stages=_DELTA_CONFIG.num_stages, **LAUNCH_OPTIONS)
        else:
            block_m = INTERPRET_BLOCKS["delta"]
            _attn_bwd_delta[launch_grid(T, block_m, B * H)](*delta_args, HEAD_DIM=D, BLOCK_M=block_m)

        dkdv_args = (q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride()[:3], H, H_kv, T, t_bucket,
                     scale, qk_scale)
        dq_args = (q, k, v, do, lse, delta, dq, *strides, *dq.stride()[:3], H, T, t_bucket, scale, qk_scale)
        if on_cuda:
            _launch_cuda("dkdv", _attn_bwd_dkdv_tuned, _attn_bwd_dkdv,
                         lambda meta: launch_grid(T, meta["BLOCK_N"], B * H_kv), dkdv_args, common)
            _launch_cuda("dq", _attn_bwd_dq_tuned, _attn_bwd_dq, lambda meta: launch_grid(T, meta["BLOCK_M"], B * H),
                         dq_args, common)
        else:
            block_m, block_n = INTERPRET_BLOCKS["dkdv"]
            _attn_bwd_dkdv[launch_grid(T, block_n, B * H_kv)](*dkdv_args, **common, BLOCK_M=block_m,
                                                               BLOCK_N=block_n)
            block_m, block_n = INTERPRET_BLOCKS["dq"]
            _attn_bwd_dq[launch_grid(T, block_m, B * H)](*dq_args, **common, BLOCK_M=block_m, BLOCK_N=block_n)
    return dq, dk, dv

