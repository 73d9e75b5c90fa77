"""Triton kernels for LayerNorm and RMSNorm over the last dimension (see fastlm/ops/norm.py).

Forward: each program normalises BLOCK_ROWS whole rows held in registers (BLOCK_D >= D, so one
read of x and one write of y), in fp32 whatever the input dtype, and stores the per-row mean
(LayerNorm) and reciprocal standard deviation for the backward. The variance is that of x - mean
(not E[x^2] - mean^2), with the mean corrected once by the sum of x - mean. y is written in the dtype the
caller asks for (under autocast, the matmul dtype that reads it next: no separate cast pass).

Backward: a fixed number of programs (a few per SM) each walks every num_programs-th block of
rows. Per row it forms dx from x, dy, mean and rstd:
    xhat = (x - mean) * rstd          (RMSNorm: x * rstd)
    g    = dy * w
    dx   = rstd * (g - xhat * mean(g * xhat) - mean(g))      (RMSNorm: without the last term)
and it sums dy * xhat and dy over its rows in fp32 registers. Each program writes its partial
sums of dw and db, one row of a (programs, D) fp32 buffer; the launcher adds the rows. No atomics,
so the result is the same in every run on a GPU (the number of programs depends on the SM count).

Row offsets are int64 (N x D may pass 2**31). Rows are whole in registers up to MAX_DIM.
"""
import os

import torch
import triton
import triton.language as tl

from fastlm.triton_kernels._launch import LAUNCH_OPTIONS, cdiv, device_guard, next_power_of_2, sm_count

# Widest row the kernels hold in registers (the backward's 8192-wide tile takes 16 warps without
# spilling on sm_90; a 16384-wide one spilled at 32); wider rows go to the torch backend.
MAX_DIM = 8192


@triton.jit
def _norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, x_stride, y_stride, n_rows, n_cols, eps,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
        # The fp32 sum's rounding leaves an error in the mean of up to ~D ulps of |x|, which
        # matters when |mean| >> spread. The sum of x - mean measures it; one correction (values
        # already in registers) brings the mean to about an ulp.
        correction = tl.sum(xc, axis=1) / n_cols
        mean += correction
        xc = tl.where(mask, xc - correction[:, None], 0.0)
        tl.store(MEAN + rows64, mean, mask=row_ok)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * y_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows64, rstd, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, dy_stride, x_stride, dx_stride, n_rows, n_cols,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    # Per-thread partial sums over this program's rows; reduced across rows once, at the end.
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    db_acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    for block in range(pid, tl.cdiv(n_rows, BLOCK_ROWS), tl.num_programs(0)):
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows64, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows64, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_W else dy
        c1 = tl.sum(g * xhat, axis=1) / n_cols
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / n_cols
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * dx_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw_acc += dy * xhat
        if HAS_B:
            db_acc += dy
    if HAS_W:
        tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(DB_PART + pid.to(tl.int64) * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_ok)


# Whether triton.jit made the kernels above for the interpreter (read once, as triton.jit does).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Warps per SM the backward's persistent grid launches: what fits at once beside its register use
# (about 72 per thread at 8 values per thread: 28 warps of an sm_90 SM's 64K registers), so that
# every program starts in the first wave.
BWD_WARPS_PER_SM = 24
INTERPRETED_BWD_PROGRAMS = 4


def tile_sizes(n_cols, kind="fwd", interpreted=INTERPRETED):
    """(BLOCK_ROWS, BLOCK_D, num_warps) of the forward or backward for rows of n_cols. Forward:
    tiles of about 4096 values, 16 per thread (several short rows per program, one long row with
    more warps). Backward: tiles of at least 1024 values, 8 per thread: it holds about twice the
    forward's live values per element (x, dy, xhat, and the dw, db partial sums); up to 16 warps
    (the widest rows then take 16 per thread)."""
    block_d = next_power_of_2(n_cols)
    if interpreted:
        # The interpreter's cost is per tile operation: wide tiles of many rows.
        return max(1, min(64, 16384 // block_d)), block_d, 1
    if kind == "fwd":
        block_rows = max(1, min(16, 4096 // block_d))
        return block_rows, block_d, min(32, max(4, block_rows * block_d // 512))
    block_rows = max(1, min(16, 1024 // block_d))
    return block_rows, block_d, min(16, max(1, block_rows * block_d // 256))


def bwd_programs(n_rows, block_rows, num_warps, device):
    """The backward's grid: one program per row block, at most BWD_WARPS_PER_SM warps' worth per SM."""
    n_blocks = cdiv(n_rows, block_rows)
    if device.type != "cuda":
        return min(n_blocks, INTERPRETED_BWD_PROGRAMS)
    per_sm = max(1, BWD_WARPS_PER_SM // num_warps)
    return min(n_blocks, per_sm * sm_count(device))


def _or(t, placeholder):
    """t, or for an absent tensor a placeholder pointer that the kernel never reads (its use is
    compiled out by HAS_W / HAS_B / IS_RMS): every Triton version takes a tensor there."""
    return placeholder if t is None else t


def norm_forward(x, weight, bias, eps, is_rms, out_dtype):
    """x (N, D) with unit column stride; weight, bias (D,) or None. Returns y (N, D) of
    out_dtype, mean (N,) fp32 (None for RMSNorm) and rstd (N,) fp32."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    mean = None if is_rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, mean, rstd
    block_rows, block_d, num_warps = tile_sizes(n_cols, "fwd")
    with device_guard(x):
        _norm_fwd_kernel[(cdiv(n_rows, block_rows),)](
            x, _or(weight, x), _or(bias, x), y, _or(mean, rstd), rstd, x.stride(0), y.stride(0), n_rows, n_cols,
            eps, IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_ROWS=block_rows,
            BLOCK_D=block_d, num_warps=num_warps, **LAUNCH_OPTIONS)
    return y, mean, rstd


def norm_backward(dy, x, weight, has_bias, mean, rstd, is_rms):
    """dy (N, D), any strides; x (N, D) with unit column stride. Returns dx (N, D) in x's dtype
    and the fp32 sums over rows dw = sum(dy * xhat) and db = sum(dy) (None without weight / bias)."""
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_rows, block_d, num_warps = tile_sizes(n_cols, "bwd")
    programs = bwd_programs(n_rows, block_rows, num_warps, x.device)
    has_w = weight is not None
    parts = [torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if wanted else None
             for wanted in (has_w, has_bias)]
    if programs > 0:
        with device_guard(x):
            _norm_bwd_kernel[(programs,)](
                dy, x, _or(weight, x), _or(mean, rstd), rstd, dx, *(_or(part, dx) for part in parts),
                dy.stride(0), x.stride(0), dx.stride(0), n_rows, n_cols,
                IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
                num_warps=num_warps, **LAUNCH_OPTIONS)
    dw, db = (None if part is None else part.sum(0) for part in parts)
    return dx, dw, db
