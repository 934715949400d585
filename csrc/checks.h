// Input validation and layout decisions shared by the CPU and CUDA implementations (host code).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>

#include "common.h"

namespace dsg_ext {

// Tensors an op receives, after validation, in the memory layout its kernels expect.
struct SlackInputs {
  at::Tensor x;  // contiguous, or channels_last contiguous
  Layout layout;
  int64_t count;       // elements per statistic group: H*W (per sample) or N*H*W (batch)
  int64_t batch;       // N
  int64_t channels;    // C
  at::Tensor target_mean, target_std, delta, gamma;  // acc dtype, contiguous, length C (expanded)
};

SlackInputs check_slack_inputs(const char* op, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& std_t, const at::Tensor& delta, const at::Tensor& gamma,
                               bool per_sample);

// The statistic saved by the forward, checked against x for the backward.
void check_slack_saved(const SlackInputs& in, const at::Tensor& grad_loss, const at::Tensor& stat_mean,
                       const at::Tensor& stat_std, bool per_sample);

// The fused eval-mode BN op (bn_eval_slack): the slack inputs (per sample or per batch) plus the BN affine
// parameters (length C, accumulation dtype, contiguous) and, for the backward, grad_y (shape, dtype
// and device of x, in the layout of slack.x).
struct BnEvalInputs {
  SlackInputs slack;
  at::Tensor bn_scale, bn_shift, grad_y;  // bn_shift: forward only; grad_y: backward only
};

BnEvalInputs check_bn_eval_inputs(const at::Tensor& x, const at::Tensor& bn_scale, const at::Tensor& bn_shift,
                                  const at::Tensor& mean, const at::Tensor& std_t, const at::Tensor& delta,
                                  const at::Tensor& gamma, bool per_sample);

BnEvalInputs check_bn_eval_backward_inputs(const at::Tensor& grad_y, const at::Tensor& grad_loss, const at::Tensor& x,
                                           const at::Tensor& bn_scale, const at::Tensor& mean, const at::Tensor& std_t,
                                           const at::Tensor& delta, const at::Tensor& gamma,
                                           const at::Tensor& stat_mean, const at::Tensor& stat_std, bool per_sample);

struct QuantInputs {
  at::Tensor x;       // contiguous or channels_last contiguous
  Layout layout;      // [A=1][R][C][B]; per tensor: C = 1
  at::Tensor scale;       // param_dtype, contiguous, length C
  at::Tensor zero_point;  // param_dtype holding integers (or the learnable float values), length C
  bool zero_point_is_float;
};

// x: the tensor quantized (activations, or weights for AdaRound); scale/zero_point of numel 1
// (per tensor, axis empty) or of the length of dimension `axis`.
QuantInputs check_quant_inputs(const char* op, const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                               std::optional<int64_t> axis, at::ScalarType param_dtype = at::kFloat);

// AdaRound: w like x above, v of the shape and dtype of w, parameters in the accumulation dtype of w.
QuantInputs check_adaround_inputs(const char* op, const at::Tensor& w, const at::Tensor& v, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                  std::optional<int64_t> axis, double beta);

// AdaRound backward: the forward's checks plus the upstream gradients (grad_w like w, grad_reg a scalar).
QuantInputs check_adaround_backward_inputs(const at::Tensor& grad_w, const at::Tensor& grad_reg, const at::Tensor& w,
                                           const at::Tensor& v, const at::Tensor& scale, const at::Tensor& zero_point,
                                           int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                           double beta);

// Values can be checked without a device sync only on the CPU; CUDA kernels write NaN instead.
void check_quant_values_cpu(const char* op, const QuantInputs& in, int64_t quant_min, int64_t quant_max);

void check_same_shape_dtype_device(const char* op, const char* name_a, const at::Tensor& a,
                                   const char* name_b, const at::Tensor& b);

// reflect_shift: x 4-D floating (returned contiguous, or channels_last when it is), shift an integer tensor of
// two values on the device of x (returned as int64).
struct ShiftInputs {
  at::Tensor x, shift;
  bool channels_last;
};
ShiftInputs check_reflect_shift_inputs(const char* op, const at::Tensor& x, const at::Tensor& shift);
// The output of reflect_shift(_backward): shaped like in.x, in its layout.
at::Tensor empty_shift_output(const ShiftInputs& in);

// `t` in the same memory format as `like` (contiguous or channels_last), so both index alike.
at::Tensor match_layout(const at::Tensor& t, const at::Tensor& like);

}  // namespace dsg_ext
