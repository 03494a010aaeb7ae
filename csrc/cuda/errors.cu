// Batched whitened errors on the GPU (DESIGN.md §2), fp64 throughout.
//
// Same semantics as rocketkit::whitened_errors (errors.h): basis from the SVD of W_L = S·W,
// mask = top-s |C_ij| per column of C_k = Σ_k V_kᵀ with ties to the lower row, G = C_m C_mᵀ,
// ridge ε = 0 unless the Cholesky fails, then 1e-12·mean(diag G) grown ×10, its effect included.
//
// Per layer, once (stream 0):
//   - reduce both W_L and W to r×r factors with the same row space, r = min(d1, d2):
//       d1 ≥ d2: K_L = R of QR(W_L), K_W = R of QR(W); the row basis is the identity.
//       d1 < d2: Wᵀ = Q_w R_w, K_W = R_wᵀ, K_L = S·K_W; the row basis is Q_w (d2×r).
//     Then ‖X·W_Lᵀ‖ = ‖X·Vb·K_Lᵀ‖ and ‖X·Wᵀ‖ = ‖X·Vb·K_Wᵀ‖ for every X.
//   - SVD of K_L (cuSOLVER gesvdp, checked by its error estimate; gesvd as the fallback):
//     σ and V = Vb·Ṽ give the mask; the column norms of K_W·Ṽ give the s = k tails.
//   - one-solve weights without inverting anything: QR of Z = [K_L/‖W_L‖; K_W/‖W‖] (2r×r),
//     Z = [Q1; Q2]·R_z, and Q1ᵀQ1 = Ψ Θ Ψᵀ (eigenvalues in [0, 1], Q2ᵀQ2 = I − Q1ᵀQ1). With
//     N = Vb·R_zᵀ·Ψ and T = L⁻¹·C_m·N the captured relative energies are Σ_c θ_c‖t_c‖² (output)
//     and Σ_c (1−θ_c)‖t_c‖² (weight): one k×r product and one triangular solve per candidate.
// Per candidate (several streams, each with its own workspace, largest k first):
//   mask kernel → dense C_m (k×d2) → syrk G → potrf → gemm C_m·N → trsm → weighted column
//   norms → e. The Cholesky's status is checked once at the end; candidates whose factorization
//   failed are redone with the ridge loop (rare: an atom no column selects).
// Only a few scalars cross to the host (validation flags, σ for the s = k rule, statuses);
// the errors are written to the caller's device arrays.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "common.cuh"
#include "mathlibs.h"
#include "rocketkit/build_info.h"
#include "rocketkit/check.h"
#include "rocketkit/cuda.h"

namespace rocketkit::cuda {
namespace {

constexpr const char* kFn = "whitened_errors";
constexpr int kThreads = 256;
constexpr int kMaskThreads = 256;
constexpr int kNormWarps = 8;
constexpr int kSafeExponent = 64;  // as the CPU: rescale W or S when max|x| is beyond 2^±64
constexpr unsigned kFull = 0xffffffffu;
constexpr cudaDataType kR64 = CUDA_R_64F;

using detail::DeviceBuffer;
using detail::grid_for;
namespace L = lib;

__device__ __forceinline__ unsigned long long abs_bits(double x) {
  // Non-negative doubles order like their bit patterns; fabs(-0.0) = +0.0.
  return static_cast<unsigned long long>(__double_as_longlong(fabs(x)));
}

__device__ __forceinline__ unsigned long long warp_min_u64(unsigned long long v) {
  for (int off = 16; off > 0; off >>= 1) v = min(v, __shfl_down_sync(kFull, v, off));
  return v;
}
__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_down_sync(kFull, v, off));
  return v;
}

// ---- validation --------------------------------------------------------------------------
struct Validation {
  unsigned long long w_bad;       // first row-major index of a non-finite W entry
  unsigned long long s_diag_bad;  // first i with S[i, i] non-finite or ≤ 0
  unsigned long long s_bad;       // first row-major index of a non-finite upper S entry
  unsigned long long w_max;       // bits of max|W|
  unsigned long long s_max;       // bits of max|S| over the upper triangle
  unsigned long long s_min_diag;  // bits of min S[i, i] over the valid diagonal
};
constexpr unsigned long long kNone = ~0ull;

// W row-major d1×d2; S row-major d1×d1, upper triangle read (the lower one is ignored).
__global__ void validate_layer_kernel(const double* __restrict__ W, int64_t nw,
                                      const double* __restrict__ S, int64_t d1,
                                      Validation* __restrict__ out) {
  unsigned long long w_bad = kNone, w_max = 0, s_diag_bad = kNone, s_bad = kNone, s_max = 0,
                     s_min_diag = kNone;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nw; i += stride) {
    const double x = W[i];
    if (!isfinite(x)) w_bad = min(w_bad, (unsigned long long)i);
    else w_max = max(w_max, abs_bits(x));
  }
  const int64_t ns = d1 * d1;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < ns; idx += stride) {
    const int64_t i = idx / d1, j = idx - i * d1;
    if (j < i) continue;
    const double x = S[idx];
    if (j == i) {
      if (!(isfinite(x) && x > 0)) s_diag_bad = min(s_diag_bad, (unsigned long long)i);
      else s_min_diag = min(s_min_diag, abs_bits(x)), s_max = max(s_max, abs_bits(x));
    } else if (!isfinite(x)) {
      s_bad = min(s_bad, (unsigned long long)idx);
    } else {
      s_max = max(s_max, abs_bits(x));
    }
  }
  w_bad = warp_min_u64(w_bad), s_diag_bad = warp_min_u64(s_diag_bad), s_bad = warp_min_u64(s_bad);
  s_min_diag = warp_min_u64(s_min_diag), w_max = warp_max_u64(w_max), s_max = warp_max_u64(s_max);
  if ((threadIdx.x & 31) == 0) {
    if (w_bad != kNone) atomicMin(&out->w_bad, w_bad);
    if (s_diag_bad != kNone) atomicMin(&out->s_diag_bad, s_diag_bad);
    if (s_bad != kNone) atomicMin(&out->s_bad, s_bad);
    if (s_min_diag != kNone) atomicMin(&out->s_min_diag, s_min_diag);
    atomicMax(&out->w_max, w_max);
    atomicMax(&out->s_max, s_max);
  }
}

// ---- small dense helpers (column-major) ----------------------------------------------------
constexpr int kPartials = 1024;  // fixed, so that sums are reproducible run to run

__global__ void sum_squares_partial_kernel(const double* __restrict__ x, int64_t n,
                                           double* __restrict__ partial) {
  __shared__ double s[kThreads];
  double acc = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    acc += x[i] * x[i];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) s[threadIdx.x] += s[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

// out[q] = Σ_b partial[stride·b + q] for q < width (width ≤ 2), one block, fixed order.
__global__ void reduce_partials_kernel(const double* __restrict__ partial, int64_t nb, int width,
                                       double* __restrict__ out) {
  __shared__ double s[2][kThreads];
  for (int q = 0; q < width; ++q) {
    double acc = 0;
    for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) acc += partial[b * width + q];
    s[q][threadIdx.x] = acc;
  }
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h)
      for (int q = 0; q < width; ++q) s[q][threadIdx.x] += s[q][threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0)
    for (int q = 0; q < width; ++q) out[q] = s[q][0];
}

// dst (r×r) = upper triangle of src's leading r×r block (leading dimension lds), zeros below.
__global__ void copy_upper_kernel(const double* __restrict__ src, int64_t lds, int64_t r,
                                  double* __restrict__ dst) {
  const int64_t n = r * r;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t % r, j = t / r;
    dst[t] = i <= j ? src[i + j * lds] : 0.0;
  }
}

// dst (r×r) = (upper triangle of src's leading r×r block)ᵀ, a lower-triangular matrix.
__global__ void transpose_upper_kernel(const double* __restrict__ src, int64_t lds, int64_t r,
                                       double* __restrict__ dst) {
  const int64_t n = r * r;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t % r, j = t / r;
    dst[t] = i >= j ? src[j + i * lds] : 0.0;
  }
}

// Z (2r×r) = [K_L/√‖W_L‖²; K_W/√‖W‖²].
__global__ void build_z_kernel(const double* __restrict__ KL, const double* __restrict__ KW,
                               int64_t r, const double* __restrict__ norm_WL2,
                               const double* __restrict__ norm_W2, double* __restrict__ Z) {
  const double a = sqrt(*norm_WL2), b = sqrt(*norm_W2);
  const int64_t n = 2 * r * r;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t % (2 * r), j = t / (2 * r);
    Z[t] = i < r ? KL[i + j * r] / a : KW[(i - r) + j * r] / b;
  }
}

// out[c] = Σ_i M[i + c·ld]² for c < cols, a warp per column.
__global__ void column_sumsq_kernel(const double* __restrict__ M, int64_t rows, int64_t cols,
                                    int64_t ld, double* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (c >= cols) return;  // whole warps leave together
  double acc = 0;
  for (int64_t i = lane; i < rows; i += 32) acc += M[i + c * ld] * M[i + c * ld];
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(kFull, acc, off);
  if (lane == 0) out[c] = acc;
}

// tail_o[i] = Σ_{j≥i} σ_j², tail_w[i] = Σ_{j≥i} colsq_j, summed from the end as on the CPU.
__global__ void tails_kernel(const double* __restrict__ sigma, const double* __restrict__ colsq,
                             int64_t r, double* __restrict__ tail_o, double* __restrict__ tail_w) {
  double to = 0, tw = 0;
  tail_o[r] = 0, tail_w[r] = 0;
  for (int64_t i = r - 1; i >= 0; --i) {
    to += sigma[i] * sigma[i];
    tw += colsq[i];
    tail_o[i] = to, tail_w[i] = tw;
  }
}

__global__ void clamp01_kernel(double* __restrict__ x, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = fmin(1.0, fmax(0.0, x[i]));
}

// s = k without a mask or ridge: the tails of the spectrum are the residuals.
__global__ void nested_errors_kernel(const int64_t* __restrict__ ks, const int64_t* __restrict__ rows,
                                     int64_t m, const double* __restrict__ tail_o,
                                     const double* __restrict__ tail_w,
                                     const double* __restrict__ norm_W2, double* __restrict__ e_w,
                                     double* __restrict__ e_o) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < m;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = ks[t], c = rows[t];
    e_o[c] = sqrt(tail_o[k] / tail_o[0]);
    e_w[c] = sqrt(fmin(1.0, tail_w[k] / *norm_W2));
  }
}

// ---- the mask -----------------------------------------------------------------------------
// Column j of C_k is C_ij = σ_i·V[j, i], i < k, read from Vt (r×d2 column-major: column j is
// row j of V). Keeps the s entries of largest |C_ij|, equal magnitudes to the lower i, and
// writes column j of the dense C_m (k×d2 column-major). One block per column:
//  1. radix select over the bits of |C_ij| (8 passes of 8 bits, most significant first) finds
//     thr = the s-th largest magnitude and `ties` = s − #{|C_ij| > thr};
//  2. a block-wide scan in row order keeps the first `ties` entries equal to thr.
// kCached keeps the k keys in shared memory; otherwise they are recomputed from V per pass.
template <bool kCached>
__global__ void __launch_bounds__(kMaskThreads)
    select_mask_kernel(const double* __restrict__ sigma, const double* __restrict__ Vt, int64_t r,
                       int k, int s, double* __restrict__ Cm) {
  extern __shared__ unsigned long long s_keys[];
  __shared__ unsigned int s_hist[256];
  __shared__ unsigned long long s_prefix;
  __shared__ int s_remaining;
  __shared__ int s_warp_ties[kMaskThreads / 32];
  __shared__ int s_carry;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const double* __restrict__ v = Vt + int64_t(blockIdx.x) * r;
  double* __restrict__ out = Cm + int64_t(blockIdx.x) * k;

  if (s >= k) {
    for (int i = tid; i < k; i += kMaskThreads) out[i] = sigma[i] * v[i];
    return;
  }
  if (kCached) {
    for (int i = tid; i < k; i += kMaskThreads) s_keys[i] = abs_bits(sigma[i] * v[i]);
  }
  if (tid == 0) {
    s_prefix = 0;
    s_remaining = s;
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kMaskThreads) s_hist[b] = 0;
    __syncthreads();  // also publishes the keys, s_prefix and s_remaining
    const unsigned long long prefix = s_prefix;
    const unsigned long long high = shift == 56 ? 0ull : (~0ull << (shift + 8));
    for (int i = tid; i < k; i += kMaskThreads) {
      const unsigned long long key = kCached ? s_keys[i] : abs_bits(sigma[i] * v[i]);
      if ((key & high) == prefix) atomicAdd(&s_hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns digits 255−8l … 248−8l (descending); find the digit where the count of
      // larger-or-equal keys first reaches `remaining`.
      const unsigned int remaining = unsigned(s_remaining);
      unsigned int cnt[8], lane_sum = 0;
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        cnt[q] = s_hist[255 - 8 * lane - q];
        lane_sum += cnt[q];
      }
      unsigned int incl = lane_sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned int y = __shfl_up_sync(kFull, incl, off);
        if (lane >= off) incl += y;
      }
      // The last lane's total is the number of keys matching the prefix, ≥ remaining.
      const int owner = __ffs(__ballot_sync(kFull, incl >= remaining)) - 1;
      if (lane == owner) {
        unsigned int cum = incl - lane_sum;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (cum + cnt[q] >= remaining) {
            s_prefix = prefix | (static_cast<unsigned long long>(255 - 8 * lane - q) << shift);
            s_remaining = int(remaining - cum);
            break;
          }
          cum += cnt[q];
        }
      }
    }
    __syncthreads();
  }
  const unsigned long long thr = s_prefix;
  const int ties = s_remaining;  // entries equal to thr that are kept, lowest rows first
  if (tid == 0) s_carry = 0;
  __syncthreads();
  for (int base = 0; base < k; base += kMaskThreads) {
    const int i = base + tid;
    double c = 0;
    unsigned long long key = 0;
    if (i < k) {
      c = sigma[i] * v[i];
      key = kCached ? s_keys[i] : abs_bits(c);
    }
    const bool tie = i < k && key == thr;
    const unsigned int ballot = __ballot_sync(kFull, tie);
    if (lane == 0) s_warp_ties[warp] = __popc(ballot);
    __syncthreads();
    int rank = s_carry + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) rank += s_warp_ties[w];
    if (i < k) out[i] = (key > thr || (tie && rank < ties)) ? c : 0.0;
    __syncthreads();
    if (tid == 0) {
      int total = 0;
      for (int w = 0; w < kMaskThreads / 32; ++w) total += s_warp_ties[w];
      s_carry += total;
    }
    __syncthreads();
  }
}

// ---- Gram, ridge, norms ---------------------------------------------------------------------
// G (k×k, lower triangle used) = diag(σ_i²): C_k C_kᵀ for s = k.
__global__ void diag_gram_kernel(const double* __restrict__ sigma, int64_t k, double* __restrict__ G) {
  const int64_t n = k * k;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t % k, j = t / k;
    G[t] = i == j ? sigma[i] * sigma[i] : 0.0;
  }
}

// mean(diag G), one block, a fixed summation order (it only scales the ridge ε).
__global__ void mean_diag_kernel(const double* __restrict__ G, int64_t k, double* __restrict__ out) {
  __shared__ double s[kThreads];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < k; i += kThreads) acc += G[i + i * k];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) s[threadIdx.x] += s[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = s[0] / double(k);
}

__global__ void add_ridge_kernel(double* __restrict__ G, int64_t k, double eps) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < k;
       i += int64_t(gridDim.x) * blockDim.x)
    G[i + i * k] += eps;
}

// *bad = 1 if the Cholesky factor has a diagonal entry that is not finite and positive.
__global__ void check_factor_kernel(const double* __restrict__ Lf, int64_t k, int* __restrict__ bad) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < k;
       i += int64_t(gridDim.x) * blockDim.x) {
    const double x = Lf[i + i * k];
    if (!(isfinite(x) && x > 0)) atomicExch(bad, 1);
  }
}

// partial[2b], partial[2b+1] = Σ over this block's columns c of θ_c‖T_c‖², (1−θ_c)‖T_c‖².
__global__ void weighted_norms_kernel(const double* __restrict__ T, int64_t k, int64_t r,
                                      const double* __restrict__ theta, double* __restrict__ partial) {
  __shared__ double s_o[kNormWarps], s_w[kNormWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = int64_t(blockIdx.x) * kNormWarps + warp;
  double o = 0, w = 0;
  if (c < r) {  // uniform over the warp
    const double* __restrict__ col = T + c * k;
    double acc = 0;
    for (int64_t i = lane; i < k; i += 32) acc += col[i] * col[i];
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(kFull, acc, off);
    const double th = theta[c];
    o = th * acc;
    w = (1.0 - th) * acc;
  }
  if (lane == 0) s_o[warp] = o, s_w[warp] = w;
  __syncthreads();
  if (threadIdx.x == 0) {
    double so = 0, sw = 0;
    for (int q = 0; q < kNormWarps; ++q) so += s_o[q], sw += s_w[q];
    partial[2 * blockIdx.x] = so;
    partial[2 * blockIdx.x + 1] = sw;
  }
}

// e from the captured energies caps[0..1] (and, with a ridge, ε·caps[2..3]).
__global__ void finish_errors_kernel(const double* __restrict__ caps, double eps,
                                     double* __restrict__ e_w, double* __restrict__ e_o) {
  double co = caps[0], cw = caps[1];
  if (eps > 0) {
    co += eps * caps[2];
    cw += eps * caps[3];
  }
  *e_o = sqrt(fmax(0.0, 1.0 - co));
  *e_w = sqrt(fmax(0.0, 1.0 - cw));
}

// ---- host side ------------------------------------------------------------------------------
int max_exponent(double amax) {
  int e = 0;
  if (amax > 0) std::frexp(amax, &e);
  return e;
}

double bits_to_double(unsigned long long b) {
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// cuSOLVER workspaces, grown on demand (stream-ordered reuse on one stream).
struct SolverWorkspace {
  DeviceBuffer<char> device;
  std::vector<char> host;
  void reserve(size_t dev_bytes, size_t host_bytes) {
    if (dev_bytes > device.size()) device.allocate(dev_bytes, kFn);
    if (host_bytes > host.size()) host.resize(host_bytes);
  }
  void* host_ptr() { return host.empty() ? nullptr : host.data(); }
};

// The per-layer quantities every candidate reads (all on the device but sigma_host).
struct Basis {
  int64_t d1 = 0, d2 = 0, r = 0;
  DeviceBuffer<double> sigma, Vt, N, theta, tail_o, tail_w, norm_W2;
  std::vector<double> sigma_host;
  std::string svd;
  double svd_error = 0;
};

void launch_check(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) ROCKETKIT_FAIL(kFn, "launching ", what, ": ", cudaGetErrorString(err));
}

// y := column-major r×r copy of x (cudaMemcpyAsync, device to device).
void copy_square(const double* x, int64_t r, double* y, cudaStream_t st) {
  ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(y, x, sizeof(double) * size_t(r) * size_t(r),
                                         cudaMemcpyDeviceToDevice, st));
}

void geqrf(const L::MathLibs& Lb, const L::HandleLease& h, SolverWorkspace& ws, int64_t m,
           int64_t n, double* A, int64_t lda, double* tau, int* info) {
  size_t dev = 0, host = 0;
  ROCKETKIT_LIB_OK(kFn, "cusolverDnXgeqrf_bufferSize",
                   Lb.xgeqrf_buffer(h.solver(), h.params(), m, n, kR64, A, lda, kR64, tau, kR64, &dev, &host));
  ws.reserve(dev, host);
  ROCKETKIT_LIB_OK(kFn, "cusolverDnXgeqrf",
                   Lb.xgeqrf(h.solver(), h.params(), m, n, kR64, A, lda, kR64, tau, kR64, ws.device.get(),
                             ws.device.size(), ws.host_ptr(), ws.host.size(), info));
}

void orgqr(const L::MathLibs& Lb, const L::HandleLease& h, int64_t m, int64_t n, double* A,
           int64_t lda, const double* tau, int* info) {
  // The legacy 32-bit API (there is no 64-bit orgqr): sizes were checked to fit int.
  int lwork = 0;
  ROCKETKIT_LIB_OK(kFn, "cusolverDnDorgqr_bufferSize",
                   Lb.dorgqr_buffer(h.solver(), int(m), int(n), int(n), A, int(lda), tau, &lwork));
  DeviceBuffer<double> work(size_t(std::max(lwork, 1)), kFn);
  ROCKETKIT_LIB_OK(kFn, "cusolverDnDorgqr",
                   Lb.dorgqr(h.solver(), int(m), int(n), int(n), A, int(lda), tau, work.get(), lwork, info));
}

void gemm(const L::MathLibs& Lb, const L::HandleLease& h, int ta, int tb, int64_t m, int64_t n,
          int64_t k, const double* A, int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc) {
  const double one = 1.0, zero = 0.0;
  ROCKETKIT_LIB_OK(kFn, "cublasDgemm", Lb.dgemm(h.blas(), ta, tb, int(m), int(n), int(k), &one, A, int(lda),
                                                B, int(ldb), &zero, C, int(ldc)));
}

// Everything per layer (see the top of this file). W_dev/S_dev are the caller's row-major inputs.
void build_basis(const L::MathLibs& Lb, const L::HandleLease& h, cudaStream_t st,
                 const double* W_dev, const double* S_dev, int64_t d1, int64_t d2, int ew, int es,
                 const std::string& svd_choice, Basis& b) {
  const int64_t r = std::min(d1, d2);
  b.d1 = d1, b.d2 = d2, b.r = r;
  SolverWorkspace ws;
  DeviceBuffer<int> info(8, kFn);
  ROCKETKIT_CUDA_OK(kFn, cudaMemsetAsync(info.get(), 0, 8 * sizeof(int), st));
  DeviceBuffer<double> partial(kPartials, kFn);
  b.norm_W2.allocate(1, kFn);
  const double one = 1.0, zero = 0.0;
  const double w_scale = std::ldexp(1.0, -ew), s_scale = std::ldexp(1.0, -es);

  // S rescaled by a power of two when it is far from unit scale (exact; as on the CPU).
  DeviceBuffer<double> S_scaled;
  const double* S_use = S_dev;  // column-major view: Sᵀ, lower triangle holds S's upper one
  if (es != 0) {
    S_scaled.allocate(size_t(d1) * size_t(d1), kFn);
    ROCKETKIT_LIB_OK(kFn, "cublasDgeam", Lb.dgeam(h.blas(), L::kOpN, L::kOpN, int(d1), int(d1), &s_scale, S_dev,
                                                 int(d1), &zero, S_dev, int(d1), S_scaled.get(), int(d1)));
    S_use = S_scaled.get();
  }

  DeviceBuffer<double> KL(size_t(r) * r, kFn), KW(size_t(r) * r, kFn), Qw;
  {
    DeviceBuffer<double> tau(size_t(r), kFn);
    if (d1 >= d2) {
      // W column-major (d1×d2) from the row-major input, scaled; W_L = S·W.
      DeviceBuffer<double> Wc(size_t(d1) * d2, kFn), WLc(size_t(d1) * d2, kFn);
      ROCKETKIT_LIB_OK(kFn, "cublasDgeam", Lb.dgeam(h.blas(), L::kOpT, L::kOpT, int(d1), int(d2), &w_scale, W_dev,
                                                   int(d2), &zero, W_dev, int(d2), Wc.get(), int(d1)));
      sum_squares_partial_kernel<<<kPartials, kThreads, 0, st>>>(Wc.get(), d1 * d2, partial.get());
      reduce_partials_kernel<<<1, kThreads, 0, st>>>(partial.get(), kPartials, 1, b.norm_W2.get());
      launch_check("the norm of W");
      ROCKETKIT_LIB_OK(kFn, "cublasDtrmm", Lb.dtrmm(h.blas(), L::kSideLeft, L::kFillLower, L::kOpT, L::kDiagNonUnit,
                                                   int(d1), int(d2), &one, S_use, int(d1), Wc.get(), int(d1),
                                                   WLc.get(), int(d1)));
      geqrf(Lb, h, ws, d1, d2, WLc.get(), d1, tau.get(), info.get() + 0);
      copy_upper_kernel<<<grid_for(r * r, kThreads), kThreads, 0, st>>>(WLc.get(), d1, r, KL.get());
      geqrf(Lb, h, ws, d1, d2, Wc.get(), d1, tau.get(), info.get() + 1);
      copy_upper_kernel<<<grid_for(r * r, kThreads), kThreads, 0, st>>>(Wc.get(), d1, r, KW.get());
      launch_check("the R factors");
    } else {
      // Wᵀ (d2×d1) is the row-major input read column-major: QR it, K_W = R_wᵀ, K_L = S·K_W.
      Qw.allocate(size_t(d2) * d1, kFn);
      ROCKETKIT_LIB_OK(kFn, "cublasDgeam", Lb.dgeam(h.blas(), L::kOpN, L::kOpN, int(d2), int(d1), &w_scale, W_dev,
                                                   int(d2), &zero, W_dev, int(d2), Qw.get(), int(d2)));
      sum_squares_partial_kernel<<<kPartials, kThreads, 0, st>>>(Qw.get(), d1 * d2, partial.get());
      reduce_partials_kernel<<<1, kThreads, 0, st>>>(partial.get(), kPartials, 1, b.norm_W2.get());
      launch_check("the norm of W");
      geqrf(Lb, h, ws, d2, d1, Qw.get(), d2, tau.get(), info.get() + 0);
      transpose_upper_kernel<<<grid_for(r * r, kThreads), kThreads, 0, st>>>(Qw.get(), d2, r, KW.get());
      launch_check("the R factor");
      orgqr(Lb, h, d2, d1, Qw.get(), d2, tau.get(), info.get() + 1);
      ROCKETKIT_LIB_OK(kFn, "cublasDtrmm", Lb.dtrmm(h.blas(), L::kSideLeft, L::kFillLower, L::kOpT, L::kDiagNonUnit,
                                                   int(r), int(r), &one, S_use, int(d1), KW.get(), int(r),
                                                   KL.get(), int(r)));
    }
  }
  S_scaled.release();

  // SVD of K_L: σ (descending) and Ṽᵀ (VTs, r×r).
  b.sigma.allocate(size_t(r), kFn);
  b.sigma_host.assign(size_t(r), 0.0);
  DeviceBuffer<double> VTs(size_t(r) * r, kFn);
  {
    DeviceBuffer<double> A(size_t(r) * r, kFn), U(size_t(r) * r, kFn);
    auto fetch = [&](int slot, int* host_info) {
      ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(host_info, info.get() + slot, sizeof(int), cudaMemcpyDeviceToHost, st));
      ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(b.sigma_host.data(), b.sigma.get(), sizeof(double) * size_t(r),
                                             cudaMemcpyDeviceToHost, st));
      ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(st));
    };
    bool done = false;
    if (svd_choice != "gesvd") {
      copy_square(KL.get(), r, A.get(), st);
      DeviceBuffer<double> V(size_t(r) * r, kFn);
      size_t dev = 0, host = 0;
      ROCKETKIT_LIB_OK(kFn, "cusolverDnXgesvdp_bufferSize",
                       Lb.xgesvdp_buffer(h.solver(), h.params(), L::kEigVector, 1, r, r, kR64, A.get(), r, kR64,
                                         b.sigma.get(), kR64, U.get(), r, kR64, V.get(), r, kR64, &dev, &host));
      ws.reserve(dev, host);
      double err_sigma = 0;
      ROCKETKIT_LIB_OK(kFn, "cusolverDnXgesvdp",
                       Lb.xgesvdp(h.solver(), h.params(), L::kEigVector, 1, r, r, kR64, A.get(), r, kR64,
                                  b.sigma.get(), kR64, U.get(), r, kR64, V.get(), r, kR64, ws.device.get(),
                                  ws.device.size(), ws.host_ptr(), ws.host.size(), info.get() + 2, &err_sigma));
      int svd_info = 0;
      fetch(2, &svd_info);
      // gesvdp perturbs a matrix with singular values near zero and reports by how much; a
      // perturbation visible at fp64 resolution of σ_max would shift the basis, so redo.
      const bool accurate = svd_info == 0 && std::isfinite(err_sigma) && b.sigma_host[0] >= 0 &&
                            err_sigma <= 1e-12 * b.sigma_host[0];
      if (accurate || svd_choice == "gesvdp") {
        if (!accurate)
          ROCKETKIT_FAIL(kFn, "gesvdp failed (info ", svd_info, ", error estimate ", err_sigma,
                         " against sigma_max ", b.sigma_host[0], "); use svd=\"gesvd\" or \"auto\"");
        ROCKETKIT_LIB_OK(kFn, "cublasDgeam", Lb.dgeam(h.blas(), L::kOpT, L::kOpT, int(r), int(r), &one, V.get(),
                                                     int(r), &zero, V.get(), int(r), VTs.get(), int(r)));
        b.svd = "gesvdp";
        b.svd_error = err_sigma;
        done = true;
      }
    }
    if (!done) {
      copy_square(KL.get(), r, A.get(), st);
      size_t dev = 0, host = 0;
      ROCKETKIT_LIB_OK(kFn, "cusolverDnXgesvd_bufferSize",
                       Lb.xgesvd_buffer(h.solver(), h.params(), 'N', 'S', r, r, kR64, A.get(), r, kR64,
                                        b.sigma.get(), kR64, U.get(), r, kR64, VTs.get(), r, kR64, &dev, &host));
      ws.reserve(dev, host);
      ROCKETKIT_LIB_OK(kFn, "cusolverDnXgesvd",
                       Lb.xgesvd(h.solver(), h.params(), 'N', 'S', r, r, kR64, A.get(), r, kR64, b.sigma.get(),
                                 kR64, U.get(), r, kR64, VTs.get(), r, kR64, ws.device.get(), ws.device.size(),
                                 ws.host_ptr(), ws.host.size(), info.get() + 3));
      int svd_info = 0;
      fetch(3, &svd_info);
      if (svd_info != 0) ROCKETKIT_FAIL(kFn, "the SVD of S·W did not converge (gesvd info ", svd_info, ")");
      b.svd = "gesvd";
      b.svd_error = 0;
    }
  }

  // V as Vt (r×d2 column-major, column j = row j of V) for the mask.
  if (d1 >= d2) {
    b.Vt = std::move(VTs);  // Vb = I: V = Ṽ
  } else {
    b.Vt.allocate(size_t(r) * d2, kFn);
    gemm(Lb, h, L::kOpN, L::kOpT, r, d2, r, VTs.get(), r, Qw.get(), d2, b.Vt.get(), r);  // Ṽᵀ·Q_wᵀ
  }
  const double* VTs_ptr = d1 >= d2 ? b.Vt.get() : VTs.get();

  // Tails: σ² and ‖W v_i‖² = ‖K_W ṽ_i‖².
  b.tail_o.allocate(size_t(r) + 1, kFn);
  b.tail_w.allocate(size_t(r) + 1, kFn);
  {
    DeviceBuffer<double> M(size_t(r) * r, kFn), colsq(size_t(r), kFn);
    gemm(Lb, h, L::kOpN, L::kOpT, r, r, r, KW.get(), r, VTs_ptr, r, M.get(), r);
    column_sumsq_kernel<<<grid_for(r * 32, kThreads), kThreads, 0, st>>>(M.get(), r, r, r, colsq.get());
    tails_kernel<<<1, 1, 0, st>>>(b.sigma.get(), colsq.get(), r, b.tail_o.get(), b.tail_w.get());
    launch_check("the spectrum tails");
  }

  // One-solve weights: Z = [K_L/‖W_L‖; K_W/‖W‖] = Q R_z, Q1ᵀQ1 = Ψ Θ Ψᵀ, N = Vb R_zᵀ Ψ.
  b.theta.allocate(size_t(r), kFn);
  b.N.allocate(size_t(d2) * r, kFn);
  {
    DeviceBuffer<double> Z(size_t(2 * r) * r, kFn), tau(size_t(r), kFn), Rz(size_t(r) * r, kFn),
        B1(size_t(r) * r, kFn);
    build_z_kernel<<<grid_for(2 * r * r, kThreads), kThreads, 0, st>>>(KL.get(), KW.get(), r, b.tail_o.get(),
                                                                        b.norm_W2.get(), Z.get());
    launch_check("Z");
    geqrf(Lb, h, ws, 2 * r, r, Z.get(), 2 * r, tau.get(), info.get() + 4);
    copy_upper_kernel<<<grid_for(r * r, kThreads), kThreads, 0, st>>>(Z.get(), 2 * r, r, Rz.get());
    launch_check("R_z");
    orgqr(Lb, h, 2 * r, r, Z.get(), 2 * r, tau.get(), info.get() + 5);
    ROCKETKIT_LIB_OK(kFn, "cublasDsyrk", Lb.dsyrk(h.blas(), L::kFillLower, L::kOpT, int(r), int(r), &one, Z.get(),
                                                 int(2 * r), &zero, B1.get(), int(r)));
    size_t dev = 0, host = 0;
    ROCKETKIT_LIB_OK(kFn, "cusolverDnXsyevd_bufferSize",
                     Lb.xsyevd_buffer(h.solver(), h.params(), L::kEigVector, L::kFillLower, r, kR64, B1.get(), r,
                                      kR64, b.theta.get(), kR64, &dev, &host));
    ws.reserve(dev, host);
    ROCKETKIT_LIB_OK(kFn, "cusolverDnXsyevd",
                     Lb.xsyevd(h.solver(), h.params(), L::kEigVector, L::kFillLower, r, kR64, B1.get(), r, kR64,
                               b.theta.get(), kR64, ws.device.get(), ws.device.size(), ws.host_ptr(),
                               ws.host.size(), info.get() + 6));
    clamp01_kernel<<<grid_for(r, kThreads), kThreads, 0, st>>>(b.theta.get(), r);
    launch_check("θ");
    if (d1 >= d2) {
      gemm(Lb, h, L::kOpT, L::kOpN, r, r, r, Rz.get(), r, B1.get(), r, b.N.get(), r);  // R_zᵀ Ψ
    } else {
      DeviceBuffer<double> Nsm(size_t(r) * r, kFn);
      gemm(Lb, h, L::kOpT, L::kOpN, r, r, r, Rz.get(), r, B1.get(), r, Nsm.get(), r);
      gemm(Lb, h, L::kOpN, L::kOpN, d2, r, r, Qw.get(), d2, Nsm.get(), r, b.N.get(), d2);  // Q_w R_zᵀ Ψ
    }
  }
  int infos[8];
  ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(infos, info.get(), sizeof infos, cudaMemcpyDeviceToHost, st));
  ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(st));
  const char* names[8] = {"QR", "QR", "", "", "QR of [K_L; K_W]", "orgqr", "eigendecomposition", ""};
  for (int i : {0, 1, 4, 5, 6})
    if (infos[i] != 0) ROCKETKIT_FAIL(kFn, "cuSOLVER ", names[i], " failed (info ", infos[i], ")");
}

// One candidate pipeline: a stream, handles bound to it, and a workspace for k ≤ kmax.
struct Pipeline {
  detail::Stream stream;
  L::HandleLease lease;
  DeviceBuffer<double> Cm, G, P, partial, caps;
  SolverWorkspace ws;
  Pipeline() : stream(kFn), lease(kFn) { lease.set_stream(stream.get(), kFn); }
};

struct Statuses {
  DeviceBuffer<int> info, bad;
  DeviceBuffer<double> mean;
};

int64_t norm_blocks(int64_t r) { return (r + kNormWarps - 1) / kNormWarps; }

void launch_mask(const Basis& b, int64_t k, int64_t s, double* Cm, cudaStream_t st, size_t smem_optin) {
  const size_t bytes = size_t(k) * sizeof(unsigned long long);
  if (s < k && bytes <= smem_optin) {
    // Static and dynamic shared memory together must stay under the 48 KB default unless the
    // kernel opts in; opt in with margin for the static arrays.
    if (bytes + 4096 > 48 * 1024)
      ROCKETKIT_CUDA_OK(kFn, cudaFuncSetAttribute(select_mask_kernel<true>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    select_mask_kernel<true><<<unsigned(b.d2), kMaskThreads, bytes, st>>>(b.sigma.get(), b.Vt.get(), b.r,
                                                                          int(k), int(s), Cm);
  } else {
    select_mask_kernel<false><<<unsigned(b.d2), kMaskThreads, 0, st>>>(b.sigma.get(), b.Vt.get(), b.r, int(k),
                                                                       int(s), Cm);
  }
  launch_check("the mask");
}

void gram(const L::MathLibs& Lb, const Pipeline& p, const Basis& b, int64_t k, int64_t s) {
  if (s == k) {
    diag_gram_kernel<<<grid_for(k * k, kThreads), kThreads, 0, p.stream.get()>>>(b.sigma.get(), k, p.G.get());
    launch_check("the Gram");
  } else {
    const double one = 1.0, zero = 0.0;
    ROCKETKIT_LIB_OK(kFn, "cublasDsyrk", Lb.dsyrk(p.lease.blas(), L::kFillLower, L::kOpN, int(k), int(b.d2), &one,
                                                 p.Cm.get(), int(k), &zero, p.G.get(), int(k)));
  }
}

void potrf(const L::MathLibs& Lb, Pipeline& p, int64_t k, int* info) {
  ROCKETKIT_LIB_OK(kFn, "cusolverDnXpotrf",
                   Lb.xpotrf(p.lease.solver(), p.lease.params(), L::kFillLower, k, kR64, p.G.get(), k, kR64,
                             p.ws.device.get(), p.ws.device.size(), p.ws.host_ptr(), p.ws.host.size(), info));
}

// T = L⁻¹·C_m·N, its weighted norms (and with a ridge those of L⁻ᵀT), then e.
void solve_and_finish(const L::MathLibs& Lb, Pipeline& p, const Basis& b, int64_t k, double eps,
                      double* e_w, double* e_o) {
  const cudaStream_t st = p.stream.get();
  const int64_t r = b.r, nb = norm_blocks(r);
  const double one = 1.0;
  gemm(Lb, p.lease, L::kOpN, L::kOpN, k, r, b.d2, p.Cm.get(), k, b.N.get(), b.d2, p.P.get(), k);
  ROCKETKIT_LIB_OK(kFn, "cublasDtrsm", Lb.dtrsm(p.lease.blas(), L::kSideLeft, L::kFillLower, L::kOpN,
                                               L::kDiagNonUnit, int(k), int(r), &one, p.G.get(), int(k),
                                               p.P.get(), int(k)));
  weighted_norms_kernel<<<unsigned(nb), kNormWarps * 32, 0, st>>>(p.P.get(), k, r, b.theta.get(), p.partial.get());
  reduce_partials_kernel<<<1, kThreads, 0, st>>>(p.partial.get(), nb, 2, p.caps.get());
  if (eps > 0) {
    // With D* = W_L C_mᵀ(G+εI)⁻¹ the residual loses ε‖(G+εI)⁻¹ C_m W_Lᵀ‖² more: L⁻ᵀ T.
    ROCKETKIT_LIB_OK(kFn, "cublasDtrsm", Lb.dtrsm(p.lease.blas(), L::kSideLeft, L::kFillLower, L::kOpT,
                                                 L::kDiagNonUnit, int(k), int(r), &one, p.G.get(), int(k),
                                                 p.P.get(), int(k)));
    weighted_norms_kernel<<<unsigned(nb), kNormWarps * 32, 0, st>>>(p.P.get(), k, r, b.theta.get(),
                                                                    p.partial.get());
    reduce_partials_kernel<<<1, kThreads, 0, st>>>(p.partial.get(), nb, 2, p.caps.get() + 2);
  }
  finish_errors_kernel<<<1, 1, 0, st>>>(p.caps.get(), eps, e_w, e_o);
  launch_check("the norms");
}

double candidate_flops(int64_t k, int64_t s, int64_t d2, int64_t r, bool ridge) {
  const double K = double(k);
  double f = (s == k ? 0.0 : K * K * double(d2)) + 2.0 * K * double(d2) * double(r) + K * K * K / 3.0 +
             K * K * double(r);
  if (ridge) f += K * K * double(r);
  return f;
}

}  // namespace

ErrorsStats whitened_errors(const double* W_dev, const double* S_dev, int64_t d1, int64_t d2,
                            const int64_t* candidates, int64_t n, double* e_weight_dev,
                            double* e_output_dev, void* stream, const ErrorsOptions& options) {
  const auto t_start = std::chrono::steady_clock::now();
  if (!has_cuda()) ROCKETKIT_FAIL(kFn, "no CUDA device is visible (driver missing or no GPU)");
  ROCKETKIT_CHECK(n >= 0, kFn, "candidate count must be >= 0, got ", n);
  ROCKETKIT_CHECK(d1 >= 1 && d2 >= 1, kFn, "W must be non-empty, got ", d1, "x", d2);
  ROCKETKIT_CHECK(d1 <= std::numeric_limits<int32_t>::max() && d2 <= std::numeric_limits<int32_t>::max(), kFn,
                  "W is ", d1, "x", d2, ": each side must fit in int32 (cuBLAS)");
  // The legacy (32-bit) orgqr forms Q_w (d2×d1, when d1 < d2) and the 2r×r Q of [K_L; K_W].
  ROCKETKIT_CHECK((d1 >= d2 || d1 <= std::numeric_limits<int32_t>::max() / d2) &&
                      std::min(d1, d2) <= std::numeric_limits<int32_t>::max() / (2 * std::min(d1, d2)),
                  kFn, "W is ", d1, "x", d2, ": too large for cuSOLVER's 32-bit orgqr");
  ROCKETKIT_CHECK(W_dev != nullptr && S_dev != nullptr, kFn, "W and S must not be null");
  ROCKETKIT_CHECK(options.svd == "auto" || options.svd == "gesvdp" || options.svd == "gesvd", kFn,
                  "svd must be \"auto\", \"gesvdp\" or \"gesvd\", got \"", options.svd, "\"");
  ROCKETKIT_CHECK(options.max_streams >= 0 && options.max_streams <= 64, kFn,
                  "max_streams must be in [0, 64], got ", options.max_streams);
  const int64_t r = std::min(d1, d2);
  if (n > 0) {
    ROCKETKIT_CHECK(candidates != nullptr && e_weight_dev != nullptr && e_output_dev != nullptr, kFn,
                    "candidates and outputs must not be null");
    for (int64_t c = 0; c < n; ++c) {
      const int64_t k = candidates[2 * c], s = candidates[2 * c + 1];
      ROCKETKIT_CHECK(k >= 1 && k <= r, kFn, "candidate ", c, ": rank k = ", k, " must be in [1, min(d1, d2) = ", r, "]");
      ROCKETKIT_CHECK(s >= 1 && s <= k, kFn, "candidate ", c, ": s = ", s, " must be in [1, k = ", k, "]");
    }
  }

  detail::DeviceOf device(W_dev, "W", kFn);
  device.check_same(S_dev, "S", kFn);
  if (n > 0) {
    device.check_same(e_weight_dev, "e_weight", kFn);
    device.check_same(e_output_dev, "e_output", kFn);
  }
  const L::MathLibs& Lb = L::math_libs(kFn);
  const cudaStream_t user = static_cast<cudaStream_t>(stream);
  ErrorsStats stats;

  // Inputs are validated on the device; only the verdict comes back.
  Pipeline p0;
  const cudaStream_t st0 = p0.stream.get();
  detail::Event ev(kFn);
  detail::stream_wait(st0, user, ev, kFn);
  Validation v;
  {
    DeviceBuffer<Validation> dv(1, kFn);
    const Validation init{kNone, kNone, kNone, 0, 0, kNone};
    ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(dv.get(), &init, sizeof init, cudaMemcpyHostToDevice, st0));
    validate_layer_kernel<<<grid_for(std::max(d1 * d2, d1 * d1), kThreads, 4096), kThreads, 0, st0>>>(
        W_dev, d1 * d2, S_dev, d1, dv.get());
    launch_check("the input checks");
    ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(&v, dv.get(), sizeof v, cudaMemcpyDeviceToHost, st0));
    ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(st0));
  }
  if (v.s_diag_bad != kNone) {
    const int64_t i = int64_t(v.s_diag_bad);
    double sii = 0;
    ROCKETKIT_CUDA_OK(kFn, cudaMemcpy(&sii, S_dev + i * d1 + i, sizeof sii, cudaMemcpyDeviceToHost));
    ROCKETKIT_CHECK(false, kFn, "S must have a positive finite diagonal, S[", i, ", ", i, "] = ", sii);
  }
  ROCKETKIT_CHECK(v.w_bad == kNone, kFn, "W has a non-finite entry at (", int64_t(v.w_bad) / d2, ", ",
                  int64_t(v.w_bad) % d2, ")");
  ROCKETKIT_CHECK(v.s_bad == kNone, kFn, "S has a non-finite entry at (", int64_t(v.s_bad) / d1, ", ",
                  int64_t(v.s_bad) % d1, ")");
  if (n == 0) return stats;
  if (v.w_max == 0) {  // documented: a zero layer has nothing to lose
    ROCKETKIT_CUDA_OK(kFn, cudaMemsetAsync(e_weight_dev, 0, sizeof(double) * size_t(n), st0));
    ROCKETKIT_CUDA_OK(kFn, cudaMemsetAsync(e_output_dev, 0, sizeof(double) * size_t(n), st0));
    detail::stream_wait(user, st0, ev, kFn);
    ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(st0));
    return stats;
  }
  int ew = max_exponent(bits_to_double(v.w_max)), es = max_exponent(bits_to_double(v.s_max));
  if (std::abs(ew) <= kSafeExponent) ew = 0;
  if (std::abs(es) <= kSafeExponent) es = 0;
  ROCKETKIT_CHECK(std::ldexp(bits_to_double(v.s_min_diag), -es) > 0, kFn,
                  "the smallest diagonal entry of S underflows once S is scaled to unit size: its "
                  "diagonal spans more than the double range (S is numerically singular)");

  Basis b;
  build_basis(Lb, p0.lease, st0, W_dev, S_dev, d1, d2, ew, es, options.svd, b);
  stats.svd = b.svd;
  stats.svd_error_estimate = b.svd_error;
  const auto t_basis = std::chrono::steady_clock::now();

  // Split: s = k with σ_{k−1} > 0 is a nested truncation (closed form, no factorization).
  std::vector<int64_t> nested_k, nested_row, full;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t k = candidates[2 * c], s = candidates[2 * c + 1];
    const double sk = b.sigma_host[size_t(k - 1)];
    if (s == k && sk * sk > 0) nested_k.push_back(k), nested_row.push_back(c);
    else full.push_back(c);
  }
  if (!nested_k.empty()) {
    const int64_t m = int64_t(nested_k.size());
    DeviceBuffer<int64_t> dk(size_t(m), kFn), drow(size_t(m), kFn);
    ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(dk.get(), nested_k.data(), sizeof(int64_t) * m, cudaMemcpyHostToDevice, st0));
    ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(drow.get(), nested_row.data(), sizeof(int64_t) * m, cudaMemcpyHostToDevice, st0));
    nested_errors_kernel<<<grid_for(m, kThreads), kThreads, 0, st0>>>(dk.get(), drow.get(), m, b.tail_o.get(),
                                                                      b.tail_w.get(), b.norm_W2.get(),
                                                                      e_weight_dev, e_output_dev);
    launch_check("the nested errors");
    ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(st0));  // before dk/drow go out of scope
  }

  if (!full.empty()) {
    // Largest ranks first, round-robin over the pipelines.
    std::stable_sort(full.begin(), full.end(),
                     [&](int64_t a, int64_t c) { return candidates[2 * a] > candidates[2 * c]; });
    const int64_t kmax = candidates[2 * full[0]];
    const int64_t nb = norm_blocks(r);
    int dev = 0;
    ROCKETKIT_CUDA_OK(kFn, cudaGetDevice(&dev));
    int optin = 0;
    ROCKETKIT_CUDA_OK(kFn, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    const size_t smem_optin = size_t(std::max(0, optin - 4096));  // room for the static arrays

    // Cholesky workspace: the largest over the ranks in use.
    size_t potrf_dev = 0, potrf_host = 0;
    {
      std::vector<int64_t> ks;
      for (int64_t c : full) ks.push_back(candidates[2 * c]);
      std::sort(ks.begin(), ks.end());
      ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
      for (int64_t k : ks) {
        size_t dv = 0, hv = 0;
        ROCKETKIT_LIB_OK(kFn, "cusolverDnXpotrf_bufferSize",
                         Lb.xpotrf_buffer(p0.lease.solver(), p0.lease.params(), L::kFillLower, k, kR64, b.N.get(),
                                          k, kR64, &dv, &hv));
        potrf_dev = std::max(potrf_dev, dv);
        potrf_host = std::max(potrf_host, hv);
      }
    }
    const double per_pipeline = 8.0 * (double(kmax) * (double(b.d2) + double(kmax) + double(r)) + 2.0 * nb + 4) +
                                double(potrf_dev);
    size_t free_b = 0, total_b = 0;
    ROCKETKIT_CUDA_OK(kFn, cudaMemGetInfo(&free_b, &total_b));
    const double usable = 0.9 * double(free_b) - 256.0 * (1 << 20);
    int64_t pipelines = options.max_streams > 0 ? options.max_streams
                        // Big products fill the GPU alone; small ones need company to hide launches.
                        : (double(kmax) * double(b.d2) * double(r) > 4e9 ? 2 : 4);
    pipelines = std::min<int64_t>({pipelines, int64_t(full.size()), int64_t(usable / per_pipeline)});
    if (pipelines < 1)
      ROCKETKIT_FAIL(kFn, "out of GPU memory: one candidate pipeline needs ", int64_t(per_pipeline) >> 20,
                     " MiB (rank ", kmax, ", ", b.d2, " columns), only ", free_b >> 20, " MiB free");
    stats.streams = int(pipelines);

    std::vector<std::unique_ptr<Pipeline>> extra;  // pipelines 1.. (0 is p0, which built the basis)
    for (int64_t q = 1; q < pipelines; ++q) extra.emplace_back(new Pipeline());
    auto pipe = [&](int64_t q) -> Pipeline& { return q == 0 ? p0 : *extra[size_t(q - 1)]; };
    for (int64_t q = 0; q < pipelines; ++q) {
      Pipeline& p = pipe(q);
      p.Cm.allocate(size_t(kmax) * size_t(b.d2), kFn);
      p.G.allocate(size_t(kmax) * size_t(kmax), kFn);
      p.P.allocate(size_t(kmax) * size_t(r), kFn);
      p.partial.allocate(size_t(2 * nb), kFn);
      p.caps.allocate(4, kFn);
      p.ws.reserve(potrf_dev, potrf_host);
    }

    Statuses status;
    status.info.allocate(size_t(n), kFn);
    status.bad.allocate(size_t(n), kFn);
    status.mean.allocate(size_t(n), kFn);
    ROCKETKIT_CUDA_OK(kFn, cudaMemsetAsync(status.info.get(), 0, sizeof(int) * size_t(n), st0));
    ROCKETKIT_CUDA_OK(kFn, cudaMemsetAsync(status.bad.get(), 0, sizeof(int) * size_t(n), st0));
    // The basis and the zeroed statuses are ready before any other pipeline starts.
    for (int64_t q = 1; q < pipelines; ++q) detail::stream_wait(pipe(q).stream.get(), st0, ev, kFn);

    // Every candidate optimistically without a ridge; the factorization's verdict is read once.
    for (size_t t = 0; t < full.size(); ++t) {
      const int64_t c = full[t], k = candidates[2 * c], s = candidates[2 * c + 1];
      Pipeline& p = pipe(int64_t(t) % pipelines);
      const cudaStream_t st = p.stream.get();
      launch_mask(b, k, s, p.Cm.get(), st, smem_optin);
      gram(Lb, p, b, k, s);
      mean_diag_kernel<<<1, kThreads, 0, st>>>(p.G.get(), k, status.mean.get() + c);
      potrf(Lb, p, k, status.info.get() + c);
      check_factor_kernel<<<grid_for(k, kThreads), kThreads, 0, st>>>(p.G.get(), k, status.bad.get() + c);
      solve_and_finish(Lb, p, b, k, 0.0, e_weight_dev + c, e_output_dev + c);
      stats.candidate_flops += candidate_flops(k, s, b.d2, r, false);
    }
    for (int64_t q = 1; q < pipelines; ++q) detail::stream_wait(st0, pipe(q).stream.get(), ev, kFn);
    std::vector<int> info(static_cast<size_t>(n)), bad(static_cast<size_t>(n));
    std::vector<double> mean(static_cast<size_t>(n));
    ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(info.data(), status.info.get(), sizeof(int) * n, cudaMemcpyDeviceToHost, st0));
    ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(bad.data(), status.bad.get(), sizeof(int) * n, cudaMemcpyDeviceToHost, st0));
    ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(mean.data(), status.mean.get(), sizeof(double) * n, cudaMemcpyDeviceToHost, st0));
    ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(st0));

    // Candidates whose G was singular: the ridge loop, ε = 1e-12·mean(diag G), ×10 per try.
    for (int64_t c : full) {
      if (info[size_t(c)] == 0 && bad[size_t(c)] == 0) continue;
      ROCKETKIT_CHECK(info[size_t(c)] >= 0, kFn, "cusolverDnXpotrf argument error ", info[size_t(c)]);
      const int64_t k = candidates[2 * c], s = candidates[2 * c + 1];
      const double base = mean[size_t(c)] > 0 ? mean[size_t(c)] : 1.0;
      launch_mask(b, k, s, p0.Cm.get(), st0, smem_optin);
      double eps = 1e-12 * base;
      bool ok = false;
      for (int attempt = 1; attempt < 64 && !ok; ++attempt) {
        gram(Lb, p0, b, k, s);
        add_ridge_kernel<<<grid_for(k, kThreads), kThreads, 0, st0>>>(p0.G.get(), k, eps);
        ROCKETKIT_CUDA_OK(kFn, cudaMemsetAsync(status.bad.get() + c, 0, sizeof(int), st0));
        potrf(Lb, p0, k, status.info.get() + c);
        check_factor_kernel<<<grid_for(k, kThreads), kThreads, 0, st0>>>(p0.G.get(), k, status.bad.get() + c);
        launch_check("the ridge");
        int verdict[2];
        ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(&verdict[0], status.info.get() + c, sizeof(int), cudaMemcpyDeviceToHost, st0));
        ROCKETKIT_CUDA_OK(kFn, cudaMemcpyAsync(&verdict[1], status.bad.get() + c, sizeof(int), cudaMemcpyDeviceToHost, st0));
        ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(st0));
        ok = verdict[0] == 0 && verdict[1] == 0;
        if (!ok) eps *= 10;
      }
      if (!ok) ROCKETKIT_FAIL(kFn, "Cholesky of C·Cᵀ failed even with a ridge of ", eps);
      solve_and_finish(Lb, p0, b, k, eps, e_weight_dev + c, e_output_dev + c);
      stats.ridge_reruns += 1;
      stats.candidate_flops += candidate_flops(k, s, b.d2, r, true);
    }
  }
  detail::stream_wait(user, st0, ev, kFn);
  ROCKETKIT_CUDA_OK(kFn, cudaStreamSynchronize(st0));
  const auto t_end = std::chrono::steady_clock::now();
  stats.basis_seconds = std::chrono::duration<double>(t_basis - t_start).count();
  stats.candidates_seconds = std::chrono::duration<double>(t_end - t_basis).count();
  return stats;
}

}  // namespace rocketkit::cuda
