"""`python -m fastlm.prepare`: tokenize a corpus once into a token file for training.

    python -m fastlm.prepare --data corpus/ --tokenizer bpe --vocab-size 4096 --out corpus.tok

The token file is a small JSON header (tokenizer, vocabulary size, dtype, count) followed by
uint16 (or uint32 for vocabularies over 65,536) token ids; training reads it through a memmap,
so the corpus is never loaded whole. Text files are encoded one at a time.
"""
import argparse
import sys

from fastlm.config import ConfigError, OneLineParser, fail
from fastlm.data import BPETokenizer, ByteTokenizer, _read_text_file, text_files, write_token_file

PROG = "python -m fastlm.prepare"


def build_parser():
    p = OneLineParser(prog=PROG, description="Tokenize text into a fastlm token file.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="UTF-8 text file or directory of .txt files")
    p.add_argument("--out", required=True, help="token file to write")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--vocab-size", "--vocab_size", type=int, default=4096, dest="vocab_size",
                   help="BPE vocabulary size (ignored for byte)")
    return p


def prepare(data, out, tokenizer_kind="byte", vocab_size=4096):
    """Tokenize `data` into the token file `out`; returns (token count, tokenizer)."""
    files = text_files(data)
    if tokenizer_kind == "bpe":
        tokenizer = BPETokenizer.train((_read_text_file(p) for p in files), vocab_size)
    else:
        tokenizer = ByteTokenizer()
    count = write_token_file(out, (tokenizer.encode_array(_read_text_file(p)) for p in files), tokenizer)
    return count, tokenizer


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        count, tokenizer = prepare(args.data, args.out, args.tokenizer, args.vocab_size)
    except (ConfigError, OSError) as exc:
        fail(PROG, str(exc))
    print(f"wrote {count:,} tokens ({tokenizer.kind} tokenizer, vocab {tokenizer.vocab_size}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
