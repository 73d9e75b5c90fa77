"""Ahead-of-time compile of every tuned config of every Triton kernel for a CUDA target (sm_90, the
H100, by default), without a GPU: registers, spill bytes and shared memory per config.

    python -m fastlm.triton_kernels.compile_report [--dtypes bf16,fp16] [--head-dims 64,128] [--vocabs ...]
                                                   [--norm-dims ...] [--arch 90]

prints one row per (kernel, config, dtype, D). tests/test_triton_compile.py asserts that every
row compiles with no spills and within the shared-memory limit; a GPU session can print the same
table. Arguments are described the way Triton's JIT specialises them: pointers 16-byte aligned,
integers that are multiples of 16 marked so (strides of the GPT's layout at T = 4096).

Registers and spills are read from the cubin with the cuobjdump that ships with Triton (the
kernel is never loaded, so Triton's own n_regs/n_spills are not filled in). "spill" is the
per-thread local memory (stack frame), the number the driver reports as Triton's n_spills.
"""
import argparse
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from fastlm.triton_kernels._launch import LAUNCH_OPTIONS

# Largest dynamic shared memory one block may use on sm_90 (H100): 227 KiB.
SMEM_LIMIT = {90: 227 * 1024}
DEFAULT_DTYPES = (torch.bfloat16, torch.float16)
DEFAULT_HEAD_DIMS = (64, 128)
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_POINTEE = {**_TRITON_DTYPE, torch.int64: "i64"}


@dataclasses.dataclass
class CompileRow:
    kernel: str     # e.g. "attention_fwd", "cross_entropy", "norm_bwd"
    config: str     # tile sizes, warps, stages
    dtype: str      # element type of the tensors (norms: of y and dy; x is fp32, the residual stream)
    shape: str      # what the specialisation depends on: D (attention, norms) or V (cross-entropy)
    regs: int       # registers per thread
    spill: int      # bytes of local memory per thread (spilled registers)
    smem: int       # bytes of shared memory per block
    asm: dict = dataclasses.field(default_factory=dict, repr=False)  # IR texts asked for: {"ttir": ...}

    def __str__(self):
        return (f"{self.kernel:<19} {self.config:<14} {self.dtype:<5} {self.shape:<10} {self.regs:>5} "
                f"{self.spill:>6} {self.smem:>8}")


HEADER = f"{'kernel':<19} {'config':<14} {'dtype':<5} {'shape':<10} {'regs':>5} {'spill':>6} {'smem':>8}"


def _nvidia_bin(tool):
    """Path of a CUDA tool bundled with Triton (triton.knobs exists from Triton 3.4)."""
    try:
        from triton import knobs
        return getattr(knobs.nvidia, tool).path
    except (ImportError, AttributeError):
        import triton.backends.nvidia as nvidia
        return os.path.join(os.path.dirname(nvidia.__file__), "bin", tool)


def _signature(fn, args, constexprs):
    """Signature and attributes of `fn` as Triton's JIT builds them for these argument values:
    torch dtype = pointer to that type (16-byte aligned), int = i32/i64 (divisible by 16 when it
    is), float = fp32."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.dtype):
            signature[name] = "*" + _POINTEE[value]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_kernel(fn, args, constexprs, num_warps, num_stages, arch=90):
    """Compile the JIT function `fn` for sm_`arch`; returns (compiled kernel, regs, spill, smem)."""
    signature, attrs = _signature(fn, args, constexprs)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages, **LAUNCH_OPTIONS))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return kernel, int(found["REG"]), int(found["STACK"]) + int(found["LOCAL"]), kernel.metadata.shared


def _probe(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@functools.lru_cache(maxsize=None)
def unavailable_reason(arch=90):
    """None if Triton can compile for sm_`arch` here (with its bundled ptxas), else why not."""
    try:
        # JITFunction directly, not triton.jit: under TRITON_INTERPRET=1 the latter gives a
        # function for the interpreter, which cannot be compiled.
        compile_kernel(JITFunction(_probe), {"x_ptr": torch.float32, "n": 7}, {"BLOCK": 16}, 4, 1, arch)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
        return f"triton cannot compile for sm_{arch} here: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None


def _interpreted():
    """True when the kernels were defined for the interpreter (TRITON_INTERPRET=1), which cannot
    compile them."""
    from fastlm.triton_kernels.attention import _attn_fwd
    return not isinstance(_attn_fwd, JITFunction)


# ---------------------------------------------------------------------------------------------
# The kernels and their configs


# Grouped-query attention: 1 (multi-head) and 4 query heads per kv head.
GQA_GROUPS = (1, 4)


def _attention_cases(dtype, head_dim):
    from fastlm.triton_kernels import attention

    B, H, T, D = 4, 16, 4096, head_dim
    qkv = dict(b=T * 3 * H * D, h=D, t=3 * H * D)      # q, k, v: views of the (B, T, 3, H, D) projection
    out = dict(b=T * H * D, h=D, t=H * D)                # o, dq, dk, dv, do: (B, T, H, D) seen as (B, H, T, D)
    args = dict(H=H, H_KV=H, T=T, T_BUCKET=T, scale=D ** -0.5, qk_scale=D ** -0.5 * attention.LOG2E,
                LSE=torch.float32, DELTA=torch.float32)
    for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
        args[name] = dtype
    for prefix, strides in (("q", qkv), ("k", qkv), ("v", qkv), ("o", out), ("dq", out), ("dk", out),
                            ("do", out)):
        for dim, stride in strides.items():
            args[f"stride_{prefix}{dim}"] = stride
    for name, (fn, configs) in attention.cuda_kernels(head_dim).items():
        # GROUP (query heads per kv head) is a loop bound in dK/dV only; the other kernels use it
        # for one index division.
        for group in GQA_GROUPS if name == "bwd_dkdv" else (1,):
            common = dict(GROUP=group, HEAD_DIM=D, DOT_PRECISION=attention.dot_precision(dtype, "cuda"))
            shape = f"D={D}" if group == 1 else f"D={D} G={group}"
            for config in configs:
                constexprs = {k: v for k, v in {**common, **config.kwargs}.items() if k in fn.arg_names}
                yield (f"attention_{name}", attention.config_label(config), shape, fn, args, constexprs,
                       config.num_warps, config.num_stages)


def _cross_entropy_cases(dtype, vocabs):
    from fastlm.triton_kernels import cross_entropy

    for vocab in vocabs:
        block_n, block_v, num_warps = cross_entropy._tile_sizes(vocab, interpreted=False)
        args = dict(logits_ptr=dtype, logits_stride=vocab, targets_ptr=torch.int64, grad_ptr=dtype,
                    grad_stride=vocab, loss_ptr=torch.float32, lse_ptr=torch.float32, scale_ptr=torch.float32,
                    n_rows=8192, n_cols=vocab, ignore_index=-100, label_smoothing=0.1, z_loss=1e-4)
        # The most demanding variant: gradient and label smoothing on.
        vec = 16 // torch.empty((), dtype=dtype).element_size()
        constexprs = dict(HAS_GRAD=True, HAS_SMOOTHING=True, GRAD_SAME_STRIDE=True, ALIGNED_ROWS=vocab % vec == 0,
                          BLOCK_N=block_n, BLOCK_V=block_v, VEC=vec, PERSISTENT=cross_entropy.PROGRAMS_PER_SM > 0 and vocab % vec == 0,
                          BACKWARD_GRAD_WALK=cross_entropy.BACKWARD_GRAD_WALK, EDGE_TILE=cross_entropy.EDGE_TILE)
        yield ("cross_entropy", f"{block_n}x{block_v} w{num_warps}", f"V={vocab}", cross_entropy._cross_entropy_kernel,
               args, constexprs, num_warps, 1)
    if vocabs:
        # The backward's in-place scaling of the saved gradient (one kernel for every V: rows back to
        # back are one flat row).
        args = dict(x_ptr=dtype, row_stride=0, scale_ptr=torch.float32, n_cols=8192 * 50257, n_tiles=100523)
        yield ("cross_entropy_scale", f"1x{cross_entropy.SCALE_BLOCK} w8", "flat", cross_entropy._scale_rows_kernel,
               args, dict(BLOCK=cross_entropy.SCALE_BLOCK), 8, 1)


# V = 50257 (GPT-2, odd row stride), 50304 (the same padded to 64), 128256 (Llama 3), 4000 (one tile).
CROSS_ENTROPY_VOCABS = (50257, 50304, 128256, 4000)


def _norm_cases(dtype, dims):
    """LayerNorm forward and backward (the variant with the most live values: weight, bias and the
    mean) as the GPT runs them under autocast: x fp32 (the residual stream), y and dy in `dtype`."""
    from fastlm.triton_kernels import norm

    stats = dict(MEAN=torch.float32, RSTD=torch.float32)
    for dim in dims:
        args = {"fwd": dict(X=torch.float32, W=torch.float32, B=torch.float32, Y=dtype, **stats, x_stride=dim,
                            y_stride=dim, n_rows=32768, n_cols=dim, eps=1e-5),
                "bwd": dict(DY=dtype, X=torch.float32, W=torch.float32, **stats, DX=torch.float32,
                            DW_PART=torch.float32, DB_PART=torch.float32, dy_stride=dim, x_stride=dim, dx_stride=dim,
                            n_rows=32768, n_cols=dim)}
        for kind, fn in (("fwd", norm._norm_fwd_kernel), ("bwd", norm._norm_bwd_kernel)):
            block_rows, block_d, num_warps = norm.tile_sizes(dim, kind, interpreted=False)
            constexprs = dict(IS_RMS=False, HAS_W=True, HAS_B=True, BLOCK_ROWS=block_rows, BLOCK_D=block_d)
            yield f"norm_{kind}", f"{block_rows}x{block_d} w{num_warps}", f"D={dim}", fn, args[kind], constexprs, \
                num_warps, 1


# GPT-2 small (768), a power of two, Llama 2/3 7-8B (4096), 13B (5120), 70B (8192: the widest).
NORM_DIMS = (768, 1024, 4096, 5120, 8192)


def _cases(dtypes, head_dims, vocabs, norm_dims=()):
    for dtype in dtypes:
        for head_dim in head_dims:
            yield from _attention_cases(dtype, head_dim)
        yield from _cross_entropy_cases(dtype, vocabs)
        yield from _norm_cases(dtype, norm_dims)


def compile_report(dtypes=DEFAULT_DTYPES, head_dims=DEFAULT_HEAD_DIMS, vocabs=CROSS_ENTROPY_VOCABS, arch=90,
                   asm=(), norm_dims=NORM_DIMS):
    """Compile every tuned config of every Triton kernel for sm_`arch`: a list of CompileRow.

    asm: IR kinds to keep in each row's `asm` ("ttir", "ttgir", "llir", "ptx").
    Raises RuntimeError (with unavailable_reason) where Triton cannot compile for CUDA. Under
    TRITON_INTERPRET=1 the kernels exist only for the interpreter, so the report is built in a
    subprocess without it.
    """
    reason = unavailable_reason(arch)
    if reason is not None:
        raise RuntimeError(reason)
    if _interpreted():
        return _report_in_subprocess(dtypes, head_dims, vocabs, arch, asm, norm_dims)
    rows = []
    for kernel, config, shape, fn, args, constexprs, num_warps, num_stages in _cases(dtypes, head_dims, vocabs,
                                                                                     norm_dims):
        compiled, regs, spill, smem = compile_kernel(fn, args, constexprs, num_warps, num_stages, arch)
        dtype = _TRITON_DTYPE[next(args[name] for name in ("Q", "logits_ptr", "x_ptr", "Y", "DY") if name in args)]
        rows.append(CompileRow(kernel, config, dtype, shape, regs, spill, smem, {k: compiled.asm[k] for k in asm}))
    return rows


def _report_in_subprocess(dtypes, head_dims, vocabs, arch, asm, norm_dims):
    """compile_report in subprocesses without TRITON_INTERPRET, one per head size, run side by
    side (the compiles are independent and each takes a second or two)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    running = []
    for i, head_dim in enumerate(head_dims):
        command = [sys.executable, "-m", "fastlm.triton_kernels.compile_report", "--json", "--arch", str(arch),
                   "--dtypes", ",".join(_TRITON_DTYPE[d] for d in dtypes), "--head-dims", str(head_dim),
                   "--vocabs", ",".join(map(str, vocabs if i == 0 else ())),
                   "--norm-dims", ",".join(map(str, norm_dims if i == 0 else ())), "--asm", ",".join(asm)]
        running.append((command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True, env=env)))
    rows = []
    for command, process in running:
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{err[-4000:]}")
        rows += [CompileRow(**row) for row in json.loads(out.splitlines()[-1])]
    return rows


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--head-dims", default="64,128", type=_ints)
    parser.add_argument("--vocabs", default=",".join(map(str, CROSS_ENTROPY_VOCABS)), type=_ints)
    parser.add_argument("--norm-dims", default=",".join(map(str, NORM_DIMS)), type=_ints)
    parser.add_argument("--arch", default=90, type=int, help="compute capability, e.g. 90 for sm_90")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    parser.add_argument("--asm", default="", help="with --json: IR kinds to include, e.g. ttir,ptx")
    args = parser.parse_args(argv)
    by_name = {v: k for k, v in _TRITON_DTYPE.items()}
    dtypes = tuple(by_name[d] for d in args.dtypes.split(","))
    rows = compile_report(dtypes, args.head_dims, args.vocabs, args.arch,
                          tuple(a for a in args.asm.split(",") if a) if args.json else (), args.norm_dims)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
        return
    limit = SMEM_LIMIT.get(args.arch)
    print(HEADER)
    for row in rows:
        flag = " <- spills" if row.spill else ""
        flag += " <- over the shared-memory limit" if limit and row.smem > limit else ""
        print(f"{row}{flag}")


if __name__ == "__main__":
    main()
