#include "rocketkit/build_info.h"

#include <cblas.h>

#include "rocketkit/check.h"

// GCC defines __SANITIZE_ADDRESS__ under -fsanitize=address; Clang answers __has_feature.
#if defined(__SANITIZE_ADDRESS__)
#define ROCKETKIT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ROCKETKIT_ASAN 1
#endif
#endif

#ifndef ROCKETKIT_VERSION
#define ROCKETKIT_VERSION "dev"
#endif

namespace rocketkit {

std::string build_info_json() {
  const char* blas_cfg = scipy_openblas_get_config();
  return detail::concat(
      "{\"version\": \"", ROCKETKIT_VERSION, "\", \"compiler\": \"", __VERSION__,
      "\", \"cuda_compiled\": ", cuda_compiled() ? "true" : "false",
      ", \"blas\": \"", blas_cfg ? blas_cfg : "unknown", "\", \"sanitize\": ",
#if defined(ROCKETKIT_ASAN)
      "true",
#else
      "false",
#endif
      ", \"native_arch\": ",
#if defined(__AVX2__)
      "\"avx2\"",
#else
      "\"generic\"",
#endif
      "}");
}

}  // namespace rocketkit
