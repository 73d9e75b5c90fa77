// Closes the region opened by avx2_begin.h, and says at run time whether its kernels may run.
#ifdef FASTLM_AVX2_KERNELS
#pragma GCC pop_options
#ifdef FASTLM_UNDEF_AVX
#undef __AVX__
#endif
#ifdef FASTLM_UNDEF_AVX2
#undef __AVX2__
#endif
#ifdef FASTLM_UNDEF_FMA
#undef __FMA__
#endif
#ifdef FASTLM_UNDEF_F16C
#undef __F16C__
#endif
#endif

namespace fastlm {
namespace {

bool vector_kernels_usable() {
#ifdef FASTLM_AVX2_KERNELS
  static const bool usable = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                             __builtin_cpu_supports("f16c");
  return usable;
#else
  return true;  // compiled for the baseline vector ISA of this target
#endif
}

}  // namespace
}  // namespace fastlm
