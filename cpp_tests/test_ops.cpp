// C++ test of the dsg_ext ops without Python: every op is reached through the dispatcher (so this
// also checks that linking dsg_ext_ops runs its static TORCH_LIBRARY registrars) and compared with
// a direct ATen computation. Runs on the CPU; in a DSG_EXT_WITH_CUDA build it also checks that the
// CUDA kernels are registered and, where a GPU is present, repeats the checks on it.
//
// Exit status 0 when every check passes; otherwise each failing check is printed and it is 1.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

int g_checks = 0;
int g_failures = 0;

void report(bool ok, const std::string& name, const std::string& detail = "") {
  ++g_checks;
  if (ok) {
    std::printf("ok    %s\n", name.c_str());
  } else {
    ++g_failures;
    std::printf("FAIL  %s%s%s\n", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  }
  std::fflush(stdout);
}

// Where two tensors differ: how many elements, and the element with the largest difference.
std::string describe_mismatch(const at::Tensor& actual, const at::Tensor& expected) {
  std::ostringstream os;
  if (actual.sizes() != expected.sizes()) {
    os << "shape " << actual.sizes() << " != expected " << expected.sizes();
    return os.str();
  }
  if (actual.scalar_type() != expected.scalar_type()) {
    os << "dtype " << actual.scalar_type() << " != expected " << expected.scalar_type();
    return os.str();
  }
  const at::Tensor a = actual.detach().to(at::kCPU, at::kDouble).contiguous().reshape({-1});
  const at::Tensor e = expected.detach().to(at::kCPU, at::kDouble).contiguous().reshape({-1});
  // Equal values (NaN and NaN included) differ by 0; a NaN on one side only by infinity.
  const at::Tensor same = at::logical_or(a.eq(e), at::logical_and(a.isnan(), e.isnan()));
  const at::Tensor diff = at::where(same, 0.0, at::nan_to_num((a - e).abs(), INFINITY));
  const at::Tensor differ = at::logical_not(same);
  os << differ.sum().item<int64_t>() << " of " << a.numel() << " elements not bit-equal";
  if (a.numel() > 0) {
    const int64_t i = diff.argmax().item<int64_t>();
    os.precision(17);
    os << "; largest |diff| " << diff[i].item<double>() << " at flat index " << i << ": got " << a[i].item<double>()
       << ", expected " << e[i].item<double>();
  }
  return os.str();
}

void check_equal(const std::string& name, const at::Tensor& actual, const at::Tensor& expected) {
  const bool ok = actual.sizes() == expected.sizes() && actual.scalar_type() == expected.scalar_type() &&
                  at::equal(actual.cpu(), expected.cpu());
  report(ok, name + " (exact)", ok ? "" : describe_mismatch(actual, expected));
}

void check_close(const std::string& name, const at::Tensor& actual, const at::Tensor& expected, double rtol,
                 double atol) {
  const bool ok = actual.sizes() == expected.sizes() && actual.scalar_type() == expected.scalar_type() &&
                  at::allclose(actual.cpu(), expected.cpu(), rtol, atol);
  std::ostringstream tol;
  tol << " (rtol " << rtol << ", atol " << atol << ")";
  report(ok, name + tol.str(), ok ? "" : describe_mismatch(actual, expected));
}

void check_throws(const std::string& name, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    if (msg.size() > 160) msg = msg.substr(0, 160) + "...";
    std::printf("      (%s threw c10::Error: %s)\n", name.c_str(), msg.c_str());
    report(true, name + " throws c10::Error");
    return;
  } catch (const std::exception& e) {
    report(false, name + " throws c10::Error", std::string("threw another exception: ") + e.what());
    return;
  }
  report(false, name + " throws c10::Error", "no exception was thrown");
}

// ---------------------------------------------------------------------------------------------------
// The ops, through the dispatcher (schemas in csrc/ops.cpp).

using FakeQuantFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                               std::optional<int64_t>);
using SlackLossFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, double, bool, bool);
using AdaRoundFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, int64_t, int64_t, std::optional<int64_t>,
                                                      double, bool);

const char* const kOps[] = {"bn_stat_slack_loss", "bn_stat_slack_loss_backward", "bn_eval_slack",
                            "bn_eval_slack_backward", "fake_quant", "fake_quant_backward", "adaround",
                            "adaround_backward", "reflect_shift", "reflect_shift_backward"};

c10::TypedOperatorHandle<FakeQuantFn> fake_quant_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dsg_ext::fake_quant", "").typed<FakeQuantFn>();
  return op;
}
c10::TypedOperatorHandle<SlackLossFn> slack_loss_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dsg_ext::bn_stat_slack_loss", "").typed<SlackLossFn>();
  return op;
}
c10::TypedOperatorHandle<AdaRoundFn> adaround_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dsg_ext::adaround", "").typed<AdaRoundFn>();
  return op;
}

// Every schema is registered and has a kernel for the backends this build contains.
void test_registration() {
  for (const char* name : kOps) {
    const std::string full = std::string("dsg_ext::") + name;
    const auto handle = c10::Dispatcher::singleton().findSchema({full.c_str(), ""});
    if (!handle.has_value()) {
      report(false, "registered " + full,
             "schema not found: libdsg_ext_ops was not loaded (dropped by the linker?) or ops.cpp changed");
      continue;
    }
    report(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU), "CPU kernel for " + full);
#ifdef DSG_EXT_TEST_EXPECT_CUDA
    report(handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA), "CUDA kernel for " + full);
#endif
  }
}

// ---------------------------------------------------------------------------------------------------
// fake_quant

void test_fake_quant(const at::Device dev) {
  const std::string where = std::string(" [") + dev.str() + "]";
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (const auto& range : std::vector<std::pair<int64_t, int64_t>>{{-128, 127}, {0, 255}, {0, 15}}) {
    const int64_t qmin = range.first, qmax = range.second;
    const std::string r = " q=[" + std::to_string(qmin) + "," + std::to_string(qmax) + "]";

    // Per tensor: random values, values far outside the range, exact ties (k + 0.5) * s, zeros.
    const float s = 0.0371f;
    const int64_t z = (qmin + qmax + 1) / 2 - 3;
    at::Tensor x = at::randn({7, 5, 9}, f32) * 3.0;
    at::Tensor ties = (at::arange(-140, 140, f32) + 0.5) * static_cast<double>(s);
    at::Tensor extra = at::tensor({0.0f, -0.0f, 1e6f, -1e6f, 1e-30f, 65504.0f, -3.5f}, f32);
    x = at::cat({x.reshape({-1}), ties, extra}).to(dev);
    const at::Tensor scale = at::full({1}, s, f32).to(dev);
    const at::Tensor zp = at::full({1}, z, at::TensorOptions().dtype(at::kInt)).to(dev);
    const at::Tensor got = fake_quant_op().call(x, scale, zp, qmin, qmax, std::nullopt);
    const at::Tensor want = at::fake_quantize_per_tensor_affine(x, static_cast<double>(s), z, qmin, qmax);
    check_equal("fake_quant per-tensor vs at::fake_quantize_per_tensor_affine" + r + where, got, want);

    // Per channel along axis 1 of an NCHW tensor and along axis 0 of a weight.
    for (const int64_t axis : {int64_t(1), int64_t(0)}) {
      const at::Tensor xc = (axis == 1 ? at::randn({3, 6, 5, 7}, f32) : at::randn({6, 11}, f32)) * 2.0;
      const int64_t c = xc.size(axis);
      const at::Tensor sc = (at::rand({c}, f32) * 0.05 + 0.01).to(dev);
      const at::Tensor zc =
          at::randint(qmin, qmax + 1, {c}, at::TensorOptions().dtype(at::kLong)).to(at::kInt).to(dev);
      const at::Tensor xd = xc.to(dev);
      const at::Tensor g = fake_quant_op().call(xd, sc, zc, qmin, qmax, axis);
      const at::Tensor w = at::fake_quantize_per_channel_affine(xd, sc, zc, axis, qmin, qmax);
      check_equal("fake_quant per-channel axis=" + std::to_string(axis) +
                      " vs at::fake_quantize_per_channel_affine" + r + where,
                  g, w);
    }
  }

  // channels_last input, per channel along C.
  {
    const at::Tensor xc = (at::randn({2, 8, 4, 5}, f32) * 2.0).contiguous(at::MemoryFormat::ChannelsLast).to(dev);
    const at::Tensor sc = (at::rand({8}, f32) * 0.05 + 0.01).to(dev);
    const at::Tensor zc = at::randint(-128, 128, {8}, at::TensorOptions().dtype(at::kLong)).to(at::kInt).to(dev);
    const at::Tensor g = fake_quant_op().call(xc, sc, zc, -128, 127, int64_t(1));
    const at::Tensor w = at::fake_quantize_per_channel_affine(xc, sc, zc, 1, -128, 127);
    check_equal("fake_quant per-channel channels_last vs at::fake_quantize_per_channel_affine" + where, g, w);
  }
}

// ---------------------------------------------------------------------------------------------------
// bn_stat_slack_loss

// (loss, mean~, std~) computed directly; dims {2, 3} per sample, {0, 2, 3} per batch.
std::tuple<at::Tensor, at::Tensor, at::Tensor> slack_reference(const at::Tensor& x, const at::Tensor& mean,
                                                               const at::Tensor& std_t, const at::Tensor& delta,
                                                               const at::Tensor& gamma, double eps,
                                                               bool unbiased, bool per_sample) {
  const std::vector<int64_t> dims = per_sample ? std::vector<int64_t>{2, 3} : std::vector<int64_t>{0, 2, 3};
  const at::Tensor mu = at::mean(x, dims);
  const at::Tensor var = at::var(x, dims, unbiased);
  const at::Tensor sd = at::sqrt(var + eps);
  const at::Tensor dm = at::relu(at::abs(mu - mean) - delta);
  const at::Tensor ds = at::relu(at::abs(sd - std_t) - gamma);
  const at::Tensor terms = dm * dm + ds * ds;
  const at::Tensor loss = per_sample ? terms.sum(1) : terms.sum();
  return {loss, mu, sd};
}

void test_slack_loss(const at::Device dev) {
  const std::string where = std::string(" [") + dev.str() + "]";
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    const auto opts = at::TensorOptions().dtype(dtype);
    const double rtol = dtype == at::kFloat ? 1e-4 : 1e-10;
    const double atol = dtype == at::kFloat ? 1e-5 : 1e-12;
    const int64_t n = 3, c = 5, h = 6, w = 7;
    // Channels with different offsets and spreads so that some hinges are active and some are not.
    const at::Tensor offs = at::linspace(-1.0, 1.0, c, opts).view({1, c, 1, 1});
    const at::Tensor spread = at::linspace(0.5, 2.0, c, opts).view({1, c, 1, 1});
    const at::Tensor x = (at::randn({n, c, h, w}, opts) * spread + offs + 100.0).to(dev);  // + 100: shifted sums
    const at::Tensor mean = (at::linspace(-1.0, 1.0, c, opts) + 100.0 + at::randn({c}, opts) * 0.3).to(dev);
    const at::Tensor std_t = (at::linspace(0.5, 2.0, c, opts) + at::randn({c}, opts) * 0.3).abs().to(dev);
    const at::Tensor delta = at::full({}, 0.05, opts).to(dev);  // a scalar slack, broadcast to every channel
    const at::Tensor gamma = (at::rand({c}, opts) * 0.2).to(dev);
    const double eps = 1e-5;
    for (const bool per_sample : {true, false}) {
      for (const bool unbiased : {false, true}) {
        for (const bool channels_last : {false, true}) {
          const at::Tensor xi = channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
          std::ostringstream tag;
          tag << " " << dtype << (per_sample ? " per_sample" : " per_batch") << (unbiased ? " unbiased" : " biased")
              << (channels_last ? " channels_last" : "") << where;
          const auto got = slack_loss_op().call(xi, mean, std_t, delta, gamma, eps, unbiased, per_sample);
          const auto want = slack_reference(x, mean, std_t, delta, gamma, eps, unbiased, per_sample);
          check_close("bn_stat_slack_loss loss" + tag.str(), std::get<0>(got), std::get<0>(want), rtol, atol);
          check_close("bn_stat_slack_loss mean~" + tag.str(), std::get<1>(got), std::get<1>(want), rtol, atol);
          check_close("bn_stat_slack_loss std~" + tag.str(), std::get<2>(got), std::get<2>(want), rtol, atol);
        }
      }
    }
  }
}

// bn_eval_slack: y = x * scale + shift (an eval-mode BatchNorm) with the slack loss of x, per sample and
// per batch.
void test_bn_eval_slack(const at::Device dev) {
  using Fn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, double, bool, bool);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dsg_ext::bn_eval_slack", "").typed<Fn>();
  const std::string where = std::string(" [") + dev.str() + "]";
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const int64_t n = 2, c = 4;
  const at::Tensor x = (at::randn({n, c, 5, 3}, opts) * 1.5 + 0.3).to(dev);
  const at::Tensor scale = at::randn({c}, opts).to(dev), shift = at::randn({c}, opts).to(dev);
  const at::Tensor mean = (at::randn({c}, opts) * 0.3).to(dev);
  const at::Tensor std_t = (at::rand({c}, opts) + 0.5).to(dev);
  const at::Tensor delta = at::full({}, 0.05, opts).to(dev), gamma = at::full({c}, 0.1, opts).to(dev);
  for (const bool per_sample : {true, false})
  for (const bool channels_last : {false, true}) {
    const at::Tensor xi = channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
    const std::string tag =
        std::string(channels_last ? " channels_last" : "") + (per_sample ? "" : " batch") + where;
    const auto got = op.call(xi, scale, shift, mean, std_t, delta, gamma, 1e-5, true, per_sample);
    const auto want = slack_reference(x, mean, std_t, delta, gamma, 1e-5, true, per_sample);
    check_close("bn_eval_slack y" + tag, std::get<0>(got), x * scale.view({1, c, 1, 1}) + shift.view({1, c, 1, 1}),
                1e-12, 1e-12);
    check_close("bn_eval_slack loss" + tag, std::get<1>(got), std::get<0>(want), 1e-10, 1e-12);
    check_close("bn_eval_slack mean~" + tag, std::get<2>(got), std::get<1>(want), 1e-10, 1e-12);
  }
}

// ---------------------------------------------------------------------------------------------------
// adaround

// h = clamp(sigmoid(v) * 1.2 - 0.1, 0, 1) (soft) or 1[v >= 0] (hard);
// w~ = s * (clamp(floor(w / s) + h + z, qmin, qmax) - z);  R = sum(1 - |2h - 1|^beta) (0 when hard).
std::tuple<at::Tensor, at::Tensor> adaround_reference(const at::Tensor& w, const at::Tensor& v,
                                                      const at::Tensor& scale, const at::Tensor& zero_point,
                                                      int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                                                      double beta, bool hard) {
  std::vector<int64_t> shape(w.dim(), 1);
  at::Tensor s = scale.to(w.scalar_type()), z = zero_point.to(w.scalar_type());
  if (axis.has_value()) {
    shape[*axis] = w.size(*axis);
    s = s.view(shape);
    z = z.view(shape);
  } else {
    s = s.reshape({});
    z = z.reshape({});
  }
  const at::Tensor h = hard ? v.ge(0).to(w.scalar_type()) : at::clamp(at::sigmoid(v) * 1.2 - 0.1, 0.0, 1.0);
  const at::Tensor q = at::clamp(at::floor(w / s) + h + z, static_cast<double>(qmin), static_cast<double>(qmax));
  const at::Tensor wq = s * (q - z);
  const at::Tensor reg = hard ? at::zeros({}, w.options())
                              : at::sum(1.0 - at::pow(at::abs(2.0 * h - 1.0), beta));
  return {wq, reg};
}

void test_adaround(const at::Device dev) {
  const std::string where = std::string(" [") + dev.str() + "]";
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    const auto opts = at::TensorOptions().dtype(dtype);
    const double rtol = dtype == at::kFloat ? 1e-5 : 1e-12;
    const double atol = dtype == at::kFloat ? 1e-6 : 1e-14;
    const int64_t qmin = -8, qmax = 7;
    const at::Tensor w = (at::randn({6, 4, 3, 3}, opts) * 0.2).to(dev);
    // v in about [-6, 6]: h saturates at 0 and 1 in places, so the clamps are exercised too.
    const at::Tensor v = (at::randn({6, 4, 3, 3}, opts) * 3.0).to(dev);
    for (const bool per_channel : {true, false}) {
      const std::optional<int64_t> axis = per_channel ? std::optional<int64_t>(0) : std::nullopt;
      const at::Tensor scale = per_channel ? (at::rand({6}, opts) * 0.04 + 0.02).to(dev) : at::full({1}, 0.035, opts).to(dev);
      const at::Tensor zp = per_channel ? at::tensor({0, 1, -1, 2, 0, -3}, at::TensorOptions().dtype(at::kInt)).to(dev)
                                        : at::full({1}, 1, at::TensorOptions().dtype(at::kInt)).to(dev);
      for (const double beta : {2.0, 20.0}) {
        for (const bool hard : {false, true}) {
          if (hard && beta != 2.0) continue;
          std::ostringstream tag;
          tag << " " << dtype << (per_channel ? " per-channel" : " per-tensor") << (hard ? " hard" : " soft")
              << " beta=" << beta << where;
          const auto got = adaround_op().call(w, v, scale, zp, qmin, qmax, axis, beta, hard);
          const auto want = adaround_reference(w, v, scale, zp, qmin, qmax, axis, beta, hard);
          if (hard) {
            check_equal("adaround weight" + tag.str(), std::get<0>(got), std::get<0>(want));
          } else {
            check_close("adaround weight" + tag.str(), std::get<0>(got), std::get<0>(want), rtol, atol);
          }
          const at::Tensor reg_want = std::get<1>(want).to(std::get<1>(got).scalar_type());
          check_close("adaround regularizer" + tag.str(), std::get<1>(got), reg_want, rtol * 10, atol);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Invalid input must raise c10::Error (never crash or return garbage).

void test_bad_inputs(const at::Device dev) {
  const std::string where = std::string(" [") + dev.str() + "]";
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x = at::randn({4, 5}, f32).to(dev);
  const at::Tensor s = at::full({1}, 0.1, f32).to(dev);
  const at::Tensor z = at::zeros({1}, at::TensorOptions().dtype(at::kInt)).to(dev);
  check_throws("fake_quant quant_min == quant_max" + where,
               [&] { fake_quant_op().call(x, s, z, 5, 5, std::nullopt); });
  check_throws("fake_quant quant_min > quant_max" + where,
               [&] { fake_quant_op().call(x, s, z, 127, -128, std::nullopt); });
  check_throws("fake_quant per-channel scale of the wrong length" + where,
               [&] { fake_quant_op().call(x, at::full({3}, 0.1, f32).to(dev), z.expand({3}).contiguous(), -128, 127, int64_t(1)); });
  check_throws("adaround quant_min >= quant_max" + where,
               [&] { adaround_op().call(x, x, s, z, 0, 0, std::nullopt, 2.0, false); });
  check_throws("bn_stat_slack_loss x of one dimension" + where, [&] {
    const at::Tensor c = at::ones({5}, f32).to(dev);
    slack_loss_op().call(at::randn({5}, f32).to(dev), c, c, c, c, 1e-5, false, true);
  });
  if (dev.is_cpu()) {  // value checks need no device sync only on the CPU (CUDA kernels write NaN)
    check_throws("fake_quant scale <= 0" + where,
                 [&] { fake_quant_op().call(x, at::zeros({1}, f32), z, -128, 127, std::nullopt); });
  }
}

// reflect_shift: torch's reflect padding + crop, in both layouts; its backward as the adjoint,
// <shift(x), g> == <x, shift_backward(g)>.
void test_reflect_shift(const at::Device dev) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dsg_ext::reflect_shift", "").typed<Fn>();
  static const auto back =
      c10::Dispatcher::singleton().findSchemaOrThrow("dsg_ext::reflect_shift_backward", "").typed<Fn>();
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({2, 3, 5, 7}, f64), g = at::randn({2, 3, 5, 7}, f64);
  const int64_t shifts[][2] = {{1, -1}, {-1, 0}, {4, -6}};
  for (const auto& s : shifts) {
    const int64_t py = std::abs(s[0]), px = std::abs(s[1]);
    const at::Tensor want = at::pad(x, {px, px, py, py}, "reflect")
                                .slice(2, py + s[0], py + s[0] + 5)
                                .slice(3, px + s[1], px + s[1] + 7);
    const at::Tensor shift = at::tensor({s[0], s[1]}, at::kLong).to(dev);
    for (const bool cl : {false, true}) {
      const auto mf = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
      const std::string tag = std::string(cl ? " channels_last" : "") + " shift " + std::to_string(s[0]) + "," +
                              std::to_string(s[1]);
      check_close("reflect_shift" + tag, op.call(x.contiguous(mf).to(dev), shift), want, 0.0, 0.0);
      const at::Tensor gx = back.call(g.contiguous(mf).to(dev), shift).cpu();
      check_close("reflect_shift_backward adjoint" + tag, (x * gx).sum(), (want * g).sum(), 1e-12, 1e-12);
    }
  }
}

void run_all(const at::Device dev) {
  at::manual_seed(0);
  test_fake_quant(dev);
  test_slack_loss(dev);
  test_bn_eval_slack(dev);
  test_adaround(dev);
  test_reflect_shift(dev);
  test_bad_inputs(dev);
}

}  // namespace

int main() {
  try {
    test_registration();
    run_all(at::Device(at::kCPU));
#ifdef DSG_EXT_TEST_EXPECT_CUDA
    if (at::hasCUDA()) {
      run_all(at::Device(at::kCUDA, 0));
    } else {
      std::printf("note  no CUDA device: the CUDA kernels were only checked for registration\n");
    }
#endif
  } catch (const c10::Error& e) {
    ++g_failures;
    std::printf("FAIL  unexpected c10::Error (remaining checks skipped): %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    ++g_failures;
    std::printf("FAIL  unexpected exception (remaining checks skipped): %s\n", e.what());
  }
  std::printf("%d checks run, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
