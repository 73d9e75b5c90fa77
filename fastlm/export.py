"""Weights in and out: Hugging Face GPT-2 directories and plain safetensors files.

    python -m fastlm.export --ckpt out/ --format hf --out gpt2-mine/
    python -m fastlm.export --ckpt out/ --format safetensors --out model.safetensors

--format hf writes config.json and model.safetensors that `transformers.GPT2LMHeadModel
.from_pretrained(DIR)` loads as is, with the tokenizer (tokenizer.json) where it has a Hugging Face
form (a trained `tokenizers` BPE, or the GPT-2 BPE of an imported model); the byte tokenizer has
none and is left out with a note (an earlier export's tokenizer files are removed, so the
directory describes this model alone; other files stay). GPT-2 expresses learned positions,
LayerNorm, a GELU MLP (exact, or the tanh approximation of the original GPT-2) and full attention
heads; fastlm's head is always tied, as GPT-2's. A model without biases is written with zero
biases. RoPE, RMSNorm, SwiGLU and grouped-query heads have no GPT-2 form: exporting them is a
one-line error.

--format safetensors writes fastlm's own state dict with the architecture (GPTConfig) and the
tokenizer in the file's metadata; `load_safetensors` reads it back.

The other way, `load_hf_gpt2(DIR)` reads a local GPT-2 directory (for example the `gpt2` weights a
user downloaded) into (GPTConfig, state_dict, tokenizer or None) for fastlm's GPT; the training
command's --init_from uses it, and `load_model` (fastlm.eval, fastlm.sample) reads any of these forms.
`safetensors` is needed for both directions; `transformers` never is.
"""
import argparse
import dataclasses
import json
import os
import sys

import torch

from fastlm.config import ConfigError, GPTConfig, OneLineParser, fail, one_line_warnings
from fastlm.files import atomic_write, atomic_write_text

PROG = "python -m fastlm.export"
HF_WEIGHTS = "model.safetensors"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SAFETENSORS_FORMAT = "fastlm-weights-1"
LAYERNORM_EPS = 1e-5  # fastlm's LayerNorm/RMSNorm epsilon (fastlm.model.make_norm)
# fastlm mlp -> GPT-2 activation_function, and back (gelu_pytorch_tanh is the same function as gelu_new).
GPT2_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
FASTLM_MLP = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError("this needs the safetensors package: pip install safetensors "
                          "(from a checkout: pip install -e '.[hf]')") from None
    return safetensors.torch


# --------------------------------------------------------------------------- fastlm -> GPT-2

def gpt2_unsupported(config):
    """Why GPT-2 cannot express this architecture (one line), or None if it can."""
    reasons = []
    if config.pos_emb != "learned":
        reasons.append(f"pos_emb={config.pos_emb}")
    if config.norm != "layernorm":
        reasons.append(f"norm={config.norm}")
    if config.mlp not in GPT2_ACTIVATION:
        reasons.append(f"mlp={config.mlp}")
    if config.n_kv_head != config.n_head:
        reasons.append(f"n_kv_head={config.n_kv_head} (grouped-query attention)")
    if not reasons:
        return None
    return (f"GPT-2 cannot express {', '.join(reasons)}: the hf format needs learned positions, layernorm, a gelu "
            "MLP and n_kv_head == n_head; use --format safetensors for this model")


def gpt2_config(config, dropout=0.1, eos_id=None):
    """The config.json of transformers' GPT2LMHeadModel for a fastlm GPTConfig."""
    problem = gpt2_unsupported(config)
    if problem:
        raise ConfigError(problem)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.d_model,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": GPT2_ACTIVATION[config.mlp], "layer_norm_epsilon": LAYERNORM_EPS,
        "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
    }


def to_gpt2_state_dict(state, config):
    """fastlm GPT state dict -> GPT-2 tensors (transformer.* names, Conv1D weights transposed,
    exactly vocab_size embedding rows, zero biases where the model has none; the head is tied)."""
    V, d = config.vocab_size, config.d_model
    out = {"transformer.wte.weight": state["wte.weight"][:V], "transformer.wpe.weight": state["wpe.weight"]}

    def norm(src, dst):
        out[f"{dst}.weight"] = state[f"{src}.weight"]
        out[f"{dst}.bias"] = state.get(f"{src}.bias", torch.zeros(d))

    def conv1d(src, dst):
        weight = state[f"{src}.weight"]
        out[f"{dst}.weight"] = weight.t()
        out[f"{dst}.bias"] = state.get(f"{src}.bias", torch.zeros(weight.shape[0]))

    for i in range(config.n_layer):
        src, dst = f"blocks.{i}", f"transformer.h.{i}"
        norm(f"{src}.norm1", f"{dst}.ln_1")
        conv1d(f"{src}.attn.qkv", f"{dst}.attn.c_attn")
        conv1d(f"{src}.attn.proj", f"{dst}.attn.c_proj")
        norm(f"{src}.norm2", f"{dst}.ln_2")
        conv1d(f"{src}.mlp.fc", f"{dst}.mlp.c_fc")
        conv1d(f"{src}.mlp.proj", f"{dst}.mlp.c_proj")
    norm("norm_f", "transformer.ln_f")
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def export_hf(config, state, tokenizer, out_dir, dropout=0.1):
    """Write a GPT-2 directory (config.json, model.safetensors, tokenizer files where the tokenizer
    has an HF form); returns the list of files written. Tokenizer files of an earlier export that
    this model does not have are removed, so the directory describes this model alone."""
    _safetensors()  # a missing package is reported before anything is written
    eos_id = hf_end_of_text_id(tokenizer)
    cfg = gpt2_config(config, dropout, eos_id)
    has_tokenizer = tokenizer is not None and getattr(tokenizer, "kind", None) == "bpe"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir} is a file; give a directory (--format hf writes one)")
    existing = os.path.join(out_dir, "config.json")
    if os.path.isfile(existing) and not _is_hf_config(existing):
        raise ConfigError(f"{existing} is not a Hugging Face config (a fastlm run's settings?) and the export would "
                          "replace it; export into another directory")
    if not has_tokenizer and all(os.path.isfile(os.path.join(out_dir, f)) for f in ("vocab.json", "merges.txt")):
        raise ConfigError(f"{out_dir} holds vocab.json and merges.txt, which would be read as this model's "
                          "tokenizer; export into another directory")
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(to_gpt2_state_dict(state, config), os.path.join(out_dir, HF_WEIGHTS), {"format": "pt"})
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(cfg, indent=2))
    written = ["config.json", HF_WEIGHTS]
    if has_tokenizer:
        special = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"} if eos_id is not None else {}
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
                            **special}
        atomic_write_text(os.path.join(out_dir, "tokenizer.json"), tokenizer._tok.to_str(pretty=True))
        atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(tokenizer_config, indent=2))
        written += list(HF_TOKENIZER_FILES)
    else:
        for name in HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    return written


def _is_hf_config(path):
    try:
        with open(path) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def missing_tokenizer_note(tokenizer):
    """What to encode text with, for an hf export written without tokenizer files."""
    kind = getattr(tokenizer, "kind", "byte")  # a checkpoint without a tokenizer is a byte model
    if kind == "byte":
        return ("note: the byte tokenizer has no Hugging Face form; encode text as UTF-8 bytes (ids 0-255) to use "
                "the exported model")
    return (f"note: the {kind} tokenizer is not written (no Hugging Face form here); encode text with the {kind} "
            "tokenizer to use the exported model")


def save_safetensors(tensors, path, metadata):
    """safetensors' save_file, but atomic and with the umask's permissions (save_file leaves 0600)."""
    with atomic_write(path) as f:
        f.write(_safetensors().save(tensors, metadata=metadata))


def hf_end_of_text_id(tokenizer):
    inner = getattr(tokenizer, "_tok", None)
    return inner.token_to_id("<|endoftext|>") if inner is not None else None


# --------------------------------------------------------------------------- GPT-2 -> fastlm

def load_hf_gpt2(hf_dir, pad_vocab_to=1):
    """Read a local Hugging Face GPT-2 directory: (GPTConfig, fastlm state_dict, tokenizer or None).

    pad_vocab_to: fastlm pads the embedding to a multiple of this. The default 1 keeps GPT-2's
    rows exactly: padded rows would take part in the training loss's softmax. The tokenizer comes
    from tokenizer.json, or vocab.json + merges.txt; None when the directory has neither.
    """
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")

    def read_config():
        with open(config_path) as f:
            return json.load(f)

    hf = _read_or_fail(config_path, read_config)
    config = gpt2_to_fastlm_config(hf, pad_vocab_to, where=hf_dir)
    tensors = _read_hf_tensors(hf_dir)
    state = from_gpt2_state_dict(tensors, config, where=hf_dir)
    return config, state, hf_tokenizer(hf_dir)


def gpt2_to_fastlm_config(hf, pad_vocab_to=1, where="config.json"):
    if hf.get("model_type") != "gpt2":
        raise ConfigError(f"{where}: only GPT-2 models can be imported, this is model_type={hf.get('model_type')!r}")
    activation = hf.get("activation_function", "gelu_new")
    d = hf.get("n_embd", 768)
    problems = []
    if activation not in FASTLM_MLP:
        problems.append(f"activation_function={activation!r}")
    elif FASTLM_MLP[activation] not in _mlp_choices():
        problems.append(f"activation_function={activation!r} (this fastlm has no mlp={FASTLM_MLP[activation]})")
    if hf.get("n_inner") not in (None, 4 * d):
        problems.append(f"n_inner={hf['n_inner']} (fastlm's MLP is 4 x n_embd)")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - LAYERNORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (fastlm uses {LAYERNORM_EPS})")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        problems.append("a non-standard attention scale")
    if not hf.get("tie_word_embeddings", True):
        problems.append("an untied lm_head")
    if problems:
        raise ConfigError(f"{where}: fastlm cannot express {', '.join(problems)}")
    return GPTConfig(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), d_model=d, bias=True,
                     pos_emb="learned", norm="layernorm", mlp=FASTLM_MLP[activation], pad_vocab_to=pad_vocab_to)


def _read_or_fail(path, read):
    """read(), with the error of a damaged or foreign file as a ConfigError naming `path`."""
    try:
        return read()
    except ConfigError:
        raise
    except Exception as exc:  # safetensors, json, tokenizers and torch.load each raise their own types
        raise ConfigError(f"{path} is corrupt or unreadable ({type(exc).__name__}: {exc})") from None


def _mlp_choices():
    return next(f.metadata["choices"] for f in dataclasses.fields(GPTConfig) if f.name == "mlp")


def _read_hf_tensors(hf_dir):
    path = os.path.join(hf_dir, HF_WEIGHTS)
    bin_path = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(path):
        load_file = _safetensors().load_file
        tensors = _read_or_fail(path, lambda: load_file(path))
    elif os.path.isfile(bin_path):
        tensors = _read_or_fail(bin_path, lambda: torch.load(bin_path, map_location="cpu", weights_only=True))
    else:
        raise ConfigError(f"{hf_dir} has no {HF_WEIGHTS} or pytorch_model.bin")
    # save_pretrained writes transformer.h.0...; the original gpt2 upload has h.0... (no prefix).
    return {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in tensors.items()}


def from_gpt2_state_dict(tensors, config, where="the GPT-2 weights"):
    """GPT-2 tensors (names without the transformer. prefix) -> a fastlm GPT state dict."""
    V = config.vocab_size

    def get(name):
        if name not in tensors:
            raise ConfigError(f"{where}: missing tensor {name}")
        return tensors[name].float()

    wte = get("wte.weight")
    if wte.shape != (V, config.d_model):
        raise ConfigError(f"{where}: wte.weight has shape {tuple(wte.shape)}, config says ({V}, {config.d_model})")
    padded = torch.zeros(config.padded_vocab_size, config.d_model)
    padded[:V] = wte  # padding rows are never predicted (GPT.forward and generate slice to vocab_size)
    state = {"wte.weight": padded, "lm_head.weight": padded, "wpe.weight": get("wpe.weight")}
    for i in range(config.n_layer):
        dst, src = f"blocks.{i}", f"h.{i}"
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            state[f"{dst}.{a}.weight"], state[f"{dst}.{a}.bias"] = get(f"{src}.{b}.weight"), get(f"{src}.{b}.bias")
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                     ("mlp.proj", "mlp.c_proj")):
            state[f"{dst}.{a}.weight"] = get(f"{src}.{b}.weight").t().contiguous()
            state[f"{dst}.{a}.bias"] = get(f"{src}.{b}.bias")
    state["norm_f.weight"], state["norm_f.bias"] = get("ln_f.weight"), get("ln_f.bias")
    return state


def hf_tokenizer(hf_dir):
    """fastlm's BPETokenizer of an HF directory (tokenizer.json, or GPT-2's vocab.json + merges.txt), or None."""
    from fastlm.data import BPETokenizer

    path = os.path.join(hf_dir, "tokenizer.json")
    vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
    if os.path.isfile(path):
        from tokenizers import Tokenizer

        return BPETokenizer(_read_or_fail(path, lambda: Tokenizer.from_file(path)))
    if os.path.isfile(vocab) and os.path.isfile(merges):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return BPETokenizer(tok)
    return None


# --------------------------------------------------------------------------- plain safetensors

def export_safetensors(config, state, tokenizer, path):
    """fastlm's state dict in one .safetensors file; metadata holds the GPTConfig and the tokenizer."""
    if os.path.isdir(path):
        raise ConfigError(f"--out {path} is a directory; give a file name (--format safetensors writes one file)")
    if not str(path).endswith(".safetensors"):  # also keeps the export off a run's ckpt.pt and config.json
        raise ConfigError(f"--out {path}: give a file name ending in .safetensors (how fastlm.eval, fastlm.sample "
                          "and --init_from recognise the file)")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k != "lm_head.weight"}  # tied
    metadata = {"format": SAFETENSORS_FORMAT, "config": json.dumps(dataclasses.asdict(config))}
    if tokenizer is not None:
        metadata["tokenizer"] = json.dumps(tokenizer.to_dict())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_safetensors(tensors, path, metadata)


def load_safetensors(path):
    """(GPTConfig, state_dict, tokenizer or None) of a file written by export_safetensors."""
    from fastlm.data import tokenizer_from_dict

    _safetensors()  # a missing package is one line, before `from safetensors import` would fail
    from safetensors import safe_open

    def read():
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != SAFETENSORS_FORMAT:
                raise ConfigError(f"{path} is not a fastlm safetensors file (no {SAFETENSORS_FORMAT} metadata)")
            return metadata, {k: f.get_tensor(k) for k in f.keys()}

    metadata, state = _read_or_fail(path, read)
    config = GPTConfig(**json.loads(metadata["config"]))
    state["lm_head.weight"] = state["wte.weight"]
    tokenizer = tokenizer_from_dict(json.loads(metadata["tokenizer"])) if "tokenizer" in metadata else None
    return config, state, tokenizer


def load_pretrained(path):
    """(GPTConfig, state_dict, tokenizer or None) from an HF GPT-2 directory, a fastlm safetensors file,
    or a fastlm checkpoint (file or out_dir): what `--init_from` starts from. A tokenizer with more
    ids than the model's vocabulary (a tokenizer file of another model) is a ConfigError."""
    from fastlm.checkpoint import CKPT_NAME, model_config_from_checkpoint
    from fastlm.checkpoint_sharded import find_sharded, load_single_file
    from fastlm.data import tokenizer_from_dict

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) \
            and not os.path.isfile(os.path.join(path, CKPT_NAME)) and find_sharded(path) is None:
        config, state, tokenizer = load_hf_gpt2(path)
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        config, state, tokenizer = load_safetensors(path)
    else:
        ckpt = load_single_file(path)
        config, state = model_config_from_checkpoint(ckpt), ckpt["model"]
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"{path}: the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but the model's "
                          f"vocabulary is {config.vocab_size} (is the tokenizer from another model?)")
    return config, state, tokenizer


MODEL_PATH_HELP = ("checkpoint file or out_dir, a Hugging Face GPT-2 directory (a 256-token one without "
                   "tokenizer files reads text as UTF-8 bytes), or a fastlm .safetensors file")


def load_model(path, device="cpu"):
    """(GPT in eval mode on `device`, tokenizer) of the weights at `path`, in any form load_pretrained
    reads. Weights without a tokenizer and with a vocabulary of 256 (fastlm's hf export of a byte
    model) read text as UTF-8 bytes, as `--init_from` with the default --tokenizer byte does."""
    from fastlm.data import ByteTokenizer
    from fastlm.model import GPT

    config, state, tokenizer = load_pretrained(path)
    if tokenizer is None:
        # Only a model of exactly the 256 byte ids is read as bytes: a GPT-2 directory missing its
        # tokenizer files would otherwise be scored, silently, on the wrong tokens.
        if config.vocab_size != ByteTokenizer.vocab_size:
            raise ConfigError(f"{path} comes without a tokenizer, and its vocabulary ({config.vocab_size}) is not "
                              "the 256 UTF-8 bytes of fastlm's byte tokenizer; add its tokenizer files "
                              "(tokenizer.json, or vocab.json and merges.txt)")
        tokenizer = ByteTokenizer()
    model = GPT(config)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer


def init_run(run, path):
    """--init_from: (run with the architecture of the weights at `path`, their state dict, their tokenizer
    or None). An architecture setting given explicitly that differs from the weights' is a ConfigError."""
    config, state, tokenizer = load_pretrained(path)
    asked = dataclasses.asdict(run.model)
    clashes = [f"{name}={asked[name]!r} (the weights have {getattr(config, name)!r})"
               for name in sorted(run.explicit) if name in asked and asked[name] != getattr(config, name)]
    if clashes:
        raise ConfigError(f"--init_from {path}: the architecture comes from the weights; drop {', '.join(clashes)}")
    return dataclasses.replace(run, model=config), state, tokenizer


# --------------------------------------------------------------------------- command line

def build_parser():
    p = OneLineParser(prog=PROG, description="Export a fastlm checkpoint's weights.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file, or the out_dir that holds ckpt.pt")
    p.add_argument("--format", choices=("hf", "safetensors"), default="hf",
                   help="hf: a transformers GPT2LMHeadModel directory; safetensors: one file with the config in its metadata")
    p.add_argument("--out", required=True, help="directory (hf) or file (safetensors) to write")
    return p


def main(argv=None):
    from fastlm.checkpoint import model_config_from_checkpoint
    from fastlm.checkpoint_sharded import load_single_file
    from fastlm.data import tokenizer_from_dict

    args = build_parser().parse_args(argv)
    try:
        ckpt = load_single_file(args.ckpt)
        config = model_config_from_checkpoint(ckpt)
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
        if args.format == "hf":
            dropout = (ckpt.get("train_config") or {}).get("dropout", 0.1)
            written = export_hf(config, ckpt["model"], tokenizer, args.out, dropout=dropout)
            print(f"wrote {', '.join(written)} in {args.out}")
            if tokenizer is None or tokenizer.kind != "bpe":
                print(missing_tokenizer_note(tokenizer))
        else:
            export_safetensors(config, ckpt["model"], tokenizer, args.out)
            print(f"wrote {args.out}")
    except ConfigError as exc:
        fail(PROG, str(exc))
    except OSError as exc:  # an --out that cannot be made or written: one line, not a traceback
        fail(PROG, f"cannot write {exc.filename or args.out}: {exc.strerror or exc}")
    return 0


if __name__ == "__main__":
    one_line_warnings(PROG)  # the command line only: main() called in-process leaves warnings as they are
    sys.exit(main())
