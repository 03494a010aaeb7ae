// Stubs for builds without the CUDA backend: same header, "not available" at call time.
#include "rocketkit/build_info.h"
#include "rocketkit/check.h"
#include "rocketkit/cuda.h"

namespace rocketkit {

bool cuda_compiled() { return false; }
bool has_cuda() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_device_name(int) { return ""; }

namespace cuda {

#define ROCKETKIT_NO_CUDA(fn) \
  ROCKETKIT_FAIL(fn, "rocketkit was built without CUDA (ROCKETKIT_ENABLE_CUDA=OFF or no nvcc found)")

ErrorsStats whitened_errors(const double*, const double*, int64_t, int64_t, const int64_t*, int64_t,
                            double*, double*, void*, const ErrorsOptions&) {
  ROCKETKIT_NO_CUDA("whitened_errors");
}

MckpDeviceResult solve_mckp(const double*, const int64_t*, const int64_t*, int64_t, int64_t,
                            int64_t, void*) {
  ROCKETKIT_NO_CUDA("solve_mckp");
}

void column_sparse_matmul(const void*, int64_t, int64_t, const void*, const void*, int, int64_t,
                          int64_t, const void*, void*, DType, int*, void*) {
  ROCKETKIT_NO_CUDA("factorized_matmul");
}

void set_cuda_library_dirs(const std::vector<std::string>&) {}

}  // namespace cuda
}  // namespace rocketkit
