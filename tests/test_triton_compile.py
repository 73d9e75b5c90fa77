"""Every config of every Triton kernel, compiled ahead of time for sm_90 (H100) without a GPU.

fastlm.triton_kernels.compile_report compiles each autotune config of the attention kernels (forward,
delta, dK/dV, dQ) at D = 64 and 128 (dK/dV also with 4 query heads per kv head), the
cross-entropy kernel at the vocabularies it lists and the norm kernels at the widths it lists, in bf16 (fp16 builds the same tiles;
`python -m fastlm.triton_kernels.compile_report` prints both); about 90 s of CPU in all.

A config that spills registers runs far slower than its tuning neighbours, and one over the
shared-memory limit fails to launch, so both are errors here. The same compiles give the IR
that the address-arithmetic and vector-access checks below read. Skipped where Triton or its
bundled ptxas cannot compile for CUDA.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from fastlm.triton_kernels import compile_report as cr  # noqa: E402

ARCH = 90
HEAD_DIMS = (64, 128)


@pytest.fixture(scope="module")
def report():
    reason = cr.unavailable_reason(ARCH)
    if reason is not None:
        pytest.skip(reason)
    return cr.compile_report(dtypes=(torch.bfloat16,), head_dims=HEAD_DIMS, arch=ARCH, asm=("ttir", "ptx"))


def test_every_config_compiles_without_spills_within_shared_memory(report):
    from fastlm.triton_kernels import attention

    # Every kernel and every kept config is in the report, once.
    for head_dim in HEAD_DIMS:
        for name, (_, configs) in attention.cuda_kernels(head_dim).items():
            groups = cr.GQA_GROUPS if name == "bwd_dkdv" else (1,)
            rows = [r for r in report if r.kernel == f"attention_{name}" and r.shape.startswith(f"D={head_dim}")]
            assert len(rows) == len(configs) * len(groups) > 0, (name, head_dim)
    assert len([r for r in report if r.kernel == "cross_entropy"]) == len(cr.CROSS_ENTROPY_VOCABS)
    for kind in ("fwd", "bwd"):
        assert [r.shape for r in report if r.kernel == f"norm_{kind}"] == [f"D={d}" for d in cr.NORM_DIMS]

    limit = cr.SMEM_LIMIT[ARCH]
    bad = [r for r in report if r.spill > 0 or r.smem > limit]
    assert not bad, (f"configs that spill or pass the {limit} B shared-memory limit on sm_{ARCH}:\n{cr.HEADER}\n"
                     + "\n".join(map(str, bad)))


def test_attention_row_offsets_are_64_bit(report):
    # v is a strided view of the qkv projection: row * stride_t passes 2**31 near T = 175K at
    # d_model 4096. Row indices are the only integer tensors the kernels multiply, so any
    # 32-bit integer tensor multiplication is a row offset computed in int32.
    int32_tensor_mul = re.compile(r"arith\.muli .*: tensor<[0-9x]+xi32>")
    for row in report:
        if row.kernel.startswith("attention"):
            lines = [line.strip() for line in row.asm["ttir"].splitlines() if int32_tensor_mul.search(line)]
            assert not lines, f"{row.kernel} {row.config} {row.shape}: 32-bit offset products:\n" + "\n".join(lines)
            assert re.search(r"arith\.muli .*: tensor<[0-9x]+xi64>", row.asm["ttir"]), row.kernel


def test_cross_entropy_unpadded_vocab_uses_vector_access(report):
    # V = 50257: rows start at unaligned elements and end mid-group. The body of each row must
    # still be read and written 16 bytes at a time (ld/st.global.v4), and the padded V = 50304
    # must be all vector access in its tile loops (one scalar load: the target logit).
    rows = {r.shape: r for r in report if r.kernel == "cross_entropy"}
    for shape in ("V=50257", "V=50304"):
        ptx = rows[shape].asm["ptx"]
        assert re.search(r"ld\.global(\.\w+)*\.v4", ptx), f"{shape}: no vector loads"
        assert re.search(r"st\.global(\.\w+)*\.v4", ptx), f"{shape}: no vector stores"
    scalar_half_loads = re.findall(r"ld\.global(?:\.\w+)*\.b16\b", rows["V=50304"].asm["ptx"])
    assert len(scalar_half_loads) <= 1, f"V=50304: {len(scalar_half_loads)} scalar 2-byte loads"


def test_cross_entropy_scale_kernel_uses_vector_access(report):
    # The backward's in-place scaling streams the whole N x V gradient when the scale is not 1:
    # 16-byte loads and stores, and nothing spilled (checked with every row above).
    (row,) = [r for r in report if r.kernel == "cross_entropy_scale"]
    assert re.search(r"ld\.global(\.\w+)*\.v4", row.asm["ptx"]), "no vector loads"
    assert re.search(r"st\.global(\.\w+)*\.v4", row.asm["ptx"]), "no vector stores"


def test_norm_kernels_use_vector_access(report):
    # Both norm kernels stream whole rows: x, dy read and y, dx written 16 bytes at a time at every
    # width (the row stride and D are multiples of 16 in the GPT), the statistics one float a row.
    for row in report:
        if row.kernel.startswith("norm_"):
            assert re.search(r"ld\.global(\.\w+)*\.v4", row.asm["ptx"]), f"{row.kernel} {row.shape}: no vector loads"
            assert re.search(r"st\.global(\.\w+)*\.v4", row.asm["ptx"]), f"{row.kernel} {row.shape}: no vector stores"


def test_cross_entropy_benchmark_variants_compile_with_vector_access():
    """Every kernel variant the benchmark times (fastlm.bench.cross_entropy.KERNEL_VARIANTS) compiles
    for sm_90 at the benchmark's vocabularies without spills, its body with vector loads and stores."""
    reason = cr.unavailable_reason(ARCH)
    if reason is not None:
        pytest.skip(reason)
    code = (
        "import json, torch\n"
        "from fastlm.bench.cross_entropy import KERNEL_VARIANTS, VARIANT_SHAPES, kernel_settings\n"
        "from fastlm.triton_kernels import compile_report as cr\n"
        "vocabs = tuple(v for _, v in VARIANT_SHAPES)\n"
        "out = []\n"
        "for label, changes in KERNEL_VARIANTS:\n"
        "    with kernel_settings(changes):\n"
        f"        rows = cr.compile_report(dtypes=(torch.bfloat16,), head_dims=(), vocabs=vocabs, norm_dims=(), "
        f"arch={ARCH}, asm=('ptx',))\n"
        "    out += [dict(label=label, shape=r.shape, spill=r.spill, smem=r.smem, ptx=r.asm['ptx'])\n"
        "            for r in rows if r.kernel == 'cross_entropy']\n"
        "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    from fastlm.bench.cross_entropy import KERNEL_VARIANTS, VARIANT_SHAPES

    assert len(rows) == len(KERNEL_VARIANTS) * len(VARIANT_SHAPES)
    bad = [(r["label"], r["shape"], r["spill"], r["smem"]) for r in rows
           if r["spill"] > 0 or r["smem"] > cr.SMEM_LIMIT[ARCH]]
    assert not bad, f"variants that spill or pass the shared-memory limit: {bad}"
    for r in rows:
        assert re.search(r"ld\.global(\.\w+)*\.v4", r["ptx"]), (r["label"], r["shape"], "no vector loads")
        assert re.search(r"st\.global(\.\w+)*\.v4", r["ptx"]), (r["label"], r["shape"], "no vector stores")
