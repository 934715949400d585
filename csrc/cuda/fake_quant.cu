// Fake quantization on CUDA: one elementwise pass forward; one pass backward that also reduces the
// learnable scale / zero-point gradients per channel (fixed-order partials, no atomics, no syncs).
// 16-byte loads and stores where the data allows (loops.cuh's vector paths).
// Invalid parameters (scale <= 0 or non-finite, integer zero point outside the range) give NaN:
// checking them on the host would need a device sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../fake_quant.h"
#include "loops.cuh"

namespace dsg_ext {
namespace {

template <typename acc_t>
struct ParamSource {
  const float* scale;
  const float* zero_point;
  bool zero_point_is_float;
  int64_t qmin, qmax;
  __device__ QParams<acc_t> operator()(int64_t c) const {
    return QParams<acc_t>(scale[c], zero_point[c], zero_point_is_float, qmin, qmax);
  }
};

template <typename scalar_t, typename acc_t>
struct Forward {
  const scalar_t* x;
  scalar_t* y;
  ParamSource<acc_t> params;
  __device__ QParams<acc_t> group(int64_t, int64_t c) const { return params(c); }
  __device__ void operator()(int64_t i, const QParams<acc_t>& p) const {
    y[i] = static_cast<scalar_t>(p.valid ? fq_forward<acc_t>(static_cast<acc_t>(x[i]), p) : static_cast<acc_t>(NAN));
  }
  static constexpr int kVec = 16 / sizeof(scalar_t);  // 16-byte loads and stores (see loops.cuh)
  bool vec_aligned() const { return cuda::aligned16(x) && cuda::aligned16(y); }
  __device__ void apply_vec(int64_t i, const QParams<acc_t>* p) const {
    const auto xv = cuda::load_vec<kVec>(x + i);
    cuda::Vec<scalar_t, kVec> out;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      out.v[v] = static_cast<scalar_t>(p[v].valid ? fq_forward<acc_t>(static_cast<acc_t>(xv.v[v]), p[v])
                                                  : static_cast<acc_t>(NAN));
    }
    cuda::store_vec(y + i, out);
  }
};

template <typename scalar_t, typename acc_t>
struct Backward {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* dx;
  ParamSource<acc_t> params;
  __device__ QParams<acc_t> group(int64_t, int64_t c) const { return params(c); }
  __device__ Pair<acc_t> operator()(int64_t i, const QParams<acc_t>& p) const {
    FqGrad<acc_t> g = fq_backward<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(dy[i]), p);
    if (!p.valid) g.dx = g.dscale = g.dzero_point = static_cast<acc_t>(NAN);
    dx[i] = static_cast<scalar_t>(g.dx);
    return Pair<acc_t>(g.dscale, g.dzero_point);
  }
  static constexpr int kVec = 16 / sizeof(scalar_t);
  bool vec_aligned() const { return cuda::aligned16(x) && cuda::aligned16(dy) && cuda::aligned16(dx); }
  __device__ void reduce_vec(int64_t i, const QParams<acc_t>* p, Pair<acc_t>* acc) const {
    const auto xv = cuda::load_vec<kVec>(x + i);
    const auto dv = cuda::load_vec<kVec>(dy + i);
    cuda::Vec<scalar_t, kVec> out;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      FqGrad<acc_t> g = fq_backward<acc_t>(static_cast<acc_t>(xv.v[v]), static_cast<acc_t>(dv.v[v]), p[v]);
      if (!p[v].valid) g.dx = g.dscale = g.dzero_point = static_cast<acc_t>(NAN);
      out.v[v] = static_cast<scalar_t>(g.dx);
      acc[v] += Pair<acc_t>(g.dscale, g.dzero_point);
    }
    cuda::store_vec(dx + i, out);
  }
};

// STE only.
template <typename scalar_t, typename acc_t>
struct BackwardInputOnly {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* dx;
  ParamSource<acc_t> params;
  __device__ QParams<acc_t> group(int64_t, int64_t c) const { return params(c); }
  __device__ void operator()(int64_t i, const QParams<acc_t>& p) const {
    dx[i] = static_cast<scalar_t>(p.valid ? fq_ste_grad<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(dy[i]), p)
                                          : static_cast<acc_t>(NAN));
  }
  static constexpr int kVec = 16 / sizeof(scalar_t);
  bool vec_aligned() const { return cuda::aligned16(x) && cuda::aligned16(dy) && cuda::aligned16(dx); }
  __device__ void apply_vec(int64_t i, const QParams<acc_t>* p) const {
    const auto xv = cuda::load_vec<kVec>(x + i);
    const auto dv = cuda::load_vec<kVec>(dy + i);
    cuda::Vec<scalar_t, kVec> out;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      out.v[v] = static_cast<scalar_t>(
          p[v].valid ? fq_ste_grad<acc_t>(static_cast<acc_t>(xv.v[v]), static_cast<acc_t>(dv.v[v]), p[v])
                     : static_cast<acc_t>(NAN));
    }
    cuda::store_vec(dx + i, out);
  }
};

struct WriteParamGrads {
  double* dscale;
  double* dzero_point;
  __device__ void operator()(int64_t g, Pair<double> total) const {
    dscale[g] = total.a;
    dzero_point[g] = total.b;
  }
};

template <typename acc_t>
ParamSource<acc_t> params_of(const QuantInputs& in, int64_t qmin, int64_t qmax) {
  return {in.scale.const_data_ptr<float>(), in.zero_point.const_data_ptr<float>(), in.zero_point_is_float, qmin, qmax};
}

at::Tensor fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                           int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis) {
  const QuantInputs in = check_quant_inputs("fake_quant", x, scale, zero_point, quant_min, quant_max, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(in.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    cuda::apply(in.layout, Forward<scalar_t, acc_t>{in.x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                    params_of<acc_t>(in, quant_min, quant_max)});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, bool param_grads) {
  const QuantInputs in = check_quant_inputs("fake_quant_backward", x, scale, zero_point, quant_min, quant_max, axis);
  check_same_shape_dtype_device("fake_quant_backward", "x", x, "grad", grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = match_layout(grad, in.x);
  at::Tensor dx = at::empty_like(in.x);
  at::Tensor dscale, dzero;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Backward<scalar_t, acc_t> op{in.x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                       dx.data_ptr<scalar_t>(), params_of<acc_t>(in, quant_min, quant_max)};
    if (param_grads) {
      at::Tensor ds = at::empty({in.layout.C}, x.options().dtype(at::kDouble));
      at::Tensor dz = at::empty({in.layout.C}, x.options().dtype(at::kDouble));
      cuda::reduce<acc_t>(in.layout, op, WriteParamGrads{ds.data_ptr<double>(), dz.data_ptr<double>()}, x);
      dscale = ds.to(scale.scalar_type()).reshape(scale.sizes());
      dzero = zero_point.is_floating_point() ? dz.to(zero_point.scalar_type()).reshape(zero_point.sizes())
                                             : at::zeros_like(zero_point);
    } else {
      cuda::apply(in.layout, BackwardInputOnly<scalar_t, acc_t>{op.x, op.dy, op.dx, op.params});
    }
  });
  if (!param_grads) {
    dscale = at::zeros_like(scale);
    dzero = at::zeros_like(zero_point);
  }
  return {dx, dscale, dzero};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsg_ext, CUDA, m) {
  m.impl("fake_quant", &fake_quant_cuda);
  m.impl("fake_quant_backward", &fake_quant_backward_cuda);
}

}  // namespace dsg_ext
