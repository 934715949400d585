// exp and log that the CPU compiler can vectorise (no libm calls, no branches), for the
// transcendental-heavy AdaRound kernels: scalar std::exp/std::pow made the CPU op 4x slower than
// PyTorch's SLEEF-vectorised chain. Polynomials after Cephes (expf/logf), relative error ~2 ulp.
// Device code and double precision use the exact library functions.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace dsg_ext {

namespace detail {
// memcpy rather than std::bit_cast: the extension must also build as C++17 (torch < 2.14).
DSG_HD float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}
DSG_HD int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
#endif
}
}  // namespace detail

// e^x for finite x (saturates at the float range; NaN stays NaN through the arithmetic).
DSG_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365447504019f ? -87.3365447504019f : x;
  // n = round(x / ln 2) with the add-and-subtract trick (|x / ln 2| < 128)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  return y * detail::bits_to_float((static_cast<int32_t>(n) + 127) << 23);
#endif
}

// Natural log for x > 0 (x == 0 gives a large negative number; callers treat 0 themselves).
DSG_HD float fast_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  x = x < 1.17549435e-38f ? 1.17549435e-38f : x;  // no denormals
  const int32_t bits = detail::float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = detail::bits_to_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
#endif
}

DSG_HD double fast_exp(double x) { return std::exp(x); }
DSG_HD double fast_log(double x) { return std::log(x); }

// a^b for a >= 0, b > 0 (0^b = 0).
template <typename T>
DSG_HD T pow_nonneg(T a, T b) {
  const T p = fast_exp(b * fast_log(a));
  return a > T(0) ? p : T(0);
}

}  // namespace dsg_ext
