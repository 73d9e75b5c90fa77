"""fastlm: train a GPT-style language model from scratch, with fused kernels.

The public surface:
  fastlm.ops        cross_entropy, linear_cross_entropy, causal_attention, resolve_backend,
                    available_backends
  fastlm.optim      AdamW
  fastlm.model      GPT;  fastlm.config  GPTConfig, KernelConfig, TrainConfig
  python -m fastlm.train / fastlm.sample / fastlm.prepare / fastlm.bench
"""
__version__ = "0.1.0"

_SUBMODULES = ("config", "model", "ops", "optim")


def __getattr__(name):
    # `import fastlm` then `fastlm.ops.cross_entropy(...)` / `fastlm.optim.AdamW(...)`, as the README
    # writes them, without making `import fastlm` itself import torch.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"fastlm.{name}")
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
