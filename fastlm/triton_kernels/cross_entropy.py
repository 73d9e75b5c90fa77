"""Triton kernel for fused cross-entropy (see fastlm/ops/cross_entropy.py for the math).

Each program owns BLOCK_N rows and walks the vocabulary in BLOCK_V tiles twice: the first walk
keeps a running max and a running sum of exponentials (online softmax) and gives the loss and
the log-sum-exp; the second, only when a gradient is wanted, writes d loss / d logits into
`grad`, which may be the logits buffer itself (each tile is read before it is overwritten, by
the same program). Row offsets are int64, so N * V may exceed 2**31.

No autotuning: when `grad` aliases the logits, trial runs would destroy their own input. Tile
sizes come from a heuristic on V instead.
"""
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_kernel(logits_ptr, logits_stride, targets_ptr, grad_ptr, grad_stride, loss_ptr,
                          lse_ptr, scale_ptr, n_rows, n_cols, ignore_index, label_smoothing, z_loss,
                          HAS_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    targets = tl.load(targets_ptr + rows64, mask=row_mask, other=ignore_index)
    valid = (targets != ignore_index) & row_mask
    row_ptrs = logits_ptr + rows64 * logits_stride

    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    sum_x = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        # Rows past n_rows are all -inf; keep their arithmetic finite (they are never stored).
        new_max = tl.where(row_mask, new_max, 0.0)
        running_sum = running_sum * tl.exp(running_max - new_max) + \
            tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=1)
    lse = running_max + tl.log(tl.where(row_mask, running_sum, 1.0))

    safe_targets = tl.where(valid, targets, 0)
    target_logit = tl.load(logits_ptr + rows64 * logits_stride + safe_targets, mask=valid, other=0.0).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * target_logit + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= label_smoothing * (sum_x / n_cols)
    tl.store(loss_ptr + rows64, tl.where(valid, loss, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows64, lse, mask=row_mask)

    if HAS_GRAD:
        scale = tl.load(scale_ptr)
        prob_coef = tl.where(valid, scale * (1.0 + 2.0 * z_loss * lse), 0.0)
        shift = tl.where(valid, scale * label_smoothing / n_cols, 0.0)
        target_coef = tl.where(valid, scale * (1.0 - label_smoothing), 0.0)
        grad_ptrs = grad_ptr + rows64 * grad_stride
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            probs = tl.exp(x - lse[:, None])
            grad = probs * prob_coef[:, None] - shift[:, None]
            grad -= tl.where(cols[None, :] == safe_targets[:, None], target_coef[:, None], 0.0)
            tl.store(grad_ptrs[:, None] + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _tile_sizes(n_cols, interpreted):
    block_v = triton.next_power_of_2(n_cols)
    if interpreted:
        # The interpreter's cost is per tile operation: few, wide tiles of several rows.
        return 8, min(block_v, 2048), 1
    block_v = min(block_v, 8192)
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    return 1, block_v, num_warps


def cross_entropy_rows(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale):
    """Fused cross-entropy over rows.

    logits (N, V) fp32/bf16/fp16 with unit stride along V; targets (N,) int64; grad None or a
    tensor like logits (it may be logits itself) that receives d loss_row / d logits *
    grad_scale (a scalar tensor). Returns (loss_rows, lse), both fp32 (N,); ignored rows have
    loss 0 and gradient 0.
    """
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss, lse
    targets = targets.contiguous()
    scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=logits.device).reshape(1)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    block_n, block_v, num_warps = _tile_sizes(n_cols, interpreted)
    grid = (triton.cdiv(n_rows, block_n),)
    _cross_entropy_kernel[grid](
        logits, logits.stride(0), targets, logits if grad is None else grad,
        0 if grad is None else grad.stride(0), loss, lse, scale, n_rows, n_cols, ignore_index,
        label_smoothing, z_loss, HAS_GRAD=grad is not None, HAS_SMOOTHING=label_smoothing != 0.0,
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps)
    return loss, lse
