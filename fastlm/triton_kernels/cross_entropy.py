"""Triton kernel for fused cross-entropy (see fastlm/ops/cross_entropy.py for the math).

Each program takes blocks of BLOCK_N rows (every num_programs-th block: on CUDA the grid is
bounded, PROGRAMS_PER_SM) and walks each row's vocabulary in BLOCK_V tiles twice: the first walk
keeps a running max and a running sum of exponentials (online softmax) and gives the loss and
the log-sum-exp; the second, only when a gradient is wanted, writes d loss / d logits into
`grad`, which may be the logits buffer itself (each tile is read before it is overwritten, by
the same program). Row offsets are int64, so N * V may exceed 2**31.

Alignment: Triton vectorises a load or store (16 bytes per access instead of one element) only
where it can prove that the addresses are 16-byte aligned and that the mask is uniform over each
group of VEC = 16 / element size columns. A row of V = 50257 logits starts at an unaligned
element and ends mid-group, so a walk over `col < V` tiles from the row start would be all
scalar accesses. Each walk therefore splits a row into a head (the < VEC columns before the
row's first aligned element), a body of whole VEC-groups from there (vector accesses; its tile
mask is `col < n_body`, a multiple of VEC) and a foot (the last < VEC columns). When every row
starts aligned and V is a multiple of VEC (ALIGNED_ROWS, e.g. a vocabulary padded to 64) there
is no head or foot. Vector access also needs the base pointers 16-byte aligned, which Triton's
launcher checks and specialises on.

No autotuning: when `grad` aliases the logits, trial runs would destroy their own input. Tile
sizes come from a heuristic on V instead.

scale_rows_ is the backward's multiply of that gradient by the incoming scalar gradient, read
on the device: when it is exactly 1 (a plain loss.backward()) the programs return without
touching the N x V buffer, which saves a full read and write of it without a host sync.
"""
import os

import torch
import triton
import triton.language as tl

from fastlm.triton_kernels._launch import LAUNCH_OPTIONS, cdiv, device_guard, next_power_of_2, sm_count


@triton.jit
def _lse_tile(ptrs, mask, running_max, running_sum, sum_x, HAS_SMOOTHING: tl.constexpr):
    """Fold one tile of logits (masked entries read as -inf) into the online softmax."""
    x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    new_max = tl.maximum(running_max, tl.max(x, axis=1))
    # A row whose tiles so far are all -inf (vocabulary masking, or rows past n_rows) has
    # new_max = -inf, and exp(-inf - -inf) is NaN: shift such rows by 0, which adds exp(-inf) = 0.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    if HAS_SMOOTHING:
        sum_x += tl.sum(tl.where(mask, x, 0.0), axis=1)
    return new_max, running_sum, sum_x


@triton.jit
def _grad_tile(ptrs, grad_ptrs, cols, mask, lse, prob_coef, shift, target_coef, targets):
    """Write the gradient of one tile of logits (columns `cols`)."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    grad = tl.exp(x - lse[:, None]) * prob_coef[:, None] - shift[:, None]
    grad -= tl.where(cols == targets[:, None], target_coef[:, None], 0.0)
    tl.store(grad_ptrs, grad.to(grad_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _edge_tile(head, foot_start, n_cols, row_mask, VEC: tl.constexpr):
    """A row's head and foot as one [BLOCK_N, 2 * VEC] gather tile: (columns, mask). Lanes [0, VEC)
    are the head's columns, lanes [VEC, 2 * VEC) the foot's."""
    lane = tl.arange(0, 2 * VEC)[None, :]
    cols = tl.where(lane < VEC, lane, foot_start[:, None] + (lane - VEC))
    return cols, row_mask[:, None] & tl.where(lane < VEC, lane < head[:, None], cols < n_cols)


@triton.jit
def _cross_entropy_kernel(logits_ptr, logits_stride, targets_ptr, grad_ptr, grad_stride, loss_ptr,
                          lse_ptr, scale_ptr, n_rows, n_cols, ignore_index, label_smoothing, z_loss,
                          HAS_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                          GRAD_SAME_STRIDE: tl.constexpr, ALIGNED_ROWS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
                          PERSISTENT: tl.constexpr, BACKWARD_GRAD_WALK: tl.constexpr, EDGE_TILE: tl.constexpr):
    if PERSISTENT:
        # A bounded grid (PROGRAMS_PER_SM): each program takes every num_programs-th block of rows.
        for block in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
            _cross_entropy_rows(block, logits_ptr, logits_stride, targets_ptr, grad_ptr, grad_stride, loss_ptr,
                                lse_ptr, scale_ptr, n_rows, n_cols, ignore_index, label_smoothing, z_loss, HAS_GRAD,
                                HAS_SMOOTHING, GRAD_SAME_STRIDE, ALIGNED_ROWS, BLOCK_N, BLOCK_V, VEC,
                                BACKWARD_GRAD_WALK, EDGE_TILE)
    else:
        _cross_entropy_rows(tl.program_id(0), logits_ptr, logits_stride, targets_ptr, grad_ptr, grad_stride,
                            loss_ptr, lse_ptr, scale_ptr, n_rows, n_cols, ignore_index, label_smoothing, z_loss,
                            HAS_GRAD, HAS_SMOOTHING, GRAD_SAME_STRIDE, ALIGNED_ROWS, BLOCK_N, BLOCK_V, VEC,
                            BACKWARD_GRAD_WALK, EDGE_TILE)


@triton.jit
def _cross_entropy_rows(block, logits_ptr, logits_stride, targets_ptr, grad_ptr, grad_stride, loss_ptr,
                        lse_ptr, scale_ptr, n_rows, n_cols, ignore_index, label_smoothing, z_loss,
                        HAS_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                        GRAD_SAME_STRIDE: tl.constexpr, ALIGNED_ROWS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
                        BACKWARD_GRAD_WALK: tl.constexpr, EDGE_TILE: tl.constexpr):
    """Loss, log-sum-exp and (HAS_GRAD) gradient of the BLOCK_N rows of block `block`."""
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    targets = tl.load(targets_ptr + rows64, mask=row_mask, other=ignore_index)
    valid = (targets != ignore_index) & row_mask
    row_starts = rows64 * logits_stride
    grad_starts = row_starts if GRAD_SAME_STRIDE else rows64 * grad_stride

    # A row is walked as head | body | foot (module doc). The body's offsets are multiples of VEC
    # by construction and its mask `col < n_body` is uniform over each VEC-group; telling Triton
    # so (multiple_of) lets it use vector accesses. Head and foot columns are taken one at a time
    # as [BLOCK_N, 1] tiles, which keeps them off the body's layout and registers, or (EDGE_TILE) as
    # one small gather tile.
    if ALIGNED_ROWS:
        head = tl.zeros([BLOCK_N], tl.int32)
        body_starts = tl.multiple_of(row_starts, VEC)
    else:
        head = tl.minimum((VEC - row_starts % VEC) % VEC, n_cols).to(tl.int32)
        body_starts = tl.multiple_of(row_starts + head, VEC)
    n_body = tl.multiple_of((n_cols - head) // VEC * VEC, VEC)
    body_cols = tl.max_contiguous(tl.arange(0, BLOCK_V), BLOCK_V)[None, :]
    foot_start = head + n_body

    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    sum_x = tl.zeros([BLOCK_N], tl.float32)
    if not ALIGNED_ROWS:
        if EDGE_TILE:
            edge_cols, edge_mask = _edge_tile(head, foot_start, n_cols, row_mask, VEC)
            running_max, running_sum, sum_x = _lse_tile(
                logits_ptr + row_starts[:, None] + edge_cols, edge_mask, running_max, running_sum, sum_x,
                HAS_SMOOTHING)
        else:
            for i in range(0, VEC):
                head_col = tl.zeros([BLOCK_N, 1], tl.int32) + i
                foot_col = foot_start[:, None] + i
                running_max, running_sum, sum_x = _lse_tile(
                    logits_ptr + row_starts[:, None] + head_col, row_mask[:, None] & (head_col < head[:, None]),
                    running_max, running_sum, sum_x, HAS_SMOOTHING)
                running_max, running_sum, sum_x = _lse_tile(
                    logits_ptr + row_starts[:, None] + foot_col, row_mask[:, None] & (foot_col < n_cols),
                    running_max, running_sum, sum_x, HAS_SMOOTHING)
    for start in range(0, n_cols, BLOCK_V):
        running_max, running_sum, sum_x = _lse_tile(
            logits_ptr + body_starts[:, None] + start + body_cols,
            row_mask[:, None] & (start + body_cols < n_body[:, None]), running_max, running_sum, sum_x,
            HAS_SMOOTHING)
    # Rows past n_rows get lse 0 (never stored) so that the gradient walk stays finite.
    lse = tl.where(row_mask, running_max + tl.log(tl.where(row_mask, running_sum, 1.0)), 0.0)

    # The op does not check the target range on CUDA (a device sync per call): a target outside
    # [0, V) reads nothing out of bounds and gives a NaN loss, which the trainer's check reports.
    in_range = (targets >= 0) & (targets < n_cols)
    safe_targets = tl.where(valid & in_range, targets, 0)
    target_logit = tl.load(logits_ptr + row_starts + safe_targets, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * target_logit + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= label_smoothing * (sum_x / n_cols)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_ptr + rows64, tl.where(valid, loss, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows64, lse, mask=row_mask)

    if HAS_GRAD:
        scale = tl.load(scale_ptr)
        prob_coef = tl.where(valid, scale * (1.0 + 2.0 * z_loss * lse), 0.0)
        shift = tl.where(valid, scale * label_smoothing / n_cols, 0.0)
        target_coef = tl.where(valid, scale * (1.0 - label_smoothing), 0.0)
        coefs = (lse, prob_coef, shift, target_coef, safe_targets)
        if not ALIGNED_ROWS:
            if EDGE_TILE:
                edge_cols, edge_mask = _edge_tile(head, foot_start, n_cols, row_mask, VEC)
                _grad_tile(logits_ptr + row_starts[:, None] + edge_cols, grad_ptr + grad_starts[:, None] + edge_cols,
                           edge_cols, edge_mask, *coefs)
            else:
                for i in range(0, VEC):
                    head_col = tl.zeros([BLOCK_N, 1], tl.int32) + i
                    foot_col = foot_start[:, None] + i
                    _grad_tile(logits_ptr + row_starts[:, None] + head_col,
                               grad_ptr + grad_starts[:, None] + head_col, head_col,
                               row_mask[:, None] & (head_col < head[:, None]), *coefs)
                    _grad_tile(logits_ptr + row_starts[:, None] + foot_col,
                               grad_ptr + grad_starts[:, None] + foot_col, foot_col,
                               row_mask[:, None] & (foot_col < n_cols), *coefs)
        # With the logits' row stride the gradient shares their aligned body offsets.
        grad_body_starts = body_starts if GRAD_SAME_STRIDE else grad_starts + head
        # Backward (BACKWARD_GRAD_WALK), the gradient walk meets first the tiles the first walk read
        # last, the likeliest to be still in the L2 cache.
        n_tiles = tl.cdiv(n_cols, BLOCK_V)
        for i in range(0, n_tiles):
            start = (n_tiles - 1 - i if BACKWARD_GRAD_WALK else i) * BLOCK_V
            _grad_tile(logits_ptr + body_starts[:, None] + start + body_cols,
                       grad_ptr + grad_body_starts[:, None] + start + body_cols, head[:, None] + start + body_cols,
                       row_mask[:, None] & (start + body_cols < n_body[:, None]), *coefs)


# Whether triton.jit made the kernels above for the interpreter: it reads the variable once, when
# it decorates them, and so does this module (not on every call).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# The gradient walk re-reads each row right after the log-sum-exp walk read it. The last GPU run
# measured the kernel moving about 3 x V bytes a row at DRAM speed: the re-read missed the L2 cache.
# Two ways to make it hit were timed on an H200 (2026-11-27, the benchmark's variants_ms at
# N=16384, bf16; ms of the fwd+bwd step, one program per block / 2 programs per SM):
#   V=128256: forward walk 3.92 / 4.32, backward walk 3.71 / 4.43;
#   V=50304:  forward walk 1.79 / 1.99, backward walk 1.82 / 2.04;
#   V=50257 (unaligned rows, always one program per block): forward 2.18, backward 2.16.
# PROGRAMS_PER_SM: on CUDA, a grid of this many programs per SM, each looping over blocks of rows;
# 0 (the default, the fastest above): one program per block, as many resident as fit. Applies to
# aligned rows only (ALIGNED_ROWS): with the unaligned head and foot tiles the looping kernel
# needs more registers than two 512-thread programs per SM allow (Triton 3.6's ptxas spills it on
# sm_90).
PROGRAMS_PER_SM = 0
# BACKWARD_GRAD_WALK: the gradient walk goes from a row's last tile to its first (5% faster at
# V=128256, even at the others).
BACKWARD_GRAD_WALK = True
# The 2026-11-27 09:18 H200 run timed three more settings the same way (variants_ms, ms; equal kernels
# differ by under 1% there: EDGE_TILE changes nothing at V=50304 and 128256, aligned rows):
#                         V=50257   V=50304   V=128256
#   these defaults          2.12      1.76       3.52
#   MAX_BLOCK_V = 16384     2.47      1.94       3.43
#   EDGE_TILE = True        1.97      1.76       3.55
#   L2 eviction hints       2.19      1.74       3.46   (with EDGE_TILE: 2.69 at V=50257)
# The hints (the log-sum-exp walk's loads evict_last, the gradient walk's loads and stores
# evict_first, so that the re-read hits the L2) gained 2% at most and lost up to 36%: removed.
#
# MAX_BLOCK_V: the widest tile. At 8192 (16 warps a program, 40 registers a thread: 3 programs an SM)
# an H200 has 396 rows in flight, 40 MB at V=50257 in bf16, against a 50 MB L2 that the gradient's
# stores pass through too. 16384 (32 warps, 1 program an SM, 132 rows in flight) is 2.5% faster at
# V=128256 but 10-17% slower at the GPT-2 vocabularies.
MAX_BLOCK_V = 8192
# EDGE_TILE: a row's unaligned head and foot (V=50257) read as one gather of 2 x VEC columns per walk,
# not 2 x VEC one-column loads in a loop, each waiting on memory in turn: 7% faster at V=50257 above,
# in one run, though Triton 3.6 (the GPU image's) gives the kernel 91 registers a thread with the
# gather against 58 without (Triton 3.9: 40 either way). Off by default: on a GPU it has passed only
# the benchmark-variant test (bf16 against float64 at the three vocabularies), not the rest of the
# cross-entropy GPU suite that the default passed (fp16, fp32, smoothing, z-loss, ignored rows,
# N * V > 2**31). The interpreter tests run both ways at every row alignment.
EDGE_TILE = False


def _grid(n_blocks, device, aligned_rows):
    if device.type != "cuda" or PROGRAMS_PER_SM == 0 or not aligned_rows:
        return (n_blocks,)
    return (min(n_blocks, PROGRAMS_PER_SM * sm_count(device)),)


def _tile_sizes(n_cols, interpreted):
    block_v = next_power_of_2(n_cols)
    if interpreted:
        # The interpreter's cost is per tile operation: few, wide tiles of several rows.
        return 8, min(block_v, 2048), 1
    block_v = min(block_v, MAX_BLOCK_V)
    # 16 elements a thread per tile from 8192 columns on: one row per 512 threads at 8192, per 1024 at 16384.
    num_warps = 32 if block_v >= 16384 else 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
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
    block_n, block_v, num_warps = _tile_sizes(n_cols, INTERPRETED)
    stride = logits.stride(0)
    grad_stride = stride if grad is None else grad.stride(0)
    vec = 16 // logits.element_size()
    n_blocks = cdiv(n_rows, block_n)
    aligned_rows = stride % vec == 0 and n_cols % vec == 0
    grid = _grid(n_blocks, logits.device, aligned_rows)
    with device_guard(logits):
        _cross_entropy_kernel[grid](
            logits, stride, targets, logits if grad is None else grad, grad_stride, loss, lse, scale, n_rows,
            n_cols, ignore_index, label_smoothing, z_loss, HAS_GRAD=grad is not None,
            HAS_SMOOTHING=label_smoothing != 0.0, GRAD_SAME_STRIDE=grad_stride == stride,
            ALIGNED_ROWS=aligned_rows, BLOCK_N=block_n, BLOCK_V=block_v, VEC=vec,
            PERSISTENT=grid[0] < n_blocks, BACKWARD_GRAD_WALK=BACKWARD_GRAD_WALK, EDGE_TILE=EDGE_TILE,
            num_warps=num_warps,
            **LAUNCH_OPTIONS)
    return loss, lse


# --------------------------------------------------------------------------------------------
# The backward's scaling of the saved gradient
# --------------------------------------------------------------------------------------------

@triton.jit
def _scale_rows_kernel(x_ptr, row_stride, scale_ptr, n_cols, n_tiles, BLOCK: tl.constexpr):
    """x[r, c] *= scale (in fp32) over n_tiles tiles of BLOCK columns, tiles_per_row = cdiv(n_cols,
    BLOCK) of them per row; each program takes every num_programs-th tile."""
    scale = tl.load(scale_ptr).to(tl.float32)
    # Exactly 1 (the incoming gradient of a loss, or of a loss scaled by the grad_scale the forward
    # already applied): every program returns having read only the scale.
    if scale != 1.0:
        tiles_per_row = tl.cdiv(n_cols, BLOCK)
        cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            row = tile // tiles_per_row
            start = (tile % tiles_per_row).to(tl.int64) * BLOCK
            ptrs = x_ptr + row.to(tl.int64) * row_stride + start + cols
            # Whole tiles unmasked (vector accesses); only a row's last tile is masked.
            if start + BLOCK <= n_cols:
                x = tl.load(ptrs)
                tl.store(ptrs, (x.to(tl.float32) * scale).to(x.dtype))
            else:
                mask = start + cols < n_cols
                x = tl.load(ptrs, mask=mask)
                tl.store(ptrs, (x.to(tl.float32) * scale).to(x.dtype), mask=mask)


# One wave of programs on a large GPU (8 of 8 warps fit an SM); each loops over its share of the
# tiles, so when the scale is 1 only this many programs start and return.
SCALE_PROGRAMS = 1024
SCALE_BLOCK = 4096


def scale_rows_(x, scale):
    """x *= scale in place and return x: x (N, V) fp32/bf16/fp16 with unit stride along V (any row
    stride), scale a one-element tensor on x's device. Each product is formed in fp32 and rounded
    once to x's dtype. When scale is exactly 1 nothing of x is read or written, and the host
    never reads the scale (no device sync)."""
    n_rows, n_cols = x.shape
    if x.numel() == 0:
        return x
    row_stride = x.stride(0)
    if n_rows == 1 or row_stride == n_cols:
        # Rows back to back: one flat row, so every tile but the last is whole and aligned.
        n_rows, n_cols, row_stride = 1, n_rows * n_cols, 0
    n_tiles = n_rows * cdiv(n_cols, SCALE_BLOCK)
    grid = (min(n_tiles, SCALE_PROGRAMS),)
    with device_guard(x):
        _scale_rows_kernel[grid](x, row_stride, scale, n_cols, n_tiles, BLOCK=SCALE_BLOCK, num_warps=8,
                                 **LAUNCH_OPTIONS)
    return x
