// Checks shared by the CPU and CUDA implementations of torch.ops.fastlm.adamw_step_.
#pragma once

#include <ATen/ATen.h>

namespace fastlm {

// Every per-parameter list must have one entry per parameter (max_exp_avg_sqs only with amsgrad,
// master_params only when master weights are kept).
inline void check_adamw_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList master_params, at::TensorList state_steps, bool amsgrad) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
              "adamw_step_: params, grads, exp_avgs, exp_avg_sqs and state_steps must have one entry per "
              "parameter");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, "adamw_step_: amsgrad needs one max_exp_avg_sq per parameter");
  TORCH_CHECK(master_params.empty() || master_params.size() == n,
              "adamw_step_: master_params must be empty or have one entry per parameter");
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// A grad whose norm is taken: on `device`, of a parameter dtype.
inline void check_adamw_grad(const at::Tensor& g, size_t i, const at::Device& device) {
  TORCH_CHECK(g.device() == device, "adamw_grad_norm: grads[", i, "] is on ", g.device(), ", expected ", device);
  TORCH_CHECK(is_float_type(g.scalar_type()), "adamw_grad_norm: grads[", i,
              "] must be float32, bfloat16 or float16, got ", g.scalar_type());
}

// Parameter i and everything that goes with it: on `device`, a parameter dtype, a grad of the same
// dtype and shape, fp32 moments (and master weights) of its shape, and an fp32 scalar step.
inline void check_adamw_param(size_t i, const at::Device& device, at::TensorList params, at::TensorList grads,
                              at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList master_params, at::TensorList state_steps, bool amsgrad) {
  const at::Tensor& p = params[i];
  TORCH_CHECK(p.device() == device, "adamw_step_: params[", i, "] is on ", p.device(), ", expected ", device);
  TORCH_CHECK(is_float_type(p.scalar_type()), "adamw_step_: params[", i,
              "] must be float32, bfloat16 or float16, got ", p.scalar_type());
  TORCH_CHECK(grads[i].scalar_type() == p.scalar_type() && grads[i].sizes() == p.sizes() &&
                  grads[i].device() == device,
              "adamw_step_: grads[", i, "] must match its parameter's dtype, shape and device");
  auto check_state = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.device() == device, "adamw_step_: ", name, "[", i, "] is on ", t.device(), ", its parameter on ",
                device);
    TORCH_CHECK(t.scalar_type() == at::kFloat, "adamw_step_: ", name, "[", i, "] must be float32, got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == p.sizes(), "adamw_step_: ", name, "[", i, "] has shape ", t.sizes(),
                " but its parameter has shape ", p.sizes());
  };
  check_state("exp_avgs", exp_avgs[i]);
  check_state("exp_avg_sqs", exp_avg_sqs[i]);
  if (amsgrad) check_state("max_exp_avg_sqs", max_exp_avg_sqs[i]);
  if (!master_params.empty()) check_state("master_params", master_params[i]);
  const at::Tensor& step = state_steps[i];
  TORCH_CHECK(step.device() == device && step.scalar_type() == at::kFloat && step.numel() == 1,
              "adamw_step_: state_steps[", i, "] must be a float32 scalar on ", device);
}

}  // namespace fastlm
