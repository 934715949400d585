// BN-statistic slack loss on CUDA.
// Forward: one read of x (shifted sums per (n, c) or per c; the fused BN op writes its output in the
// same pass), then two tiny kernels that merge partials and form the per-sample loss. Backward: one
// pass reading x (and the fused op's grad_y) and writing the gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../slack_loss.h"
#include "loops.cuh"

namespace dsg_ext {
namespace {

template <typename scalar_t, typename acc_t>
struct ShiftedSums {
  const scalar_t* x;
  Layout L;
  __device__ acc_t group(int64_t a, int64_t c) const {
    return static_cast<acc_t>(x[(a * L.R * L.C + c) * L.B]);  // first element of the group
  }
  __device__ Pair<acc_t> operator()(int64_t i, acc_t shift) const {
    const acc_t v = static_cast<acc_t>(x[i]) - shift;
    return Pair<acc_t>(v, v * v);
  }
  static constexpr int kVec = 16 / sizeof(scalar_t);  // channels_last: kVec channels per 16-byte load
  bool vec_aligned() const { return cuda::aligned16(x); }
  __device__ void reduce_vec(int64_t i, const acc_t* shift, Pair<acc_t>* acc) const {
    const auto xv = cuda::load_vec<kVec>(x + i);
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const acc_t d = static_cast<acc_t>(xv.v[v]) - shift[v];
      acc[v] += Pair<acc_t>(d, d * d);
    }
  }
};

template <typename scalar_t, typename acc_t>
struct SlackStats {
  const scalar_t* x;
  Layout L;
  const acc_t* target_mean;
  const acc_t* target_std;
  const acc_t* delta;
  const acc_t* gamma;
  int64_t count, correction;
  acc_t eps;
  acc_t* mean_out;
  acc_t* std_out;
  acc_t* term_out;
  __device__ void operator()(int64_t g, Pair<double> total) const {
    const int64_t a = g / L.C, c = g % L.C;
    const acc_t shift = L.numel() > 0 ? static_cast<acc_t>(x[(a * L.R * L.C + c) * L.B]) : acc_t(0);
    acc_t m, s;
    finalize_moments<acc_t>(shift, static_cast<acc_t>(total.a), static_cast<acc_t>(total.b), count, correction, eps,
                            &m, &s);
    mean_out[g] = m;
    std_out[g] = s;
    term_out[g] = slack_term<acc_t>(m, s, target_mean[c], target_std[c], delta[c], gamma[c]);
  }
};

// loss[a] = sum_c term[a, c], summed in a fixed order.
template <typename acc_t>
__global__ void sum_terms_kernel(const acc_t* term, int64_t C, acc_t* loss) {
  Pair<acc_t> acc;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) acc.a += term[blockIdx.x * C + c];
  acc = cuda::block_sum(acc);
  if (threadIdx.x == 0) loss[blockIdx.x] = acc.a;
}

template <typename scalar_t, typename acc_t>
struct SlackGrad {
  struct Coef {
    acc_t alpha, beta, mean, scale;
  };
  const scalar_t* x;
  scalar_t* grad;
  Layout L;
  const acc_t* upstream;
  const acc_t* stat_mean;
  const acc_t* stat_std;
  const acc_t* target_mean;
  const acc_t* target_std;
  const acc_t* delta;
  const acc_t* gamma;
  int64_t count, correction;
  const scalar_t* dy = nullptr;  // the fused BN op: grad += grad_y * bn_scale[c]
  const acc_t* bn_scale = nullptr;
  __device__ Coef group(int64_t a, int64_t c) const {
    const int64_t g = a * L.C + c;
    Coef k;
    k.mean = stat_mean[g];
    slack_grad_coefficients<acc_t>(upstream[a], k.mean, stat_std[g], target_mean[c], target_std[c], delta[c], gamma[c],
                                   count, correction, &k.alpha, &k.beta);
    k.scale = dy != nullptr ? bn_scale[c] : acc_t(0);
    return k;
  }
  __device__ void operator()(int64_t i, const Coef& k) const {
    acc_t v = k.alpha + k.beta * (static_cast<acc_t>(x[i]) - k.mean);
    if (dy != nullptr) v += static_cast<acc_t>(dy[i]) * k.scale;
    grad[i] = static_cast<scalar_t>(v);
  }
  static constexpr int kVec = 16 / sizeof(scalar_t);
  bool vec_aligned() const { return cuda::aligned16(x) && cuda::aligned16(grad) && (dy == nullptr || cuda::aligned16(dy)); }
  __device__ void apply_vec(int64_t i, const Coef* k) const {
    const auto xv = cuda::load_vec<kVec>(x + i);
    cuda::Vec<scalar_t, kVec> out;
    if (dy != nullptr) {
      const auto dv = cuda::load_vec<kVec>(dy + i);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        out.v[v] = static_cast<scalar_t>(k[v].alpha + k[v].beta * (static_cast<acc_t>(xv.v[v]) - k[v].mean) +
                                         static_cast<acc_t>(dv.v[v]) * k[v].scale);
      }
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        out.v[v] = static_cast<scalar_t>(k[v].alpha + k[v].beta * (static_cast<acc_t>(xv.v[v]) - k[v].mean));
      }
    }
    cuda::store_vec(grad + i, out);
  }
};

// The fused BN op's forward: the shifted sums of ShiftedSums and, in the same read of x,
// y = x * bn_scale[c] + bn_shift[c].
template <typename scalar_t, typename acc_t>
struct ShiftedSumsAffine {
  struct Ctx {
    acc_t shift, scale, bias;
  };
  const scalar_t* x;
  scalar_t* y;
  Layout L;
  const acc_t* bn_scale;
  const acc_t* bn_shift;
  __device__ Ctx group(int64_t a, int64_t c) const {
    return Ctx{static_cast<acc_t>(x[(a * L.R * L.C + c) * L.B]), bn_scale[c], bn_shift[c]};
  }
  __device__ Pair<acc_t> operator()(int64_t i, const Ctx& k) const {
    const acc_t xv = static_cast<acc_t>(x[i]);
    y[i] = static_cast<scalar_t>(xv * k.scale + k.bias);
    const acc_t v = xv - k.shift;
    return Pair<acc_t>(v, v * v);
  }
  static constexpr int kVec = 16 / sizeof(scalar_t);
  bool vec_aligned() const { return cuda::aligned16(x) && cuda::aligned16(y); }
  __device__ void reduce_vec(int64_t i, const Ctx* k, Pair<acc_t>* acc) const {
    const auto xv = cuda::load_vec<kVec>(x + i);
    cuda::Vec<scalar_t, kVec> yv;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const acc_t xe = static_cast<acc_t>(xv.v[v]);
      yv.v[v] = static_cast<scalar_t>(xe * k[v].scale + k[v].bias);
      const acc_t d = xe - k[v].shift;
      acc[v] += Pair<acc_t>(d, d * d);
    }
    cuda::store_vec(y + i, yv);
  }
};

// The statistics and the loss of validated inputs (on the current device).
// With bn (the fused BN op) it also writes y = x * bn_scale + bn_shift during the same read of x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> slack_forward(const SlackInputs& in, const at::Tensor& x, double eps,
                                                             bool unbiased, bool per_sample,
                                                             const BnEvalInputs* bn = nullptr, at::Tensor* y = nullptr) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(acc);
  const Layout L = in.layout;
  const std::vector<int64_t> stat_shape =
      per_sample ? std::vector<int64_t>{in.batch, in.channels} : std::vector<int64_t>{in.channels};
  at::Tensor stat_mean = at::empty(stat_shape, opts);
  at::Tensor stat_std = at::empty(stat_shape, opts);
  at::Tensor terms = at::empty({L.groups()}, opts);
  at::Tensor loss = per_sample ? at::empty({in.batch}, opts) : at::empty({}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_slack_loss_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
    const SlackStats<scalar_t, acc_t> fin{xp,
                                          L,
                                          in.target_mean.const_data_ptr<acc_t>(),
                                          in.target_std.const_data_ptr<acc_t>(),
                                          in.delta.const_data_ptr<acc_t>(),
                                          in.gamma.const_data_ptr<acc_t>(),
                                          in.count,
                                          unbiased ? 1 : 0,
                                          static_cast<acc_t>(eps),
                                          stat_mean.data_ptr<acc_t>(),
                                          stat_std.data_ptr<acc_t>(),
                                          terms.data_ptr<acc_t>()};
    if (bn != nullptr) {
      cuda::reduce<acc_t>(L,
                          ShiftedSumsAffine<scalar_t, acc_t>{xp, y->data_ptr<scalar_t>(), L,
                                                             bn->bn_scale.const_data_ptr<acc_t>(),
                                                             bn->bn_shift.const_data_ptr<acc_t>()},
                          fin, x);
    } else {
      cuda::reduce<acc_t>(L, ShiftedSums<scalar_t, acc_t>{xp, L}, fin, x);
    }
    if (L.A > 0) {
      sum_terms_kernel<acc_t><<<cuda::grid_x(L.A), cuda::kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          terms.const_data_ptr<acc_t>(), L.C, loss.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, stat_mean, stat_std};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slack_loss_cuda(const at::Tensor& x, const at::Tensor& mean,
                                                               const at::Tensor& std_t, const at::Tensor& delta,
                                                               const at::Tensor& gamma, double eps, bool unbiased,
                                                               bool per_sample) {
  const SlackInputs in = check_slack_inputs("bn_stat_slack_loss", x, mean, std_t, delta, gamma, per_sample);
  const c10::cuda::CUDAGuard guard(x.device());
  return slack_forward(in, x, eps, unbiased, per_sample);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_eval_slack_cuda(
    const at::Tensor& x, const at::Tensor& bn_scale, const at::Tensor& bn_shift, const at::Tensor& mean,
    const at::Tensor& std_t, const at::Tensor& delta, const at::Tensor& gamma, double eps, bool unbiased,
    bool per_sample) {
  const BnEvalInputs bn = check_bn_eval_inputs(x, bn_scale, bn_shift, mean, std_t, delta, gamma, per_sample);
  const SlackInputs& in = bn.slack;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(in.x);
  auto [loss, stat_mean, stat_std] = slack_forward(in, x, eps, unbiased, per_sample, &bn, &y);
  return {y, loss, stat_mean, stat_std};
}

// grad_x of the slack loss; with grad_y and bn_scale (the fused BN op) plus grad_y * bn_scale, in the
// same pass.
at::Tensor slack_backward(const SlackInputs& in, const at::Tensor& grad_loss, const at::Tensor& stat_mean,
                          const at::Tensor& stat_std, bool unbiased, const at::Tensor* grad_y = nullptr,
                          const at::Tensor* bn_scale = nullptr) {
  const c10::cuda::CUDAGuard guard(in.x.device());
  const auto acc = in.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor up = grad_loss.to(acc).reshape({-1}).contiguous();
  at::Tensor grad = at::empty_like(in.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "slack_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    SlackGrad<scalar_t, acc_t> op{in.x.const_data_ptr<scalar_t>(),
                                  grad.data_ptr<scalar_t>(),
                                  in.layout,
                                  up.const_data_ptr<acc_t>(),
                                  stat_mean.const_data_ptr<acc_t>(),
                                  stat_std.const_data_ptr<acc_t>(),
                                  in.target_mean.const_data_ptr<acc_t>(),
                                  in.target_std.const_data_ptr<acc_t>(),
                                  in.delta.const_data_ptr<acc_t>(),
                                  in.gamma.const_data_ptr<acc_t>(),
                                  in.count,
                                  unbiased ? 1 : 0};
    if (grad_y != nullptr) {
      op.dy = grad_y->const_data_ptr<scalar_t>();
      op.bn_scale = bn_scale->const_data_ptr<acc_t>();
    }
    cuda::apply(in.layout, op);
  });
  return grad;
}

at::Tensor slack_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& mean,
                                    const at::Tensor& std_t, const at::Tensor& delta, const at::Tensor& gamma,
                                    const at::Tensor& stat_mean, const at::Tensor& stat_std, bool unbiased,
                                    bool per_sample) {
  const SlackInputs in = check_slack_inputs("bn_stat_slack_loss_backward", x, mean, std_t, delta, gamma, per_sample);
  check_slack_saved(in, grad_loss, stat_mean, stat_std, per_sample);
  return slack_backward(in, grad_loss, stat_mean, stat_std, unbiased);
}

at::Tensor bn_eval_slack_backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_loss, const at::Tensor& x,
                                       const at::Tensor& bn_scale, const at::Tensor& mean, const at::Tensor& std_t,
                                       const at::Tensor& delta, const at::Tensor& gamma, const at::Tensor& stat_mean,
                                       const at::Tensor& stat_std, bool unbiased, bool per_sample) {
  const BnEvalInputs bn = check_bn_eval_backward_inputs(grad_y, grad_loss, x, bn_scale, mean, std_t, delta, gamma,
                                                        stat_mean, stat_std, per_sample);
  return slack_backward(bn.slack, grad_loss, stat_mean, stat_std, unbiased, &bn.grad_y, &bn.bn_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(dsg_ext, CUDA, m) {
  m.impl("bn_stat_slack_loss", &slack_loss_cuda);
  m.impl("bn_stat_slack_loss_backward", &slack_loss_backward_cuda);
  m.impl("bn_eval_slack", &bn_eval_slack_cuda);
  m.impl("bn_eval_slack_backward", &bn_eval_slack_backward_cuda);
}

}  // namespace dsg_ext
