// Opens the region of a CPU kernel file whose vector code is compiled for AVX2+FMA+F16C.
//
// The extension is built without -march flags, so at::vec::Vectorized would fall back to its
// generic, scalar-in-practice implementation. On x86-64 with GCC, the code between this header and
// avx2_end.h is compiled against ATen's AVX2 specializations instead (in their own at::vec::AVX2
// namespace, exactly as ATen builds its AVX2 kernels). Include every other header before this one:
// inline code that other files share must not be compiled for AVX2. The kernels of the region run
// only when fastlm::vector_kernels_usable() (avx2_end.h) says the CPU has the instructions;
// elsewhere (other CPUs, other compilers) the region is compiled for the baseline ISA.
// Included once per file, around the include of <ATen/cpu/vec/vec.h>; no include guard on purpose.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CPU_CAPABILITY)
#define FASTLM_AVX2_KERNELS 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The target pragma does not define the ISA macros that sleef.h and the vec headers test.
#ifndef __AVX__
#define __AVX__ 1
#define FASTLM_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define FASTLM_UNDEF_AVX2
#endif
#ifndef __FMA__
#define __FMA__ 1
#define FASTLM_UNDEF_FMA
#endif
#ifndef __F16C__
#define __F16C__ 1
#define FASTLM_UNDEF_F16C
#endif
#endif
