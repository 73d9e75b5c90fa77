// AdamW on CPU: torch.ops.fastlm.adamw_step_ and torch.ops.fastlm.adamw_grad_norm.
//
// The schemas of both operators are defined here (the CUDA file only adds its kernels).
// adamw_step_ updates every tensor of a param group in one call: p, g, m, v (and the amsgrad
// max and the fp32 master copy when present) are each read once and p, m, v written once.
// Gradient unscaling (GradScaler), the clip factor of global-norm clipping and maximize are
// folded into one factor applied to g as it is loaded, so the grads are never rewritten.
//
// Work is cut into fixed-size pieces across all tensors and spread over threads with one
// at::parallel_for. Piece boundaries never depend on the thread count, and each piece is
// summed in a fixed order, so the global norm is bit-identical from run to run.
// Keep every rounding where the source puts it: the update must match torch.optim.AdamW's
// per-op rounding, and the compiler would otherwise fuse a*b+c into one fma wherever it can.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>
#include <torch/library.h>

#include "adamw.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

// The vector kernels below are compiled for AVX2 on x86-64 (see avx2_begin.h) and only called when
// the CPU has it; otherwise a plain scalar loop runs. Every other header is included above.
#include "avx2_begin.h"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace fastlm {
namespace {

using at::BFloat16;
using at::Half;
using Vec = at::vec::Vectorized<float>;

// Elements per work piece: large enough to amortize scheduling, small enough to balance
// threads over a model's mix of tensor sizes.
constexpr int64_t kPiece = 1 << 15;
// Elements handled per inner iteration: two float vectors, i.e. one reduced-precision vector.
constexpr int64_t kBlock = 2 * Vec::size();

#if defined(__GNUC__)
#define FASTLM_INLINE inline __attribute__((always_inline))
#else
#define FASTLM_INLINE inline
#endif

// ---- loads and stores of kBlock elements as two float vectors ------------------------------

FASTLM_INLINE void load_block(const float* ptr, int64_t count, Vec& lo, Vec& hi) {
  if (count == kBlock) {
    lo = Vec::loadu(ptr);
    hi = Vec::loadu(ptr + Vec::size());
  } else {
    lo = Vec::loadu(ptr, std::min<int64_t>(count, Vec::size()));
    hi = Vec::loadu(ptr + Vec::size(), std::max<int64_t>(count - Vec::size(), 0));
  }
}

template <typename T>
FASTLM_INLINE void load_block(const T* ptr, int64_t count, Vec& lo, Vec& hi) {
  auto raw = count == kBlock ? at::vec::Vectorized<T>::loadu(ptr) : at::vec::Vectorized<T>::loadu(ptr, count);
  auto [first, second] = at::vec::convert_to_float<T>(raw);
  lo = first;
  hi = second;
}

FASTLM_INLINE void store_block(float* ptr, int64_t count, const Vec& lo, const Vec& hi) {
  if (count == kBlock) {
    lo.store(ptr);
    hi.store(ptr + Vec::size());
  } else {
    lo.store(ptr, std::min<int64_t>(count, Vec::size()));
    hi.store(ptr + Vec::size(), std::max<int64_t>(count - Vec::size(), 0));
  }
}

template <typename T>
FASTLM_INLINE void store_block(T* ptr, int64_t count, const Vec& lo, const Vec& hi) {
  auto raw = at::vec::convert_from_float<T>(lo, hi);
  if (count == kBlock) {
    raw.store(ptr);
  } else {
    raw.store(ptr, count);
  }
}

// ---- the update ------------------------------------------------------------------------------

struct TensorSlots {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // null unless amsgrad
  float* master;          // null unless fp32 master weights
  at::ScalarType dtype;
  float step_size;        // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

struct Hyper {
  float decay;        // 1 - lr * weight_decay
  float beta1_comp;   // 1 - beta1, the lerp weight of exp_avg towards g
  float beta2;
  float beta2_comp;   // 1 - beta2
  float eps;
  float grad_factor;  // clip / grad_scale, negated for maximize
};

struct Piece {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// One block of the AdamW update, rounded step by step exactly as torch.optim.AdamW's CPU ops
// round it (floating-point contraction is off in this file, so every fma is written out):
// p *= decay; m = fma(1 - beta1, g - m, m); v = fma((1 - beta2) g, g, beta2 v);
// p += (-step_size m) / (sqrt(max(v)) / sqrt(1 - beta2^step) + eps).
template <typename scalar_t, bool amsgrad, bool has_master>
FASTLM_INLINE void update_block(const TensorSlots& t, const Hyper& h, int64_t i, int64_t count) {
  auto* param = static_cast<scalar_t*>(t.param) + i;
  auto* grad = static_cast<const scalar_t*>(t.grad) + i;
  Vec g[2], p[2], m[2], v[2], vmax[2];
  load_block(grad, count, g[0], g[1]);
  if constexpr (has_master) {
    load_block(t.master + i, count, p[0], p[1]);
  } else {
    load_block(param, count, p[0], p[1]);
  }
  load_block(t.exp_avg + i, count, m[0], m[1]);
  load_block(t.exp_avg_sq + i, count, v[0], v[1]);
  if constexpr (amsgrad) {
    load_block(t.max_exp_avg_sq + i, count, vmax[0], vmax[1]);
  }
  const Vec grad_factor(h.grad_factor), decay(h.decay), beta1_comp(h.beta1_comp), beta2(h.beta2),
      beta2_comp(h.beta2_comp), eps(h.eps), neg_step_size(-t.step_size), bc2_sqrt(t.bias_correction2_sqrt);
  for (int k = 0; k < 2; ++k) {
    const Vec gk = g[k] * grad_factor;
    p[k] = p[k] * decay;
    m[k] = at::vec::fmadd(beta1_comp, gk - m[k], m[k]);
    v[k] = at::vec::fmadd(beta2_comp * gk, gk, v[k] * beta2);
    Vec second = v[k];
    if constexpr (amsgrad) {
      vmax[k] = at::vec::maximum(vmax[k], v[k]);
      second = vmax[k];
    }
    p[k] = p[k] + (neg_step_size * m[k]) / (second.sqrt() / bc2_sqrt + eps);
  }
  store_block(t.exp_avg + i, count, m[0], m[1]);
  store_block(t.exp_avg_sq + i, count, v[0], v[1]);
  if constexpr (amsgrad) {
    store_block(t.max_exp_avg_sq + i, count, vmax[0], vmax[1]);
  }
  if constexpr (has_master) {
    store_block(t.master + i, count, p[0], p[1]);
  }
  store_block(param, count, p[0], p[1]);
}

template <typename scalar_t, bool amsgrad, bool has_master>
FASTLM_INLINE void update_piece(const TensorSlots& t, const Hyper& h, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    update_block<scalar_t, amsgrad, has_master>(t, h, i, kBlock);
  }
  if (i < end) {
    update_block<scalar_t, amsgrad, has_master>(t, h, i, end - i);
  }
}

template <typename scalar_t>
FASTLM_INLINE void update_piece_dispatch(const TensorSlots& t, const Hyper& h, int64_t begin, int64_t end) {
  const bool amsgrad = t.max_exp_avg_sq != nullptr, master = t.master != nullptr;
  if (amsgrad && master) update_piece<scalar_t, true, true>(t, h, begin, end);
  else if (amsgrad) update_piece<scalar_t, true, false>(t, h, begin, end);
  else if (master) update_piece<scalar_t, false, true>(t, h, begin, end);
  else update_piece<scalar_t, false, false>(t, h, begin, end);
}

FASTLM_INLINE void update_pieces_body(const TensorSlots* slots, const Hyper& h, const Piece* pieces, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const Piece& piece = pieces[k];
    const TensorSlots& t = slots[piece.tensor];
    switch (t.dtype) {
      case at::kFloat: update_piece_dispatch<float>(t, h, piece.begin, piece.end); break;
      case at::kBFloat16: update_piece_dispatch<BFloat16>(t, h, piece.begin, piece.end); break;
      case at::kHalf: update_piece_dispatch<Half>(t, h, piece.begin, piece.end); break;
      default: break;  // rejected before any piece runs
    }
  }
}

// ---- the sum of squares ----------------------------------------------------------------------

template <typename scalar_t>
FASTLM_INLINE double sum_squares_piece(const scalar_t* data, int64_t begin, int64_t end) {
  // fp32 lanes are folded into a double every few thousand elements, so a long piece loses
  // no more precision than a short one.
  constexpr int64_t kFold = 64 * kBlock;
  double total = 0.0;
  for (int64_t start = begin; start < end; start += kFold) {
    const int64_t stop = std::min(start + kFold, end);
    Vec acc0(0.f), acc1(0.f), lo, hi;
    int64_t i = start;
    for (; i + kBlock <= stop; i += kBlock) {
      load_block(data + i, kBlock, lo, hi);
      acc0 = at::vec::fmadd(lo, lo, acc0);
      acc1 = at::vec::fmadd(hi, hi, acc1);
    }
    if (i < stop) {
      load_block(data + i, stop - i, lo, hi);
      acc0 = at::vec::fmadd(lo, lo, acc0);
      acc1 = at::vec::fmadd(hi, hi, acc1);
    }
    float lanes[2 * Vec::size()];
    acc0.store(lanes);
    acc1.store(lanes + Vec::size());
    for (int64_t l = 0; l < kBlock; ++l) total += static_cast<double>(lanes[l]);
  }
  return total;
}

struct GradSlot {
  const void* data;
  at::ScalarType dtype;
};

FASTLM_INLINE void sum_squares_body(const GradSlot* grads, const Piece* pieces, int64_t n, double* out) {
  for (int64_t k = 0; k < n; ++k) {
    const Piece& piece = pieces[k];
    const GradSlot& g = grads[piece.tensor];
    double s = 0.0;
    switch (g.dtype) {
      case at::kFloat: s = sum_squares_piece(static_cast<const float*>(g.data), piece.begin, piece.end); break;
      case at::kBFloat16: s = sum_squares_piece(static_cast<const BFloat16*>(g.data), piece.begin, piece.end); break;
      case at::kHalf: s = sum_squares_piece(static_cast<const Half*>(g.data), piece.begin, piece.end); break;
      default: break;
    }
    out[k] = s;
  }
}

// ---- entry points and the scalar fallback ---------------------------------------------------

using UpdateFn = void (*)(const TensorSlots*, const Hyper&, const Piece*, int64_t);
using SumSquaresFn = void (*)(const GradSlot*, const Piece*, int64_t, double*);

void update_pieces_vec(const TensorSlots* s, const Hyper& h, const Piece* p, int64_t n) {
  update_pieces_body(s, h, p, n);
}
void sum_squares_vec(const GradSlot* g, const Piece* p, int64_t n, double* out) {
  sum_squares_body(g, p, n, out);
}

}  // namespace
}  // namespace fastlm

#include "avx2_end.h"

namespace fastlm {
namespace {

template <typename scalar_t>
void update_range_scalar(const TensorSlots& t, const Hyper& h, int64_t begin, int64_t end) {
  auto* param = static_cast<scalar_t*>(t.param);
  const auto* grad = static_cast<const scalar_t*>(t.grad);
  for (int64_t i = begin; i < end; ++i) {
    const float g = static_cast<float>(grad[i]) * h.grad_factor;
    float p = (t.master ? t.master[i] : static_cast<float>(param[i])) * h.decay;
    const float m = std::fma(h.beta1_comp, g - t.exp_avg[i], t.exp_avg[i]);
    const float v = std::fma(h.beta2_comp * g, g, t.exp_avg_sq[i] * h.beta2);
    float second = v;
    if (t.max_exp_avg_sq) {
      second = std::isnan(v) ? v : std::max(t.max_exp_avg_sq[i], v);
      t.max_exp_avg_sq[i] = second;
    }
    p = p + (-t.step_size * m) / (std::sqrt(second) / t.bias_correction2_sqrt + h.eps);
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
    if (t.master) t.master[i] = p;
    param[i] = static_cast<scalar_t>(p);
  }
}

void update_pieces_scalar(const TensorSlots* slots, const Hyper& h, const Piece* pieces, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const Piece& piece = pieces[k];
    const TensorSlots& t = slots[piece.tensor];
    switch (t.dtype) {
      case at::kFloat: update_range_scalar<float>(t, h, piece.begin, piece.end); break;
      case at::kBFloat16: update_range_scalar<BFloat16>(t, h, piece.begin, piece.end); break;
      case at::kHalf: update_range_scalar<Half>(t, h, piece.begin, piece.end); break;
      default: break;
    }
  }
}

template <typename scalar_t>
double sum_squares_range_scalar(const scalar_t* data, int64_t begin, int64_t end) {
  double total = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const double x = static_cast<float>(data[i]);
    total += x * x;
  }
  return total;
}

void sum_squares_scalar(const GradSlot* grads, const Piece* pieces, int64_t n, double* out) {
  for (int64_t k = 0; k < n; ++k) {
    const Piece& piece = pieces[k];
    const GradSlot& g = grads[piece.tensor];
    double s = 0.0;
    switch (g.dtype) {
      case at::kFloat: s = sum_squares_range_scalar(static_cast<const float*>(g.data), piece.begin, piece.end); break;
      case at::kBFloat16: s = sum_squares_range_scalar(static_cast<const BFloat16*>(g.data), piece.begin, piece.end); break;
      case at::kHalf: s = sum_squares_range_scalar(static_cast<const Half*>(g.data), piece.begin, piece.end); break;
      default: break;
    }
    out[k] = s;
  }
}

UpdateFn update_fn() { return vector_kernels_usable() ? update_pieces_vec : update_pieces_scalar; }

SumSquaresFn sum_squares_fn() { return vector_kernels_usable() ? sum_squares_vec : sum_squares_scalar; }

// ---- host side -------------------------------------------------------------------------------

std::vector<Piece> split_into_pieces(const std::vector<int64_t>& sizes) {
  std::vector<Piece> pieces;
  for (int64_t t = 0; t < static_cast<int64_t>(sizes.size()); ++t) {
    for (int64_t begin = 0; begin < sizes[t]; begin += kPiece) {
      pieces.push_back({t, begin, std::min(begin + kPiece, sizes[t])});
    }
  }
  return pieces;
}


at::Tensor adamw_grad_norm_cpu(at::TensorList grads, const std::optional<at::Tensor>& grad_scale) {
  std::vector<at::Tensor> dense;
  std::vector<GradSlot> slots;
  std::vector<int64_t> sizes;
  dense.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    fastlm::check_adamw_grad(g, i, at::kCPU);
    dense.push_back(g.is_non_overlapping_and_dense() ? g : g.contiguous());
    slots.push_back({dense.back().data_ptr(), g.scalar_type()});
    sizes.push_back(g.numel());
  }
  const std::vector<Piece> pieces = split_into_pieces(sizes);
  std::vector<double> partial(pieces.size(), 0.0);
  const SumSquaresFn fn = sum_squares_fn();
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    fn(slots.data(), pieces.data() + begin, end - begin, partial.data() + begin);
  });
  double total = 0.0;
  for (double s : partial) total += s;
  double norm = std::sqrt(total);
  if (grad_scale.has_value()) {
    norm /= grad_scale->item<double>();
  }
  return at::scalar_tensor(norm, at::TensorOptions().dtype(at::kFloat));
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList master_params,
                    at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool amsgrad, bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                    double max_grad_norm) {
  const size_t n = params.size();
  fastlm::check_adamw_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
                            amsgrad);
  TORCH_CHECK(max_grad_norm <= 0 || grad_norm.has_value(), "adamw_step_: max_grad_norm needs grad_norm");
  if (found_inf.has_value() && found_inf->item<float>() != 0.f) {
    return;  // GradScaler saw an inf/nan: skip the step, step counts included
  }

  // One factor for unscaling, clipping and maximize, computed in fp32 as clip_grad_norm_ does.
  float grad_factor = 1.f;
  if (grad_scale.has_value()) {
    grad_factor = static_cast<float>(1.0 / grad_scale->item<double>());
  }
  if (max_grad_norm > 0) {
    const float clip = static_cast<float>(max_grad_norm) / (grad_norm->item<float>() + 1e-6f);
    if (!(clip >= 1.f)) grad_factor *= clip;  // a nan norm propagates, as in clip_grad_norm_
  }
  if (maximize) grad_factor = -grad_factor;
  Hyper hyper{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
              static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(eps), grad_factor};

  // Tensors whose operands do not share one dense layout are updated on contiguous copies,
  // written back afterwards.
  struct CopyBack {
    at::Tensor dst, src;
  };
  std::vector<CopyBack> copy_back;
  std::vector<at::Tensor> keep_alive;
  std::vector<TensorSlots> slots(n);
  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    fastlm::check_adamw_param(i, at::kCPU, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                              state_steps, amsgrad);
    const bool has_master = !master_params.empty();
    const at::Tensor& step = state_steps[i];

    std::vector<at::Tensor> operands = {p, g, exp_avgs[i], exp_avg_sqs[i]};
    if (amsgrad) operands.push_back(max_exp_avg_sqs[i]);
    if (has_master) operands.push_back(master_params[i]);
    bool shared_layout = p.is_non_overlapping_and_dense();
    for (const auto& t : operands) shared_layout = shared_layout && t.strides() == p.strides();
    if (!shared_layout) {
      for (size_t k = 0; k < operands.size(); ++k) {
        at::Tensor dense = operands[k].contiguous();
        if (k != 1 && !dense.is_same(operands[k])) copy_back.push_back({operands[k], dense});
        keep_alive.push_back(dense);
        operands[k] = dense;
      }
    }
    float* step_ptr = step.data_ptr<float>();
    *step_ptr += 1.f;
    const double step_value = *step_ptr;
    const double bias_correction1 = 1.0 - std::pow(beta1, step_value);
    const double bias_correction2 = 1.0 - std::pow(beta2, step_value);
    TensorSlots& s = slots[i];
    s.param = operands[0].data_ptr();
    s.grad = operands[1].data_ptr();
    s.exp_avg = operands[2].data_ptr<float>();
    s.exp_avg_sq = operands[3].data_ptr<float>();
    s.max_exp_avg_sq = amsgrad ? operands[4].data_ptr<float>() : nullptr;
    s.master = has_master ? operands.back().data_ptr<float>() : nullptr;
    s.dtype = p.scalar_type();
    s.step_size = static_cast<float>(lr / bias_correction1);
    s.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
    sizes[i] = p.numel();
  }

  const std::vector<Piece> pieces = split_into_pieces(sizes);
  const UpdateFn fn = update_fn();
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    fn(slots.data(), hyper, pieces.data() + begin, end - begin);
  });
  for (auto& c : copy_back) c.dst.copy_(c.src);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, Tensor(f!)[] state_steps, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, float max_grad_norm) -> ()");
  m.def("adamw_grad_norm(Tensor[] grads, Tensor? grad_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("adamw_grad_norm", &adamw_grad_norm_cpu);
}

}  // namespace fastlm
