// The column-sparse product of a factorized forward on the GPU, y = z·C (+ bias), with
// z = x·U computed beforehand by cuBLAS (torch's matmul) and C stored as s×d2 values/indices.
//
// A thread owns one output column j and kRows consecutive rows of y: for each t < s it reads
// idx[t, j] and val[t, j] once (coalesced across the warp, since row t of values/indices is
// contiguous over j) and gathers z[i, idx] for its rows (one row of z is k entries, held in
// L1/L2). fp32 accumulators; the index range check is one unsigned compare per nonzero.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "rocketkit/build_info.h"
#include "rocketkit/check.h"
#include "rocketkit/cuda.h"

namespace rocketkit::cuda {
namespace {

constexpr const char* kFn = "factorized_matmul";
constexpr int kCols = 128;  // threads per block, one output column each

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T, typename I, int kRows>
__global__ void __launch_bounds__(kCols)
    column_sparse_kernel(const T* __restrict__ z, int64_t n, int64_t k, const T* __restrict__ values,
                         const I* __restrict__ indices, int64_t s, int64_t d2, const T* __restrict__ bias,
                         T* __restrict__ y, int* __restrict__ bad_index, int64_t col_tiles, int64_t tiles) {
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t j = (tile % col_tiles) * kCols + threadIdx.x;
    const int64_t i0 = (tile / col_tiles) * kRows;
    if (j >= d2) continue;
    float acc[kRows];
#pragma unroll
    for (int q = 0; q < kRows; ++q) acc[q] = 0.f;
    bool bad = false;
    for (int64_t t = 0; t < s; ++t) {
      const int64_t idx = int64_t(indices[t * d2 + j]);
      const float v = to_float(values[t * d2 + j]);
      if (static_cast<uint64_t>(idx) >= static_cast<uint64_t>(k)) {
        bad = true;
        continue;
      }
#pragma unroll
      for (int q = 0; q < kRows; ++q)
        if (i0 + q < n) acc[q] = fmaf(to_float(z[(i0 + q) * k + idx]), v, acc[q]);
    }
    if (bad && bad_index) atomicExch(bad_index, 1);
    const float b = bias ? to_float(bias[j]) : 0.f;
#pragma unroll
    for (int q = 0; q < kRows; ++q)
      if (i0 + q < n) y[(i0 + q) * d2 + j] = from_float<T>(acc[q] + b);
  }
}

template <typename T, typename I, int kRows>
void launch(const void* z, int64_t n, int64_t k, const void* values, const void* indices, int64_t s,
            int64_t d2, const void* bias, void* y, int* bad, cudaStream_t st) {
  const int64_t col_tiles = (d2 + kCols - 1) / kCols;
  const int64_t tiles = col_tiles * ((n + kRows - 1) / kRows);
  const unsigned grid = unsigned(tiles < (1LL << 30) ? tiles : (1LL << 30));
  column_sparse_kernel<T, I, kRows><<<grid, kCols, 0, st>>>(
      static_cast<const T*>(z), n, k, static_cast<const T*>(values), static_cast<const I*>(indices), s, d2,
      static_cast<const T*>(bias), static_cast<T*>(y), bad, col_tiles, tiles);
}

template <typename T, typename I>
void launch_rows(const void* z, int64_t n, int64_t k, const void* values, const void* indices, int64_t s,
                 int64_t d2, const void* bias, void* y, int* bad, cudaStream_t st) {
  // Decode (n = 1) streams C once; larger batches reuse each nonzero for 8 rows.
  if (n == 1) launch<T, I, 1>(z, n, k, values, indices, s, d2, bias, y, bad, st);
  else if (n <= 4) launch<T, I, 4>(z, n, k, values, indices, s, d2, bias, y, bad, st);
  else launch<T, I, 8>(z, n, k, values, indices, s, d2, bias, y, bad, st);
}

template <typename T>
void launch_index(const void* z, int64_t n, int64_t k, const void* values, const void* indices, int index_bytes,
                  int64_t s, int64_t d2, const void* bias, void* y, int* bad, cudaStream_t st) {
  if (index_bytes == 2) launch_rows<T, int16_t>(z, n, k, values, indices, s, d2, bias, y, bad, st);
  else launch_rows<T, int32_t>(z, n, k, values, indices, s, d2, bias, y, bad, st);
}

}  // namespace

void column_sparse_matmul(const void* z_dev, int64_t n, int64_t k, const void* values_dev,
                          const void* indices_dev, int index_bytes, int64_t s, int64_t d2,
                          const void* bias_dev, void* y_dev, DType dtype, int* bad_index_dev,
                          void* stream) {
  if (!has_cuda()) ROCKETKIT_FAIL(kFn, "no CUDA device is visible (driver missing or no GPU)");
  ROCKETKIT_CHECK(n >= 0 && k >= 1 && s >= 1 && s <= k && d2 >= 1, kFn,
                  "need n >= 0, 1 <= s <= k and d2 >= 1, got n=", n, ", k=", k, ", s=", s, ", d2=", d2);
  ROCKETKIT_CHECK(index_bytes == 2 || index_bytes == 4, kFn, "indices must be int16 or int32");
  ROCKETKIT_CHECK(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16, kFn, "unknown dtype");
  if (n == 0) return;
  ROCKETKIT_CHECK(z_dev && values_dev && indices_dev && y_dev, kFn, "z, values, indices and y must not be null");
  // y's GPU is made current; the other buffers must be on it too (the Python layer checks
  // that on the tensors: one pointer query per call keeps the decode path cheap).
  detail::DeviceOf device(y_dev, "y", kFn);
  const auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::f32:
      launch_index<float>(z_dev, n, k, values_dev, indices_dev, index_bytes, s, d2, bias_dev, y_dev, bad_index_dev, st);
      break;
    case DType::bf16:
      launch_index<__nv_bfloat16>(z_dev, n, k, values_dev, indices_dev, index_bytes, s, d2, bias_dev, y_dev,
                                  bad_index_dev, st);
      break;
    case DType::f16:
      launch_index<__half>(z_dev, n, k, values_dev, indices_dev, index_bytes, s, d2, bias_dev, y_dev, bad_index_dev, st);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) ROCKETKIT_FAIL(kFn, "kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace rocketkit::cuda
