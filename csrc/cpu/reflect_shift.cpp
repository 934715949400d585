// reflect_shift on the CPU: each output row is one contiguous copy of its source row (shifted by dx) plus
// |dx| reflected elements at one border; the backward gathers each gradient row from its (at most three)
// source rows into a row buffer in the accumulation type. Rows are W elements (NCHW, one plane per
// (n, c)) or W pixels of C channels (channels_last, one plane per n); work is split over rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../reflect_shift.h"

namespace dsg_ext {
namespace {

struct Rows {
  int64_t planes, h, w, e;  // e: elements per pixel of a row (1, or C for channels_last)
};

Rows rows_of(const ShiftInputs& in) {
  const auto s = in.x.sizes();
  return in.channels_last ? Rows{s[0], s[2], s[3], s[1]} : Rows{s[0] * s[1], s[2], s[3], 1};
}

template <typename F>
void for_rows(const Rows& R, const F& f) {
  const int64_t row = std::max<int64_t>(1, R.w * R.e);
  at::parallel_for(0, R.planes * R.h, std::max<int64_t>(1, 32768 / row), [&](int64_t r0, int64_t r1) { f(r0, r1); });
}

std::pair<int64_t, int64_t> shifts(const ShiftInputs& in, const Rows& R) {
  const int64_t* s = in.shift.const_data_ptr<int64_t>();
  return {clamp_shift(s[0], R.h), clamp_shift(s[1], R.w)};
}

// dst[j] = src[reflect(j + dx)] for the W pixels (of e elements) of one row.
template <typename scalar_t>
void shift_row(const scalar_t* src, scalar_t* dst, int64_t w, int64_t e, int64_t dx) {
  const int64_t lo = std::max<int64_t>(0, -dx), hi = std::min<int64_t>(w, w - dx);
  if (hi > lo) std::copy(src + (lo + dx) * e, src + (hi + dx) * e, dst + lo * e);
  const auto edge = [&](int64_t j) {
    const int64_t k = reflect_index(j + dx, w);
    std::copy(src + k * e, src + (k + 1) * e, dst + j * e);
  };
  for (int64_t j = 0; j < lo; ++j) edge(j);
  for (int64_t j = hi; j < w; ++j) edge(j);
}

// acc[reflect(j + dx)] += g[j] over one row.
template <typename scalar_t, typename acc_t>
void shift_row_adjoint(const scalar_t* __restrict__ g, acc_t* __restrict__ acc, int64_t w, int64_t e, int64_t dx) {
  const int64_t lo = std::max<int64_t>(0, -dx), hi = std::min<int64_t>(w, w - dx);
  if (hi > lo) {
    const scalar_t* gs = g + lo * e;
    acc_t* as = acc + (lo + dx) * e;
    const int64_t n = (hi - lo) * e;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) as[i] += static_cast<acc_t>(gs[i]);
  }
  const auto edge = [&](int64_t j) {
    const int64_t k = reflect_index(j + dx, w);
    for (int64_t i = 0; i < e; ++i) acc[k * e + i] += static_cast<acc_t>(g[j * e + i]);
  };
  for (int64_t j = 0; j < lo; ++j) edge(j);
  for (int64_t j = hi; j < w; ++j) edge(j);
}

template <typename acc_t, typename scalar_t>
void store_row(const acc_t* __restrict__ acc, scalar_t* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
}

// What both directions start from: the checked input, the output, its rows and the clamped shifts.
struct Prepared {
  ShiftInputs in;
  at::Tensor out;
  Rows R;
  int64_t dy = 0, dx = 0;
};

Prepared prepare(const char* op, const at::Tensor& t, const at::Tensor& shift) {
  Prepared p{check_reflect_shift_inputs(op, t, shift), {}, {}};
  p.out = empty_shift_output(p.in);
  p.R = rows_of(p.in);
  if (p.in.x.numel() > 0) std::tie(p.dy, p.dx) = shifts(p.in, p.R);
  return p;
}

at::Tensor reflect_shift_cpu(const at::Tensor& x, const at::Tensor& shift) {
  const auto [in, out, R, dy, dx] = prepare("reflect_shift", x, shift);
  if (in.x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "reflect_shift_cpu", [&] {
    const scalar_t* src = in.x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t row = R.w * R.e;
    for_rows(R, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = r / R.h, i = r % R.h;
        shift_row(src + (p * R.h + reflect_index(i + dy, R.h)) * row, dst + r * row, R.w, R.e, dx);
      }
    });
  });
  return out;
}

at::Tensor reflect_shift_backward_cpu(const at::Tensor& grad, const at::Tensor& shift) {
  const auto [in, out, R, dy, dx] = prepare("reflect_shift_backward", grad, shift);
  if (in.x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "reflect_shift_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* g = in.x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t row = R.w * R.e;
    for_rows(R, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc(row);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = r / R.h, j = r % R.h;
        int64_t src_rows[3];
        const int k = reflect_preimages(j, R.h, dy, src_rows);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int q = 0; q < k; ++q) shift_row_adjoint(g + (p * R.h + src_rows[q]) * row, acc.data(), R.w, R.e, dx);
        store_row(acc.data(), dst + r * row, row);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsg_ext, CPU, m) {
  m.impl("reflect_shift", &reflect_shift_cpu);
  m.impl("reflect_shift_backward", &reflect_shift_backward_cpu);
}

}  // namespace dsg_ext
