// Shared definitions for the dsg_ext ops: host/device qualifiers, the accumulation type, the
// memory-layout view every per-channel op uses, and the input checks both backends share.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DSG_HD __host__ __device__ __forceinline__
#else
// Always inlined: the CPU loops only vectorise when the element math is inlined into them.
#define DSG_HD __attribute__((always_inline)) inline
#endif

namespace dsg_ext {

// Statistics and reductions run in fp32 for fp32/fp16/bf16 inputs and in fp64 for fp64 inputs.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// Two running sums reduced together (mean and square of the statistic loss, or the scale and
// zero-point gradients of fake quantization).
template <typename T>
struct Pair {
  T a;
  T b;
  DSG_HD Pair() : a(0), b(0) {}
  DSG_HD Pair(T a_, T b_) : a(a_), b(b_) {}
  DSG_HD Pair& operator+=(const Pair& o) {
    a += o.a;
    b += o.b;
    return *this;
  }
};

// Every per-channel op sees its tensor in memory as a contiguous [A][R][C][B] block: C is the
// channel, groups are (a, c) pairs, reductions run over (r, b).
//   per-sample BN statistics, NCHW:  A=N, R=1,   B=H*W
//   per-sample BN statistics, NHWC:  A=N, R=H*W, B=1
//   batch BN statistics,      NCHW:  A=1, R=N,   B=H*W
//   batch BN statistics,      NHWC:  A=1, R=N*H*W, B=1
//   per-channel quantization along axis k of a contiguous tensor: A=1, R=prod(dims<k), B=prod(dims>k)
struct Layout {
  int64_t A = 1, R = 1, C = 1, B = 1;
  DSG_HD int64_t numel() const { return A * R * C * B; }
  DSG_HD int64_t groups() const { return A * C; }
};

// x - shift, in the accumulation type, with the shift taken from a value of the same group so the
// one-pass sum of squares does not cancel catastrophically (the "shifted data" variance).
template <typename acc_t>
DSG_HD void finalize_moments(acc_t shift, acc_t sum, acc_t sum_sq, int64_t count, int64_t correction,
                             acc_t eps, acc_t* mean, acc_t* std_out) {
  const acc_t n = static_cast<acc_t>(count);
  const acc_t mean_shifted = sum / n;  // 0/0 = NaN for empty groups, like torch.mean
  acc_t m2 = sum_sq - sum * mean_shifted;
  if (m2 < acc_t(0)) m2 = acc_t(0);  // rounding can push a zero variance below 0; NaN stays NaN
  const int64_t dof_i = count - correction;
  const acc_t dof = static_cast<acc_t>(dof_i > 0 ? dof_i : 0);  // torch.var: dof <= 0 gives NaN or inf
  const acc_t var = m2 / dof;
  *mean = shift + mean_shifted;
  *std_out = std::sqrt(var + eps);
}

}  // namespace dsg_ext
