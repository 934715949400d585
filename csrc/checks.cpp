#include "checks.h"

#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

namespace dsg_ext {
namespace {

// Error messages are built here without std::ostream. TORCH_CHECK formats its arguments through an
// ostringstream, and on one real toolchain (Ubuntu 24.04 gcc 13.3 building against the torch 2.11
// wheel) streaming an integer from extension code kills the process with SIGSEGV instead of raising
// -- torch's own load_inline example crashes the same way (bench/gpu_errors.py --diagnose). Handing
// TORCH_CHECK one finished std::string takes no stream, so our errors raise there too.
void append(std::string& out, const char* s) { out += s; }
void append(std::string& out, const std::string& s) { out += s; }
void append(std::string& out, at::ScalarType t) { out += c10::toString(t); }
void append(std::string& out, const c10::Device& d) { out += d.str(); }
void append(std::string& out, at::IntArrayRef sizes) {
  out += '[';
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  out += ']';
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& out, T v) {
  if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.8g", static_cast<double>(v));
    out += buf;
  } else {
    out += std::to_string(v);
  }
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}

// TORCH_CHECK with the message built by message(): same lazy evaluation, same c10::Error.
#define DSG_CHECK(cond, ...) TORCH_CHECK(cond, ::dsg_ext::message(__VA_ARGS__))

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  DSG_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be a floating tensor (float32, float64, float16 or bfloat16), got ", t.scalar_type());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  DSG_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
            "; all tensors must be on the same device");
}

// A per-channel parameter given as a scalar (numel 1) or one value per channel.
at::Tensor per_channel(const char* op, const char* name, const at::Tensor& t, int64_t channels,
                       at::ScalarType dtype, bool allow_scalar) {
  const bool scalar = allow_scalar && t.numel() == 1 && t.dim() <= 1;
  DSG_CHECK(scalar || (t.dim() == 1 && t.size(0) == channels), op, ": ", name, " must have shape (",
              channels, ")", allow_scalar ? " or be a scalar" : "", " to match the channel dimension of x, got shape ",
              t.sizes());
  at::Tensor out = t.to(dtype).reshape({-1});
  if (scalar) out = out.expand({channels});
  return out.contiguous();
}

}  // namespace

void check_same_shape_dtype_device(const char* op, const char* name_a, const at::Tensor& a,
                                   const char* name_b, const at::Tensor& b) {
  DSG_CHECK(a.sizes() == b.sizes(), op, ": ", name_b, " must have the shape of ", name_a, " ", a.sizes(),
              ", got ", b.sizes());
  DSG_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_b, " must have the dtype of ", name_a, " (",
              a.scalar_type(), "), got ", b.scalar_type());
  DSG_CHECK(a.device() == b.device(), op, ": ", name_b, " is on ", b.device(), " but ", name_a, " is on ",
            a.device(), "; all tensors must be on the same device");
}

at::Tensor match_layout(const at::Tensor& t, const at::Tensor& like) {
  return is_channels_last(like) ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

SlackInputs check_slack_inputs(const char* op, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& std_t, const at::Tensor& delta, const at::Tensor& gamma,
                               bool per_sample) {
  check_float(op, "x", x);
  DSG_CHECK(x.dim() >= 2, op, ": x must have shape (N, C, *spatial), got shape ", x.sizes());
  check_float(op, "mean", mean);
  check_float(op, "std", std_t);
  check_float(op, "delta", delta);
  check_float(op, "gamma", gamma);
  check_device(op, "mean", mean, x);
  check_device(op, "std", std_t, x);
  check_device(op, "delta", delta, x);
  check_device(op, "gamma", gamma, x);

  SlackInputs in;
  const int64_t n = x.size(0), c = x.size(1);
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  in.batch = n;
  in.channels = c;
  in.count = per_sample ? hw : n * hw;
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  in.target_mean = per_channel(op, "mean", mean, c, acc, false);
  in.target_std = per_channel(op, "std", std_t, c, acc, false);
  in.delta = per_channel(op, "delta", delta, c, acc, true);
  in.gamma = per_channel(op, "gamma", gamma, c, acc, true);

  if (is_channels_last(x)) {
    in.x = x;
    in.layout = per_sample ? Layout{n, hw, c, 1} : Layout{1, n * hw, c, 1};
  } else {
    in.x = x.contiguous();
    in.layout = per_sample ? Layout{n, 1, c, hw} : Layout{1, n, c, hw};
  }
  if (x.device().is_cpu()) {
    // Negative slack would reward a statistic gap; checked where it costs no device sync.
    const bool ok = in.delta.numel() == 0 || ((in.delta >= 0).all().item<bool>() && (in.gamma >= 0).all().item<bool>());
    DSG_CHECK(ok, op, ": slack delta and gamma must be >= 0 (and not NaN)");
  }
  return in;
}

void check_slack_saved(const SlackInputs& in, const at::Tensor& grad_loss, const at::Tensor& stat_mean,
                       const at::Tensor& stat_std, bool per_sample) {
  const char* op = "bn_stat_slack_loss_backward";
  check_float(op, "grad_loss", grad_loss);
  check_device(op, "grad_loss", grad_loss, in.x);
  if (per_sample) {
    DSG_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == in.batch, op,
                ": grad_loss must have shape (N) = (", in.batch, "), got ", grad_loss.sizes());
  } else {
    DSG_CHECK(grad_loss.numel() == 1, op, ": grad_loss must be a scalar in batch mode, got ",
                grad_loss.sizes());
  }
  const at::ScalarType acc = in.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&stat_mean, &stat_std}) {
    DSG_CHECK(t->scalar_type() == acc && t->is_contiguous() && t->device() == in.x.device(), op,
                ": saved statistics must be contiguous ", acc, " tensors on the device of x");
    DSG_CHECK(t->numel() == (per_sample ? in.batch * in.channels : in.channels), op,
                ": saved statistics do not match x (shape ", t->sizes(), ")");
  }
}

namespace {

at::Tensor check_bn_affine(const char* op, const char* name, const at::Tensor& t, const SlackInputs& in) {
  check_float(op, name, t);
  check_device(op, name, t, in.x);
  const at::ScalarType acc = in.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return per_channel(op, name, t, in.channels, acc, false);
}

}  // namespace

BnEvalInputs check_bn_eval_inputs(const at::Tensor& x, const at::Tensor& bn_scale, const at::Tensor& bn_shift,
                                  const at::Tensor& mean, const at::Tensor& std_t, const at::Tensor& delta,
                                  const at::Tensor& gamma, bool per_sample) {
  const char* op = "bn_eval_slack";
  BnEvalInputs in;
  in.slack = check_slack_inputs(op, x, mean, std_t, delta, gamma, per_sample);
  in.bn_scale = check_bn_affine(op, "bn_scale", bn_scale, in.slack);
  in.bn_shift = check_bn_affine(op, "bn_shift", bn_shift, in.slack);
  return in;
}

BnEvalInputs check_bn_eval_backward_inputs(const at::Tensor& grad_y, const at::Tensor& grad_loss, const at::Tensor& x,
                                           const at::Tensor& bn_scale, const at::Tensor& mean, const at::Tensor& std_t,
                                           const at::Tensor& delta, const at::Tensor& gamma,
                                           const at::Tensor& stat_mean, const at::Tensor& stat_std, bool per_sample) {
  const char* op = "bn_eval_slack_backward";
  BnEvalInputs in;
  in.slack = check_slack_inputs(op, x, mean, std_t, delta, gamma, per_sample);
  check_slack_saved(in.slack, grad_loss, stat_mean, stat_std, per_sample);
  in.bn_scale = check_bn_affine(op, "bn_scale", bn_scale, in.slack);
  check_same_shape_dtype_device(op, "x", in.slack.x, "grad_y", grad_y);
  in.grad_y = match_layout(grad_y, in.slack.x);
  return in;
}

QuantInputs check_quant_inputs(const char* op, const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                               std::optional<int64_t> axis, at::ScalarType param_dtype) {
  check_float(op, "input", x);
  check_float(op, "scale", scale);
  DSG_CHECK(is_float_type(zero_point.scalar_type()) ||
                  (at::isIntegralType(zero_point.scalar_type(), /*includeBool=*/false)),
              op, ": zero_point must be an integer or floating tensor, got ", zero_point.scalar_type());
  check_device(op, "scale", scale, x);
  check_device(op, "zero_point", zero_point, x);
  DSG_CHECK(quant_min < quant_max, op, ": quant_min (", quant_min, ") must be smaller than quant_max (",
              quant_max, ")");
  // Levels are exact in fp32 and the rounding stays in range for |level| <= 2^16.
  DSG_CHECK(quant_min >= -(int64_t(1) << 16) && quant_max <= (int64_t(1) << 16), op,
              ": quantization range [", quant_min, ", ", quant_max,
              "] is not supported: quant_min and quant_max must lie in [-65536, 65536] (at most 16 bits)");

  QuantInputs in;
  in.zero_point_is_float = is_float_type(zero_point.scalar_type());
  int64_t channels = 1;
  if (axis.has_value()) {
    DSG_CHECK(x.dim() > 0, op, ": per-channel quantization needs a tensor with at least one dimension");
    int64_t ax = *axis;
    DSG_CHECK(ax >= -x.dim() && ax < x.dim(), op, ": axis ", ax, " is out of range for a tensor of ",
                x.dim(), " dimensions");
    if (ax < 0) ax += x.dim();
    channels = x.size(ax);
    in.scale = per_channel(op, "scale", scale, channels, param_dtype, false);
    // A single zero point (e.g. the 0 of a symmetric quantizer) applies to every channel.
    in.zero_point = per_channel(op, "zero_point", zero_point, channels, param_dtype, true);
    // Work in memory order so channels_last stays channels_last: [N][H][W][C] for a 4-D channels_last x.
    const bool cl = is_channels_last(x);
    in.x = cl ? x : x.contiguous();
    const std::vector<int64_t> order = cl ? std::vector<int64_t>{0, 2, 3, 1} : [&] {
      std::vector<int64_t> o(x.dim());
      for (int64_t d = 0; d < x.dim(); ++d) o[d] = d;
      return o;
    }();
    int64_t r = 1, b = 1;
    bool before = true;
    for (const int64_t d : order) {
      if (d == ax) {
        before = false;
      } else {
        (before ? r : b) *= x.size(d);
      }
    }
    in.layout = Layout{1, r, channels, b};
  } else {
    DSG_CHECK(scale.numel() == 1, op, ": per-tensor quantization (axis=None) needs a single scale, got shape ",
                scale.sizes());
    DSG_CHECK(zero_point.numel() == 1, op,
                ": per-tensor quantization (axis=None) needs a single zero_point, got shape ", zero_point.sizes());
    in.scale = scale.to(param_dtype).reshape({1}).contiguous();
    in.zero_point = zero_point.to(param_dtype).reshape({1}).contiguous();
    in.x = is_channels_last(x) ? x : x.contiguous();
    in.layout = Layout{1, 1, 1, x.numel()};
  }
  return in;
}

QuantInputs check_adaround_inputs(const char* op, const at::Tensor& w, const at::Tensor& v, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                  std::optional<int64_t> axis, double beta) {
  const auto acc = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  QuantInputs in = check_quant_inputs(op, w, scale, zero_point, quant_min, quant_max, axis, acc);
  check_same_shape_dtype_device(op, "w", w, "v", v);
  DSG_CHECK(beta > 0 && std::isfinite(beta), op, ": beta must be positive and finite, got ", beta);
  return in;
}

QuantInputs check_adaround_backward_inputs(const at::Tensor& grad_w, const at::Tensor& grad_reg, const at::Tensor& w,
                                           const at::Tensor& v, const at::Tensor& scale, const at::Tensor& zero_point,
                                           int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                           double beta) {
  const char* op = "adaround_backward";
  QuantInputs in = check_adaround_inputs(op, w, v, scale, zero_point, quant_min, quant_max, axis, beta);
  check_same_shape_dtype_device(op, "w", w, "grad_w", grad_w);
  DSG_CHECK(grad_reg.numel() == 1 && grad_reg.device() == w.device(), op,
              ": grad_reg must be a scalar on the device of w");
  return in;
}

void check_quant_values_cpu(const char* op, const QuantInputs& in, int64_t quant_min, int64_t quant_max) {
  if (in.scale.numel() == 0) return;
  const at::Tensor s_t = in.scale.to(at::kDouble), z_t = in.zero_point.to(at::kDouble);
  const double* s = s_t.const_data_ptr<double>();
  const double* z = z_t.const_data_ptr<double>();
  for (int64_t c = 0; c < in.scale.numel(); ++c) {
    const std::string where = in.scale.numel() > 1 ? " at channel " + std::to_string(c) : std::string();
    DSG_CHECK(s[c] > 0.0 && std::isfinite(s[c]) && std::isfinite(static_cast<float>(s[c])), op,
                ": scale must be positive and finite, got ", s[c], where);
    DSG_CHECK(s[c] >= 1.17549435e-38, op, ": scale ", s[c], where,
                " is below the smallest normal float (1.1754944e-38): 1/scale would overflow");
    DSG_CHECK(!std::isnan(z[c]), op, ": zero_point is NaN", where);
    DSG_CHECK(in.zero_point_is_float || (z[c] >= quant_min && z[c] <= quant_max), op, ": zero_point ", z[c],
                " lies outside [quant_min, quant_max] = [", quant_min, ", ", quant_max, "]", where);
  }
}

ShiftInputs check_reflect_shift_inputs(const char* op, const at::Tensor& x, const at::Tensor& shift) {
  const char* name = std::string(op) == "reflect_shift" ? "x" : "grad";
  check_float(op, name, x);
  DSG_CHECK(x.dim() == 4, op, ": ", name, " must have shape (N, C, H, W), got shape ", x.sizes());
  DSG_CHECK(!at::isFloatingType(shift.scalar_type()) && !at::isComplexType(shift.scalar_type()) &&
                shift.scalar_type() != at::kBool,
            op, ": shift must be an integer tensor (dy, dx), got ", shift.scalar_type());
  DSG_CHECK(shift.numel() == 2, op, ": shift must hold two values (dy, dx), got shape ", shift.sizes());
  check_device(op, "shift", shift, x);
  ShiftInputs in;
  in.channels_last = is_channels_last(x);
  in.x = in.channels_last ? x : x.contiguous();
  in.shift = shift.reshape({2}).to(at::kLong).contiguous();
  return in;
}

at::Tensor empty_shift_output(const ShiftInputs& in) {
  return at::empty_like(in.x, in.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

}  // namespace dsg_ext
