// Internals shared by whitened_errors and factorize. Both go through these helpers, so the
// basis, the mask and the ridge that profiling measures are the ones factorize applies.
#pragma once
#include <cstdint>
#include <vector>

namespace rocketkit::errors_detail {

/// Per-layer precompute: W_L = S·W = U Σ Vᵀ (thin SVD, r = min(d1, d2)).
struct LayerBasis {
  int64_t d1 = 0, d2 = 0, r = 0;
  std::vector<double> sigma;  ///< r, descending
  std::vector<double> Vt;     ///< r×d2: row i is v_i, so C_k = Σ_k·Vt[:k]
  std::vector<double> U;      ///< d1×r left singular vectors (only when keep_U)
  std::vector<double> R;      ///< r×r upper: QR of W·V (fallback path); ‖L⁻¹Y Rᵀ‖ = ‖L⁻¹ C Wᵀ‖
  /// One-solve path (when A = Σ²/‖W_L‖² + MᵀM/‖W‖², M = W·V, is well conditioned):
  /// A = F Fᵀ and Σ²/‖W_L‖² = F Θ Fᵀ, so with T = L⁻¹ C_m (V F) the captured energies are
  /// Σ_c θ_c‖t_c‖² (output) and Σ_c (1−θ_c)‖t_c‖² (weight), both relative.
  bool one_solve = false;
  std::vector<double> N;      ///< d2×r: V·F
  std::vector<double> theta;  ///< r, in [0, 1]
  double norm_WL2 = 0;        ///< Σ σ_i²
  double norm_W2 = 0;         ///< ‖W‖_F²
  std::vector<double> tail_o; ///< r+1: tail_o[k] = Σ_{i≥k} σ_i²  (s = k errors)
  std::vector<double> tail_w; ///< r+1: tail_w[k] = Σ_{i≥k} ‖W v_i‖² (only when keep_R)
};

/// Builds the basis; W, S already validated. Uses OpenBLAS's current thread count.
LayerBasis build_layer_basis(const double* W, const double* S, int64_t d1, int64_t d2, bool keep_U,
                             bool keep_R);

/// Y = C_m·B for a d2×r row-major B (V, or N of the one-solve path).
void coefficients_times(const LayerBasis& b, int64_t k, const double* CmT, const double* B, double* Y);

/// Mask of candidate (k, s): in column j of C_k = Σ_k V_kᵀ keep the s entries of largest
/// |C_ij|, ties to the lower row index. Writes the dense masked C_m (k×d2, zeros elsewhere)
/// and, if non-null, values/indices (s×d2, rows ascending). C_m is stored transposed
/// (CmT, d2×k: row j is column j of C_m). `scratch` grows to 2k.
void select_mask(const LayerBasis& b, int64_t k, int64_t s, double* CmT, double* values,
                 int32_t* indices, std::vector<double>& scratch);

/// Y = C_m·V (k×r), C_m given as CmT (d2×k).
void coefficients_times_V(const LayerBasis& b, int64_t k, const double* Cm, double* Y);

/// L·Lᵀ = C_m C_mᵀ + εI in `L` (k×k row-major, lower). ε = 0 unless the plain Cholesky fails;
/// then ε = 1e-12·mean(diag G) (1e-12 if G = 0), ×10 until it succeeds. `scratch` k×k.
/// For s = k, G = Σ_k² exactly (C_k C_kᵀ = Σ_k V_kᵀV_k Σ_k). Returns ε; `relative` (may be
/// null) gets ε / mean(diag G), the scale-free figure that factorize reports.
double factor_gram(const LayerBasis& b, int64_t k, int64_t s, const double* Cm, double* L,
                   double* scratch, double* relative = nullptr);

}  // namespace rocketkit::errors_detail
