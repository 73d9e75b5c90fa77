"""Configuration: three dataclasses and the command line that fills them.

  GPTConfig     the architecture: every field shapes or defines the weights, so a checkpoint
                and the run that loads it must agree on all of them
  KernelConfig  how the model and optimizer compute (backends, loss fusion): free to change
                between runs without changing the result beyond rounding
  TrainConfig   the run: data, optimisation, schedule, precision, intervals, output

Every field is settable as `--field value`, from `--config FILE` (TOML or JSON, flat or with
[model] / [kernels] / [train] tables), and is listed by `--help` with its default. Precedence:
defaults < config file < command line.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Optional

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None


class ConfigError(ValueError):
    """A user error in the configuration or the command line (reported as one line, exit 2)."""


@dataclass
class GPTConfig:
    """The architecture. A checkpoint's weights fit a model only if every field agrees."""

    vocab_size: int = field(default=256, metadata={"help": "vocabulary size (byte tokenizer: at least 256; bpe: size to train)"})
    block_size: int = field(default=128, metadata={"help": "context length in tokens"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "query heads"})
    n_kv_head: Optional[int] = field(default=None, metadata={"help": "key/value heads (grouped-query attention); divides n_head; default n_head"})
    d_model: int = field(default=128, metadata={"help": "embedding width"})
    bias: bool = field(default=True, metadata={"help": "biases in linear layers and LayerNorm"})
    pos_emb: str = field(default="learned", metadata={"help": "position information", "choices": ("learned", "rope")})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency"})
    norm: str = field(default="layernorm", metadata={"help": "normalisation", "choices": ("layernorm", "rmsnorm")})
    mlp: str = field(default="gelu", metadata={"help": "MLP type (4x width; gelu_tanh is GPT-2's tanh-approximated GELU)", "choices": ("gelu", "gelu_tanh", "swiglu")})
    pad_vocab_to: int = field(default=64, metadata={"help": "round the embedding and lm_head rows up to a multiple of this, for aligned kernels (the extra tokens are never predicted); 1 = no padding"})

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head

    def validate(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model", "pad_vocab_to"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.pos_emb == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(f"rope needs an even head size, got d_model/n_head = {self.d_model // self.n_head}")
        _check_finite(self)
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        _check_choices(self)

    @property
    def head_dim(self):
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self):
        """Rows of the embedding and lm_head: vocab_size rounded up to a multiple of pad_vocab_to."""
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to


@dataclass
class KernelConfig:
    """Which implementation runs each op ("auto" resolves once, when the model is placed)."""

    attn_backend: str = field(default="auto", metadata={"help": "causal_attention backend", "choices": ("auto", "torch", "sdpa", "triton")})
    ce_backend: str = field(default="auto", metadata={"help": "cross-entropy backend", "choices": ("auto", "torch", "triton", "cpp")})
    norm_backend: str = field(default="auto", metadata={"help": "LayerNorm/RMSNorm backend", "choices": ("auto", "torch", "triton")})
    optim_backend: str = field(default="auto", metadata={"help": "AdamW backend", "choices": ("auto", "torch", "cpp", "cuda")})
    fused_linear_ce: bool = field(default=True, metadata={"help": "fuse lm_head and the loss (no full logits) when training"})

    def validate(self):
        _check_choices(self)


@dataclass
class TrainConfig:
    batch_size: int = field(default=32, metadata={"help": "sequences per micro-batch (per process)"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices and embeddings only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings, attention output and MLP output"})
    eval_interval: int = field(default=200, metadata={"help": "evaluate every this many steps"})
    eval_iters: int = field(default=50, metadata={"help": "batches per evaluation"})
    eval_train_split: bool = field(default=False, metadata={"help": "also evaluate the train split in eval mode (else the train column is the mean batch loss since the last eval)"})
    log_interval: int = field(default=10, metadata={"help": "write a metrics.jsonl line every this many steps"})
    ckpt_interval: int = field(default=500, metadata={"help": "checkpoint every this many steps (0 = only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "numbered checkpoints to keep in out_dir (a corrupt newest one falls back to the previous)"})
    skip_nonfinite_steps: int = field(default=0, metadata={"help": "skip the update of up to this many steps whose loss or grad norm is NaN/inf, instead of stopping at the first"})
    check_every_step: bool = field(default=False, metadata={"help": "read the loss and check it for NaN/inf (and, under torchrun, for a stop signal) every step, not only at log, eval and checkpoint steps (a host sync per step on GPU)"})
    out_dir: str = field(default="out", metadata={"help": "where checkpoints, metrics and plots go"})
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its newest checkpoint, with its settings"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh even if out_dir already holds a run"})
    override_resume_config: bool = field(default=False, metadata={"help": "with --resume, let flags change settings that alter what the run computes (data, batch, schedule, seed, ...)"})
    data: Optional[str] = field(default=None, metadata={"help": "UTF-8 text file, directory of .txt files, or token shards: a directory or glob from fastlm.prepare, llm.c or modded-nanogpt, nanoGPT's train.bin/val.bin (default: the embedded corpus)"})
    tokenizer: str = field(default="byte", metadata={"help": "tokenizer for text data (gpt2, cl100k_base, o200k_base: tiktoken)", "choices": ("byte", "bpe", "gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")})
    tokenizer_file: Optional[str] = field(default=None, metadata={"help": "local .tiktoken file for a tiktoken tokenizer (else tiktoken's cache, TIKTOKEN_CACHE_DIR)"})
    data_order: str = field(default="random", metadata={"help": "random windows, or the corpus's windows in order, epoch after epoch", "choices": ("random", "sequential")})
    dtype: str = field(default="float32", metadata={"help": "autocast dtype", "choices": ("float32", "bfloat16", "float16")})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    seed: int = field(default=1337, metadata={"help": "random seed (data order, init, dropout)"})
    sample_tokens: int = field(default=200, metadata={"help": "tokens to sample at the end (0 = none)"})
    progress: bool = field(default=True, metadata={"help": "show the progress bar"})
    init_from: Optional[str] = field(default=None, metadata={"help": "start from these weights with a fresh optimizer: a Hugging Face GPT-2 directory, a fastlm .safetensors file or a fastlm checkpoint (the architecture and tokenizer come with them)"})
    tensorboard: bool = field(default=False, metadata={"help": "also write TensorBoard scalars to out_dir/tensorboard"})
    wandb_project: Optional[str] = field(default=None, metadata={"help": "also log to this Weights & Biases project (offline without an account; skipped if wandb is not installed)"})
    hellaswag: Optional[str] = field(default=None, metadata={"help": "HellaSwag jsonl file scored at every eval (acc, acc_norm)"})
    hellaswag_limit: int = field(default=0, metadata={"help": "score only the first this many HellaSwag examples (0 = all)"})
    parallel: str = field(default="ddp", metadata={"help": "under torchrun: ddp (every rank holds the whole model and optimizer) or fsdp (FSDP2: parameters, gradients and AdamW state sharded over the ranks; sharded checkpoints in out_dir/ckpt.dcp)", "choices": ("ddp", "fsdp")})
    reshard_after_forward: bool = field(default=True, metadata={"help": "fsdp: free each block's gathered parameters after its forward (least memory) or keep them for backward (one all-gather less)"})
    activation_checkpointing: str = field(default="none", metadata={"help": "recompute activations in backward: none, full (every block) or selective (the attention of every block)", "choices": ("none", "full", "selective")})

    def validate(self):
        for name in ("batch_size", "grad_accum_steps", "max_steps", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        _check_finite(self)
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in out_dir and --overwrite replaces it: pass one of them")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        for name in ("warmup_steps", "ckpt_interval", "sample_tokens", "skip_nonfinite_steps", "hellaswag_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hellaswag_limit and not self.hellaswag:
            raise ConfigError("--hellaswag_limit limits the HellaSwag scoring of --hellaswag FILE, which is not given")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check_choices(self)


@dataclass
class RunConfig:
    """Everything a run is given: the three configs, and the names of the fields the user set
    (on the command line or in a config file), so a resumed run can tell a choice from a default."""

    model: GPTConfig = field(default_factory=GPTConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explicit: frozenset = frozenset()

    def validate(self):
        self.model.validate()
        self.kernels.validate()
        self.train.validate()
        return self

    def as_dict(self):
        """{"model": {...}, "kernels": {...}, "train": {...}}, as written to config.json."""
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}


SECTIONS = {"model": GPTConfig, "kernels": KernelConfig, "train": TrainConfig}
# What a run's config.json records beside its settings (the backends each op ran on): skipped when
# that file is given back as --config, so a finished run's settings start a new one.
RECORD_KEYS = frozenset({"backends"})


def _check_finite(cfg):
    """Every float setting must be a number: inf or nan would only surface steps later, as a NaN loss."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if _field_type(f) is float and value is not None and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")


def _check_choices(cfg):
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(cfg, f.name)!r}")


def parse_bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(f):
    """The Python type a dataclass field holds (unwrapping Optional[...])."""
    kind = f.type if not isinstance(f.type, str) else eval(f.type, {"Optional": Optional})  # noqa: S307
    args = getattr(kind, "__args__", None)
    if args:  # Optional[X]
        kind = next(a for a in args if a is not type(None))
    return kind


def _coerce(f, value):
    """Convert a config-file value to the field's type, or raise ConfigError."""
    kind = _field_type(f)
    if value is None:
        return None
    try:
        if kind is bool:
            return value if isinstance(value, bool) else parse_bool(str(value))
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{f.name} must be {kind.__name__}, got {value!r}") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exits 2 (no usage dump)."""

    # True for the command that torchrun starts on every rank (fastlm.train): see fail().
    same_on_every_rank = False

    def error(self, message):
        fail(self.prog, message, same_on_every_rank=self.same_on_every_rank)


def build_parser(prog, description):
    parser = OneLineParser(prog=prog, description=description,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.same_on_every_rank = True  # torchrun starts fastlm.train on every rank
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML or JSON file of settings (command-line flags win)")
    for title, cls in SECTIONS.items():
        group = parser.add_argument_group(title)
        for f in fields(cls):
            kind = _field_type(f)
            help_text = f.metadata.get("help", "")
            if "(default:" not in help_text:
                help_text += f" (default: {f.default})"
            kwargs = {"default": argparse.SUPPRESS, "help": help_text}
            if kind is bool:
                kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
            else:
                kwargs.update(type=kind, metavar=kind.__name__.upper())
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs.pop("metavar")
            # --max_steps and --max-steps alike, as fastlm's other commands accept both spellings.
            spellings = dict.fromkeys((f"--{f.name}", f"--{f.name.replace('_', '-')}"))
            group.add_argument(*spellings, dest=f.name, **kwargs)
    return parser


def load_config_file(path):
    """Read a TOML or JSON settings file into a flat {field: value} dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.endswith(".toml"):
            if tomllib is None:
                raise ConfigError("TOML config files need Python 3.11+; use JSON")
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        else:
            with open(path) as f:
                raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings")
    flat = {}
    for key, value in raw.items():
        if key in RECORD_KEYS:
            continue
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def configs_from_dict(values, explicit=frozenset()):
    """RunConfig from a flat {field: value} dict (not yet validated); unknown keys raise ConfigError."""
    by_section = {name: {f.name: f for f in fields(cls)} for name, cls in SECTIONS.items()}
    unknown = sorted(set(values) - {name for section in by_section.values() for name in section})
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    built = {name: SECTIONS[name](**{k: _coerce(f, values[k]) for k, f in section.items() if k in values})
             for name, section in by_section.items()}
    return RunConfig(**built, explicit=frozenset(explicit))


def parse_args(argv=None, prog="python -m fastlm.train", description=None):
    """Parse the command line (and --config file) into a validated RunConfig whose `explicit`
    holds the names of the fields the user set."""
    parser = build_parser(prog, description)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values = load_config_file(config_path) if config_path else {}
    values.update(args)
    return configs_from_dict(values, explicit=set(values)).validate()


def as_dict(cfg):
    return dataclasses.asdict(cfg)


def one_line_warnings(prog):
    """Show warnings as the CLIs show errors, one line each ("prog: warning: ..."), not with the
    file, line number and source line of the code that raised them. Called where a command starts
    (its `__main__` block), so that main() run in-process leaves the warnings module alone."""
    import warnings

    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"{prog}: warning: {message}\n"


# How long a rank other than 0 waits, silent, for the launcher to stop it once rank 0 has reported
# an error that every rank meets alike. Rank 0 normally ends, and torchrun stops the rest, within a
# fraction of a second; a rank waits it out (and then prints the error itself) only where nothing
# stops it: rank 0 did not meet the error (another node's config file) or runs on another node.
RANK0_GRACE_S = 10.0


def is_other_rank():
    """Whether this process is a rank other than 0 of a multi-process launch, judged from the
    RANK and WORLD_SIZE that torchrun sets (torch.distributed is not initialised yet)."""
    return (os.environ.get("RANK", "0").strip() not in ("", "0")
            and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"))


def fail(prog, message, code=2, same_on_every_rank=False):
    """Print one line on stderr and exit: how every CLI reports a user error.

    same_on_every_rank: the error follows from what every rank of a launch shares (the command
    line, the config file), so rank 0 alone prints it and the other ranks exit with the same
    code in silence -- after giving rank 0 the time to print, since the launcher stops every
    rank as soon as one ends. A rank that is not stopped within RANK0_GRACE_S prints it too."""
    if same_on_every_rank and is_other_rank():
        _wait_for_rank0(code)
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _wait_for_rank0(code):
    """Wait up to RANK0_GRACE_S for the launcher's SIGTERM (or a Ctrl-C), then exit with `code`
    at once and in silence; returns when neither came."""
    def stopped(signum, frame):
        os._exit(code)

    previous = {signum: signal.signal(signum, stopped) for signum in (signal.SIGTERM, signal.SIGINT)}
    time.sleep(RANK0_GRACE_S)
    for signum, handler in previous.items():
        signal.signal(signum, handler)
