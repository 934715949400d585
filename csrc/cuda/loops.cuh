// CUDA loops over the [A][R][C][B] layout (see common.h), shared by every op:
//   apply  - calls op(i, ctx) on each element i; ctx = op.group(a, c) is computed once per thread
//   reduce - the same, summing the Pair op returns per group (a, c) into fixed-order partials,
//            then finalize_kernel sums each group's partials in double and calls fin(g, total).
// Row mode (B > 1 or C == 1): a block walks a contiguous run of B elements of one (a, r, c).
// Column mode (B == 1): 32 x 8 blocks, threadIdx.x over 32 channels (coalesced), threadIdx.y over rows.
// Vectorised: an op that declares kVec (elements per 16-byte access), vec_aligned() and apply_vec /
// reduce_vec takes 16-byte loads and stores where its pointers are 16-byte aligned: in column mode
// each thread walks kVec adjacent channels (C a multiple of kVec), in row mode kVec adjacent elements
// of a run (runs of at least kVec; unaligned heads and tails one at a time). DSG_EXT_CUDA_VEC
// switches them (see vec_switch).
// Partials are written, not atomically added, so every result is deterministic. All work runs on
// the current stream and nothing waits for the device.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "../common.h"

namespace dsg_ext {
namespace cuda {

constexpr int kRowThreads = 256;
constexpr int kColX = 32, kColY = 8;
constexpr int64_t kMaxGridY = 65535;

// Elements each thread walks per block: a block covers kRowThreads * work elements of a run (row
// mode), kColY * work rows of 32 channels (column mode) or 256 / tx * work rows of tx * kVec channels
// (vectorised column mode: work 16-byte accesses per thread and tensor). Defaults 16 (row) and 8
// (column: the settings measured in docs/results/log.md; vectorised: not yet measured).
// DSG_EXT_CUDA_WORK=N sets all three, read once per process: a tuning knob for bench/gpu_check.sh's
// sweep, not a user setting.
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

// A launch has at most 2^31 - 1 blocks along x; the kernels index one row (or channel tile) per
// block there, so a layout needing more is refused with a clear error instead of being cut short.
inline unsigned grid_x(int64_t blocks) {
  TORCH_CHECK(blocks <= int64_t{2147483647},
              std::string("dsg_ext CUDA kernels: this input needs ") + std::to_string(blocks) +
                  " thread blocks along the launch's x dimension (at most 2147483647): too many rows of "
                  "too few elements; split it along the batch dimension");
  return static_cast<unsigned>(blocks);
}

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

// ---- vectorised column mode ----------------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Through the uint4 load/store intrinsics, so that each access is one 128-bit instruction
// (ld.global.nc.v4 / st.global.wb.v4): a plain dereference lets the compiler split the store when the
// element math around it is scalarised. Loads go through the read-only path: no kernel here reads a
// tensor it writes.
template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  static_assert(sizeof(Vec<T, V>) == sizeof(uint4), "vector accesses are 16 bytes");
  const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p));
  Vec<T, V> v;
  std::memcpy(&v, &bits, sizeof(bits));
  return v;
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  uint4 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  __stwb(reinterpret_cast<uint4*>(p), bits);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// kVec of an op, 0 when it has none.
template <typename Op, typename = void>
struct VecWidth : std::integral_constant<int, 0> {};
template <typename Op>
struct VecWidth<Op, std::void_t<decltype(Op::kVec)>> : std::integral_constant<int, Op::kVec> {};

// Which 16-byte paths are on: both by default (checked on an H100, 2026-11-27: docs/results/log.md);
// DSG_EXT_CUDA_VEC=0 turns both off (the scalar kernels), =cols keeps only the channels_last one,
// =runs only the row-mode one -- for comparisons and as an escape hatch.
struct VecSwitch {
  bool columns, runs;
};
inline VecSwitch vec_switch() {
  static const VecSwitch on = [] {
    const char* env = std::getenv("DSG_EXT_CUDA_VEC");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "1") == 0) return VecSwitch{true, true};
    if (std::strcmp(env, "cols") == 0) return VecSwitch{true, false};
    if (std::strcmp(env, "runs") == 0) return VecSwitch{false, true};
    return VecSwitch{false, false};
  }();
  return on;
}

enum class VecMode { kNone, kColumns, kRuns };

// Which vector path an op takes on layout L: along channels (column mode, C a multiple of kVec) or
// along runs (row mode with runs of at least kVec elements: each chunk's unaligned head and tail
// elements go one at a time, the rest in 16-byte accesses).
template <typename Op>
VecMode vec_mode(const Layout& L, const Op& op) {
  constexpr int V = VecWidth<Op>::value;
  if constexpr (V > 1) {
    const VecSwitch on = vec_switch();
    if (!op.vec_aligned()) return VecMode::kNone;
    if (!row_mode(L)) return on.columns && L.C % V == 0 ? VecMode::kColumns : VecMode::kNone;
    return on.runs && L.B >= V ? VecMode::kRuns : VecMode::kNone;
  } else {
    return VecMode::kNone;
  }
}

// Row mode, vectorised: chunks of about kRowThreads * V * work elements per block.
inline RowGrid row_grid_vec(const Layout& L, int V) {
  if (L.B == 0) return {1, 0};
  const int64_t target = kRowThreads * V * (work_override() > 0 ? work_override() : 4);
  const int64_t nchunks = std::min<int64_t>(kMaxGridY, (L.B + target - 1) / target);
  return {(L.B + nchunks - 1) / nchunks, nchunks};
}

inline int row_threads(int64_t per_block) {
  return static_cast<int>(std::min<int64_t>(kRowThreads, ((per_block + 31) / 32) * 32));
}

struct VecGrid {
  int tx, ty;       // block: tx vector slots (V channels each) x ty rows
  int64_t rows;     // rows per block
  int64_t nchunks;  // blocks along R
  int64_t ctiles;   // blocks across the C / V slots
};

inline VecGrid vec_grid(const Layout& L, int V) {
  const int64_t slots = L.C / V;
  VecGrid g;
  g.tx = static_cast<int>(std::min<int64_t>(32, slots));
  g.ty = kRowThreads / g.tx;
  const int64_t per_thread = work_override() > 0 ? work_override() : 8;  // rows (16-byte accesses) per thread
  g.rows = std::max<int64_t>(g.ty * per_thread, (L.R + kMaxGridY - 1) / kMaxGridY);
  g.nchunks = (L.R + g.rows - 1) / g.rows;
  g.ctiles = (slots + g.tx - 1) / g.tx;
  return g;
}

template <int V, typename Op>
__global__ void col_apply_vec_kernel(Op op, Layout L, int64_t rows, int64_t ctiles) {
  const int64_t a = blockIdx.x / ctiles;
  const int64_t slot = (blockIdx.x % ctiles) * blockDim.x + threadIdx.x;
  if (slot * V >= L.C) return;
  const int64_t c0 = slot * V;
  decltype(op.group(0, 0)) ctx[V];
#pragma unroll
  for (int v = 0; v < V; ++v) ctx[v] = op.group(a, c0 + v);
  const int64_t r1 = min(L.R, (static_cast<int64_t>(blockIdx.y) + 1) * rows);
  for (int64_t r = blockIdx.y * rows + threadIdx.y; r < r1; r += blockDim.y) op.apply_vec((a * L.R + r) * L.C + c0, ctx);
}

// Dynamic shared memory: blockDim.x * blockDim.y * V pairs.
template <int V, typename acc_t, typename Op>
__global__ void col_reduce_vec_kernel(Op op, Layout L, int64_t rows, int64_t ctiles, Pair<acc_t>* partials) {
  extern __shared__ unsigned char smem_raw[];
  Pair<acc_t>* smem = reinterpret_cast<Pair<acc_t>*>(smem_raw);
  const int64_t a = blockIdx.x / ctiles;
  const int64_t slot = (blockIdx.x % ctiles) * blockDim.x + threadIdx.x;
  const int64_t c0 = slot * V;
  const bool active = c0 < L.C;
  Pair<acc_t> acc[V];
  if (active) {
    decltype(op.group(0, 0)) ctx[V];
#pragma unroll
    for (int v = 0; v < V; ++v) ctx[v] = op.group(a, c0 + v);
    const int64_t r1 = min(L.R, (static_cast<int64_t>(blockIdx.y) + 1) * rows);
    for (int64_t r = blockIdx.y * rows + threadIdx.y; r < r1; r += blockDim.y) op.reduce_vec((a * L.R + r) * L.C + c0, ctx, acc);
  }
#pragma unroll
  for (int v = 0; v < V; ++v) smem[(threadIdx.y * blockDim.x + threadIdx.x) * V + v] = acc[v];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      Pair<acc_t> total;
      for (int y = 0; y < static_cast<int>(blockDim.y); ++y) total += smem[(y * blockDim.x + threadIdx.x) * V + v];
      partials[(a * L.C + c0 + v) * gridDim.y + blockIdx.y] = total;
    }
  }
}

// The block's chunk [b0, b1) of run blockIdx.x: elements up to the first 16-byte boundary one at a
// time (head), then nvec vectors of V, then the tail. Every element of a run has the group's context,
// so the vector methods get V copies of it.
template <int V>
struct RunChunk {
  int64_t base, b0, b1, head_end, nvec;
  __device__ RunChunk(const Layout& L, int64_t chunk) {
    base = static_cast<int64_t>(blockIdx.x) * L.B;
    b0 = blockIdx.y * chunk;
    b1 = min(L.B, b0 + chunk);
    head_end = min(b1, b0 + (V - (base + b0) % V) % V);
    nvec = (b1 - head_end) / V;
  }
  __device__ int64_t tail() const { return head_end + nvec * V; }
};

template <int V, typename Op, typename Ctx>
__device__ __forceinline__ void run_contexts(const Op& op, const Layout& L, Ctx* ctx) {
  const int64_t run = blockIdx.x;
  ctx[0] = op.group(run / (L.R * L.C), run % L.C);
#pragma unroll
  for (int v = 1; v < V; ++v) ctx[v] = ctx[0];
}

template <int V, typename Op>
__global__ void row_apply_vec_kernel(Op op, Layout L, int64_t chunk) {
  decltype(op.group(0, 0)) ctx[V];
  run_contexts<V>(op, L, ctx);
  const RunChunk<V> k(L, chunk);
  for (int64_t b = k.b0 + threadIdx.x; b < k.head_end; b += blockDim.x) op(k.base + b, ctx[0]);
  for (int64_t j = threadIdx.x; j < k.nvec; j += blockDim.x) op.apply_vec(k.base + k.head_end + j * V, ctx);
  for (int64_t b = k.tail() + threadIdx.x; b < k.b1; b += blockDim.x) op(k.base + b, ctx[0]);
}

template <int V, typename acc_t, typename Op>
__global__ void row_reduce_vec_kernel(Op op, Layout L, int64_t chunk, int64_t nchunks, Pair<acc_t>* partials) {
  const int64_t run = blockIdx.x;
  const int64_t c = run % L.C, a = run / (L.R * L.C), r = (run / L.C) % L.R;
  decltype(op.group(0, 0)) ctx[V];
  run_contexts<V>(op, L, ctx);
  const RunChunk<V> k(L, chunk);
  Pair<acc_t> acc;
  for (int64_t b = k.b0 + threadIdx.x; b < k.head_end; b += blockDim.x) acc += op(k.base + b, ctx[0]);
  Pair<acc_t> accv[V];
  for (int64_t j = threadIdx.x; j < k.nvec; j += blockDim.x) op.reduce_vec(k.base + k.head_end + j * V, ctx, accv);
#pragma unroll
  for (int v = 0; v < V; ++v) acc += accv[v];
  for (int64_t b = k.tail() + threadIdx.x; b < k.b1; b += blockDim.x) acc += op(k.base + b, ctx[0]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[((a * L.C + c) * L.R + r) * nchunks + blockIdx.y] = acc;
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
  constexpr int V = VecWidth<Op>::value;
  const VecMode vm = vec_mode(L, op);
  if (vm != VecMode::kNone) {
    if constexpr (V > 1) {
      if (vm == VecMode::kColumns) {
        const VecGrid g = vec_grid(L, V);
        const dim3 grid(grid_x(L.A * g.ctiles), static_cast<unsigned>(g.nchunks));
        col_apply_vec_kernel<V><<<grid, dim3(g.tx, g.ty), 0, stream>>>(op, L, g.rows, g.ctiles);
      } else {
        const RowGrid g = row_grid_vec(L, V);
        const dim3 grid(grid_x(L.A * L.R * L.C), static_cast<unsigned>(g.nchunks));
        row_apply_vec_kernel<V><<<grid, row_threads((g.chunk + V - 1) / V), 0, stream>>>(op, L, g.chunk);
      }
    }
  } else if (row_mode(L)) {
    const RowGrid g = row_grid(L);
    const dim3 grid(grid_x(L.A * L.R * L.C), static_cast<unsigned>(g.nchunks));
    const int threads = row_threads(L.B);
    row_apply_kernel<<<grid, threads, 0, stream>>>(op, L, g.chunk);
  } else {
    const ColGrid g = col_grid(L);
    const dim3 grid(grid_x(L.A * g.ctiles), static_cast<unsigned>(g.nchunks));
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
  auto make_partials = [&](int64_t per_group) {
    return at::empty({std::max<int64_t>(G * per_group, 1) * 2}, like.options().dtype(acc_dtype));
  };
  int64_t per_group = 0;
  at::Tensor partials;
  constexpr int V = VecWidth<Op>::value;
  const VecMode vm = vec_mode(L, op);
  if (vm == VecMode::kRuns) {
    if constexpr (V > 1) {
      const RowGrid g = row_grid_vec(L, V);
      per_group = L.R * g.nchunks;
      partials = make_partials(per_group);
      if (L.numel() > 0) {
        const dim3 grid(grid_x(L.A * L.R * L.C), static_cast<unsigned>(g.nchunks));
        row_reduce_vec_kernel<V, acc_t><<<grid, row_threads((g.chunk + V - 1) / V), 0, stream>>>(
            op, L, g.chunk, g.nchunks, reinterpret_cast<Pair<acc_t>*>(partials.data_ptr()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  } else if (vm == VecMode::kColumns) {
    if constexpr (V > 1) {
      const VecGrid g = vec_grid(L, V);
      per_group = L.numel() > 0 ? g.nchunks : 0;
      partials = make_partials(per_group);
      if (L.numel() > 0) {
        const dim3 grid(grid_x(L.A * g.ctiles), static_cast<unsigned>(g.nchunks));
        const size_t smem = static_cast<size_t>(g.tx) * g.ty * V * sizeof(Pair<acc_t>);
        col_reduce_vec_kernel<V, acc_t><<<grid, dim3(g.tx, g.ty), smem, stream>>>(
            op, L, g.rows, g.ctiles, reinterpret_cast<Pair<acc_t>*>(partials.data_ptr()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  } else if (row_mode(L)) {
    const RowGrid g = row_grid(L);
    per_group = L.R * g.nchunks;
    partials = make_partials(per_group);
    if (L.numel() > 0) {
      const dim3 grid(grid_x(L.A * L.R * L.C), static_cast<unsigned>(g.nchunks));
      const int threads = row_threads(L.B);
      row_reduce_kernel<acc_t><<<grid, threads, 0, stream>>>(
          op, L, g.chunk, g.nchunks, reinterpret_cast<Pair<acc_t>*>(partials.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    const ColGrid g = col_grid(L);
    per_group = L.numel() > 0 ? g.nchunks : 0;
    partials = make_partials(per_group);
    if (L.numel() > 0) {
      const dim3 grid(grid_x(L.A * g.ctiles), static_cast<unsigned>(g.nchunks));
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
