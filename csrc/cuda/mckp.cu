// CUDA MCKP solver: the same plan as the CPU solver (validation, pruning, rounded-up costs
// and the LP bound run on a host copy of the small inputs, via detail::plan_mckp), then one
// min-plus kernel launch per layer over the buckets, with uint8/uint16 back-pointers kept on
// the device. Bit-identical to the CPU: each bucket takes the same candidates in the same
// (original index) order with the same strict "<", and fp64 sums are rounded alike. Only the
// final DP row (the curve, part of the result) and the chosen positions come back.
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "common.cuh"
#include "rocketkit/build_info.h"
#include "rocketkit/check.h"
#include "rocketkit/cuda.h"

namespace rocketkit::cuda {
namespace {

constexpr const char* kFn = "solve_mckp";
constexpr int kThreads = 256;
constexpr int kChunk = 1024;  // candidates staged in shared memory at a time

using detail::DeviceBuffer;

// cur[b] = min_c prev[b − cost_c] + err_c over the layer's candidates, which are in
// original index order; strict < keeps the lower index on ties, as on the CPU.
template <typename BP>
__global__ void min_plus_layer(const double* __restrict__ prev, double* __restrict__ cur,
                               BP* __restrict__ bp_row, const int32_t* __restrict__ cost,
                               const double* __restrict__ err, int n, int64_t width) {
  __shared__ int32_t s_cost[kChunk];
  __shared__ double s_err[kChunk];
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  double best = INFINITY;
  int arg = 0;
  for (int c0 = 0; c0 < n; c0 += kChunk) {
    const int m = min(kChunk, n - c0);
    __syncthreads();  // the previous chunk is no longer read
    for (int i = threadIdx.x; i < m; i += blockDim.x) {
      s_cost[i] = cost[c0 + i];
      s_err[i] = err[c0 + i];
    }
    __syncthreads();
    if (b < width) {
      for (int i = 0; i < m; ++i) {
        const int64_t w = s_cost[i];
        if (w <= b) {
          const double v = prev[b - w] + s_err[i];
          if (v < best) {
            best = v;
            arg = c0 + i;
          }
        }
      }
    }
  }
  if (b < width) {
    cur[b] = best;
    bp_row[b] = static_cast<BP>(arg);
  }
}

// Walks the back-pointers from `bucket` down through the layers (a few hundred steps).
template <typename BP>
__global__ void walk_back(const BP* __restrict__ bp, const int32_t* __restrict__ cost,
                          const int64_t* __restrict__ layer_begin, int64_t num_layers,
                          int64_t width, int64_t bucket, int32_t* __restrict__ position) {
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const int32_t c = bp[l * width + bucket];
    position[l] = c;
    bucket -= cost[layer_begin[l] + c];
    if (bucket < 0) bucket = 0;  // cannot happen (costs fit); finish_mckp re-checks the sum
  }
}

template <typename BP>
double run(const ::rocketkit::detail::MckpPlan& plan, cudaStream_t stream, std::vector<double>& curve,
           std::vector<int32_t>& position) {
  const int64_t L = plan.num_layers, width = plan.buckets + 1;
  const size_t ncand = plan.cost.size();
  size_t free_bytes = 0, total_bytes = 0;
  ROCKETKIT_CUDA_OK(kFn, cudaMemGetInfo(&free_bytes, &total_bytes));
  const double need = double(L) * double(width) * sizeof(BP) + 2.0 * double(width) * sizeof(double);
  ROCKETKIT_CHECK(need <= double(free_bytes), kFn, "buckets=", plan.buckets, " with ", L,
                  " layers needs ", int64_t(need / 1048576), " MiB on the GPU, only ",
                  free_bytes >> 20, " MiB free; use fewer buckets");

  DeviceBuffer<int32_t> cost(ncand, kFn);
  DeviceBuffer<double> err(ncand, kFn);
  DeviceBuffer<int64_t> layer_begin(size_t(L + 1), kFn);
  DeviceBuffer<double> rows(2 * size_t(width), kFn);
  DeviceBuffer<BP> bp(size_t(L) * size_t(width), kFn);
  DeviceBuffer<int32_t> pos(size_t(L), kFn);
  detail::Event t0(kFn, /*timing=*/true), t1(kFn, /*timing=*/true);

  ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(cost.get(), plan.cost.data(), ncand * sizeof(int32_t),
                                         cudaMemcpyHostToDevice, stream));
  ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(err.get(), plan.err.data(), ncand * sizeof(double),
                                         cudaMemcpyHostToDevice, stream));
  ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(layer_begin.get(), plan.layer_begin.data(),
                                         size_t(L + 1) * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
  // Row 0 starts as "no layers chosen yet": error 0 (all-zero bytes) within any budget.
  ROCKETKIT_CUDA_OK(kFn, cudaMemsetAsync(rows.get(), 0, size_t(width) * sizeof(double), stream));

  const unsigned blocks = unsigned((width + kThreads - 1) / kThreads);
  ROCKETKIT_CUDA_OK(kFn, cudaEventRecord(t0.get(), stream));
  for (int64_t l = 0; l < L; ++l) {
    const double* prev = rows.get() + (l & 1) * width;
    double* cur = rows.get() + ((l + 1) & 1) * width;
    const int64_t c0 = plan.layer_begin[l];
    const int n = int(plan.layer_begin[l + 1] - c0);
    min_plus_layer<BP><<<blocks, kThreads, 0, stream>>>(prev, cur, bp.get() + l * width,
                                                        cost.get() + c0, err.get() + c0, n, width);
  }
  ROCKETKIT_CUDA_OK(kFn, cudaEventRecord(t1.get(), stream));
  ROCKETKIT_CUDA_OK(kFn, cudaGetLastError());
  curve.resize(size_t(width));
  ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(curve.data(), rows.get() + (L & 1) * width,
                                         size_t(width) * sizeof(double), cudaMemcpyDeviceToHost, stream));
  ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(stream));
  float ms = 0;
  ROCKETKIT_CUDA_OK(kFn, cudaEventElapsedTime(&ms, t0.get(), t1.get()));

  walk_back<BP><<<1, 1, 0, stream>>>(bp.get(), cost.get(), layer_begin.get(), L, width,
                                     ::rocketkit::detail::best_bucket(curve), pos.get());
  ROCKETKIT_CUDA_OK(kFn, cudaGetLastError());
  position.resize(size_t(L));
  ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(position.data(), pos.get(), size_t(L) * sizeof(int32_t),
                                         cudaMemcpyDeviceToHost, stream));
  ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(stream));
  return double(ms);
}

}  // namespace

MckpDeviceResult solve_mckp(const double* errors_dev, const int64_t* params_dev,
                            const int64_t* offsets, int64_t num_layers, int64_t budget,
                            int64_t buckets, void* stream) {
  if (!has_cuda()) ROCKETKIT_FAIL(kFn, "no CUDA device is visible (driver missing or no GPU)");
  ::rocketkit::detail::check_offsets(offsets, num_layers);
  ROCKETKIT_CHECK(errors_dev != nullptr && params_dev != nullptr, kFn, "errors or params is null");
  detail::DeviceOf device(errors_dev, "errors", kFn);
  device.check_same(params_dev, "params", kFn);
  const auto s = static_cast<cudaStream_t>(stream);
  const size_t total = size_t(offsets[num_layers]);
  // The inputs are small (candidates, not buckets): plan on a host copy, as the CPU does.
  std::vector<double> errors(total);
  std::vector<int64_t> params(total);
  ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(errors.data(), errors_dev, total * sizeof(double),
                                         cudaMemcpyDeviceToHost, s));
  ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(params.data(), params_dev, total * sizeof(int64_t),
                                         cudaMemcpyDeviceToHost, s));
  ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(s));
  const ::rocketkit::detail::MckpPlan plan =
      ::rocketkit::detail::plan_mckp(errors.data(), params.data(), offsets, num_layers, budget, buckets);

  std::vector<double> curve;
  std::vector<int32_t> position;
  const double ms = plan.backpointer_bytes == 1 ? run<uint8_t>(plan, s, curve, position)
                                                : run<uint16_t>(plan, s, curve, position);
  MckpDeviceResult out;
  static_cast<MckpResult&>(out) = ::rocketkit::detail::finish_mckp(
      plan, errors.data(), params.data(), offsets, std::move(curve), position);
  out.dp_gpu_ms = ms;
  return out;
}

}  // namespace rocketkit::cuda
