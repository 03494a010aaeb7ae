#include "rocketkit/mckp.h"

#include "rocketkit/check.h"

namespace rocketkit {

MckpResult solve_mckp(const double*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t,
                      int) {
  ROCKETKIT_FAIL("solve_mckp", "not implemented yet");
}

}  // namespace rocketkit
