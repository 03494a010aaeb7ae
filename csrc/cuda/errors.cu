#include "rocketkit/check.h"
#include "rocketkit/cuda.h"

namespace rocketkit::cuda {

void whitened_errors(const double*, const double*, int64_t, int64_t, const int64_t*, int64_t,
                     double*, double*, void*) {
  ROCKETKIT_FAIL("whitened_errors", "the CUDA errors kernel is not implemented yet");
}

}  // namespace rocketkit::cuda
