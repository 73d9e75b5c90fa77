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

}  // namespace fastlm
