// Batched whitened reconstruction errors for all candidates of one layer, and the
// factorization that rocketkit applies for a candidate. Both share one code path
// (basis, mask rule, dictionary refit), so a profiled error is the applied error.
//
// Conventions: a layer computes y = x·W with W ∈ R^{d1×d2} (d1 = in, d2 = out),
// every matrix is row-major and contiguous, H = XᵀX = SᵀS with S upper triangular.
//
// The factorization of candidate (k, s), W_L = S·W = U Σ Vᵀ (thin SVD, r = min(d1, d2)):
//  - basis D = U_k, coefficients C_k = DᵀW_L = Σ_k V_kᵀ (k×d2);
//  - mask: in each column j of C_k keep the s entries with the largest |C_ij|; equal
//    magnitudes go to the lower row index i. C_m is C_k with the rest set to zero;
//  - dictionary refit by least squares: D* = W_L C_mᵀ (G + εI)⁻¹, G = C_m C_mᵀ (for s = k,
//    G = Σ_k², its exact value). ε = 0 when the Cholesky of G succeeds. Otherwise (an atom
//    never selected, a zero singular value) ε = 1e-12·mean(diag G) (1e-12 if G = 0), grown
//    ×10 until the Cholesky succeeds; factorize reports it and the errors include its effect;
//  - W and S far from unit scale (max entry beyond 2^±64) are first rescaled by powers of two,
//    which changes neither relative error, so tiny, huge and denormal layers stay finite;
//  - Ŵ = S⁻¹ D* C_m, stored as U = S⁻¹D* (triangular solve) and the s kept entries of C.
// Profiling and factorize share one implementation of the basis, mask and ridge.
#pragma once
#include <cstdint>

namespace rocketkit {

/// Relative errors of every candidate (k, s) of one layer.
///
/// @param W           d1×d2 weight (fp64, finite).
/// @param S           d1×d1 upper Cholesky factor of H (lower triangle ignored; diagonal > 0).
/// @param candidates  n×2 pairs (k, s): rank k with 1 ≤ k ≤ min(d1, d2), nonzeros per column 1 ≤ s ≤ k.
/// @param e_weight    out, n: ‖W − Ŵ‖_F / ‖W‖_F.
/// @param e_output    out, n: ‖S(W − Ŵ)‖_F / ‖SW‖_F  (= ‖XW − XŴ‖_F / ‖XW‖_F).
/// @param num_threads 0 = all hardware threads; candidates run in parallel, each with
///                    single-threaded BLAS (the per-layer SVD uses OpenBLAS's own setting).
/// A zero W gives e = 0 for every candidate. Errors come from trace identities (no d1×d2
/// reconstruction per candidate) and match a direct reconstruction to ~1e-12.
/// Throws std::invalid_argument on bad input (before any output is written: shapes, overflow,
/// non-finite W or upper S, diagonal of S ≤ 0, k or s out of range), std::runtime_error if
/// LAPACK fails.
void whitened_errors(const double* W, const double* S, int64_t d1, int64_t d2,
                     const int64_t* candidates, int64_t n, double* e_weight, double* e_output,
                     int num_threads = 0);

/// whitened_errors for m layers on one pool: layer l has W[l] (d1[l]×d2[l]), S[l] (d1[l]×d1[l];
/// layers of one input Gram may pass the same pointer), candidates[l] (n[l]×2) and outputs
/// e_weight[l], e_output[l] (n[l] each). Each layer's basis runs single-threaded BLAS on one of
/// num_threads threads, side by side with the other layers' bases and candidates, so no core
/// idles through a serial SVD. Errors equal per-layer whitened_errors calls to rounding (~1e-13:
/// there the basis uses OpenBLAS's own threading) and do not depend on num_threads. Bases are
/// built before the chains start and each is freed after its layer's last chain, so memory peaks
/// near all m bases at once. Every layer is validated before any output is written; throws as
/// whitened_errors.
void whitened_errors_layers(int64_t m, const double* const* W, const double* const* S, const int64_t* d1,
                            const int64_t* d2, const int64_t* const* candidates, const int64_t* n,
                            double* const* e_weight, double* const* e_output, int num_threads = 0);

/// The factorization Ŵ = U·C applied for candidate (k, s) (rules at the top of this file).
///
/// @param W, S     as for whitened_errors; 1 ≤ s ≤ k ≤ min(d1, d2).
/// @param U        out, d1×k dense: S⁻¹·D*, D* the least-squares dictionary.
/// @param values   out, s×d2: the kept entries of C, column j in values[:, j].
/// @param indices  out, s×d2: their row indices in [0, k), ascending within each column.
/// @param ridge    out (may be null): the ridge added to CCᵀ relative to mean(diag CCᵀ), so
///                 1e-12·10^j (0 unless CCᵀ was singular).
/// The split of Ŵ between U and C is balanced by a power of two (exact): max|U| and max|C| are
/// within a factor 4 of each other, so neither overflows and both survive fp16/bf16 storage.
void factorize(const double* W, const double* S, int64_t d1, int64_t d2, int64_t k, int64_t s,
               double* U, double* values, int32_t* indices, double* ridge);

}  // namespace rocketkit
