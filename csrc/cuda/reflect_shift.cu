// reflect_shift on CUDA: one thread per output element, reading the shift from device memory (no host
// sync, so a CUDA graph captures it); the backward gathers each gradient element from its at most 3 x 3
// sources in the accumulation type (no atomics: deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../checks.h"
#include "../reflect_shift.h"

namespace dsg_ext {
namespace {

constexpr int kThreads = 256;

struct Geometry {
  int64_t n, c, h, w;
  bool channels_last;
  // (plane offset, i, j, channel offset) of a linear index in the tensor's memory order.
  __device__ __forceinline__ void split(int64_t idx, int64_t* base, int64_t* i, int64_t* j, int64_t* stride_i,
                                        int64_t* stride_j) const {
    if (channels_last) {  // [n][i][j][c]
      const int64_t ch = idx % c, pix = idx / c;
      *j = pix % w;
      *i = (pix / w) % h;
      *base = (pix / (w * h)) * h * w * c + ch;
      *stride_j = c;
      *stride_i = w * c;
    } else {  // [n c][i][j]
      *j = idx % w;
      *i = (idx / w) % h;
      *base = (idx / (w * h)) * h * w;
      *stride_j = 1;
      *stride_i = w;
    }
  }
};

template <typename scalar_t>
__global__ void shift_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const int64_t* shift,
                             Geometry G, int64_t numel) {
  const int64_t dy = clamp_shift(shift[0], G.h), dx = clamp_shift(shift[1], G.w);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < numel;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t base, i, j, si, sj;
    G.split(idx, &base, &i, &j, &si, &sj);
    out[idx] = x[base + reflect_index(i + dy, G.h) * si + reflect_index(j + dx, G.w) * sj];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void shift_backward_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ out, const int64_t* shift,
                                      Geometry G, int64_t numel) {
  const int64_t dy = clamp_shift(shift[0], G.h), dx = clamp_shift(shift[1], G.w);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < numel;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t base, i, j, si, sj;
    G.split(idx, &base, &i, &j, &si, &sj);
    int64_t rows[3], cols[3];
    const int nr = reflect_preimages(i, G.h, dy, rows), nc = reflect_preimages(j, G.w, dx, cols);
    acc_t sum = 0;
    for (int a = 0; a < nr; ++a)
      for (int b = 0; b < nc; ++b) sum += static_cast<acc_t>(g[base + rows[a] * si + cols[b] * sj]);
    out[idx] = static_cast<scalar_t>(sum);
  }
}

Geometry geometry_of(const ShiftInputs& in) {
  const auto s = in.x.sizes();
  return {s[0], s[1], s[2], s[3], in.channels_last};
}

int blocks_for(int64_t numel) {
  return static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, int64_t(1) << 20));
}

// Checks, allocates and calls launch(tag, in, out, numel, stream) with tag a null scalar_t pointer of the
// input's dtype: both directions differ only in their kernel.
template <typename Launch>
at::Tensor run(const char* op, const at::Tensor& t, const at::Tensor& shift, const Launch& launch) {
  const ShiftInputs in = check_reflect_shift_inputs(op, t, shift);
  const c10::cuda::CUDAGuard guard(t.device());
  at::Tensor out = empty_shift_output(in);
  const int64_t numel = in.x.numel();
  if (numel == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "reflect_shift_cuda", [&] {
    launch(static_cast<scalar_t*>(nullptr), in, out, numel, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor reflect_shift_cuda(const at::Tensor& x, const at::Tensor& shift) {
  return run("reflect_shift", x, shift, [](auto tag, const ShiftInputs& in, at::Tensor& out, int64_t numel,
                                          cudaStream_t stream) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    shift_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
        in.x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), in.shift.const_data_ptr<int64_t>(),
        geometry_of(in), numel);
  });
}

at::Tensor reflect_shift_backward_cuda(const at::Tensor& grad, const at::Tensor& shift) {
  return run("reflect_shift_backward", grad, shift, [](auto tag, const ShiftInputs& in, at::Tensor& out,
                                                      int64_t numel, cudaStream_t stream) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    shift_backward_kernel<scalar_t, acc_type<scalar_t>><<<blocks_for(numel), kThreads, 0, stream>>>(
        in.x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), in.shift.const_data_ptr<int64_t>(),
        geometry_of(in), numel);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dsg_ext, CUDA, m) {
  m.impl("reflect_shift", &reflect_shift_cuda);
  m.impl("reflect_shift_backward", &reflect_shift_backward_cuda);
}

}  // namespace dsg_ext
