// Batched whitened errors (DESIGN.md §2) and the factorization they describe.
//
// Per layer once: W_L = S·W, thin SVD W_L = U Σ Vᵀ, and R from W·V = Q R. Per candidate the
// captured energies are ‖L⁻¹ Y Σ‖² (output) and ‖L⁻¹ Y Rᵀ‖² (weight) with Y = C_m V and
// L Lᵀ = C_m C_mᵀ (+ εI): every product works on r = min(d1, d2) columns, nothing d1×d2 is
// rebuilt and S⁻¹ is never formed.
#include "rocketkit/errors.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include <cblas.h>
#include <lapacke.h>

#include "errors_impl.h"
#include "rocketkit/check.h"

namespace rocketkit {
namespace errors_detail {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

double sum_squares(const double* a, int64_t n) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * a[i];
  return acc;
}

// Sum of squares of the first `cols` entries of each of `rows` rows with leading dimension ld.
double block_sum_squares(const double* a, int64_t rows, int64_t cols, int64_t ld) {
  double acc = 0;
  for (int64_t i = 0; i < rows; ++i) acc += sum_squares(a + i * ld, cols);
  return acc;
}

}  // namespace

LayerBasis build_layer_basis(const double* W, const double* S, int64_t d1, int64_t d2, bool keep_U,
                             bool keep_R) {
  LayerBasis b;
  b.d1 = d1;
  b.d2 = d2;
  b.r = std::min(d1, d2);
  const int64_t r = b.r;
  b.norm_W2 = sum_squares(W, d1 * d2);

  std::vector<double> WL(W, W + d1 * d2);
  scipy_cblas_dtrmm(CblasRowMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, int(d1), int(d2),
              1.0, S, int(d1), WL.data(), int(d2));

  // Row-major W_L (d1×d2) is column-major W_Lᵀ = V Σ Uᵀ: LAPACK's "U" (d2×r, col-major) is Vᵀ
  // row-major and its "VT" (r×d1, col-major) is U row-major.
  b.sigma.assign(r, 0.0);
  std::vector<double> Vt(r * d2), Ubuf(d1 * r);
  const lapack_int info =
      scipy_LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'S', lapack_int(d2), lapack_int(d1), WL.data(),
                     lapack_int(d2), b.sigma.data(), Vt.data(), lapack_int(d2), Ubuf.data(),
                     lapack_int(r));
  if (info != 0) ROCKETKIT_FAIL("whitened_errors", "SVD of S·W failed (dgesdd info ", info, ")");
  WL.clear();
  WL.shrink_to_fit();
  if (keep_U) b.U = std::move(Ubuf);

  // V row-major (d2×r) so that column j of C_k = Σ_k V_kᵀ is contiguous: C_ij = σ_i·V[j, i].
  b.Vt.resize(d2 * r);
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < d2; ++j) b.Vt[j * r + i] = Vt[i * d2 + j];

  b.norm_WL2 = sum_squares(b.sigma.data(), r);
  b.tail_o.assign(r + 1, 0.0);
  for (int64_t i = r - 1; i >= 0; --i) b.tail_o[i] = b.tail_o[i + 1] + b.sigma[i] * b.sigma[i];

  if (keep_R) {
    // M = W·V (d1×r). Row-major M is column-major Mᵀ (r×d1); its LQ Mᵀ = L Q gives M = Qᵀ Lᵀ,
    // so R = Lᵀ, which row-major is the leading r×r block with the strict lower part zeroed.
    std::vector<double> M(d1 * r);
    scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(d1), int(r), int(d2), 1.0, W,
                int(d2), b.Vt.data(), int(r), 0.0, M.data(), int(r));
    std::vector<double> colsq(r, 0.0);
    for (int64_t a = 0; a < d1; ++a)
      for (int64_t i = 0; i < r; ++i) colsq[i] += M[a * r + i] * M[a * r + i];
    b.tail_w.assign(r + 1, 0.0);
    for (int64_t i = r - 1; i >= 0; --i) b.tail_w[i] = b.tail_w[i + 1] + colsq[i];
    // A = A1 + A2 with A1 = Σ²/‖W_L‖², A2 = MᵀM/‖W‖² (both trace ≤ 1, PSD).
    std::vector<double> A(r * r);
    scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(r), int(d1), 1.0 / b.norm_W2,
                      M.data(), int(r), 0.0, A.data(), int(r));
    std::vector<double> a1(r);
    for (int64_t i = 0; i < r; ++i) {
      a1[i] = b.sigma[i] * b.sigma[i] / b.norm_WL2;
      A[i * r + i] += a1[i];
      for (int64_t j = i + 1; j < r; ++j) A[j * r + i] = A[i * r + j];
    }
    std::vector<double> alpha(r);
    lapack_int einfo = scipy_LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'L', lapack_int(r), A.data(),
                                            lapack_int(r), alpha.data());
    // Well conditioned A: the θ-weights are accurate (errors in B1 scale as eps·α_max/α_min).
    b.one_solve = einfo == 0 && alpha[0] > 1e-10 * alpha[r - 1];
    if (b.one_solve) {
      // A's column-major eigenvectors: PhiT[j*r + i] = Φ_ij. Q = A1^{1/2} Φ α^{-1/2}, B1 = QᵀQ.
      const double* PhiT = A.data();
      std::vector<double> Q(r * r), B1(r * r), P(r * r), F(r * r);
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < r; ++j) {
          Q[i * r + j] = std::sqrt(a1[i]) * PhiT[j * r + i] / std::sqrt(alpha[j]);
          P[i * r + j] = PhiT[j * r + i] * std::sqrt(alpha[j]);
        }
      scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(r), int(r), 1.0, Q.data(), int(r),
                        0.0, B1.data(), int(r));
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = i + 1; j < r; ++j) B1[j * r + i] = B1[i * r + j];
      b.theta.resize(r);
      einfo = scipy_LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'L', lapack_int(r), B1.data(),
                                   lapack_int(r), b.theta.data());
      if (einfo != 0) ROCKETKIT_FAIL("whitened_errors", "dsyevd failed (info ", einfo, ")");
      for (double& th : b.theta) th = std::min(1.0, std::max(0.0, th));
      // F = Φ α^{1/2} Ψ, with B1 holding Ψᵀ row-major; N = V·F.
      scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(r), int(r), int(r), 1.0,
                        P.data(), int(r), B1.data(), int(r), 0.0, F.data(), int(r));
      b.N.resize(d2 * r);
      scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(d2), int(r), int(r), 1.0,
                        b.Vt.data(), int(r), F.data(), int(r), 0.0, b.N.data(), int(r));
    } else {
      std::vector<double> tau(r);
      const lapack_int qinfo = scipy_LAPACKE_dgelqf(LAPACK_COL_MAJOR, lapack_int(r), lapack_int(d1),
                                                    M.data(), lapack_int(r), tau.data());
      if (qinfo != 0) ROCKETKIT_FAIL("whitened_errors", "LQ of W·V failed (dgelqf info ", qinfo, ")");
      b.R.assign(r * r, 0.0);
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = i; j < r; ++j) b.R[i * r + j] = M[i * r + j];
      // N = [V·Σ | V·Rᵀ] (d2×2r): the chains update C_m·N directly, so a candidate needs no
      // r×r triangular product of its own.
      b.N.assign(size_t(d2) * 2 * r, 0.0);
      for (int64_t j = 0; j < d2; ++j)
        for (int64_t c = 0; c < r; ++c) {
          b.N[j * 2 * r + c] = b.Vt[j * r + c] * b.sigma[c];
          b.N[j * 2 * r + r + c] = b.Vt[j * r + c];
        }
      scipy_cblas_dtrmm(CblasRowMajor, CblasRight, CblasUpper, CblasTrans, CblasNonUnit, int(d2), int(r),
                        1.0, b.R.data(), int(r), b.N.data() + r, int(2 * r));
    }
    b.nb = b.one_solve ? r : 2 * r;
  }
  return b;
}

// V is stored in b.Vt as d2×r row-major (see build_layer_basis): column j of C is
// σ_i·Vt[j·r + i], contiguous.
ColumnOrder column_order(const LayerBasis& b, int64_t kord, int threads) {
  ColumnOrder order;
  order.kord = kord;
  order.rows.resize(size_t(b.d2) * size_t(kord));
  order.pos.resize(size_t(b.d2) * size_t(kord));
  auto sort_columns = [&](int64_t j0, int64_t j1) {
    std::vector<double> mag(kord);
    for (int64_t j = j0; j < j1; ++j) {
      const double* vj = b.Vt.data() + j * b.r;
      for (int64_t i = 0; i < kord; ++i) mag[i] = std::fabs(b.sigma[i] * vj[i]);
      int32_t* o = order.rows.data() + j * kord;
      std::iota(o, o + kord, 0);
      std::sort(o, o + kord, [&](int32_t a, int32_t c) { return mag[a] > mag[c] || (mag[a] == mag[c] && a < c); });
      int32_t* q = order.pos.data() + j * kord;
      for (int64_t p = 0; p < kord; ++p) q[o[p]] = int32_t(p);
    }
  };
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, b.d2 / 64)));
  std::vector<std::thread> pool;
  const int64_t per = (b.d2 + threads - 1) / threads;
  for (int t = 1; t < threads; ++t)
    pool.emplace_back(sort_columns, std::min(b.d2, t * per), std::min(b.d2, (t + 1) * per));
  sort_columns(0, std::min(b.d2, per));
  for (auto& th : pool) th.join();
  return order;
}

void select_mask(const LayerBasis& b, int64_t k, int64_t s, double* CmT, double* values,
                 int32_t* indices) {
  const int64_t d2 = b.d2, r = b.r;
  const ColumnOrder order = column_order(b, k, 1);
  std::vector<int32_t> rows(s);
  for (int64_t j = 0; j < d2; ++j) {
    select_column(order, j, k, s, rows.data());
    std::sort(rows.begin(), rows.end());
    const double* vj = b.Vt.data() + j * r;
    double* out = CmT + j * k;
    std::fill(out, out + k, 0.0);
    for (int64_t t = 0; t < s; ++t) {
      const int32_t i = rows[t];
      const double c = b.sigma[i] * vj[i];
      out[i] = c;
      if (values) values[t * d2 + j] = c;
      if (indices) indices[t * d2 + j] = i;
    }
  }
}

void coefficients_times(const LayerBasis& b, int64_t k, const double* CmT, const double* B, double* Y) {
  scipy_cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(k), int(b.r), int(b.d2), 1.0, CmT,
                    int(k), B, int(b.r), 0.0, Y, int(b.r));
}

void coefficients_times_V(const LayerBasis& b, int64_t k, const double* CmT, double* Y) {
  coefficients_times(b, k, CmT, b.Vt.data(), Y);
}

double cholesky_with_ridge(const double* G, int64_t k, double* L, double* relative) {
  if (relative) *relative = 0;
  const size_t kk = size_t(k) * size_t(k);
  // Row-major lower is column-major upper: dpotrf 'U' leaves L with G = L·Lᵀ (row-major lower).
  double mean_diag = 0;
  for (int64_t i = 0; i < k; ++i) mean_diag += G[i * k + i];
  mean_diag /= double(k);
  const double base = mean_diag > 0 ? mean_diag : 1.0;
  double eps = 0;
  for (int attempt = 0; attempt < 64; ++attempt) {
    std::memcpy(L, G, sizeof(double) * kk);
    if (eps > 0)
      for (int64_t i = 0; i < k; ++i) L[i * k + i] += eps;
    const lapack_int info = scipy_LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', lapack_int(k), L, lapack_int(k));
    if (info == 0) {
      if (relative) *relative = eps / base;
      return eps;
    }
    if (info < 0) ROCKETKIT_FAIL("whitened_errors", "dpotrf argument error ", info);
    eps = eps == 0 ? 1e-12 * base : eps * 10;
  }
  ROCKETKIT_FAIL("whitened_errors", "Cholesky of C·Cᵀ failed even with a ridge of ", eps);
}

double factor_gram(const LayerBasis& b, int64_t k, int64_t s, const double* CmT, double* L,
                   double* G, double* relative) {
  if (relative) *relative = 0;
  const size_t kk = size_t(k) * size_t(k);
  if (s == k) {
    // C_k C_kᵀ = Σ_k² exactly; a diagonal needs no factorization unless some σ_i² is 0.
    std::memset(G, 0, sizeof(double) * kk);
    for (int64_t i = 0; i < k; ++i) G[i * k + i] = b.sigma[i] * b.sigma[i];
    if (G[(k - 1) * k + (k - 1)] > 0) {
      std::memset(L, 0, sizeof(double) * kk);
      for (int64_t i = 0; i < k; ++i) L[i * k + i] = std::sqrt(G[i * k + i]);
      return 0.0;
    }
  } else {
    scipy_cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, int(k), int(b.d2), 1.0, CmT, int(k), 0.0,
                G, int(k));
  }
  return cholesky_with_ridge(G, k, L, relative);
}

void errors_from_products(const LayerBasis& b, int64_t k, const double* L, double eps,
                          const double* Z, int64_t ldz, ProductScratch& w, double* e_w, double* e_o) {
  const int64_t r = b.r;
  if (b.one_solve) {
    w.T.resize(size_t(k) * r);
    double* T = w.T.data();
    for (int64_t i = 0; i < k; ++i) std::memcpy(T + i * r, Z + i * ldz, sizeof(double) * size_t(r));
    scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, int(k),
                      int(r), 1.0, L, int(k), T, int(r));
    auto weighted = [&](double& cap_o, double& cap_w) {
      std::vector<double>& colsq = w.colsq;
      colsq.assign(r, 0.0);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t c = 0; c < r; ++c) colsq[c] += T[i * r + c] * T[i * r + c];
      cap_o = cap_w = 0;
      for (int64_t c = 0; c < r; ++c) {
        cap_o += b.theta[c] * colsq[c];
        cap_w += (1.0 - b.theta[c]) * colsq[c];
      }
    };
    double cap_o, cap_w;
    weighted(cap_o, cap_w);
    if (eps > 0) {
      scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasTrans, CblasNonUnit, int(k),
                        int(r), 1.0, L, int(k), T, int(r));
      double ro, rw;
      weighted(ro, rw);
      cap_o += eps * ro;
      cap_w += eps * rw;
    }
    *e_o = std::sqrt(std::max(0.0, 1.0 - cap_o));
    *e_w = std::sqrt(std::max(0.0, 1.0 - cap_w));
    return;
  }
  // T = L⁻¹·Z with Z = C_m·[V·Σ | V·Rᵀ] (k×2r).
  w.T.resize(size_t(k) * 2 * r);
  double* T = w.T.data();
  for (int64_t i = 0; i < k; ++i) std::memcpy(T + i * 2 * r, Z + i * ldz, sizeof(double) * size_t(2 * r));
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, int(k), int(2 * r),
              1.0, L, int(k), T, int(2 * r));
  double cap_o = block_sum_squares(T, k, r, 2 * r);
  double cap_w = block_sum_squares(T + r, k, r, 2 * r);
  if (eps > 0) {
    // With D* = W_L C_mᵀ(G+εI)⁻¹ the residual is ‖W_L‖² − ‖Z‖² − ε‖L⁻ᵀZ‖², Z = L⁻¹B.
    scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasTrans, CblasNonUnit, int(k), int(2 * r),
                1.0, L, int(k), T, int(2 * r));
    cap_o += eps * block_sum_squares(T, k, r, 2 * r);
    cap_w += eps * block_sum_squares(T + r, k, r, 2 * r);
  }
  *e_o = std::sqrt(std::max(0.0, b.norm_WL2 - cap_o) / b.norm_WL2);
  *e_w = std::sqrt(std::max(0.0, b.norm_W2 - cap_w) / b.norm_W2);
}

bool tail_errors(const LayerBasis& b, int64_t k, int64_t s, double* e_w, double* e_o) {
  if (s != k || !(b.sigma[k - 1] * b.sigma[k - 1] > 0)) return false;
  // Nested truncation (no mask, no ridge): the tails of the spectrum are the residuals.
  *e_o = std::sqrt(b.tail_o[k] / b.norm_WL2);
  *e_w = std::sqrt(std::min(1.0, b.tail_w[k] / b.norm_W2));
  return true;
}

namespace {

void check_layer(const char* fn, const double* W, const double* S, int64_t d1, int64_t d2) {
  ROCKETKIT_CHECK(d1 >= 1 && d2 >= 1, fn, "W must be non-empty, got ", d1, "x", d2);
  ROCKETKIT_CHECK(d1 <= kInt32Max && d2 <= kInt32Max, fn, "W is ", d1, "x", d2,
                  ": each side must fit in int32 (LAPACK)");
  ROCKETKIT_CHECK(d1 <= std::numeric_limits<int64_t>::max() / d2 &&
                      d1 <= std::numeric_limits<int64_t>::max() / d1,
                  fn, "W is ", d1, "x", d2, ": element count overflows int64");
  const int64_t r = std::min(d1, d2);
  // dgesdd's workspace (about 4r² + 7r doubles) is indexed with 32-bit integers.
  ROCKETKIT_CHECK(r <= 20000, fn, "min(d1, d2) = ", r, " is above 20000 (32-bit LAPACK workspace)");
  ROCKETKIT_CHECK(W != nullptr && S != nullptr, fn, "W and S must not be null");
  for (int64_t i = 0; i < d1 * d2; ++i)
    ROCKETKIT_CHECK(std::isfinite(W[i]), fn, "W has a non-finite entry at (", i / d2, ", ", i % d2, ")");
  for (int64_t i = 0; i < d1; ++i) {
    ROCKETKIT_CHECK(std::isfinite(S[i * d1 + i]) && S[i * d1 + i] > 0, fn,
                    "S must have a positive finite diagonal, S[", i, ", ", i, "] = ", S[i * d1 + i]);
    for (int64_t j = i + 1; j < d1; ++j)
      ROCKETKIT_CHECK(std::isfinite(S[i * d1 + j]), fn, "S has a non-finite entry at (", i, ", ", j, ")");
  }
}

void check_candidate(const char* fn, int64_t k, int64_t s, int64_t r, int64_t row) {
  ROCKETKIT_CHECK(k >= 1 && k <= r, fn, "candidate ", row, ": rank k = ", k,
                  " must be in [1, min(d1, d2) = ", r, "]");
  ROCKETKIT_CHECK(s >= 1 && s <= k, fn, "candidate ", row, ": s = ", s, " must be in [1, k = ", k, "]");
}

// Power-of-two exponent e with max|a|·2^-e in [0.5, 1); 0 for an all-zero a.
int max_exponent(double amax) {
  int e = 0;
  if (amax > 0) std::frexp(amax, &e);
  return e;
}

// W and S rescaled by powers of two (exact) when either lies outside a range where every product
// below stays normal; both relative errors are invariant under such scalings.
struct ScaledLayer {
  const double* W;
  const double* S;
  int ew = 0, es = 0;  // the inputs are W·2^ew and S·2^es
  std::vector<double> W_copy, S_copy;
};

constexpr int kSafeExponent = 64;

ScaledLayer rescale_layer(const double* W, const double* S, int64_t d1, int64_t d2) {
  ScaledLayer out{W, S};
  double wmax = 0, smax = 0;
  for (int64_t i = 0; i < d1 * d2; ++i) wmax = std::max(wmax, std::fabs(W[i]));
  for (int64_t i = 0; i < d1; ++i)
    for (int64_t j = i; j < d1; ++j) smax = std::max(smax, std::fabs(S[i * d1 + j]));
  const int ew = max_exponent(wmax), es = max_exponent(smax);
  if (std::abs(ew) > kSafeExponent) {
    out.ew = ew;
    out.W_copy.resize(size_t(d1) * size_t(d2));
    for (int64_t i = 0; i < d1 * d2; ++i) out.W_copy[i] = std::ldexp(W[i], -ew);
    out.W = out.W_copy.data();
  }
  if (std::abs(es) > kSafeExponent) {
    out.es = es;
    out.S_copy.assign(size_t(d1) * size_t(d1), 0.0);
    for (int64_t i = 0; i < d1; ++i)
      for (int64_t j = i; j < d1; ++j) out.S_copy[i * d1 + j] = std::ldexp(S[i * d1 + j], -es);
    out.S = out.S_copy.data();
  }
  return out;
}

void check_scaled_diagonal(const char* fn, const ScaledLayer& sc, int64_t d1) {
  for (int64_t i = 0; i < d1; ++i)
    ROCKETKIT_CHECK(sc.S[i * d1 + i] > 0, fn, "S[", i, ", ", i,
                    "] underflows once S is scaled to unit size: its diagonal spans more than the "
                    "double range (S is numerically singular)");
}

// Pins OpenBLAS's (process-wide) thread count for a scope and restores it, even on exceptions.
// The wheel's OpenBLAS exports no per-thread setting, so a concurrent BLAS caller elsewhere in
// the process also runs single-threaded while candidates are profiled.
class BlasThreads {
 public:
  explicit BlasThreads(int n) : saved_(scipy_openblas_get_num_threads()) {
    scipy_openblas_set_num_threads(n);
  }
  ~BlasThreads() { scipy_openblas_set_num_threads(saved_); }
  BlasThreads(const BlasThreads&) = delete;
  BlasThreads& operator=(const BlasThreads&) = delete;

 private:
  int saved_;
};

}  // namespace
}  // namespace errors_detail

using namespace errors_detail;

void whitened_errors(const double* W, const double* S, int64_t d1, int64_t d2,
                     const int64_t* candidates, int64_t n, double* e_weight, double* e_output,
                     int num_threads) {
  const char* fn = "whitened_errors";
  ROCKETKIT_CHECK(n >= 0, fn, "candidate count must be >= 0, got ", n);
  ROCKETKIT_CHECK(num_threads >= 0, fn, "num_threads must be >= 0, got ", num_threads);
  check_layer(fn, W, S, d1, d2);
  if (n == 0) return;
  ROCKETKIT_CHECK(candidates != nullptr && e_weight != nullptr && e_output != nullptr, fn,
                  "candidates and outputs must not be null");
  const int64_t r = std::min(d1, d2);
  for (int64_t c = 0; c < n; ++c) check_candidate(fn, candidates[2 * c], candidates[2 * c + 1], r, c);

  bool zero = true;
  for (int64_t i = 0; i < d1 * d2 && zero; ++i) zero = W[i] == 0;
  if (zero) {  // documented: a zero layer has nothing to lose
    std::fill(e_weight, e_weight + n, 0.0);
    std::fill(e_output, e_output + n, 0.0);
    return;
  }

  const ScaledLayer sc = rescale_layer(W, S, d1, d2);
  check_scaled_diagonal(fn, sc, d1);
  const LayerBasis b = build_layer_basis(sc.W, sc.S, d1, d2, /*keep_U=*/false, /*keep_R=*/true);

  const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  // Candidates run single-threaded BLAS, in parallel with each other.
  BlasThreads pin(1);
  profile_candidates(b, candidates, n, e_weight, e_output, num_threads > 0 ? num_threads : hw);
}

void whitened_errors_layers(int64_t m, const double* const* W, const double* const* S, const int64_t* d1,
                            const int64_t* d2, const int64_t* const* candidates, const int64_t* n,
                            double* const* e_weight, double* const* e_output, int num_threads) {
  const char* fn = "whitened_errors";
  ROCKETKIT_CHECK(m >= 0, fn, "layer count must be >= 0, got ", m);
  ROCKETKIT_CHECK(num_threads >= 0, fn, "num_threads must be >= 0, got ", num_threads);
  if (m == 0) return;
  ROCKETKIT_CHECK(W != nullptr && S != nullptr && d1 != nullptr && d2 != nullptr && candidates != nullptr &&
                      n != nullptr && e_weight != nullptr && e_output != nullptr,
                  fn, "layer arrays must not be null");
  for (int64_t l = 0; l < m; ++l) {
    check_layer(fn, W[l], S[l], d1[l], d2[l]);
    ROCKETKIT_CHECK(n[l] >= 0, fn, "layer ", l, ": candidate count must be >= 0, got ", n[l]);
    if (n[l] == 0) continue;
    ROCKETKIT_CHECK(candidates[l] != nullptr && e_weight[l] != nullptr && e_output[l] != nullptr, fn,
                    "layer ", l, ": candidates and outputs must not be null");
    const int64_t r = std::min(d1[l], d2[l]);
    for (int64_t c = 0; c < n[l]; ++c) check_candidate(fn, candidates[l][2 * c], candidates[l][2 * c + 1], r, c);
  }
  // Layers left to profile: not empty, not all zeros (documented: zero errors).
  std::vector<int64_t> todo;
  for (int64_t l = 0; l < m; ++l) {
    if (n[l] == 0) continue;
    bool zero = true;
    for (int64_t i = 0; i < d1[l] * d2[l] && zero; ++i) zero = W[l][i] == 0;
    if (zero) {
      std::fill(e_weight[l], e_weight[l] + n[l], 0.0);
      std::fill(e_output[l], e_output[l] + n[l], 0.0);
    } else {
      todo.push_back(l);
    }
  }
  std::vector<ScaledLayer> scaled;
  for (int64_t l : todo) {
    scaled.push_back(rescale_layer(W[l], S[l], d1[l], d2[l]));
    check_scaled_diagonal(fn, scaled.back(), d1[l]);
  }
  std::vector<const int64_t*> cand;
  std::vector<int64_t> count;
  std::vector<double*> ew, eo;
  for (int64_t l : todo) {
    cand.push_back(candidates[l]);
    count.push_back(n[l]);
    ew.push_back(e_weight[l]);
    eo.push_back(e_output[l]);
  }
  const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  // Every basis and every candidate runs single-threaded BLAS, side by side.
  BlasThreads pin(1);
  profile_layers(
      int64_t(todo.size()),
      [&](int64_t t) {
        const int64_t l = todo[t];
        return build_layer_basis(scaled[t].W, scaled[t].S, d1[l], d2[l], /*keep_U=*/false, /*keep_R=*/true);
      },
      cand.data(), count.data(), ew.data(), eo.data(), num_threads > 0 ? num_threads : hw);
}

void factorize(const double* W, const double* S, int64_t d1, int64_t d2, int64_t k, int64_t s,
               double* U, double* values, int32_t* indices, double* ridge) {
  const char* fn = "factorize";
  check_layer(fn, W, S, d1, d2);
  check_candidate(fn, k, s, std::min(d1, d2), 0);
  ROCKETKIT_CHECK(U != nullptr && values != nullptr && indices != nullptr, fn,
                  "outputs must not be null");

  const ScaledLayer sc = rescale_layer(W, S, d1, d2);
  check_scaled_diagonal(fn, sc, d1);
  const LayerBasis b = build_layer_basis(sc.W, sc.S, d1, d2, /*keep_U=*/true, /*keep_R=*/false);
  const int64_t r = b.r;
  std::vector<double> CmT(size_t(d2) * k), Y(size_t(k) * r), L(size_t(k) * k), G(size_t(k) * k);
  select_mask(b, k, s, CmT.data(), values, indices);
  double ridge_relative = 0;
  const double eps = factor_gram(b, k, s, CmT.data(), L.data(), G.data(), &ridge_relative);
  coefficients_times_V(b, k, CmT.data(), Y.data());
  // D*ᵀ = (G+εI)⁻¹ C_m W_Lᵀ = (G+εI)⁻¹ (Y·Σ) Uᵀ.
  for (int64_t i = 0; i < k; ++i)
    for (int64_t c = 0; c < r; ++c) Y[i * r + c] *= b.sigma[c];
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, int(k), int(r), 1.0,
              L.data(), int(k), Y.data(), int(r));
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasTrans, CblasNonUnit, int(k), int(r), 1.0,
              L.data(), int(k), Y.data(), int(r));
  scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(d1), int(k), int(r), 1.0, b.U.data(),
              int(r), Y.data(), int(r), 0.0, U, int(k));
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, int(d1), int(k), 1.0,
              sc.S, int(d1), U, int(k));
  for (int64_t i = 0; i < d1 * k; ++i)
    ROCKETKIT_CHECK(std::isfinite(U[i]), fn, "U = S⁻¹·D* overflows: S is numerically singular "
                    "(whiten its Gram with jitter first)");
  // Ŵ = 2^ew·U·C. Split 2^ew so that max|U| and max|C| are a power of two apart at most: neither
  // overflows, and both keep their precision when stored in fp16/bf16.
  double umax = 0, cmax = 0;
  for (int64_t i = 0; i < d1 * k; ++i) umax = std::max(umax, std::fabs(U[i]));
  for (int64_t i = 0; i < s * d2; ++i) cmax = std::max(cmax, std::fabs(values[i]));
  if (umax > 0 && cmax > 0) {
    const int shift_u = (sc.ew + max_exponent(cmax) - max_exponent(umax)) / 2;
    const int shift_c = sc.ew - shift_u;
    for (int64_t i = 0; i < d1 * k; ++i) U[i] = std::ldexp(U[i], shift_u);
    for (int64_t i = 0; i < s * d2; ++i) values[i] = std::ldexp(values[i], shift_c);
  }
  if (ridge) *ridge = ridge_relative;
}

}  // namespace rocketkit
