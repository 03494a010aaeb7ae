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

void whitened_errors(const double*, const double*, int64_t, int64_t, const int64_t*, int64_t,
                     double*, double*, void*) {
  ROCKETKIT_FAIL("whitened_errors", "rocketkit was built without CUDA (ROCKETKIT_ENABLE_CUDA=OFF or no nvcc found)");
}

MckpDeviceResult solve_mckp(const double*, const int64_t*, const int64_t*, int64_t, int64_t,
                            int64_t, void*) {
  ROCKETKIT_FAIL("solve_mckp", "rocketkit was built without CUDA (ROCKETKIT_ENABLE_CUDA=OFF or no nvcc found)");
}

}  // namespace cuda
}  // namespace rocketkit
