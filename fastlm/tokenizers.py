"""Tokenizers beyond byte and trained BPE: tiktoken's encodings (GPT-2, cl100k_base, o200k_base)
and nanoGPT's character vocabularies (its `meta.pkl`).

tiktoken downloads an encoding's BPE file on first use and caches it (TIKTOKEN_CACHE_DIR, else
the system temp dir). Where there is no network, the encoding loads from that cache or from a
local file given as `--tokenizer_file PATH` (a `.tiktoken` file: one base64 token and its rank
per line; GPT-2's ranks are r50k_base.tiktoken). A tokenizer is saved in checkpoints by name
(plus the file path when one was given), so sampling needs nothing beyond the cache.

The encoding is loaded lazily: training on shards that are already tokenized needs only the
vocabulary size, which is known for the named encodings without their file.
"""
import os
import pickle
from unittest import mock

import numpy as np

# n_vocab of each encoding (max token id + 1), so pre-tokenized data needs no BPE file.
TIKTOKEN_VOCAB = {"gpt2": 50257, "r50k_base": 50257, "p50k_base": 50281, "cl100k_base": 100277,
                  "o200k_base": 200019}
TIKTOKEN_NAMES = tuple(TIKTOKEN_VOCAB)
_FILE_HINT = {"gpt2": "r50k_base.tiktoken (the same ranks as gpt2)"}
_BLOB = "https://openaipublic.blob.core.windows.net/"
# The files tiktoken fetches per encoding (tiktoken_ext/openai_public.py): where its cache keeps them.
_TIKTOKEN_URLS = {
    "gpt2": (_BLOB + "gpt-2/encodings/main/vocab.bpe", _BLOB + "gpt-2/encodings/main/encoder.json"),
    **{name: (f"{_BLOB}encodings/{name}.tiktoken",) for name in ("r50k_base", "p50k_base", "cl100k_base", "o200k_base")},
}


def tiktoken_cached(name):
    """Whether tiktoken's cache holds the files of encoding `name` (no download is tried)."""
    import hashlib
    import tempfile

    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    cache = os.path.join(tempfile.gettempdir(), "data-gym-cache") if cache is None else cache
    return bool(cache) and all(os.path.isfile(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
                               for url in _TIKTOKEN_URLS.get(name, ("",)))


def _data_error(message):
    from fastlm.data import DataError  # data.py imports this module lazily; no import cycle

    return DataError(message)


def _encoding_from_file(name, path):
    """A tiktoken Encoding with `name`'s regex and special tokens and the ranks in the local file `path`."""
    import tiktoken
    import tiktoken_ext.openai_public as public
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(path)
    except OSError as exc:
        raise _data_error(f"cannot read --tokenizer_file {path}: {exc.strerror}") from None
    except Exception as exc:  # a malformed line: base64 or int parsing
        raise _data_error(f"--tokenizer_file {path} is not a .tiktoken file ({type(exc).__name__})") from None
    # The named constructor knows the regex and special tokens; hand it the local ranks instead of a URL.
    with mock.patch.object(public, "load_tiktoken_bpe", lambda *a, **k: ranks), \
            mock.patch.object(public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: ranks):
        spec = public.ENCODING_CONSTRUCTORS[name]()
    spec.pop("explicit_n_vocab", None)  # a test's small file is not the full vocabulary
    return tiktoken.Encoding(**spec)


def load_tiktoken_encoding(name, path=None):
    """tiktoken's encoding `name`, from the local file `path` if given, else from tiktoken's cache
    (or a download). Raises DataError with one line that says how to provide the file."""
    try:
        import tiktoken
    except ImportError:
        raise _data_error(f"the {name} tokenizer needs tiktoken: pip install tiktoken") from None
    if name not in TIKTOKEN_VOCAB:
        raise _data_error(f"unknown tiktoken encoding {name!r}; known: {', '.join(TIKTOKEN_NAMES)}")
    if path:
        return _encoding_from_file(name, path)
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # requests errors, hash mismatches, ...: all mean "no usable file here"
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
        hint = _FILE_HINT.get(name, f"{name}.tiktoken")
        raise _data_error(f"the {name} tokenizer's BPE file is not in tiktoken's cache and could not be downloaded "
                          f"({type(exc).__name__}: {reason}); set TIKTOKEN_CACHE_DIR to a directory holding "
                          f"tiktoken's cached copy, or pass --tokenizer_file PATH to a local {hint}") from None


class TiktokenTokenizer:
    """A tiktoken encoding: ids exactly as tiktoken gives them; documents separated by <|endoftext|>."""

    def __init__(self, name, file=None, encoding=None):
        self.kind = name  # what the run prints: "gpt2 tokenizer"
        self.name, self.file = name, (os.path.abspath(file) if file else None)  # saved: works from any cwd
        self._encoding = encoding
        self._vocab_size = encoding.n_vocab if encoding is not None else TIKTOKEN_VOCAB.get(name)
        if self._vocab_size is None:
            self._vocab_size = self.encoding.n_vocab

    def can_load_offline(self):
        """Whether the encoding is loaded, or a local file or tiktoken's cache holds it."""
        return self._encoding is not None or bool(self.file and os.path.isfile(self.file)) or tiktoken_cached(self.name)

    @property
    def encoding(self):
        if self._encoding is None:
            self._encoding = load_tiktoken_encoding(self.name, self.file)
        return self._encoding

    @property
    def vocab_size(self):
        return self._vocab_size

    @property
    def eot_token(self):
        return self.encoding.eot_token

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text):
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        try:
            return self.encoding.decode(ids)
        except KeyError:  # an id the encoding lacks (a gap in its ranks, a padding row): skip it
            pieces = []
            for i in ids:
                try:
                    pieces.append(self.encoding.decode_single_token_bytes(i))
                except KeyError:
                    pass
            return b"".join(pieces).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"kind": "tiktoken", "name": self.name, "file": self.file, "vocab_size": self._vocab_size}

    @classmethod
    def from_dict(cls, spec):
        tok = cls(spec["name"], spec.get("file"))
        if spec.get("vocab_size") not in (None, tok.vocab_size):
            raise _data_error(f"tokenizer {spec['name']} has {tok.vocab_size} tokens here but "
                              f"{spec['vocab_size']} where it was saved")
        return tok


class CharTokenizer:
    """nanoGPT's character-level vocabulary (shakespeare_char): one token per character."""

    kind = "char"

    def __init__(self, chars):
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        try:
            return [self._stoi[c] for c in text]
        except KeyError as exc:
            raise _data_error(f"character {exc.args[0]!r} is not in the character vocabulary") from None

    def encode_array(self, text):
        return np.asarray(self.encode(text), dtype=np.uint16)

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < len(self.chars))

    def to_dict(self):
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_meta_pkl(cls, path):
        """Read nanoGPT's meta.pkl ({vocab_size, itos, stoi}) without running arbitrary pickled code."""
        with open(path, "rb") as f:
            try:
                meta = _PlainUnpickler(f).load()
            except Exception as exc:
                raise _data_error(f"{path} is not a nanoGPT meta.pkl ({type(exc).__name__})") from None
        itos = meta.get("itos") if isinstance(meta, dict) else None
        if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))):
            raise _data_error(f"{path} holds no character vocabulary (itos)")
        return cls("".join(itos[i] for i in range(len(itos))))


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: a meta.pkl never needs more."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
