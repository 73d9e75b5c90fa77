// AdamW on CUDA: the CUDA kernels of torch.ops.fastlm.adamw_step_ and adamw_grad_norm (their
// schemas are defined in adamw_cpu.cpp).
//
// Multi-tensor apply: every tensor is cut into chunks of kChunk elements, one block each, and one
// launch covers every chunk of up to kMaxTensors tensors (the addresses travel in the kernel's
// argument struct, with the first block of each tensor), so a GPT-2 step takes a handful of
// launches, not one per tensor. A launch is as large as its tensors' chunks. A cap of 320 blocks
// (as in torch 2.11's fused AdamW, and in this file before 2026-11-27) cut GPT-2 small's step into 10
// launches, each a wave of the 264 blocks an H100/H200 holds at once (2 per SM at this kernel's
// 50-64 registers a thread) and a last wave of 56 that leaves most SMs idle. Each thread moves
// kIlp elements per access: 16-byte loads and stores for fp32 arrays when the tensor's pointers
// are aligned. Math is fp32 whatever the parameter dtype.
//
// The host never waits for the device: found_inf (skip the step), grad_scale (unscale) and the
// global norm (clip) are read by the kernels. Step counts live on the device and are bumped by
// a last small launch, after every chunk has read them.
//
// The global norm is deterministic: each chunk's sum of squares goes to its own slot, and one
// block adds the slots in a fixed order.
// Only device-generic c10 headers are used (no c10/cuda), so this file also compiles against
// the headers of a CPU-only torch, which is how CI checks it without a GPU.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "adamw.h"

#include <algorithm>
#include <climits>
#include <vector>

namespace fastlm {
namespace {

cudaStream_t current_stream(const at::Device& device) {
  return static_cast<cudaStream_t>(c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle());
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "adamw: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;
constexpr int kIlp = 4;
constexpr int kMaxTensors = 32;
// Blocks (chunks) of one launch at most: a tensor with more is carried into the next launch.
constexpr int64_t kMaxBlocks = int64_t{1} << 24;
constexpr int kMaxSteps = 128;

template <typename T>
struct alignas(sizeof(T) * kIlp) Pack {
  T v[kIlp];
};

template <typename T>
__device__ __forceinline__ bool is_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<T>) == 0;
}

// ---- multi-tensor launch bookkeeping ----------------------------------------------------------

// Where each block of a launch works: the launch's blocks are its slots' chunks in order, slot s
// taking blocks [first_block[s], first_block[s + 1]) (unused slots start at INT_MAX), from chunk
// first_chunk[s] of its tensor on (0 unless the tensor was carried over from the last launch).
struct ChunkMap {
  int first_block[kMaxTensors];
  int64_t first_chunk[kMaxTensors];
};

// The slot of this block and the offset of its chunk in that slot's tensor. A scan of at most
// kMaxTensors entries of the kernel's arguments: nothing next to a chunk's 64K elements.
__device__ __forceinline__ int64_t locate_chunk(const ChunkMap& map, int& slot) {
  const int block = static_cast<int>(blockIdx.x);
  int s = 0;
  while (s + 1 < kMaxTensors && block >= map.first_block[s + 1]) ++s;
  slot = s;
  return (map.first_chunk[s] + (block - map.first_block[s])) * kChunk;
}

// Calls fill(slot, tensor) to place a tensor's pointers in the launch struct and
// launch(num_blocks, blocks_before) whenever its kMaxTensors slots (or kMaxBlocks blocks) are
// taken; a tensor whose chunks do not all fit is carried into slot 0 of the next launch.
template <typename Fill, typename Launch>
void for_each_launch(const std::vector<int64_t>& numels, ChunkMap& map, Fill fill, Launch launch) {
  int slot = 0;
  int64_t blocks = 0, blocks_before = 0;
  auto flush = [&]() {
    for (int s = slot; s < kMaxTensors; ++s) map.first_block[s] = INT_MAX;
    launch(static_cast<int>(blocks), blocks_before);
    blocks_before += blocks;
    blocks = 0;
    slot = 0;
  };
  for (size_t t = 0; t < numels.size(); ++t) {
    const int64_t chunks = (numels[t] + kChunk - 1) / kChunk;
    for (int64_t chunk = 0; chunk < chunks;) {
      const int64_t take = std::min(chunks - chunk, kMaxBlocks - blocks);
      fill(slot, t);
      map.first_block[slot] = static_cast<int>(blocks);
      map.first_chunk[slot] = chunk;
      blocks += take;
      chunk += take;
      if (++slot == kMaxTensors || blocks == kMaxBlocks) flush();
    }
  }
  if (blocks > 0) flush();
}

int64_t total_chunks(const std::vector<int64_t>& numels) {
  int64_t total = 0;
  for (int64_t n : numels) total += (n + kChunk - 1) / kChunk;
  return total;
}

// ---- the update -----------------------------------------------------------------------------

struct AdamwTensors {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  float* max_exp_avg_sq[kMaxTensors];
  float* master[kMaxTensors];
  const float* step[kMaxTensors];
  int64_t numel[kMaxTensors];
  ChunkMap map;
};

struct AdamwHyper {
  double lr;
  double beta1;
  double beta2;
  float eps;
  float decay;  // 1 - lr * weight_decay
  float max_grad_norm;  // <= 0: no clipping
  bool maximize;
};

struct ElementConsts {
  float grad_factor, decay, beta1_comp, beta2, beta2_comp, eps, neg_step_size, bc2_sqrt;
};

// The arithmetic of torch.optim.AdamW, in its order: p *= decay; m = fma(1 - beta1, g - m, m);
// v = fma((1 - beta2) g, g, beta2 v); p += (-step_size m) / (sqrt(max(v)) / sqrt(1 - beta2^step) + eps).
template <bool amsgrad>
__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, float& vmax,
                                              const ElementConsts& k) {
  g = __fmul_rn(g, k.grad_factor);
  p = __fmul_rn(p, k.decay);
  m = fmaf(k.beta1_comp, g - m, m);
  v = fmaf(__fmul_rn(k.beta2_comp, g), g, __fmul_rn(v, k.beta2));
  float second = v;
  if (amsgrad) {
    vmax = fmaxf(vmax, v);
    second = vmax;
  }
  // Explicitly rounded division and sqrt: the extension is built with --use_fast_math.
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(second), k.bc2_sqrt), k.eps);
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(k.neg_step_size, m), denom));
}

template <typename scalar_t, bool amsgrad, bool has_master>
__global__ void __launch_bounds__(kThreads) adamw_kernel(AdamwTensors tl, AdamwHyper h, const float* grad_scale,
                                                         const float* found_inf, const float* grad_norm) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  int t;
  const int64_t begin = locate_chunk(tl.map, t);
  const int64_t len = min(kChunk, tl.numel[t] - begin);

  ElementConsts k;
  k.grad_factor = grad_scale != nullptr ? 1.f / *grad_scale : 1.f;
  if (h.max_grad_norm > 0.f) {
    const float clip = h.max_grad_norm / (*grad_norm + 1e-6f);
    if (!(clip >= 1.f)) k.grad_factor *= clip;  // a nan norm propagates, as in clip_grad_norm_
  }
  if (h.maximize) k.grad_factor = -k.grad_factor;
  const double step = static_cast<double>(*tl.step[t]) + 1.0;  // the count after this update
  k.decay = h.decay;
  k.beta1_comp = static_cast<float>(1.0 - h.beta1);
  k.beta2 = static_cast<float>(h.beta2);
  k.beta2_comp = static_cast<float>(1.0 - h.beta2);
  k.eps = h.eps;
  k.neg_step_size = static_cast<float>(-h.lr / (1.0 - pow(h.beta1, step)));
  k.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, step)));

  scalar_t* param = static_cast<scalar_t*>(tl.param[t]) + begin;
  const scalar_t* grad = static_cast<const scalar_t*>(tl.grad[t]) + begin;
  float* exp_avg = tl.exp_avg[t] + begin;
  float* exp_avg_sq = tl.exp_avg_sq[t] + begin;
  float* max_exp_avg_sq = amsgrad ? tl.max_exp_avg_sq[t] + begin : nullptr;
  float* master = has_master ? tl.master[t] + begin : nullptr;

  bool aligned = is_aligned<scalar_t>(param) && is_aligned<scalar_t>(grad) && is_aligned<float>(exp_avg) &&
                 is_aligned<float>(exp_avg_sq);
  if (amsgrad) aligned = aligned && is_aligned<float>(max_exp_avg_sq);
  if (has_master) aligned = aligned && is_aligned<float>(master);
  const int64_t vec_len = aligned ? (len / kIlp) * kIlp : 0;

  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kIlp; i < vec_len; i += kThreads * kIlp) {
    const Pack<scalar_t> g = *reinterpret_cast<const Pack<scalar_t>*>(grad + i);
    Pack<float> p, m = *reinterpret_cast<const Pack<float>*>(exp_avg + i),
                   v = *reinterpret_cast<const Pack<float>*>(exp_avg_sq + i), vmax;
    if (has_master) {
      p = *reinterpret_cast<const Pack<float>*>(master + i);
    } else {
      const Pack<scalar_t> raw = *reinterpret_cast<const Pack<scalar_t>*>(param + i);
#pragma unroll
      for (int j = 0; j < kIlp; ++j) p.v[j] = static_cast<float>(raw.v[j]);
    }
    if (amsgrad) vmax = *reinterpret_cast<const Pack<float>*>(max_exp_avg_sq + i);
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      adamw_element<amsgrad>(p.v[j], static_cast<float>(g.v[j]), m.v[j], v.v[j], vmax.v[j], k);
    }
    *reinterpret_cast<Pack<float>*>(exp_avg + i) = m;
    *reinterpret_cast<Pack<float>*>(exp_avg_sq + i) = v;
    if (amsgrad) *reinterpret_cast<Pack<float>*>(max_exp_avg_sq + i) = vmax;
    if (has_master) *reinterpret_cast<Pack<float>*>(master + i) = p;
    Pack<scalar_t> out;
#pragma unroll
    for (int j = 0; j < kIlp; ++j) out.v[j] = static_cast<scalar_t>(p.v[j]);
    *reinterpret_cast<Pack<scalar_t>*>(param + i) = out;
  }
  for (int64_t i = vec_len + threadIdx.x; i < len; i += kThreads) {
    float p = has_master ? master[i] : static_cast<float>(param[i]);
    float m = exp_avg[i], v = exp_avg_sq[i], vmax = amsgrad ? max_exp_avg_sq[i] : 0.f;
    adamw_element<amsgrad>(p, static_cast<float>(grad[i]), m, v, vmax, k);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (amsgrad) max_exp_avg_sq[i] = vmax;
    if (has_master) master[i] = p;
    param[i] = static_cast<scalar_t>(p);
  }
}

struct StepList {
  float* step[kMaxSteps];
  int count;
};

__global__ void bump_steps_kernel(StepList list, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  const int i = threadIdx.x;
  if (i < list.count) *list.step[i] += 1.f;
}

// ---- the global norm ------------------------------------------------------------------------

struct NormTensors {
  const void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];
  ChunkMap map;
};

template <typename T>
__device__ __forceinline__ T block_sum(T value, T* shared) {
  // A fixed reduction tree: the same inputs give the same bits on every run.
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  const int warps = blockDim.x / 32;
  value = threadIdx.x < warps ? shared[threadIdx.x] : T(0);
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(NormTensors tl, float* partials) {
  __shared__ float shared[kThreads / 32];
  int t;
  const int64_t begin = locate_chunk(tl.map, t);
  const int64_t len = min(kChunk, tl.numel[t] - begin);
  const scalar_t* grad = static_cast<const scalar_t*>(tl.grad[t]) + begin;
  const int64_t vec_len = is_aligned<scalar_t>(grad) ? (len / kIlp) * kIlp : 0;
  float acc = 0.f;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kIlp; i < vec_len; i += kThreads * kIlp) {
    const Pack<scalar_t> g = *reinterpret_cast<const Pack<scalar_t>*>(grad + i);
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const float x = static_cast<float>(g.v[j]);
      acc += x * x;
    }
  }
  for (int64_t i = vec_len + threadIdx.x; i < len; i += kThreads) {
    const float x = static_cast<float>(grad[i]);
    acc += x * x;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(1024) finish_norm_kernel(const float* partials, int64_t count,
                                                           const float* grad_scale, float* out) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += static_cast<double>(partials[i]);
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) {
    double norm = sqrt(acc);
    if (grad_scale != nullptr) norm /= static_cast<double>(*grad_scale);
    *out = static_cast<float>(norm);
  }
}

// ---- host side ------------------------------------------------------------------------------

const float* optional_scalar(const std::optional<at::Tensor>& t, const at::Device& device, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, "adamw: ", name,
              " must be a float32 scalar on ", device);
  return t->data_ptr<float>();
}

// fn(scalar_t{}) for the parameter dtypes the kernels are built for.
template <typename Fn>
void dispatch_param_dtype(at::ScalarType dtype, Fn fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    case at::kHalf: fn(at::Half{}); break;
    default: TORCH_CHECK(false, "adamw: unsupported dtype ", dtype);
  }
}

at::Tensor adamw_grad_norm_cuda(at::TensorList grads, const std::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(!grads.empty(), "adamw_grad_norm: needs at least one grad");
  const at::Device device = grads[0].device();
  c10::DeviceGuard guard(device);
  const float* scale_ptr = optional_scalar(grad_scale, device, "grad_scale");
  std::vector<at::Tensor> dense;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    fastlm::check_adamw_grad(g, i, device);
    dense.push_back(g.is_non_overlapping_and_dense() ? g : g.contiguous());
  }
  std::vector<int64_t> all_numels;
  for (const auto& g : dense) all_numels.push_back(g.numel());
  const int64_t chunks = total_chunks(all_numels);
  auto options = dense[0].options().dtype(at::kFloat);
  at::Tensor out = at::empty({}, options);
  if (chunks == 0) {
    out.zero_();
    return out;
  }
  at::Tensor partials = at::empty({chunks}, options);
  cudaStream_t stream = current_stream(device);
  int64_t offset = 0;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    std::vector<const at::Tensor*> group;
    std::vector<int64_t> numels;
    for (const auto& g : dense) {
      if (g.scalar_type() == dtype) {
        group.push_back(&g);
        numels.push_back(g.numel());
      }
    }
    if (group.empty()) continue;
    NormTensors tl;
    auto fill = [&](int slot, size_t t) {
      tl.grad[slot] = group[t]->data_ptr();
      tl.numel[slot] = group[t]->numel();
    };
    auto launch = [&](int blocks, int64_t before) {
      float* out_ptr = partials.data_ptr<float>() + offset + before;
      dispatch_param_dtype(dtype, [&](auto tag) {
        using scalar_t = decltype(tag);
        sum_squares_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(tl, out_ptr);
      });
      check_launch();
    };
    for_each_launch(numels, tl.map, fill, launch);
    offset += total_chunks(numels);
  }
  finish_norm_kernel<<<1, 1024, 0, stream>>>(partials.data_ptr<float>(), chunks, scale_ptr, out.data_ptr<float>());
  check_launch();
  return out;
}

template <typename scalar_t, bool amsgrad, bool has_master>
void launch_adamw(const AdamwTensors& tl, int blocks, const AdamwHyper& h, const float* grad_scale,
                  const float* found_inf, const float* grad_norm, cudaStream_t stream) {
  adamw_kernel<scalar_t, amsgrad, has_master><<<blocks, kThreads, 0, stream>>>(tl, h, grad_scale, found_inf, grad_norm);
  check_launch();
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList master_params, at::TensorList state_steps,
                     double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                     bool maximize, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                     double max_grad_norm) {
  const size_t n = params.size();
  fastlm::check_adamw_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
                            amsgrad);
  if (n == 0) return;
  const at::Device device = params[0].device();
  c10::DeviceGuard guard(device);
  const float* scale_ptr = optional_scalar(grad_scale, device, "grad_scale");
  const float* inf_ptr = optional_scalar(found_inf, device, "found_inf");
  const float* norm_ptr = optional_scalar(grad_norm, device, "grad_norm");
  TORCH_CHECK(max_grad_norm <= 0 || norm_ptr != nullptr, "adamw_step_: max_grad_norm needs grad_norm");
  const bool has_master = !master_params.empty();

  // Operands that do not share one dense layout are updated on contiguous copies.
  struct Operands {
    at::Tensor param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master;
  };
  std::vector<Operands> ops(n);
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    fastlm::check_adamw_param(i, device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                              state_steps, amsgrad);
    std::vector<at::Tensor> list = {p, grads[i], exp_avgs[i], exp_avg_sqs[i]};
    if (amsgrad) list.push_back(max_exp_avg_sqs[i]);
    if (has_master) list.push_back(master_params[i]);
    bool shared_layout = p.is_non_overlapping_and_dense();
    for (const auto& t : list) shared_layout = shared_layout && t.strides() == p.strides();
    if (!shared_layout) {
      for (size_t k = 0; k < list.size(); ++k) {
        at::Tensor dense = list[k].contiguous();
        if (k != 1 && !dense.is_same(list[k])) copy_back.emplace_back(list[k], dense);
        list[k] = dense;
      }
    }
    ops[i] = {list[0], list[1], list[2], list[3], amsgrad ? list[4] : at::Tensor(),
              has_master ? list.back() : at::Tensor()};
  }

  AdamwHyper h{lr, beta1, beta2, static_cast<float>(eps), static_cast<float>(1.0 - lr * weight_decay),
               static_cast<float>(max_grad_norm), maximize};
  cudaStream_t stream = current_stream(device);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    std::vector<size_t> group;
    std::vector<int64_t> numels;
    for (size_t i = 0; i < n; ++i) {
      if (params[i].scalar_type() == dtype) {
        group.push_back(i);
        numels.push_back(params[i].numel());
      }
    }
    if (group.empty()) continue;
    AdamwTensors tl;
    auto fill = [&](int slot, size_t t) {
      const size_t i = group[t];
      tl.param[slot] = ops[i].param.data_ptr();
      tl.grad[slot] = ops[i].grad.data_ptr();
      tl.exp_avg[slot] = ops[i].exp_avg.data_ptr<float>();
      tl.exp_avg_sq[slot] = ops[i].exp_avg_sq.data_ptr<float>();
      tl.max_exp_avg_sq[slot] = amsgrad ? ops[i].max_exp_avg_sq.data_ptr<float>() : nullptr;
      tl.master[slot] = has_master ? ops[i].master.data_ptr<float>() : nullptr;
      tl.step[slot] = state_steps[i].data_ptr<float>();
      tl.numel[slot] = ops[i].param.numel();
    };
    auto launch = [&](int blocks, int64_t) {
      dispatch_param_dtype(dtype, [&](auto tag) {
        using scalar_t = decltype(tag);
        if (amsgrad && has_master) launch_adamw<scalar_t, true, true>(tl, blocks, h, scale_ptr, inf_ptr, norm_ptr, stream);
        else if (amsgrad) launch_adamw<scalar_t, true, false>(tl, blocks, h, scale_ptr, inf_ptr, norm_ptr, stream);
        else if (has_master) launch_adamw<scalar_t, false, true>(tl, blocks, h, scale_ptr, inf_ptr, norm_ptr, stream);
        else launch_adamw<scalar_t, false, false>(tl, blocks, h, scale_ptr, inf_ptr, norm_ptr, stream);
      });
    };
    for_each_launch(numels, tl.map, fill, launch);
  }

  // Every chunk has read its step count by now (stream order); bump them all.
  for (size_t first = 0; first < n; first += kMaxSteps) {
    StepList list;
    list.count = static_cast<int>(std::min<size_t>(kMaxSteps, n - first));
    for (int j = 0; j < list.count; ++j) list.step[j] = state_steps[first + j].data_ptr<float>();
    bump_steps_kernel<<<1, kMaxSteps, 0, stream>>>(list, inf_ptr);
    check_launch();
  }
  for (auto& [dst, src] : copy_back) dst.copy_(src);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("adamw_grad_norm", &adamw_grad_norm_cuda);
}

}  // namespace fastlm
