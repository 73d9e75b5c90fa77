"""The Triton compile report (python -m fastlm.triton_kernels.compile_report) in parallel processes.

    python benchmarks/compile_report_parallel.py [--arch 90] [--dtypes bf16,fp16] [--head-dims 64,128]
                                                 [--vocabs 50257,...] [--norm-dims 768,...] [--out FILE]

runs one report per dtype and head size (the attention kernels) and one per dtype for the
cross-entropy and norm kernels, side by side, and prints their rows as one table: the same rows, in the same
order, as the one-process report with the same arguments (its defaults where one is not given).
In one process the report's ~115 compiles (CPU-bound, 1-2 s each, Triton's cache cold on a fresh
machine) ran past the GPU check's 111 s on an H200 machine; the largest part here is ~30 of them.
--out also writes the table to FILE. A failed part's stderr is shown and the exit status is 1;
at Ctrl-C or SIGINT (the GPU check's time limit) the rows of the parts that finished are printed,
the others named, and the exit status is 130.
"""
import argparse
import subprocess
import sys

MODULE = "fastlm.triton_kernels.compile_report"


def parts(dtypes, head_dims, vocabs, norm_dims=None):
    """The argument lists of the parts, in the report's order: per dtype, each head size's
    attention kernels, then the cross-entropy and norm kernels (vocabs, norm_dims None: the
    report's defaults)."""
    for dtype in dtypes:
        for head_dim in head_dims:
            yield ["--dtypes", dtype, "--head-dims", str(head_dim), "--vocabs", ",", "--norm-dims", ","]
        if vocabs != () or norm_dims != ():
            part = ["--dtypes", dtype, "--head-dims", ","]
            for flag, values in (("--vocabs", vocabs), ("--norm-dims", norm_dims)):
                if values is not None:
                    part += [flag, ",".join(values) or ","]
            yield part


def _names(text):
    return tuple(x for x in text.split(",") if x)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/compile_report_parallel.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="90", help="compute capability, e.g. 90 for sm_90")
    parser.add_argument("--dtypes", default="bf16,fp16", type=_names)
    parser.add_argument("--head-dims", default="64,128", type=_names)
    parser.add_argument("--vocabs", default=None, type=_names, help="default: the report's")
    parser.add_argument("--norm-dims", default=None, type=_names, help="default: the report's")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    running = [(part, subprocess.Popen([sys.executable, "-m", MODULE, "--arch", args.arch, *part],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
               for part in parts(args.dtypes, args.head_dims, args.vocabs, args.norm_dims)]
    outputs = {}  # part index: (stdout, stderr) of a part that ended
    try:
        for i, (_, process) in enumerate(running):
            outputs[i] = process.communicate()
    except KeyboardInterrupt:  # keep the parts that had finished; stop the others
        for i, (_, process) in enumerate(running):
            if i not in outputs and process.poll() == 0:
                outputs[i] = process.communicate()
            elif process.poll() is None:
                process.kill()
    header, rows, failed, unfinished = None, [], [], []
    for i, (part, process) in enumerate(running):
        if i not in outputs:
            unfinished.append(" ".join(part))
        elif process.returncode != 0:
            failed.append(f"{' '.join(part)}: exit {process.returncode}\n{outputs[i][1][-3000:]}")
        else:
            header, *lines = outputs[i][0].splitlines()
            rows += lines
    if header:
        table = "\n".join([header] + rows)
        print(table, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(table + "\n")
    for failure in failed:
        print(f"compile_report_parallel: a part failed: {failure}", file=sys.stderr)
    if unfinished:
        print("compile_report_parallel: interrupted; not reported: " + "; ".join(unfinished), file=sys.stderr)
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
