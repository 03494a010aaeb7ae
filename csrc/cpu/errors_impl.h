// Internals shared by whitened_errors and factorize. Both go through these helpers, so the
// basis, the mask and the ridge that profiling measures are the ones factorize applies.
#pragma once
#include <cstdint>
#include <functional>
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
  std::vector<double> N;      ///< d2×nb: V·F (one-solve, nb = r), else [V·Σ | V·Rᵀ] (nb = 2r, keep_R)
  int64_t nb = 0;             ///< columns of N
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

/// The mask rule's order: for each column j of C = Σ·Vᵀ, the rows 0..kord−1 by |C_ij|
/// descending, ties to the lower row index (d2×kord, row j = column j's order), and its inverse
/// (pos[j·kord + i] = where row i sits in column j's order).
struct ColumnOrder {
  int64_t kord = 0;
  std::vector<int32_t> rows;
  std::vector<int32_t> pos;
};

/// Builds the order, columns split over `threads` threads.
ColumnOrder column_order(const LayerBasis& b, int64_t kord, int threads);

/// The mask rule for column j of candidate (k, s), k ≤ kord: the s rows of largest |C_ij| among
/// rows < k, ties to the lower row, written to `rows` in that order (not ascending).
inline void select_column(const ColumnOrder& order, int64_t j, int64_t k, int64_t s, int32_t* rows) {
  const int32_t* o = order.rows.data() + j * order.kord;
  for (int64_t p = 0, t = 0; t < s; ++p)
    if (o[p] < k) rows[t++] = o[p];
}

/// Mask of candidate (k, s) by select_column, for factorize: writes the dense masked C_m (k×d2,
/// zeros elsewhere) stored transposed (CmT, d2×k: row j is column j of C_m) and, if non-null,
/// values/indices (s×d2, rows ascending).
void select_mask(const LayerBasis& b, int64_t k, int64_t s, double* CmT, double* values,
                 int32_t* indices);

/// Y = C_m·V (k×r), C_m given as CmT (d2×k).
void coefficients_times_V(const LayerBasis& b, int64_t k, const double* Cm, double* Y);

/// L·Lᵀ = C_m C_mᵀ + εI in `L` (k×k row-major, lower). ε = 0 unless the plain Cholesky fails;
/// then ε = 1e-12·mean(diag G) (1e-12 if G = 0), ×10 until it succeeds. `scratch` k×k.
/// For s = k, G = Σ_k² exactly (C_k C_kᵀ = Σ_k V_kᵀV_k Σ_k). Returns ε; `relative` (may be
/// null) gets ε / mean(diag G), the scale-free figure that factorize reports.
double factor_gram(const LayerBasis& b, int64_t k, int64_t s, const double* Cm, double* L,
                   double* scratch, double* relative = nullptr);

/// L·Lᵀ = G + εI for a k×k row-major G (lower triangle read): ε = 0 unless the plain Cholesky
/// fails; then ε = 1e-12·mean(diag G) (1e-12 if G = 0), ×10 until it succeeds. Returns ε;
/// `relative` (may be null) gets ε / mean(diag G).
double cholesky_with_ridge(const double* G, int64_t k, double* L, double* relative = nullptr);

/// Buffers of errors_from_products, reused across candidates.
struct ProductScratch {
  std::vector<double> T, colsq;
};

/// Both relative errors of a candidate from its Cholesky factor L (k×k, of C_m C_mᵀ + εI) and
/// Z = C_m·N, k×nb with leading dimension ldz.
void errors_from_products(const LayerBasis& b, int64_t k, const double* L, double eps,
                          const double* Z, int64_t ldz, ProductScratch& w, double* e_w, double* e_o);

/// The errors of an unmasked candidate (s = k, σ_k > 0) from the spectrum tails; false when
/// the candidate needs the general path.
bool tail_errors(const LayerBasis& b, int64_t k, int64_t s, double* e_w, double* e_o);

/// Errors of every candidate (n×2 pairs (k, s), validated) on `threads` threads, each running
/// single-threaded BLAS. Candidates are grouped into fixed chains (independent of `threads`), so
/// results do not depend on the thread count; see errors_chain.cpp.
void profile_candidates(const LayerBasis& b, const int64_t* candidates, int64_t n, double* e_weight,
                        double* e_output, int threads);

/// profile_candidates for m layers on one pool of `threads` threads, for layers whose bases can
/// be built side by side: make_basis(l) (called on a pool thread; BLAS should be single-threaded)
/// gives layer l's basis, then its chains join a queue shared with the other layers. Layer l's
/// results are those of profile_candidates on the same basis.
void profile_layers(int64_t m, const std::function<LayerBasis(int64_t)>& make_basis,
                    const int64_t* const* candidates, const int64_t* n, double* const* e_weight,
                    double* const* e_output, int threads);

}  // namespace rocketkit::errors_detail
