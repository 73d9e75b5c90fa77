"""Triton kernels, one module per op; imported lazily by fastlm.ops (Triton is optional).

The public functions, their validation and their PyTorch references live in fastlm.ops; the
C++ and CUDA kernels live in csrc/ (the extension fastlm._C).
"""
