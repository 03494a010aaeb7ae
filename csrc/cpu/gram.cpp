// Gram accumulation by SYRK: one triangle, half the flops of a GEMM of XᵀX.
#include "rocketkit/gram.h"

#include <algorithm>
#include <limits>

#include <cblas.h>

#include "rocketkit/check.h"

namespace rocketkit {

void gram_accumulate(double* H, const double* X, int64_t n, int64_t d) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  ROCKETKIT_CHECK(d >= 1 && d <= kIntMax, "gram_accumulate", "d must be in [1, ", kIntMax, "], got ", d);
  ROCKETKIT_CHECK(n >= 0 && n <= kIntMax, "gram_accumulate", "n must be in [0, ", kIntMax, "], got ", n);
  if (n == 0) return;
  // Row-major XᵀX with X n×d: Trans on a d-leading-dimension matrix.
  scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(d), int(n), 1.0, X, int(d), 1.0, H,
                    int(d));
}

void gram_symmetrize(double* H, int64_t d) {
  ROCKETKIT_CHECK(d >= 1, "gram_symmetrize", "d must be >= 1, got ", d);
  // Blocked transpose copy: the upper rows are read contiguously, the lower writes stay in cache.
  constexpr int64_t kTile = 64;
  for (int64_t i0 = 0; i0 < d; i0 += kTile)
    for (int64_t j0 = i0; j0 < d; j0 += kTile)
      for (int64_t i = i0; i < std::min(i0 + kTile, d); ++i)
        for (int64_t j = std::max(j0, i + 1); j < std::min(j0 + kTile, d); ++j) H[j * d + i] = H[i * d + j];
}

}  // namespace rocketkit
