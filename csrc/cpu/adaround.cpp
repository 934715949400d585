// AdaRound on the CPU: soft/hard rounding fused with the rounding regularizer (one pass forward,
// one pass backward).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../adaround.h"
#include "../checks.h"
#include "loops.h"

namespace dsg_ext {
namespace {

template <typename acc_t>
std::vector<AdaRoundParams<acc_t>> channel_params(const QuantInputs& in, int64_t qmin, int64_t qmax) {
  const acc_t* s = in.scale.const_data_ptr<acc_t>();
  const acc_t* z = in.zero_point.const_data_ptr<acc_t>();
  std::vector<AdaRoundParams<acc_t>> p;
  p.reserve(in.layout.C);
  for (int64_t c = 0; c < in.layout.C; ++c) p.emplace_back(s[c], z[c], in.zero_point_is_float, qmin, qmax);
  return p;
}

// The AdaRound element math is transcendental-heavy (exp, log, exp per element): on x86-64 the
// block functions are also compiled for AVX2 and picked at load time (gcc target_clones), so
// the wheel still runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSG_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DSG_CPU_CLONES
#endif

// One block (at most 256 elements, see cpu::blocked_sum) with one set of parameters: writes W~ and the
// per-element regularizer.
template <typename scalar_t, typename acc_t, bool kHard>
DSG_CPU_CLONES void forward_block(const scalar_t* __restrict__ w, const scalar_t* __restrict__ v,
                                  scalar_t* __restrict__ out, int64_t count, const AdaRoundParams<acc_t> p,
                                  const acc_t beta, acc_t* __restrict__ reg) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    acc_t r;
    out[i] = static_cast<scalar_t>(adaround_forward_element<acc_t, kHard>(static_cast<acc_t>(w[i]),
                                                                        static_cast<acc_t>(v[i]), p, beta, &r));
    reg[i] = r;
  }
}

// Writes dL/dV for one block and the per-element share of dL/ds, dW~ * (q - z).
template <typename scalar_t, typename acc_t, bool kHard>
DSG_CPU_CLONES void backward_block(const scalar_t* __restrict__ w, const scalar_t* __restrict__ v,
                                   const scalar_t* __restrict__ dy, scalar_t* __restrict__ grad_v, int64_t count,
                                   const AdaRoundParams<acc_t> p, const acc_t beta, const acc_t dreg,
                                   acc_t* __restrict__ dscale) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const acc_t g = static_cast<acc_t>(dy[i]);
    acc_t level;
    grad_v[i] = static_cast<scalar_t>(adaround_grad_v<acc_t, kHard>(static_cast<acc_t>(w[i]), static_cast<acc_t>(v[i]),
                                                                     g, p, beta, dreg, &level));
    dscale[i] = g * level;
  }
}

// One contiguous run with one set of parameters; returns the regularizer summed over the run.
template <typename scalar_t, typename acc_t, bool kHard>
acc_t forward_run(const scalar_t* w, const scalar_t* v, scalar_t* out, int64_t n, const AdaRoundParams<acc_t>& p,
                  acc_t beta) {
  return cpu::blocked_sum<acc_t>(n, [&](int64_t start, int64_t count, acc_t* reg, acc_t*) {
    forward_block<scalar_t, acc_t, kHard>(w + start, v + start, out + start, count, p, beta, reg);
  }).a;
}

// Returns the run's share of dL/ds.
template <typename scalar_t, typename acc_t, bool kHard>
acc_t backward_run(const scalar_t* w, const scalar_t* v, const scalar_t* dy, scalar_t* grad_v, int64_t n,
                   const AdaRoundParams<acc_t>& p, acc_t beta, acc_t dreg) {
  return cpu::blocked_sum<acc_t>(n, [&](int64_t start, int64_t count, acc_t* dscale, acc_t*) {
    backward_block<scalar_t, acc_t, kHard>(w + start, v + start, dy + start, grad_v + start, count, p, beta, dreg,
                                           dscale);
  }).a;
}

// Calls run(offset, length, params) for a row-mode run, or once per element of a column-mode row.
template <typename acc_t, typename Run>
void for_runs(const std::vector<AdaRoundParams<acc_t>>& params, int64_t off, int64_t n, int64_t c,
              Pair<double>* acc, const Run& run) {
  if (c >= 0) {
    acc->a += run(off, n, params[c]);
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i].a += run(off + i, 1, params[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> adaround_cpu(const at::Tensor& w, const at::Tensor& v, const at::Tensor& scale,
                                                const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                                                std::optional<int64_t> axis, double beta, bool hard) {
  const QuantInputs in = check_adaround_inputs("adaround", w, v, scale, zero_point, qmin, qmax, axis, beta);
  check_quant_values_cpu("adaround", in, qmin, qmax);
  const at::Tensor vv = match_layout(v, in.x);
  at::Tensor out = at::empty_like(in.x);
  at::Tensor reg = at::empty({}, in.scale.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto params = channel_params<acc_t>(in, qmin, qmax);
    const scalar_t* wp = in.x.const_data_ptr<scalar_t>();
    const scalar_t* vp = vv.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t b = static_cast<acc_t>(beta);
    const auto sums = cpu::reduce_channels(in.layout, [&](int64_t off, int64_t n, int64_t c, Pair<double>* acc) {
      for_runs<acc_t>(params, off, n, c, acc, [&](int64_t o, int64_t m, const AdaRoundParams<acc_t>& p) {
        return hard ? forward_run<scalar_t, acc_t, true>(wp + o, vp + o, op + o, m, p, b)
                    : forward_run<scalar_t, acc_t, false>(wp + o, vp + o, op + o, m, p, b);
      });
    });
    double total = 0;
    for (const auto& s : sums) total += s.a;
    reg.fill_(total);
  });
  return {out, reg};
}

std::tuple<at::Tensor, at::Tensor> adaround_backward_cpu(const at::Tensor& grad_w, const at::Tensor& grad_reg,
                                                         const at::Tensor& w, const at::Tensor& v,
                                                         const at::Tensor& scale, const at::Tensor& zero_point,
                                                         int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                                                         double beta, bool hard, bool scale_grad) {
  const QuantInputs in =
      check_adaround_backward_inputs(grad_w, grad_reg, w, v, scale, zero_point, qmin, qmax, axis, beta);
  check_quant_values_cpu("adaround_backward", in, qmin, qmax);
  const at::Tensor vv = match_layout(v, in.x);
  const at::Tensor dy = match_layout(grad_w, in.x);
  at::Tensor grad_v = at::empty_like(in.x);
  at::Tensor grad_scale = at::zeros_like(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto params = channel_params<acc_t>(in, qmin, qmax);
    const scalar_t* wp = in.x.const_data_ptr<scalar_t>();
    const scalar_t* vp = vv.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* gv = grad_v.data_ptr<scalar_t>();
    const acc_t b = static_cast<acc_t>(beta);
    const acc_t dreg = static_cast<acc_t>(grad_reg.to(at::kDouble).item<double>());
    const auto sums = cpu::reduce_channels(in.layout, [&](int64_t off, int64_t n, int64_t c, Pair<double>* acc) {
      for_runs<acc_t>(params, off, n, c, acc, [&](int64_t o, int64_t m, const AdaRoundParams<acc_t>& p) {
        return hard ? backward_run<scalar_t, acc_t, true>(wp + o, vp + o, dyp + o, gv + o, m, p, b, dreg)
                    : backward_run<scalar_t, acc_t, false>(wp + o, vp + o, dyp + o, gv + o, m, p, b, dreg);
      });
    });
    if (scale_grad) {
      std::vector<double> ds(in.layout.C);
      for (int64_t c = 0; c < in.layout.C; ++c) ds[c] = sums[c].a;
      grad_scale.copy_(at::tensor(ds, at::kDouble).reshape(scale.sizes()));
    }
  });
  return {grad_v, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsg_ext, CPU, m) {
  m.impl("adaround", &adaround_cpu);
  m.impl("adaround_backward", &adaround_backward_cpu);
}

}  // namespace dsg_ext
