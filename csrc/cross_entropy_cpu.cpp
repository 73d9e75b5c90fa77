// Fused cross-entropy for CPU tensors: torch.ops.fastlm.cross_entropy_fwd.
//
// One row of logits at a time (rows in parallel): the row is read once from memory into a
// per-thread fp32 scratch row that stays in cache, then max, exp and sum, the loss and the
// log-sum-exp are computed from it and, when `grad` is given, d loss / d logits * grad_scale is
// written to `grad` (which may be the logits buffer itself: each row is fully read before it is
// written). Math is fp32 for fp32/bf16/fp16 inputs (float64 for float64, used by gradcheck).
//
// Per non-ignored row, with p = softmax(x), eps = label_smoothing, z = z_loss, t = target:
//   loss = lse - (1 - eps) x_t - eps mean(x) + z lse^2
//   grad = grad_scale * (p (1 + 2 z lse) - eps / V - (1 - eps) [j == t]);   ignored rows: 0.
//
// The vector loops use at::vec::Vectorized<float>. The extension is built without -march flags,
// so on x86-64 with GCC only the vector kernels below are compiled for AVX2+FMA (in their own
// at::vec::AVX2 namespace, as ATen builds its AVX2 kernels; every other header is included
// before that region, so no inline code that other files share is compiled for AVX2), and they
// run only when the CPU has AVX2+FMA+F16C. Elsewhere (older CPUs, clang) a scalar loop runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastlm {
namespace {

struct Options {
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  double grad_scale;
};

}  // namespace
}  // namespace fastlm

#include "avx2_begin.h"
#include <ATen/cpu/vec/vec.h>

namespace fastlm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

struct RowStats {
  float max;
  float sum_x;
};

// Lanes sum over blocks of this many elements before adding into the row total, so that fp32
// rounding grows with the block length, not with V.
constexpr int64_t kSumBlock = 512;

float lanes_sum(const Vec& v) {
  float lanes[kLanes];
  v.store(lanes);
  float sum = 0.f;
  for (int64_t k = 0; k < kLanes; ++k) sum += lanes[k];
  return sum;
}

// Max and (when wanted) sum of a row.
RowStats row_max_and_sum(const float* x, int64_t V, bool want_sum) {
  const int64_t V_vec = V - V % kLanes;
  Vec vmax(-std::numeric_limits<float>::infinity());
  float sum_x = 0.f;
  for (int64_t block = 0; block < V_vec; block += kSumBlock) {
    const int64_t block_end = std::min(block + kSumBlock, V_vec);
    Vec vsum(0.f);
    for (int64_t j = block; j < block_end; j += kLanes) {
      Vec v = Vec::loadu(x + j);
      vmax = at::vec::maximum(vmax, v);
      if (want_sum) vsum = vsum + v;
    }
    if (want_sum) sum_x += lanes_sum(vsum);
  }
  float lanes_max[kLanes];
  vmax.store(lanes_max);
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < kLanes; ++k) max = std::max(max, lanes_max[k]);
  for (int64_t j = V_vec; j < V; ++j) {
    max = std::max(max, x[j]);
    sum_x += x[j];
  }
  return {max, want_sum ? sum_x : 0.f};
}

// sum_j exp(x_j - max); the exponentials replace x in place when keep is true.
float row_exp_sum(float* x, int64_t V, float max, bool keep) {
  const int64_t V_vec = V - V % kLanes;
  const Vec vmax(max);
  float sum = 0.f;
  for (int64_t block = 0; block < V_vec; block += kSumBlock) {
    const int64_t block_end = std::min(block + kSumBlock, V_vec);
    Vec vsum(0.f);
    for (int64_t j = block; j < block_end; j += kLanes) {
      Vec e = (Vec::loadu(x + j) - vmax).exp_u20();
      if (keep) e.store(x + j);
      vsum = vsum + e;
    }
    sum += lanes_sum(vsum);
  }
  for (int64_t j = V_vec; j < V; ++j) {
    float e = std::exp(x[j] - max);
    if (keep) x[j] = e;
    sum += e;
  }
  return sum;
}

// out = e * coef - shift, converted to the gradient dtype.
template <typename scalar_t>
void write_grad_row(const float* e, scalar_t* out, int64_t V, float coef, float shift) {
  const Vec vcoef(coef), vshift(shift);
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; j + kLanes <= V; j += kLanes) {
      at::vec::fmsub(Vec::loadu(e + j), vcoef, vshift).store(out + j);
    }
  } else {
    float lanes[kLanes];
    for (; j + kLanes <= V; j += kLanes) {
      at::vec::fmsub(Vec::loadu(e + j), vcoef, vshift).store(lanes);
      for (int64_t k = 0; k < kLanes; ++k) out[j + k] = static_cast<scalar_t>(lanes[k]);
    }
  }
  for (; j < V; ++j) out[j] = static_cast<scalar_t>(e[j] * coef - shift);
}

// Rows [begin, end) of fp32/bf16/fp16 logits, fp32 math, vectorized; `x` is V floats of scratch.
template <typename scalar_t>
void rows_vec(const scalar_t* logits, int64_t logits_stride, const int64_t* targets, scalar_t* grad,
              int64_t grad_stride, float* loss, float* lse_out, int64_t begin, int64_t end, int64_t V,
              const Options& opt, float* x) {
  const float eps = static_cast<float>(opt.label_smoothing);
  const float z = static_cast<float>(opt.z_loss);
  const float scale = static_cast<float>(opt.grad_scale);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* in = logits + row * logits_stride;
    for (int64_t j = 0; j < V; ++j) x[j] = static_cast<float>(in[j]);
    const int64_t t = targets[row];
    const bool valid = t != opt.ignore_index;
    const float x_t = valid ? x[t] : 0.f;
    RowStats stats = row_max_and_sum(x, V, eps != 0.f);
    const bool with_grad = grad != nullptr;
    const float sum_exp = row_exp_sum(x, V, stats.max, with_grad && valid);
    const float lse = stats.max + std::log(sum_exp);
    lse_out[row] = lse;
    loss[row] = valid ? lse - (1.f - eps) * x_t - eps * (stats.sum_x / V) + z * lse * lse : 0.f;
    if (!with_grad) continue;
    scalar_t* g = grad + row * grad_stride;
    if (!valid) {
      for (int64_t j = 0; j < V; ++j) g[j] = static_cast<scalar_t>(0.f);
      continue;
    }
    const float coef = scale * (1.f + 2.f * z * lse) / sum_exp;
    const float shift = scale * eps / V;
    write_grad_row(x, g, V, coef, shift);
    g[t] = static_cast<scalar_t>(x[t] * coef - shift - scale * (1.f - eps));
  }
}

}  // namespace
}  // namespace fastlm

#include "avx2_end.h"

namespace fastlm {
namespace {

// Rows [begin, end), scalar, with acc_t math: float64 logits (tests, gradcheck), and fp32/bf16/fp16
// on CPUs the vector kernels cannot run on. `e` is V acc_t of scratch.
template <typename scalar_t, typename acc_t>
void rows_scalar(const scalar_t* logits, int64_t logits_stride, const int64_t* targets, scalar_t* grad,
                 int64_t grad_stride, acc_t* loss, acc_t* lse_out, int64_t begin, int64_t end, int64_t V,
                 const Options& opt, acc_t* e) {
  const acc_t eps = opt.label_smoothing, z = opt.z_loss, scale = opt.grad_scale;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = logits + row * logits_stride;
    const int64_t t = targets[row];
    const bool valid = t != opt.ignore_index;
    acc_t max = -std::numeric_limits<acc_t>::infinity(), sum_x = 0, sum_exp = 0;
    for (int64_t j = 0; j < V; ++j) {
      max = std::max(max, static_cast<acc_t>(x[j]));
      sum_x += static_cast<acc_t>(x[j]);
    }
    for (int64_t j = 0; j < V; ++j) {
      e[j] = std::exp(static_cast<acc_t>(x[j]) - max);
      sum_exp += e[j];
    }
    const acc_t x_t = valid ? static_cast<acc_t>(x[t]) : acc_t(0);
    const acc_t lse = max + std::log(sum_exp);
    lse_out[row] = lse;
    loss[row] = valid ? lse - (1 - eps) * x_t - eps * (sum_x / V) + z * lse * lse : acc_t(0);
    if (grad == nullptr) continue;
    scalar_t* g = grad + row * grad_stride;
    const acc_t coef = scale * (1 + 2 * z * lse) / sum_exp, shift = scale * eps / V;
    for (int64_t j = 0; j < V; ++j) {
      acc_t value = valid ? e[j] * coef - shift : acc_t(0);
      if (valid && j == t) value -= scale * (1 - eps);
      g[j] = static_cast<scalar_t>(value);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                     const std::optional<at::Tensor>& grad,
                                                     int64_t ignore_index, double label_smoothing,
                                                     double z_loss, const at::Tensor& grad_scale) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "cross_entropy_fwd: logits must be (N, V) with V > 0, got ",
              logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "cross_entropy_fwd: logits rows must be contiguous, got strides ",
              logits.strides());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "cross_entropy_fwd: logits must be float32/bfloat16/float16/float64, got ", dtype);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == N && targets.scalar_type() == at::kLong,
              "cross_entropy_fwd: targets must be int64 of shape (", N, "), got ", targets.scalar_type(), " ",
              targets.sizes());
  const at::Tensor t = targets.contiguous();
  const int64_t* t_ptr = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(t_ptr[i] == ignore_index || (t_ptr[i] >= 0 && t_ptr[i] < V), "cross_entropy_fwd: target ",
                t_ptr[i], " out of range [0, ", V, ")");
  }
  at::Tensor g;
  if (grad.has_value() && grad->defined()) {
    g = *grad;
    TORCH_CHECK(g.sizes() == logits.sizes() && g.scalar_type() == dtype && g.stride(1) == 1,
                "cross_entropy_fwd: grad must match logits in shape and dtype, with contiguous rows");
  }
  TORCH_CHECK(grad_scale.numel() == 1 && grad_scale.device().is_cpu() && grad_scale.is_floating_point(),
              "cross_entropy_fwd: grad_scale must be a one-element float CPU tensor, got ", grad_scale.sizes(), " ",
              grad_scale.scalar_type(), " on ", grad_scale.device());
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({N}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({N}, logits.options().dtype(acc));
  const Options opt{ignore_index, label_smoothing, z_loss, grad_scale.item<double>()};
  if (N == 0) return {loss, lse};
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  const int64_t grad_stride = g.defined() ? g.stride(0) : 0;
  if (dtype == at::kDouble) {
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(V);
      rows_scalar<double, double>(logits.data_ptr<double>(), logits.stride(0), t_ptr,
                                  g.defined() ? g.data_ptr<double>() : nullptr, grad_stride,
                                  loss.data_ptr<double>(), lse.data_ptr<double>(), begin, end, V, opt,
                                  scratch.data());
    });
    return {loss, lse};
  }
  const bool vectorized = vector_kernels_usable();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cross_entropy_fwd", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(V);
        const scalar_t* in = logits.data_ptr<scalar_t>();
        scalar_t* out = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
        if (vectorized) {
          rows_vec<scalar_t>(in, logits.stride(0), t_ptr, out, grad_stride, loss.data_ptr<float>(),
                             lse.data_ptr<float>(), begin, end, V, opt, scratch.data());
        } else {
          rows_scalar<scalar_t, float>(in, logits.stride(0), t_ptr, out, grad_stride, loss.data_ptr<float>(),
                                       lse.data_ptr<float>(), begin, end, V, opt, scratch.data());
        }
      });
    }
  });
  return {loss, lse};
}

}  // namespace
}  // namespace fastlm

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor targets, Tensor(a!)? grad, int ignore_index, "
      "float label_smoothing, float z_loss, Tensor grad_scale) -> (Tensor loss, Tensor lse)");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("cross_entropy_fwd", &fastlm::cross_entropy_fwd); }
