// BN-statistic slack loss on the CPU: one read of x in the forward (shifted sums per group),
// one read of x and one write of the gradient in the backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../slack_loss.h"
#include "loops.h"

namespace dsg_ext {
namespace {

constexpr int64_t kChunk = 2048;  // elements summed in the accumulation type before widening to double

// Sums of (x - shift) and (x - shift)^2 over a contiguous span, added to (sum, sum_sq); with kAffine
// also y = x * a + b over the span, in the same pass (the fused eval-mode BatchNorm).
template <typename scalar_t, typename acc_t, bool kAffine = false>
void add_shifted_sums(const scalar_t* p, int64_t n, acc_t shift, double& sum, double& sum_sq, scalar_t* y = nullptr,
                      acc_t a = 0, acc_t b = 0) {
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    acc_t s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = start; i < end; ++i) {
      const acc_t xv = static_cast<acc_t>(p[i]);
      const acc_t v = xv - shift;
      s += v;
      q += v * v;
      if constexpr (kAffine) y[i] = static_cast<scalar_t>(xv * a + b);
    }
    sum += s;
    sum_sq += q;
  }
}

// Per-group statistics and the loss; with kAffine also y = x * bn_scale[c] + bn_shift[c] in the same
// read of x (y in the layout of in.x).
template <typename scalar_t, bool kAffine = false>
void slack_forward_kernel(const SlackInputs& in, double eps, int64_t correction, bool per_sample,
                          at::Tensor& stat_mean, at::Tensor& stat_std, at::Tensor& loss, scalar_t* y = nullptr,
                          const acc_type<scalar_t>* bn_scale = nullptr, const acc_type<scalar_t>* bn_shift = nullptr) {
  using acc_t = acc_type<scalar_t>;
  const Layout L = in.layout;
  const int64_t G = L.groups();
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  std::vector<double> sum(G, 0.0), sum_sq(G, 0.0);
  std::vector<acc_t> shift(G, acc_t(0));
  if (L.numel() > 0) {
    for (int64_t a = 0; a < L.A; ++a)
      for (int64_t c = 0; c < L.C; ++c) shift[a * L.C + c] = static_cast<acc_t>(x[(a * L.R * L.C + c) * L.B]);
  }

  if (cpu::row_mode(L)) {
    // Row mode: each (a, r, c) is a contiguous run of B elements.
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t a = g / L.C, c = g % L.C;
        for (int64_t r = 0; r < L.R; ++r) {
          const int64_t off = ((a * L.R + r) * L.C + c) * L.B;
          if constexpr (kAffine) {
            add_shifted_sums<scalar_t, acc_t, true>(x + off, L.B, shift[g], sum[g], sum_sq[g], y + off, bn_scale[c],
                                                    bn_shift[c]);
          } else {
            add_shifted_sums<scalar_t, acc_t>(x + off, L.B, shift[g], sum[g], sum_sq[g]);
          }
        }
      }
    });
  } else {
    // Column mode (channels_last): rows of C channels; vectorised across channels. Rows are split
    // into a fixed number of chunks (independent of the thread count, so results are deterministic).
    const int64_t max_chunks = std::max<int64_t>(1, (L.R + 255) / 256);
    const int64_t chunks = std::min(max_chunks, std::max<int64_t>(1, (64 + L.A - 1) / L.A));
    const int64_t rows_per_chunk = (L.R + chunks - 1) / chunks;
    std::vector<double> psum(L.A * chunks * L.C, 0.0), psq(L.A * chunks * L.C, 0.0);
    at::parallel_for(0, L.A * chunks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> s(L.C), q(L.C);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t a = t / chunks, k = t % chunks;
        const int64_t r0 = k * rows_per_chunk, r1 = std::min(L.R, r0 + rows_per_chunk);
        const acc_t* sh = shift.data() + a * L.C;
        double* ps = psum.data() + t * L.C;
        double* pq = psq.data() + t * L.C;
        for (int64_t rb = r0; rb < r1; rb += 256) {
          std::fill(s.begin(), s.end(), acc_t(0));
          std::fill(q.begin(), q.end(), acc_t(0));
          const int64_t re = std::min(r1, rb + 256);
          for (int64_t r = rb; r < re; ++r) {
            const scalar_t* row = x + (a * L.R + r) * L.C;
            acc_t* sp = s.data();
            acc_t* qp = q.data();
            if constexpr (kAffine) {
              scalar_t* yrow = y + (a * L.R + r) * L.C;
#pragma omp simd
              for (int64_t c = 0; c < L.C; ++c) {
                const acc_t xv = static_cast<acc_t>(row[c]);
                const acc_t v = xv - sh[c];
                sp[c] += v;
                qp[c] += v * v;
                yrow[c] = static_cast<scalar_t>(xv * bn_scale[c] + bn_shift[c]);
              }
            } else {
#pragma omp simd
              for (int64_t c = 0; c < L.C; ++c) {
                const acc_t v = static_cast<acc_t>(row[c]) - sh[c];
                sp[c] += v;
                qp[c] += v * v;
              }
            }
          }
          for (int64_t c = 0; c < L.C; ++c) {
            ps[c] += s[c];
            pq[c] += q[c];
          }
        }
      }
    });
    for (int64_t a = 0; a < L.A; ++a)
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = 0; c < L.C; ++c) {
          sum[a * L.C + c] += psum[(a * chunks + k) * L.C + c];
          sum_sq[a * L.C + c] += psq[(a * chunks + k) * L.C + c];
        }
  }

  acc_t* mean_out = stat_mean.data_ptr<acc_t>();
  acc_t* std_out = stat_std.data_ptr<acc_t>();
  const acc_t* tm = in.target_mean.const_data_ptr<acc_t>();
  const acc_t* ts = in.target_std.const_data_ptr<acc_t>();
  const acc_t* dl = in.delta.const_data_ptr<acc_t>();
  const acc_t* gm = in.gamma.const_data_ptr<acc_t>();
  acc_t* loss_out = loss.data_ptr<acc_t>();
  for (int64_t a = 0; a < L.A; ++a) {
    acc_t total = 0;
    for (int64_t c = 0; c < L.C; ++c) {
      const int64_t g = a * L.C + c;
      acc_t m, s;
      finalize_moments<acc_t>(shift[g], static_cast<acc_t>(sum[g]), static_cast<acc_t>(sum_sq[g]), in.count,
                              correction, static_cast<acc_t>(eps), &m, &s);
      mean_out[g] = m;
      std_out[g] = s;
      total += slack_term<acc_t>(m, s, tm[c], ts[c], dl[c], gm[c]);
    }
    loss_out[a] = total;
  }
  (void)per_sample;
}

// grad = alpha + beta * (x - mu~) [+ grad_y * bn_scale[c] when dy is given: the fused BN op].
template <typename scalar_t, bool kWithDy = false>
void slack_backward_kernel(const SlackInputs& in, const at::Tensor& grad_loss, const at::Tensor& stat_mean,
                           const at::Tensor& stat_std, int64_t correction, at::Tensor& grad,
                           const scalar_t* dy = nullptr, const acc_type<scalar_t>* bn_scale = nullptr) {
  using acc_t = acc_type<scalar_t>;
  const Layout L = in.layout;
  const int64_t G = L.groups();
  std::vector<acc_t> alpha(G), beta(G);
  const acc_t* m = stat_mean.const_data_ptr<acc_t>();
  const acc_t* s = stat_std.const_data_ptr<acc_t>();
  const acc_t* tm = in.target_mean.const_data_ptr<acc_t>();
  const acc_t* ts = in.target_std.const_data_ptr<acc_t>();
  const acc_t* dl = in.delta.const_data_ptr<acc_t>();
  const acc_t* gm = in.gamma.const_data_ptr<acc_t>();
  const acc_t* up = grad_loss.const_data_ptr<acc_t>();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t a = g / L.C, c = g % L.C;
    slack_grad_coefficients<acc_t>(up[a], m[g], s[g], tm[c], ts[c], dl[c], gm[c], in.count, correction, &alpha[g],
                                   &beta[g]);
  }
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const int64_t rows = L.A * L.R * L.C;
  if (cpu::row_mode(L)) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(L.B, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t row = i0; row < i1; ++row) {
        const int64_t c = row % L.C, a = row / (L.R * L.C);
        const int64_t g = a * L.C + c;
        const acc_t al = alpha[g], be = beta[g], mu = m[g];
        const scalar_t* xp = x + row * L.B;
        scalar_t* op = out + row * L.B;
        if constexpr (kWithDy) {
          const acc_t sc = bn_scale[c];
          const scalar_t* dp = dy + row * L.B;
#pragma omp simd
          for (int64_t b = 0; b < L.B; ++b)
            op[b] = static_cast<scalar_t>(static_cast<acc_t>(dp[b]) * sc + al + be * (static_cast<acc_t>(xp[b]) - mu));
        } else {
#pragma omp simd
          for (int64_t b = 0; b < L.B; ++b) op[b] = static_cast<scalar_t>(al + be * (static_cast<acc_t>(xp[b]) - mu));
        }
      }
    });
  } else {
    at::parallel_for(0, L.A * L.R, std::max<int64_t>(1, 32768 / L.C), [&](int64_t i0, int64_t i1) {
      for (int64_t ar = i0; ar < i1; ++ar) {
        const int64_t a = ar / L.R;
        const acc_t* al = alpha.data() + a * L.C;
        const acc_t* be = beta.data() + a * L.C;
        const acc_t* mu = m + a * L.C;
        const scalar_t* xp = x + ar * L.C;
        scalar_t* op = out + ar * L.C;
        if constexpr (kWithDy) {
          const scalar_t* dp = dy + ar * L.C;
#pragma omp simd
          for (int64_t c = 0; c < L.C; ++c)
            op[c] = static_cast<scalar_t>(static_cast<acc_t>(dp[c]) * bn_scale[c] + al[c] +
                                          be[c] * (static_cast<acc_t>(xp[c]) - mu[c]));
        } else {
#pragma omp simd
          for (int64_t c = 0; c < L.C; ++c)
            op[c] = static_cast<scalar_t>(al[c] + be[c] * (static_cast<acc_t>(xp[c]) - mu[c]));
        }
      }
    });
  }
}

std::vector<int64_t> stat_shape(const SlackInputs& in, bool per_sample) {
  if (per_sample) return {in.batch, in.channels};
  return {in.channels};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slack_loss_cpu(const at::Tensor& x, const at::Tensor& mean,
                                                              const at::Tensor& std_t, const at::Tensor& delta,
                                                              const at::Tensor& gamma, double eps, bool unbiased,
                                                              bool per_sample) {
  const SlackInputs in = check_slack_inputs("bn_stat_slack_loss", x, mean, std_t, delta, gamma, per_sample);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(acc);
  at::Tensor stat_mean = at::empty(stat_shape(in, per_sample), opts);
  at::Tensor stat_std = at::empty(stat_shape(in, per_sample), opts);
  at::Tensor loss = per_sample ? at::empty({in.batch}, opts) : at::empty({}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_slack_loss_cpu", [&] {
    slack_forward_kernel<scalar_t>(in, eps, unbiased ? 1 : 0, per_sample, stat_mean, stat_std, loss);
  });
  return {loss, stat_mean, stat_std};
}

// grad_x of the slack loss; with grad_y and bn_scale (the fused BN op) plus grad_y * bn_scale, in the
// same pass.
at::Tensor slack_backward(const SlackInputs& in, const at::Tensor& grad_loss, const at::Tensor& stat_mean,
                          const at::Tensor& stat_std, bool unbiased, const at::Tensor* grad_y = nullptr,
                          const at::Tensor* bn_scale = nullptr) {
  const auto acc = in.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor up = grad_loss.to(acc).reshape({-1}).contiguous();
  at::Tensor grad = at::empty_like(in.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "slack_backward_cpu", [&] {
    if (grad_y != nullptr) {
      slack_backward_kernel<scalar_t, true>(in, up, stat_mean, stat_std, unbiased ? 1 : 0, grad,
                                            grad_y->const_data_ptr<scalar_t>(),
                                            bn_scale->const_data_ptr<acc_type<scalar_t>>());
    } else {
      slack_backward_kernel<scalar_t>(in, up, stat_mean, stat_std, unbiased ? 1 : 0, grad);
    }
  });
  return grad;
}

at::Tensor slack_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& mean,
                                   const at::Tensor& std_t, const at::Tensor& delta, const at::Tensor& gamma,
                                   const at::Tensor& stat_mean, const at::Tensor& stat_std, bool unbiased,
                                   bool per_sample) {
  const SlackInputs in = check_slack_inputs("bn_stat_slack_loss_backward", x, mean, std_t, delta, gamma, per_sample);
  check_slack_saved(in, grad_loss, stat_mean, stat_std, per_sample);
  return slack_backward(in, grad_loss, stat_mean, stat_std, unbiased);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_eval_slack_cpu(
    const at::Tensor& x, const at::Tensor& bn_scale, const at::Tensor& bn_shift, const at::Tensor& mean,
    const at::Tensor& std_t, const at::Tensor& delta, const at::Tensor& gamma, double eps, bool unbiased,
    bool per_sample) {
  const BnEvalInputs bn = check_bn_eval_inputs(x, bn_scale, bn_shift, mean, std_t, delta, gamma, per_sample);
  const SlackInputs& in = bn.slack;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(acc);
  at::Tensor stat_mean = at::empty(stat_shape(in, per_sample), opts);
  at::Tensor stat_std = at::empty(stat_shape(in, per_sample), opts);
  at::Tensor loss = per_sample ? at::empty({in.batch}, opts) : at::empty({}, opts);
  at::Tensor y = at::empty_like(in.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_eval_slack_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    slack_forward_kernel<scalar_t, true>(in, eps, unbiased ? 1 : 0, per_sample, stat_mean, stat_std, loss,
                                         y.data_ptr<scalar_t>(), bn.bn_scale.const_data_ptr<acc_t>(),
                                         bn.bn_shift.const_data_ptr<acc_t>());
  });
  return {y, loss, stat_mean, stat_std};
}

at::Tensor bn_eval_slack_backward_cpu(const at::Tensor& grad_y, const at::Tensor& grad_loss, const at::Tensor& x,
                                      const at::Tensor& bn_scale, const at::Tensor& mean, const at::Tensor& std_t,
                                      const at::Tensor& delta, const at::Tensor& gamma, const at::Tensor& stat_mean,
                                      const at::Tensor& stat_std, bool unbiased, bool per_sample) {
  const BnEvalInputs bn = check_bn_eval_backward_inputs(grad_y, grad_loss, x, bn_scale, mean, std_t, delta, gamma,
                                                        stat_mean, stat_std, per_sample);
  return slack_backward(bn.slack, grad_loss, stat_mean, stat_std, unbiased, &bn.grad_y, &bn.bn_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(dsg_ext, CPU, m) {
  m.impl("bn_stat_slack_loss", &slack_loss_cpu);
  m.impl("bn_stat_slack_loss_backward", &slack_loss_backward_cpu);
  m.impl("bn_eval_slack", &bn_eval_slack_cpu);
  m.impl("bn_eval_slack_backward", &bn_eval_slack_backward_cpu);
}

}  // namespace dsg_ext
