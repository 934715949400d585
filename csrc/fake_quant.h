// Per-element math of affine fake quantization, shared by the CPU and CUDA kernels.
//
//   q   = clamp(round_half_even(x * (1/s)) + z, qmin, qmax)        (1/s computed in fp32, as torch)
//   out = (q - z) * s
//   STE backward:  dx = dy where qmin <= round(x/s) + z <= qmax, else 0
//   learnable (torch._fake_quantize_learnable_*):  ds = dy * ((out - x) / s) in range,
//                  (qmin - z) below, (qmax - z) above;  dz = dy * (-s) outside the range, else 0.
#pragma once

#include "common.h"

namespace dsg_ext {

// A product that the compiler may not fuse into an FMA (the rounding must match torch's).
template <typename T>
DSG_HD T mul_rn(T a, T b) {
  return a * b;  // host code is compiled with -ffp-contract=off; device code uses the specialisations below
}
#if defined(__CUDA_ARCH__)
template <>
__device__ __forceinline__ float mul_rn<float>(float a, float b) {
  return __fmul_rn(a, b);
}
template <>
__device__ __forceinline__ double mul_rn<double>(double a, double b) {
  return __dmul_rn(a, b);
}
#endif

// Round half to even for |v| < 2^22 (float) / 2^51 (double): callers clamp v first. Adding and
// subtracting 1.5 * 2^mantissa rounds in the current (nearest-even) mode and vectorises on any
// CPU, unlike std::nearbyint; without -ffast-math the compiler may not fold it away.
DSG_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return (v + 12582912.0f) - 12582912.0f;
#endif
}
DSG_HD double round_half_even(double v) {
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return (v + 6755399441055744.0) - 6755399441055744.0;
#endif
}

// Quantization parameters of one channel (or of the whole tensor), in the accumulation type.
template <typename acc_t>
struct QParams {
  acc_t scale;
  acc_t inv_scale;
  acc_t zero_point;
  acc_t qmin, qmax;
  bool valid;  // scale a finite normal float > 0 (so 1/scale is finite), zero point in range; else NaN

  QParams() = default;  // (arrays of contexts in the CUDA vector loops)

  // Integer zero points must lie in [qmin, qmax]; floating (learnable) ones are rounded half to
  // even and clamped into the range, as torch._fake_quantize_learnable_* does.
  DSG_HD QParams(float scale_f, float zero_point_f, bool zero_point_is_float, int64_t quant_min,
                 int64_t quant_max) {
    const float inv = 1.0f / scale_f;  // fp32 reciprocal, exactly as torch's kernels
    const float lo = static_cast<float>(quant_min), hi = static_cast<float>(quant_max);
    scale = static_cast<acc_t>(scale_f);
    inv_scale = static_cast<acc_t>(inv);
    qmin = static_cast<acc_t>(quant_min);
    qmax = static_cast<acc_t>(quant_max);
    valid = scale_f >= 1.17549435e-38f && scale_f <= 3.4028234663852886e38f && zero_point_f == zero_point_f &&
            (zero_point_is_float || (zero_point_f >= lo && zero_point_f <= hi));
    float z = zero_point_f < lo ? lo : (zero_point_f > hi ? hi : zero_point_f);
    z = round_half_even(z);
    zero_point = static_cast<acc_t>(z);
  }
};

// Quantization level before clamping: round(x / s) + z, saturated to [qmin - 1, qmax + 1] so the
// rounding trick stays in range. NaN stays NaN; +-inf saturate.
template <typename acc_t>
DSG_HD acc_t fq_level(acc_t x, const QParams<acc_t>& p) {
  acc_t v = mul_rn(x, p.inv_scale);
  const acc_t lo = p.qmin - p.zero_point - acc_t(1);
  const acc_t hi = p.qmax - p.zero_point + acc_t(1);
  v = v < lo ? lo : (v > hi ? hi : v);
  return round_half_even(v) + p.zero_point;
}

// The element functions assume valid parameters (the CPU checks them up front); the CUDA kernels,
// which cannot check without a sync, test p.valid themselves. No branch here keeps CPU loops vectorised.
template <typename acc_t>
DSG_HD acc_t fq_forward(acc_t x, const QParams<acc_t>& p) {
  acc_t q = fq_level(x, p);
  q = q < p.qmin ? p.qmin : (q > p.qmax ? p.qmax : q);
  return mul_rn(q - p.zero_point, p.scale);
}

// Straight-through gradient and the per-element learnable-parameter terms.
template <typename acc_t>
struct FqGrad {
  acc_t dx;
  acc_t dscale;
  acc_t dzero_point;
};

// Straight-through gradient alone (the common case: no learnable parameters).
template <typename acc_t>
DSG_HD acc_t fq_ste_grad(acc_t x, acc_t dy, const QParams<acc_t>& p) {
  const acc_t q = fq_level(x, p);
  return (q < p.qmin || q > p.qmax) ? acc_t(0) : dy;
}

template <typename acc_t>
DSG_HD FqGrad<acc_t> fq_backward(acc_t x, acc_t dy, const QParams<acc_t>& p) {
  FqGrad<acc_t> g;
  const acc_t q = fq_level(x, p);
  if (q < p.qmin) {
    g.dx = acc_t(0);
    g.dscale = dy * (p.qmin - p.zero_point);
    g.dzero_point = -dy * p.scale;
  } else if (q > p.qmax) {
    g.dx = acc_t(0);
    g.dscale = dy * (p.qmax - p.zero_point);
    g.dzero_point = -dy * p.scale;
  } else {  // in range, NaN included: the gradient is passed on, never zeroed
    const acc_t out = mul_rn(q - p.zero_point, p.scale);
    g.dx = dy;
    g.dscale = dy * ((out - x) * p.inv_scale);
    g.dzero_point = acc_t(0);
  }
  return g;
}

}  // namespace dsg_ext
