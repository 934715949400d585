// The dsg_ext operator schemas, declared once; CPU and CUDA implementations register themselves in
// cpu/*.cpp and cuda/*.cu with TORCH_LIBRARY_IMPL. Autograd, fake tensors and the Python API live in
// dsg_ext/ops.py.
#include <torch/library.h>

#ifdef DSG_EXT_PYTHON_MODULE
#include <Python.h>

// An empty Python module: importing dsg_ext._C loads this library, which registers the ops.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(dsg_ext, m) {
  // Returns (loss, mean~, std~): loss has shape (N) per sample or () per batch; the statistics,
  // (N, C) or (C), in float32 (float64 for float64 x), are saved for the backward.
  m.def(
      "bn_stat_slack_loss(Tensor x, Tensor mean, Tensor std, Tensor delta, Tensor gamma, float eps, "
      "bool unbiased, bool per_sample) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_stat_slack_loss_backward(Tensor grad_loss, Tensor x, Tensor mean, Tensor std, Tensor delta, "
      "Tensor gamma, Tensor stat_mean, Tensor stat_std, bool unbiased, bool per_sample) -> Tensor");
  // Inference-mode BatchNorm fused with the slack loss on its input: returns (y = x * bn_scale[c] +
  // bn_shift[c] in the dtype and layout of x, loss, mean~, std~): per sample (N), (N, C), (N, C), or with
  // per_sample=False over the batch (), (C), (C).
  // bn_scale = weight / sqrt(running_var + eps_bn), bn_shift = bias - running_mean * bn_scale.
  m.def(
      "bn_eval_slack(Tensor x, Tensor bn_scale, Tensor bn_shift, Tensor mean, Tensor std, Tensor delta, "
      "Tensor gamma, float eps, bool unbiased, bool per_sample=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // grad_x = grad_y * bn_scale[c] + d(loss)/dx, in one pass over grad_y and x.
  m.def(
      "bn_eval_slack_backward(Tensor grad_y, Tensor grad_loss, Tensor x, Tensor bn_scale, Tensor mean, "
      "Tensor std, Tensor delta, Tensor gamma, Tensor stat_mean, Tensor stat_std, bool unbiased, "
      "bool per_sample=True) -> Tensor");
  // With param_grads the backward also returns the scale and zero-point gradients (LSQ's, unscaled:
  // the Python API applies LSQ's gradient factor to scale and zero_point before the op).
  m.def("fake_quant(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, int? axis) -> Tensor");
  m.def(
      "fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, int? axis, bool param_grads) -> (Tensor, Tensor, Tensor)");
  // Returns (quantized weight, regularizer R(V, beta)).
  m.def(
      "adaround(Tensor w, Tensor v, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis, float beta, bool hard) -> (Tensor, Tensor)");
  m.def(
      "adaround_backward(Tensor grad_w, Tensor grad_reg, Tensor w, Tensor v, Tensor scale, "
      "Tensor zero_point, int quant_min, int quant_max, int? axis, float beta, bool hard, "
      "bool scale_grad) -> (Tensor, Tensor)");
  // Swing convolution's shift: out[n, c, i, j] = x[n, c, r(i + dy), r(j + dx)] with reflection at the borders
  // (csrc/reflect_shift.h); shift = (dy, dx), int64 on the device of x (read there: no host sync), each
  // clamped to +-(size - 1). Output in the dtype and layout (contiguous or channels_last) of x.
  m.def("reflect_shift(Tensor x, Tensor shift) -> Tensor");
  // The adjoint: grad_x[r(i + dy), r(j + dx)] += grad[i, j], as a gather (no atomics, no zero fill).
  m.def("reflect_shift_backward(Tensor grad, Tensor shift) -> Tensor");
}
