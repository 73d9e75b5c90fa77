"""`python -m fastlm.consolidate OUT_DIR_OR_CKPT_DCP [--out FILE]`: one file from a sharded checkpoint.

Reads the sharded checkpoint (ckpt.dcp, written under --parallel fsdp by any number of ranks) in
one process, without a process group, and writes the single-file checkpoint of fastlm.checkpoint
(model, optimizer, step, RNG states, configs, tokenizer): what `python -m fastlm.sample`, the
exporters and a resumed run without FSDP read. Default output: ckpt.pt beside ckpt.dcp.
"""
import os
import sys

from fastlm.checkpoint import CKPT_NAME
from fastlm.config import ConfigError, OneLineParser, fail, one_line_warnings

PROG = "python -m fastlm.consolidate"


def main(argv=None):
    # No ArgumentDefaultsHelpFormatter: --out says its default, which it would follow with "(default: None)".
    parser = OneLineParser(prog=PROG, description="Consolidate a sharded (FSDP) checkpoint into one file.")
    parser.add_argument("path", help="the run's out_dir, or its ckpt.dcp directory")
    parser.add_argument("--out", default=None, help=f"output file (default: {CKPT_NAME} in the run's out_dir)")
    args = parser.parse_args(argv)
    from fastlm.checkpoint_sharded import SHARDED_NAME, consolidate

    path = os.path.normpath(args.path)
    run_dir = os.path.dirname(path) if os.path.basename(path).startswith(SHARDED_NAME) else path
    out = args.out or os.path.join(run_dir, CKPT_NAME)
    try:
        written = consolidate(path, out)
    except ConfigError as exc:
        fail(PROG, str(exc))
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    one_line_warnings(PROG)  # the command line only: main() called in-process leaves warnings as they are
    sys.exit(main())
