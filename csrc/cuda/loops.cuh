// CUDA loops over the [A][R][C][B] layout (see common.h), shared by every op:
//   apply  - calls op(i, ctx) on each element i; ctx = op.group(a, c) is computed once per thread
//   reduce - the same, summing the Pair op returns per group (a, c) into fixed-order partials,
//            then finalize_kernel sums each group's partials in double and calls fin(g, total).
// Row mode (B > 1 or C == 1): a block walks a contiguous run of B elements of one (a, r, c).
// Column mode (B == 1): 32 x 8 blocks, threadIdx.x over 32 channels (coalesced), threadIdx.y over rows.
// Partials are written, not atomically added, so every result is deterministic. All work runs on
// the current stream and nothing waits for the device.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>

#include "../common.h"

namespace dsg_ext {
namespace cuda {

constexpr int kRowThreads = 256;
constexpr int kColX = 32, kColY = 8;
constexpr int64_t kMaxGridY = 65535;

// Elements each thread walks per block: a block covers kRowThreads * work elements of a run (row
// mode) or kColY * work rows of 32 channels (column mode). Default 16 (row) and 8 (column), the
// settings measured in bench/RESULTS.md. DSG_EXT_CUDA_WORK=N sets both, read once per process: a
// tuning knob for bench/gpu_check.sh's sweep, not a user setting.
inline int64_t work_override() {
  static const int64_t value = [] {
    const char* env = std::getenv("DSG_EXT_CUDA_WORK");
    const long v = env != nullptr ? std::strtol(env, nullptr, 10) : 0;
    return static_cast<int64_t>(v >= 1 && v <= 1024 ? v : 0);
  }();
  return value;
}
inline int64_t row_chunk() { return kRowThreads * (work_override() > 0 ? work_override() : 16); }
inline int64_t col_rows() { return kColY * (work_override() > 0 ? work_override() : 8); }

// Column mode is for B == 1 with several channels; everything else (B == 0 included) walks runs.
inline bool row_mode(const Layout& L) { return L.B != 1 || L.C == 1; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a 1-D block; the result is valid in thread 0.
template <typename T>
__device__ __forceinline__ Pair<T> block_sum(Pair<T> v) {
  __shared__ T sa[32];
  __shared__ T sb[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v.a = warp_sum(v.a);
  v.b = warp_sum(v.b);
  __syncthreads();  // the shared arrays may still be read by a previous call
  if (lane == 0) {
    sa[warp] = v.a;
    sb[warp] = v.b;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) / 32;
    v = lane < warps ? Pair<T>(sa[lane], sb[lane]) : Pair<T>();
    v.a = warp_sum(v.a);
    v.b = warp_sum(v.b);
  }
  return v;
}

struct RowGrid {
  int64_t chunk;    // elements per block along B
  int64_t nchunks;  // blocks per run
};

// Runs are cut into equal chunks of about row_chunk() elements (12544 -> 4 x 3136, not 3 x 4096 + 256).
inline RowGrid row_grid(const Layout& L) {
  if (L.B == 0) return {1, 0};
  const int64_t chunk = row_chunk();
  const int64_t nchunks = std::min<int64_t>(kMaxGridY, (L.B + chunk - 1) / chunk);
  return {(L.B + nchunks - 1) / nchunks, nchunks};
}

struct ColGrid {
  int64_t rows;     // rows per block
  int64_t nchunks;  // blocks along R
  int64_t ctiles;   // 32-channel tiles
};

inline ColGrid col_grid(const Layout& L) {
  const int64_t rows = std::max<int64_t>(col_rows(), (L.R + kMaxGridY - 1) / kMaxGridY);
  return {rows, (L.R + rows - 1) / rows, (L.C + kColX - 1) / kColX};
}

template <typename Op>
__global__ void row_apply_kernel(Op op, Layout L, int64_t chunk) {
  const int64_t run = blockIdx.x;
  const int64_t c = run % L.C, a = run / (L.R * L.C);
  const auto ctx = op.group(a, c);
  const int64_t b1 = min(L.B, (static_cast<int64_t>(blockIdx.y) + 1) * chunk);
  for (int64_t b = blockIdx.y * chunk + threadIdx.x; b < b1; b += blockDim.x) op(run * L.B + b, ctx);
}

template <typename Op>
__global__ void col_apply_kernel(Op op, Layout L, int64_t rows, int64_t ctiles) {
  const int64_t a = blockIdx.x / ctiles;
  const int64_t c = (blockIdx.x % ctiles) * kColX + threadIdx.x;
  if (c >= L.C) return;
  const auto ctx = op.group(a, c);
  const int64_t r1 = min(L.R, (static_cast<int64_t>(blockIdx.y) + 1) * rows);
  for (int64_t r = blockIdx.y * rows + threadIdx.y; r < r1; r += kColY) op((a * L.R + r) * L.C + c, ctx);
}

template <typename acc_t, typename Op>
__global__ void row_reduce_kernel(Op op, Layout L, int64_t chunk, int64_t nchunks, Pair<acc_t>* partials) {
  const int64_t run = blockIdx.x;
  const int64_t c = run % L.C, a = run / (L.R * L.C), r = (run / L.C) % L.R;
  const auto ctx = op.group(a, c);
  const int64_t b1 = min(L.B, (static_cast<int64_t>(blockIdx.y) + 1) * chunk);
  Pair<acc_t> acc;
  for (int64_t b = blockIdx.y * chunk + threadIdx.x; b < b1; b += blockDim.x) acc += op(run * L.B + b, ctx);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[((a * L.C + c) * L.R + r) * nchunks + blockIdx.y] = acc;
}

template <typename acc_t, typename Op>
__global__ void col_reduce_kernel(Op op, Layout L, int64_t rows, int64_t ctiles, Pair<acc_t>* partials) {
  __shared__ acc_t sa[kColY][kColX + 1];
  __shared__ acc_t sb[kColY][kColX + 1];
  const int64_t a = blockIdx.x / ctiles;
  const int64_t c = (blockIdx.x % ctiles) * kColX + threadIdx.x;
  Pair<acc_t> acc;
  if (c < L.C) {
    const auto ctx = op.group(a, c);
    const int64_t r1 = min(L.R, (static_cast<int64_t>(blockIdx.y) + 1) * rows);
    for (int64_t r = blockIdx.y * rows + threadIdx.y; r < r1; r += kColY) acc += op((a * L.R + r) * L.C + c, ctx);
  }
  sa[threadIdx.y][threadIdx.x] = acc.a;
  sb[threadIdx.y][threadIdx.x] = acc.b;
  __syncthreads();
  if (threadIdx.y == 0 && c < L.C) {
    Pair<acc_t> total;
#pragma unroll
    for (int y = 0; y < kColY; ++y) total += Pair<acc_t>(sa[y][threadIdx.x], sb[y][threadIdx.x]);
    partials[(a * L.C + c) * gridDim.y + blockIdx.y] = total;
  }
}

template <typename acc_t, typename Fin>
__global__ void finalize_kernel(const Pair<acc_t>* partials, int64_t per_group, Fin fin) {
  const int64_t g = blockIdx.x;
  Pair<double> acc;
  for (int64_t p = threadIdx.x; p < per_group; p += blockDim.x) {
    const Pair<acc_t> v = partials[g * per_group + p];
    acc += Pair<double>(v.a, v.b);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) fin(g, acc);
}

template <typename Op>
void apply(const Layout& L, const Op& op) {
  if (L.numel() == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (row_mode(L)) {
    const RowGrid g = row_grid(L);
    const dim3 grid(static_cast<unsigned>(L.A * L.R * L.C), static_cast<unsigned>(g.nchunks));
    const int threads = static_cast<int>(std::min<int64_t>(kRowThreads, ((L.B + 31) / 32) * 32));
    row_apply_kernel<<<grid, threads, 0, stream>>>(op, L, g.chunk);
  } else {
    const ColGrid g = col_grid(L);
    const dim3 grid(static_cast<unsigned>(L.A * g.ctiles), static_cast<unsigned>(g.nchunks));
    col_apply_kernel<<<grid, dim3(kColX, kColY), 0, stream>>>(op, L, g.rows, g.ctiles);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Reduces per group (a, c) and calls fin(g, Pair<double> total) once per group, g = a * C + c.
// Groups with no elements get a zero total.
template <typename acc_t, typename Op, typename Fin>
void reduce(const Layout& L, const Op& op, const Fin& fin, const at::Tensor& like) {
  const int64_t G = L.groups();
  if (G == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  int64_t per_group = 0;
  at::Tensor partials;
  if (row_mode(L)) {
    const RowGrid g = row_grid(L);
    per_group = L.R * g.nchunks;
    partials = at::empty({std::max<int64_t>(G * per_group, 1) * 2}, like.options().dtype(acc_dtype));
    if (L.numel() > 0) {
      const dim3 grid(static_cast<unsigned>(L.A * L.R * L.C), static_cast<unsigned>(g.nchunks));
      const int threads = static_cast<int>(std::min<int64_t>(kRowThreads, ((L.B + 31) / 32) * 32));
      row_reduce_kernel<acc_t><<<grid, threads, 0, stream>>>(
          op, L, g.chunk, g.nchunks, reinterpret_cast<Pair<acc_t>*>(partials.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    const ColGrid g = col_grid(L);
    per_group = L.numel() > 0 ? g.nchunks : 0;
    partials = at::empty({std::max<int64_t>(G * per_group, 1) * 2}, like.options().dtype(acc_dtype));
    if (L.numel() > 0) {
      const dim3 grid(static_cast<unsigned>(L.A * g.ctiles), static_cast<unsigned>(g.nchunks));
      col_reduce_kernel<acc_t><<<grid, dim3(kColX, kColY), 0, stream>>>(
          op, L, g.rows, g.ctiles, reinterpret_cast<Pair<acc_t>*>(partials.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  finalize_kernel<acc_t><<<static_cast<unsigned>(G), kRowThreads, 0, stream>>>(
      reinterpret_cast<const Pair<acc_t>*>(partials.data_ptr()), per_group, fin);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace dsg_ext
