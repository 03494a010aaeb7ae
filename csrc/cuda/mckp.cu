// CUDA MCKP solver: the same plan as the CPU solver (validation, pruning, rounded-up costs
// and the LP bound run on a host copy of the small inputs), then one min-plus kernel launch
// per layer over the buckets, with uint8/uint16 back-pointers kept on the device.
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "rocketkit/build_info.h"
#include "rocketkit/check.h"
#include "rocketkit/cuda.h"

namespace rocketkit::cuda {
namespace {

constexpr const char* kFn = "solve_mckp";
constexpr int kThreads = 256;
constexpr int kChunk = 1024;  // candidates staged in shared memory at a time

#define ROCKETKIT_CUDA_OK(expr)                                                         \
  do {                                                                                  \
    const cudaError_t err_ = (expr);                                                    \
    if (err_ != cudaSuccess) ROCKETKIT_FAIL(kFn, #expr, ": ", cudaGetErrorString(err_)); \
  } while (0)

// Device buffer freed on scope exit (also when a later step throws).
template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  explicit DeviceArray(size_t n) {
    if (n) ROCKETKIT_CUDA_OK(cudaMalloc(&ptr, n * sizeof(T)));
  }
  ~DeviceArray() {
    if (ptr) cudaFree(ptr);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

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
    __syncthreads();
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
  }
}

template <typename BP>
void run(const detail::MckpPlan& plan, cudaStream_t stream, std::vector<double>& curve,
         std::vector<int32_t>& position) {
  const int64_t L = plan.num_layers, width = plan.buckets + 1;
  const size_t ncand = plan.cost.size();
  size_t free_bytes = 0, total_bytes = 0;
  ROCKETKIT_CUDA_OK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const double need = double(L) * double(width) * sizeof(BP) + 2.0 * double(width) * sizeof(double);
  ROCKETKIT_CHECK(need <= double(free_bytes), kFn, "buckets=", plan.buckets, " with ", L,
                  " layers needs ", int64_t(need / 1048576), " MiB on the GPU, only ",
                  free_bytes >> 20, " MiB free; use fewer buckets");

  DeviceArray<int32_t> cost(ncand);
  DeviceArray<double> err(ncand);
  DeviceArray<int64_t> layer_begin(L + 1);
  DeviceArray<double> rows(2 * size_t(width));
  DeviceArray<BP> bp(size_t(L) * size_t(width));
  DeviceArray<int32_t> pos(L);
  ROCKETKIT_CUDA_OK(cudaMemcpyAsync(cost.ptr, plan.cost.data(), ncand * sizeof(int32_t),
                                    cudaMemcpyHostToDevice, stream));
  ROCKETKIT_CUDA_OK(cudaMemcpyAsync(err.ptr, plan.err.data(), ncand * sizeof(double),
                                    cudaMemcpyHostToDevice, stream));
  ROCKETKIT_CUDA_OK(cudaMemcpyAsync(layer_begin.ptr, plan.layer_begin.data(),
                                    (L + 1) * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
  // Row 0 starts as "no layers chosen yet": error 0 (all-zero bytes) within any budget.
  ROCKETKIT_CUDA_OK(cudaMemsetAsync(rows.ptr, 0, size_t(width) * sizeof(double), stream));

  const unsigned blocks = unsigned((width + kThreads - 1) / kThreads);
  for (int64_t l = 0; l < L; ++l) {
    const double* prev = rows.ptr + (l & 1) * width;
    double* cur = rows.ptr + ((l + 1) & 1) * width;
    const int64_t c0 = plan.layer_begin[l];
    const int n = int(plan.layer_begin[l + 1] - c0);
    min_plus_layer<BP><<<blocks, kThreads, 0, stream>>>(prev, cur, bp.ptr + l * width,
                                                        cost.ptr + c0, err.ptr + c0, n, width);
  }
  ROCKETKIT_CUDA_OK(cudaGetLastError());
  curve.resize(width);
  ROCKETKIT_CUDA_OK(cudaMemcpyAsync(curve.data(), rows.ptr + (L & 1) * width,
                                    size_t(width) * sizeof(double), cudaMemcpyDeviceToHost, stream));
  ROCKETKIT_CUDA_OK(cudaStreamSynchronize(stream));

  walk_back<BP><<<1, 1, 0, stream>>>(bp.ptr, cost.ptr, layer_begin.ptr, L, width,
                                     detail::best_bucket(curve), pos.ptr);
  ROCKETKIT_CUDA_OK(cudaGetLastError());
  position.resize(L);
  ROCKETKIT_CUDA_OK(cudaMemcpyAsync(position.data(), pos.ptr, L * sizeof(int32_t),
                                    cudaMemcpyDeviceToHost, stream));
  ROCKETKIT_CUDA_OK(cudaStreamSynchronize(stream));
}

}  // namespace

MckpDeviceResult solve_mckp(const double* errors_dev, const int64_t* params_dev,
                            const int64_t* offsets, int64_t num_layers, int64_t budget,
                            int64_t buckets, void* stream) {
  detail::check_offsets(offsets, num_layers);
  ROCKETKIT_CHECK(errors_dev != nullptr && params_dev != nullptr, kFn, "errors or params is null");
  if (!has_cuda()) ROCKETKIT_FAIL(kFn, "no CUDA device is visible (driver missing or no GPU)");
  const auto s = static_cast<cudaStream_t>(stream);
  const size_t total = size_t(offsets[num_layers]);
  // The inputs are small (candidates, not buckets): plan on a host copy, as the CPU does.
  std::vector<double> errors(total);
  std::vector<int64_t> params(total);
  ROCKETKIT_CUDA_OK(cudaMemcpyAsync(errors.data(), errors_dev, total * sizeof(double),
                                    cudaMemcpyDefault, s));
  ROCKETKIT_CUDA_OK(cudaMemcpyAsync(params.data(), params_dev, total * sizeof(int64_t),
                                    cudaMemcpyDefault, s));
  ROCKETKIT_CUDA_OK(cudaStreamSynchronize(s));
  const detail::MckpPlan plan =
      detail::plan_mckp(errors.data(), params.data(), offsets, num_layers, budget, buckets);

  std::vector<double> curve;
  std::vector<int32_t> position;
  if (plan.backpointer_bytes == 1)
    run<uint8_t>(plan, s, curve, position);
  else
    run<uint16_t>(plan, s, curve, position);
  return detail::finish_mckp(plan, errors.data(), params.data(), offsets, std::move(curve),
                             position);
}

}  // namespace rocketkit::cuda
