// Per-element math of the BN-statistic slack loss, shared by the CPU and CUDA kernels.
//
//   mu~, sigma~ = mean and sqrt(var + eps) of x over a group (H*W per sample, or N*H*W per batch)
//   term(c)     = max(|mu~ - mu| - delta, 0)^2 + max(|sigma~ - sigma| - gamma, 0)^2
//   dL/dx_i     = g * ( a / M + b * (x_i - mu~) / ((M - correction) * sigma~) )
//                 with a = d term / d mu~, b = d term / d sigma~, g the upstream gradient of L.
// So the backward is grad = alpha + beta * (x - mu~) with two coefficients per group (centred on
// mu~ so that a large mean does not cancel the small deviation term).
#pragma once

#include "common.h"

namespace dsg_ext {

// max(|d| - slack, 0); NaN in d stays NaN (a NaN loss must reach the caller, never become 0).
template <typename acc_t>
DSG_HD acc_t hinge(acc_t d, acc_t slack) {
  const acc_t e = (d < acc_t(0) ? -d : d) - slack;
  return e < acc_t(0) ? acc_t(0) : e;
}

// d/d(d) of hinge(d)^2 = 2 * hinge(d) * sign(d).
template <typename acc_t>
DSG_HD acc_t hinge_sq_grad(acc_t d, acc_t slack) {
  const acc_t h = hinge(d, slack);
  return d < acc_t(0) ? acc_t(-2) * h : acc_t(2) * h;
}

template <typename acc_t>
DSG_HD acc_t slack_term(acc_t mean, acc_t std_v, acc_t target_mean, acc_t target_std, acc_t delta,
                        acc_t gamma) {
  const acc_t hm = hinge(mean - target_mean, delta);
  const acc_t hs = hinge(std_v - target_std, gamma);
  return hm * hm + hs * hs;
}

// Coefficients of grad_x = alpha + beta * (x - mu~) for one group.
template <typename acc_t>
DSG_HD void slack_grad_coefficients(acc_t upstream, acc_t mean, acc_t std_v, acc_t target_mean,
                                    acc_t target_std, acc_t delta, acc_t gamma, int64_t count,
                                    int64_t correction, acc_t* alpha, acc_t* beta) {
  const acc_t a = hinge_sq_grad(mean - target_mean, delta);
  const acc_t b = hinge_sq_grad(std_v - target_std, gamma);
  const int64_t dof_i = count - correction;
  const acc_t dof = static_cast<acc_t>(dof_i > 0 ? dof_i : 0);
  // b == 0 (inside the slack) must give a zero gradient even where dof or sigma~ is 0.
  const acc_t bb = b == acc_t(0) ? acc_t(0) : upstream * b / (dof * std_v);
  *beta = bb;
  *alpha = upstream * a / static_cast<acc_t>(count);
}

}  // namespace dsg_ext
