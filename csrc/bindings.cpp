// The Python module fastlm._C. Kernels register themselves as torch operators in the
// `fastlm` namespace (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in their own files), so
// they are called as torch.ops.fastlm.<name> and dispatch on device; this file only
// exposes what the Python side needs to know about the build.
#include <torch/extension.h>

#ifndef FASTLM_WITH_CUDA
#define FASTLM_WITH_CUDA 0
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm compiled kernels (operators live in torch.ops.fastlm)";
  m.def("with_cuda", []() { return static_cast<bool>(FASTLM_WITH_CUDA); },
        "True when the CUDA kernels were compiled into this build");
}
