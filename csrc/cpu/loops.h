// Parallel loops over the [A][R][C][B] layout shared by the CPU kernels. Work is split into tasks
// whose boundaries depend on the shape only, and partial sums are merged in task order, so results
// are bitwise reproducible whatever the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace dsg_ext {
namespace cpu {

constexpr int64_t kGrain = 32768;

// Column mode is for B == 1 with several channels; everything else (B == 0 included) walks runs.
inline bool row_mode(const Layout& L) { return L.B != 1 || L.C == 1; }

// Calls f(offset, length, channel) on contiguous runs sharing one channel (row mode), or on rows of
// C channels with channel = -1 (column mode, B == 1: element i of the run has channel i).
template <typename F>
void for_each_run(const Layout& L, const F& f) {
  if (row_mode(L)) {
    const int64_t runs = L.A * L.R * L.C;
    const int64_t pieces = (L.B + kGrain - 1) / kGrain;  // long runs are split across threads
    if (runs * pieces == 0) return;
    at::parallel_for(0, runs * pieces, std::max<int64_t>(1, kGrain / std::max<int64_t>(L.B, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t run = i / pieces, piece = i % pieces;
        const int64_t b0 = piece * kGrain, b1 = std::min(L.B, b0 + kGrain);
        if (b1 > b0) f(run * L.B + b0, b1 - b0, run % L.C);
      }
    });
  } else {
    at::parallel_for(0, L.A * L.R, std::max<int64_t>(1, kGrain / L.C), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) f(i * L.C, L.C, int64_t(-1));
    });
  }
}

// Sum over [0, n) of values that fill(start, count, out_a, out_b) writes for a block of elements.
// gcc does not vectorise a simd-reduction loop whose body is as large as the AdaRound or learnable
// fake-quant element functions, so the element loop writes a small buffer and a second, trivial
// loop sums it.
template <typename acc_t, typename Fill>
Pair<double> blocked_sum(int64_t n, const Fill& fill) {
  constexpr int64_t kBlock = 256;
  acc_t buf_a[kBlock] = {}, buf_b[kBlock] = {};  // a fill may leave buf_b unused
  Pair<double> total;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(kBlock, n - start);
    fill(start, count, buf_a, buf_b);
    acc_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = 0; i < count; ++i) {
      a += buf_a[i];
      b += buf_b[i];
    }
    total += Pair<double>(a, b);
  }
  return total;
}

// Per-channel sums of two quantities (over A, R and B), in double, merged in a fixed order.
// run(offset, length, channel, acc) processes a contiguous run and adds its sums into acc:
//   row mode:    channel >= 0, the run has that channel, acc points to one Pair;
//   column mode: channel == -1, the run is a row of C channels, acc points to C Pairs.
// The callee keeps its parameters in locals and sums a run in registers, so the loop vectorises.
template <typename Run>
std::vector<Pair<double>> reduce_channels(const Layout& L, const Run& run) {
  std::vector<Pair<double>> sums(L.C);
  if (row_mode(L)) {
    const int64_t per_channel = L.A * L.R * L.B;
    const int64_t pieces = std::max<int64_t>(1, (per_channel + 4 * kGrain - 1) / (4 * kGrain));
    const int64_t piece_len = (per_channel + pieces - 1) / pieces;
    std::vector<Pair<double>> part(L.C * pieces);
    at::parallel_for(0, L.C * pieces, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / pieces;
        const int64_t e1 = std::min(per_channel, (t % pieces + 1) * piece_len);
        Pair<double> total;
        for (int64_t e = (t % pieces) * piece_len; e < e1;) {  // e indexes (a, r, b) inside channel c
          const int64_t ar = e / L.B, b = e % L.B;
          const int64_t n = std::min({L.B - b, e1 - e, kGrain});
          run((ar * L.C + c) * L.B + b, n, c, &total);
          e += n;
        }
        part[t] = total;
      }
    });
    for (int64_t c = 0; c < L.C; ++c)
      for (int64_t k = 0; k < pieces; ++k) sums[c] += part[c * pieces + k];
  } else {
    const int64_t rows = L.A * L.R;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, (rows + 255) / 256));
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    std::vector<Pair<double>> part(chunks * L.C);
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r1 = std::min(rows, (k + 1) * rows_per_chunk);
        for (int64_t r = k * rows_per_chunk; r < r1; ++r) run(r * L.C, L.C, int64_t(-1), &part[k * L.C]);
      }
    });
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = 0; c < L.C; ++c) sums[c] += part[k * L.C + c];
  }
  return sums;
}

}  // namespace cpu
}  // namespace dsg_ext
