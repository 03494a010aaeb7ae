// Calibration Gram matrices H = XᵀX, accumulated in fp64 on one triangle (SYRK).
//
// Conventions: row-major, contiguous; X holds n tokens of dimension d (n×d), H is d×d.
#pragma once
#include <cstdint>

namespace rocketkit {

/// H's upper triangle (diagonal included) += XᵀX; the strict lower triangle is not touched.
///
/// @param H  d×d fp64, updated in place (upper triangle).
/// @param X  n×d fp64 (n may be 0).
/// Uses OpenBLAS's current thread count. Throws std::invalid_argument on d < 1, n < 0 or sizes
/// that overflow a BLAS int.
void gram_accumulate(double* H, const double* X, int64_t n, int64_t d);

/// Copies H's upper triangle onto its lower one, so H is exactly symmetric.
/// @param H  d×d fp64, in place.
void gram_symmetrize(double* H, int64_t d);

}  // namespace rocketkit
