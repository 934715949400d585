// Per-element math of AdaRound (Nagel et al., ICML 2020), shared by the CPU and CUDA kernels.
//
//   h(V)  = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1
//   soft:   W~ = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z);   hard: h = 1[V >= 0]
//   R(V)  = sum(1 - |2 h(V) - 1|^beta)
//   dW~/dV = s * h'(V) * 1[qmin <= floor(W/s) + h + z <= qmax],  dW~/ds = q - z (floor has no slope)
//   dR/dV  = -2 * beta * |2h - 1|^(beta - 1) * sign(2h - 1) * h'(V)
// Clamp gradients pass on the closed interval, as torch.clamp's do.
#pragma once

#include "common.h"
#include "vec_math.h"

namespace dsg_ext {

constexpr double kAdaRoundZeta = 1.1;
constexpr double kAdaRoundGamma = -0.1;

template <typename acc_t>
struct SoftRounding {
  acc_t h;      // h(V)
  acc_t dh_dv;  // h'(V), zero where the clamp is active
};

template <typename acc_t>
DSG_HD SoftRounding<acc_t> soft_rounding(acc_t v) {
  const acc_t zeta = static_cast<acc_t>(kAdaRoundZeta), gamma = static_cast<acc_t>(kAdaRoundGamma);
  const acc_t sig = acc_t(1) / (acc_t(1) + fast_exp(-v));
  const acc_t stretched = sig * (zeta - gamma) + gamma;
  SoftRounding<acc_t> r;
  r.h = stretched < acc_t(0) ? acc_t(0) : (stretched > acc_t(1) ? acc_t(1) : stretched);
  const acc_t slope = sig * (acc_t(1) - sig) * (zeta - gamma);
  r.dh_dv = stretched < acc_t(0) ? acc_t(0) : (stretched > acc_t(1) ? acc_t(0) : slope);  // NaN passes
  return r;
}

// 1 - |2h - 1|^beta and its derivative with respect to h:
// d/dh = -2 beta |u|^(beta-1) sign(u) = -2 beta |u|^beta / u, and 0 at u == 0 (sign(0) = 0, as torch).
template <typename acc_t>
DSG_HD void rounding_regularizer(acc_t h, acc_t beta, acc_t* reg, acc_t* dreg_dh) {
  const acc_t u = acc_t(2) * h - acc_t(1);
  const acc_t p = pow_nonneg(u < acc_t(0) ? -u : u, beta);
  *reg = acc_t(1) - p;
  *dreg_dh = u == acc_t(0) ? acc_t(0) : acc_t(-2) * beta * p / u;
}

template <typename acc_t>
struct AdaRoundParams {
  acc_t scale;
  acc_t zero_point;
  acc_t qmin, qmax;
  bool valid;

  DSG_HD AdaRoundParams(acc_t scale_, acc_t zero_point_, bool zero_point_is_float, int64_t quant_min,
                        int64_t quant_max) {
    qmin = static_cast<acc_t>(quant_min);
    qmax = static_cast<acc_t>(quant_max);
    scale = scale_;
    valid = scale_ > acc_t(0) && scale_ - scale_ == acc_t(0) && zero_point_ == zero_point_ &&
            (zero_point_is_float || (zero_point_ >= qmin && zero_point_ <= qmax));
    acc_t z = zero_point_ < qmin ? qmin : (zero_point_ > qmax ? qmax : zero_point_);
    zero_point = std::nearbyint(z);
  }
};

// floor(v) for |v| < 2^22 without libm (vectorises on any CPU); exact, like std::floor.
template <typename acc_t>
DSG_HD acc_t floor_small(acc_t v) {
#if defined(__CUDA_ARCH__)
  return floor(v);
#else
  const acc_t magic = sizeof(acc_t) == 4 ? acc_t(12582912.0f) : acc_t(6755399441055744.0);
  const acc_t r = (v + magic) - magic;  // round half to even
  return r > v ? r - acc_t(1) : r;
#endif
}

// Quantized weight; also reports whether the level clamp is inactive (the gradient passes), as 1 or 0
// in acc_t (a float mask keeps the CPU loops vectorisable where a bool does not).
// w / s is pre-clamped to [qmin - z - 2, qmax - z + 1]: floor is monotone and every level outside
// that window is clamped anyway, so results are unchanged and floor_small stays in range.
template <typename acc_t>
DSG_HD acc_t adaround_weight(acc_t w, acc_t h, const AdaRoundParams<acc_t>& p, acc_t* level_minus_zero,
                             acc_t* inside) {
  acc_t ws = w / p.scale;
  const acc_t lo = p.qmin - p.zero_point - acc_t(2), hi = p.qmax - p.zero_point + acc_t(1);
  ws = ws < lo ? lo : (ws > hi ? hi : ws);
  const acc_t level = floor_small(ws) + h + p.zero_point;
  *inside = level < p.qmin ? acc_t(0) : (level > p.qmax ? acc_t(0) : acc_t(1));
  const acc_t q = level < p.qmin ? p.qmin : (level > p.qmax ? p.qmax : level);
  *level_minus_zero = q - p.zero_point;
  return p.scale * (q - p.zero_point);
}

// One element of the forward: W~, and the regularizer term 1 - |2h - 1|^beta (0 when hard).
template <typename acc_t, bool kHard>
DSG_HD acc_t adaround_forward_element(acc_t w, acc_t v, const AdaRoundParams<acc_t>& p, acc_t beta, acc_t* reg) {
  acc_t h, r = acc_t(0), unused, level, inside;
  if constexpr (kHard) {
    h = v >= acc_t(0) ? acc_t(1) : acc_t(0);
  } else {
    h = soft_rounding<acc_t>(v).h;
    rounding_regularizer<acc_t>(h, beta, &r, &unused);
  }
  *reg = r;
  return adaround_weight<acc_t>(w, h, p, &level, &inside);
}

// One element of the backward: dL/dV from the upstream gradient g of W~ and dreg of R; also the
// level q - z, whose product with g is the element's share of dL/ds. Hard rounding has no slope in V.
template <typename acc_t, bool kHard>
DSG_HD acc_t adaround_grad_v(acc_t w, acc_t v, acc_t g, const AdaRoundParams<acc_t>& p, acc_t beta, acc_t dreg,
                             acc_t* level) {
  acc_t inside;
  if constexpr (kHard) {
    adaround_weight<acc_t>(w, v >= acc_t(0) ? acc_t(1) : acc_t(0), p, level, &inside);
    return acc_t(0);
  } else {
    const SoftRounding<acc_t> sr = soft_rounding<acc_t>(v);
    acc_t r, dr_dh;
    rounding_regularizer<acc_t>(sr.h, beta, &r, &dr_dh);
    adaround_weight<acc_t>(w, sr.h, p, level, &inside);
    const acc_t through_weight = inside > acc_t(0) ? g * p.scale : acc_t(0);
    return (through_weight + dreg * dr_dh) * sr.dh_dv;
  }
}

}  // namespace dsg_ext
