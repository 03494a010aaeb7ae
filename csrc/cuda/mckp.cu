#include "rocketkit/check.h"
#include "rocketkit/cuda.h"

namespace rocketkit::cuda {

MckpDeviceResult solve_mckp(const double*, const int64_t*, const int64_t*, int64_t, int64_t,
                            int64_t, void*) {
  ROCKETKIT_FAIL("solve_mckp", "the CUDA MCKP solver is not implemented yet");
}

}  // namespace rocketkit::cuda
