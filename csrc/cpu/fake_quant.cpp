// Fake quantization on the CPU: per tensor or per channel along any axis; STE backward with the
// learnable scale / zero-point gradients reduced per channel in the same pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../fake_quant.h"
#include "loops.h"

namespace dsg_ext {
namespace {

template <typename acc_t>
std::vector<QParams<acc_t>> channel_params(const QuantInputs& in, int64_t qmin, int64_t qmax) {
  const float* s = in.scale.const_data_ptr<float>();
  const float* z = in.zero_point.const_data_ptr<float>();
  std::vector<QParams<acc_t>> p;
  p.reserve(in.layout.C);
  for (int64_t c = 0; c < in.layout.C; ++c) p.emplace_back(s[c], z[c], in.zero_point_is_float, qmin, qmax);
  return p;
}

template <typename scalar_t>
void forward_kernel(const QuantInputs& in, int64_t qmin, int64_t qmax, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const auto params = channel_params<acc_t>(in, qmin, qmax);
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  scalar_t* y = out.data_ptr<scalar_t>();
  cpu::for_each_run(in.layout, [&](int64_t off, int64_t n, int64_t c) {
    const scalar_t* __restrict__ xp = x + off;
    scalar_t* __restrict__ yp = y + off;
    if (c >= 0) {
      const QParams<acc_t> p = params[c];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yp[i] = static_cast<scalar_t>(fq_forward<acc_t>(static_cast<acc_t>(xp[i]), p));
    } else {
      const QParams<acc_t>* p = params.data();
      for (int64_t i = 0; i < n; ++i) yp[i] = static_cast<scalar_t>(fq_forward<acc_t>(static_cast<acc_t>(xp[i]), p[i]));
    }
  });
}

// STE gradient only.
template <typename scalar_t>
void backward_x_kernel(const QuantInputs& in, const at::Tensor& grad, int64_t qmin, int64_t qmax, at::Tensor& dx) {
  using acc_t = acc_type<scalar_t>;
  const auto params = channel_params<acc_t>(in, qmin, qmax);
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = grad.const_data_ptr<scalar_t>();
  scalar_t* out = dx.data_ptr<scalar_t>();
  cpu::for_each_run(in.layout, [&](int64_t off, int64_t n, int64_t c) {
    const scalar_t* __restrict__ xp = x + off;
    const scalar_t* __restrict__ gp = dy + off;
    scalar_t* __restrict__ op = out + off;
    if (c >= 0) {
      const QParams<acc_t> p = params[c];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i)
        op[i] = static_cast<scalar_t>(fq_ste_grad<acc_t>(static_cast<acc_t>(xp[i]), static_cast<acc_t>(gp[i]), p));
    } else {
      for (int64_t i = 0; i < n; ++i)
        op[i] = static_cast<scalar_t>(fq_ste_grad<acc_t>(static_cast<acc_t>(xp[i]), static_cast<acc_t>(gp[i]), params[i]));
    }
  });
}

// STE gradient plus the scale and zero-point gradients, reduced per channel in the same pass.
template <typename scalar_t>
void backward_params_kernel(const QuantInputs& in, const at::Tensor& grad, int64_t qmin, int64_t qmax,
                            at::Tensor& dx, at::Tensor& dscale, at::Tensor& dzero) {
  using acc_t = acc_type<scalar_t>;
  const auto params = channel_params<acc_t>(in, qmin, qmax);
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = grad.const_data_ptr<scalar_t>();
  scalar_t* out = dx.data_ptr<scalar_t>();
  const auto sums = cpu::reduce_channels(in.layout, [&](int64_t off, int64_t n, int64_t c, Pair<double>* acc) {
    const scalar_t* __restrict__ xp = x + off;
    const scalar_t* __restrict__ gp = dy + off;
    scalar_t* __restrict__ op = out + off;
    if (c >= 0) {
      const QParams<acc_t> p = params[c];
      *acc += cpu::blocked_sum<acc_t>(n, [&](int64_t start, int64_t count, acc_t* ds, acc_t* dz) {
#pragma omp simd
        for (int64_t i = start; i < start + count; ++i) {
          const FqGrad<acc_t> g = fq_backward<acc_t>(static_cast<acc_t>(xp[i]), static_cast<acc_t>(gp[i]), p);
          op[i] = static_cast<scalar_t>(g.dx);
          ds[i - start] = g.dscale;
          dz[i - start] = g.dzero_point;
        }
      });
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const FqGrad<acc_t> g = fq_backward<acc_t>(static_cast<acc_t>(xp[i]), static_cast<acc_t>(gp[i]), params[i]);
        op[i] = static_cast<scalar_t>(g.dx);
        acc[i] += Pair<double>(g.dscale, g.dzero_point);
      }
    }
  });
  std::vector<double> ds(in.layout.C), dz(in.layout.C);
  for (int64_t c = 0; c < in.layout.C; ++c) {
    ds[c] = sums[c].a;
    dz[c] = sums[c].b;
  }
  dscale.copy_(at::tensor(ds, at::kDouble).reshape(dscale.sizes()));
  if (dzero.is_floating_point()) dzero.copy_(at::tensor(dz, at::kDouble).reshape(dzero.sizes()));
}

at::Tensor fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                          int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis) {
  const QuantInputs in = check_quant_inputs("fake_quant", x, scale, zero_point, quant_min, quant_max, axis);
  check_quant_values_cpu("fake_quant", in, quant_min, quant_max);
  at::Tensor out = at::empty_like(in.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_cpu",
                                  [&] { forward_kernel<scalar_t>(in, quant_min, quant_max, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, bool param_grads) {
  const QuantInputs in = check_quant_inputs("fake_quant_backward", x, scale, zero_point, quant_min, quant_max, axis);
  check_same_shape_dtype_device("fake_quant_backward", "x", x, "grad", grad);
  check_quant_values_cpu("fake_quant_backward", in, quant_min, quant_max);
  const at::Tensor dy = match_layout(grad, in.x);
  at::Tensor dx = at::empty_like(in.x);
  at::Tensor dscale = at::zeros_like(scale);
  at::Tensor dzero = at::zeros_like(zero_point);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_backward_cpu", [&] {
    if (param_grads) {
      backward_params_kernel<scalar_t>(in, dy, quant_min, quant_max, dx, dscale, dzero);
    } else {
      backward_x_kernel<scalar_t>(in, dy, quant_min, quant_max, dx);
    }
  });
  return {dx, dscale, dzero};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsg_ext, CPU, m) {
  m.impl("fake_quant", &fake_quant_cpu);
  m.impl("fake_quant_backward", &fake_quant_backward_cpu);
}

}  // namespace dsg_ext
