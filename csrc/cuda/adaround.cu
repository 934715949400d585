// AdaRound on CUDA: one kernel pass forward (rounding + regularizer partials), one pass backward
// (gradient to V from the weight and the regularizer; scale gradient reduced per channel).
// Invalid scales or zero points give NaN instead of a host-side check (which would sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../adaround.h"
#include "../checks.h"
#include "loops.cuh"

namespace dsg_ext {
namespace {

template <typename acc_t>
struct Params {
  const acc_t* scale;
  const acc_t* zero_point;
  bool zero_point_is_float;
  int64_t qmin, qmax;
  __device__ AdaRoundParams<acc_t> operator()(int64_t c) const {
    return AdaRoundParams<acc_t>(scale[c], zero_point[c], zero_point_is_float, qmin, qmax);
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t nan_if_invalid(acc_t v, const AdaRoundParams<acc_t>& p) {
  return p.valid ? v : static_cast<acc_t>(NAN);
}

template <typename scalar_t, typename acc_t>
struct Forward {
  const scalar_t* w;
  const scalar_t* v;
  scalar_t* out;
  Params<acc_t> params;
  acc_t beta;
  bool hard;
  __device__ AdaRoundParams<acc_t> group(int64_t, int64_t c) const { return params(c); }
  __device__ Pair<acc_t> operator()(int64_t i, const AdaRoundParams<acc_t>& p) const {
    const acc_t wi = static_cast<acc_t>(w[i]), vi = static_cast<acc_t>(v[i]);
    acc_t r;
    const acc_t wq = hard ? adaround_forward_element<acc_t, true>(wi, vi, p, beta, &r)
                          : adaround_forward_element<acc_t, false>(wi, vi, p, beta, &r);
    out[i] = static_cast<scalar_t>(nan_if_invalid(wq, p));
    return Pair<acc_t>(r, acc_t(0));
  }
};

template <typename scalar_t, typename acc_t>
struct Backward {
  const scalar_t* w;
  const scalar_t* v;
  const scalar_t* dy;
  scalar_t* grad_v;
  const acc_t* grad_reg;
  Params<acc_t> params;
  acc_t beta;
  bool hard;
  __device__ AdaRoundParams<acc_t> group(int64_t, int64_t c) const { return params(c); }
  __device__ Pair<acc_t> operator()(int64_t i, const AdaRoundParams<acc_t>& p) const {
    const acc_t wi = static_cast<acc_t>(w[i]), vi = static_cast<acc_t>(v[i]), g = static_cast<acc_t>(dy[i]);
    acc_t level;
    const acc_t gv = hard ? adaround_grad_v<acc_t, true>(wi, vi, g, p, beta, *grad_reg, &level)
                          : adaround_grad_v<acc_t, false>(wi, vi, g, p, beta, *grad_reg, &level);
    grad_v[i] = static_cast<scalar_t>(hard ? gv : nan_if_invalid(gv, p));
    return Pair<acc_t>(g * level, acc_t(0));
  }
};

template <typename scalar_t, typename acc_t>
struct BackwardVOnly {
  Backward<scalar_t, acc_t> inner;
  __device__ AdaRoundParams<acc_t> group(int64_t a, int64_t c) const { return inner.group(a, c); }
  __device__ void operator()(int64_t i, const AdaRoundParams<acc_t>& p) const { inner(i, p); }
};

struct WriteSum {
  double* out;
  __device__ void operator()(int64_t g, Pair<double> total) const { out[g] = total.a; }
};


template <typename acc_t>
Params<acc_t> params_of(const QuantInputs& in, int64_t qmin, int64_t qmax) {
  return {in.scale.const_data_ptr<acc_t>(), in.zero_point.const_data_ptr<acc_t>(), in.zero_point_is_float, qmin, qmax};
}

std::tuple<at::Tensor, at::Tensor> adaround_cuda(const at::Tensor& w, const at::Tensor& v, const at::Tensor& scale,
                                                 const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                                                 std::optional<int64_t> axis, double beta, bool hard) {
  const QuantInputs in = check_adaround_inputs("adaround", w, v, scale, zero_point, qmin, qmax, axis, beta);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor vv = match_layout(v, in.x);
  at::Tensor out = at::empty_like(in.x);
  at::Tensor per_channel = at::zeros({in.layout.C}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Forward<scalar_t, acc_t> op{in.x.const_data_ptr<scalar_t>(), vv.const_data_ptr<scalar_t>(),
                                      out.data_ptr<scalar_t>(),         params_of<acc_t>(in, qmin, qmax),
                                      static_cast<acc_t>(beta),         hard};
    cuda::reduce<acc_t>(in.layout, op, WriteSum{per_channel.data_ptr<double>()}, w);
  });
  at::Tensor reg = per_channel.sum().to(in.scale.scalar_type());
  return {out, reg};
}

std::tuple<at::Tensor, at::Tensor> adaround_backward_cuda(const at::Tensor& grad_w, const at::Tensor& grad_reg,
                                                          const at::Tensor& w, const at::Tensor& v,
                                                          const at::Tensor& scale, const at::Tensor& zero_point,
                                                          int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                                                          double beta, bool hard, bool scale_grad) {
  const QuantInputs in =
      check_adaround_backward_inputs(grad_w, grad_reg, w, v, scale, zero_point, qmin, qmax, axis, beta);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor vv = match_layout(v, in.x);
  const at::Tensor dy = match_layout(grad_w, in.x);
  at::Tensor grad_v = at::empty_like(in.x);
  at::Tensor grad_scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adaround_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor dreg = grad_reg.to(in.scale.scalar_type()).reshape({1}).contiguous();
    const Backward<scalar_t, acc_t> op{in.x.const_data_ptr<scalar_t>(), vv.const_data_ptr<scalar_t>(),
                                       dy.const_data_ptr<scalar_t>(),   grad_v.data_ptr<scalar_t>(),
                                       dreg.const_data_ptr<acc_t>(),    params_of<acc_t>(in, qmin, qmax),
                                       static_cast<acc_t>(beta),        hard};
    if (scale_grad) {
      at::Tensor ds = at::empty({in.layout.C}, w.options().dtype(at::kDouble));
      cuda::reduce<acc_t>(in.layout, op, WriteSum{ds.data_ptr<double>()}, w);
      grad_scale = ds.to(scale.scalar_type()).reshape(scale.sizes());
    } else {
      cuda::apply(in.layout, BackwardVOnly<scalar_t, acc_t>{op});
    }
  });
  if (!scale_grad) grad_scale = at::zeros_like(scale);
  return {grad_v, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsg_ext, CUDA, m) {
  m.impl("adaround", &adaround_cuda);
  m.impl("adaround_backward", &adaround_backward_cuda);
}

}  // namespace dsg_ext
