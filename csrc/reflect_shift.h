// Index math of reflect_shift (swing convolution's random shift), shared by the CPU and CUDA kernels.
//
//   out[n, c, i, j] = x[n, c, r_H(i + dy), r_W(j + dx)],   r_n(t) = -t (t < 0), 2(n-1) - t (t > n-1), else t
//
// torch's "reflect" padding followed by a crop at offset (dy, dx) + pad, without the padded copy. Each
// shift is clamped to [-(n-1), n-1] so that one reflection covers it (a shift on the device cannot be
// checked without a sync; the CPU clamps alike so both devices agree).
#pragma once

#include "common.h"

namespace dsg_ext {

DSG_HD int64_t clamp_shift(int64_t s, int64_t n) {
  const int64_t m = n > 0 ? n - 1 : 0;
  return s < -m ? -m : (s > m ? m : s);
}

DSG_HD int64_t reflect_index(int64_t t, int64_t n) { return t < 0 ? -t : (t > n - 1 ? 2 * (n - 1) - t : t); }

// The indices i in [0, n) with reflect_index(i + s, n) == j (s clamped): at most three (t = i + s is j,
// or -j when t < 0, or 2(n-1) - j when t > n-1). Writes them to out and returns how many.
DSG_HD int reflect_preimages(int64_t j, int64_t n, int64_t s, int64_t* out) {
  int k = 0;
  int64_t i = j - s;
  if (i >= 0 && i < n) out[k++] = i;
  if (j > 0) {
    i = -j - s;
    if (i >= 0 && i < n) out[k++] = i;
  }
  if (j < n - 1) {
    i = 2 * (n - 1) - j - s;
    if (i >= 0 && i < n) out[k++] = i;
  }
  return k;
}

}  // namespace dsg_ext
