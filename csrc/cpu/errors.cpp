#include "rocketkit/errors.h"

#include "rocketkit/check.h"

namespace rocketkit {

void whitened_errors(const double*, const double*, int64_t, int64_t, const int64_t*, int64_t,
                     double*, double*, int) {
  ROCKETKIT_FAIL("whitened_errors", "not implemented yet");
}

void factorize(const double*, const double*, int64_t, int64_t, int64_t, int64_t, double*, double*,
               int32_t*, double*) {
  ROCKETKIT_FAIL("factorize", "not implemented yet");
}

}  // namespace rocketkit
