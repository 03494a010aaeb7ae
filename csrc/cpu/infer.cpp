// CPU kernel for factorized layers: z = x·U by BLAS (column slices of U over our threads,
// single-threaded BLAS each), then the column-sparse product z·C.
//
// The sparse step gathers rows of zᵀ: for a block of jb output columns and a chunk of at most
// kRowChunk input rows, zᵀ of that chunk (k×NB) is contiguous per row of C, so each nonzero
// of C is one contiguous vector axpy of length NB into an accumulator that stays in L1.
// values and indices (s×d2) are read once per row chunk, row t after row t, jb entries each.
#include "rocketkit/infer.h"

#include <algorithm>
#include <atomic>
#include <cblas.h>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "rocketkit/check.h"

namespace rocketkit {
namespace {

constexpr int64_t kRowChunk = 16;
constexpr int64_t kAccBytes = 16 * 1024;  // accumulator budget per task (L1)
constexpr int64_t kMinWorkPerThread = 1 << 16;

// z[:, c0:c1) = x·U[:, c0:c1); z and U have row stride k.
void gemm_xu(const float* x, int64_t n, int64_t d1, const float* U, int64_t k, int64_t c0, int64_t c1,
             float* z) {
  if (n == 1)
    scipy_cblas_sgemv(CblasRowMajor, CblasTrans, int(d1), int(c1 - c0), 1.0f, U + c0, int(k), x, 1, 0.0f,
                      z + c0, 1);
  else
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(c1 - c0), int(d1), 1.0f, x,
                      int(d1), U + c0, int(k), 0.0f, z + c0, int(k));
}

void gemm_xu(const double* x, int64_t n, int64_t d1, const double* U, int64_t k, int64_t c0, int64_t c1,
             double* z) {
  if (n == 1)
    scipy_cblas_dgemv(CblasRowMajor, CblasTrans, int(d1), int(c1 - c0), 1.0, U + c0, int(k), x, 1, 0.0,
                      z + c0, 1);
  else
    scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(c1 - c0), int(d1), 1.0, x,
                      int(d1), U + c0, int(k), 0.0, z + c0, int(k));
}

// Runs fn(t) for t in [0, threads) on threads-1 new threads and the caller.
template <typename F>
void run_parallel(int threads, F&& fn) {
  if (threads <= 1) {
    fn(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads - 1));
  std::exception_ptr err;
  std::mutex mu;
  auto guarded = [&](int t) {
    try {
      fn(t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!err) err = std::current_exception();
    }
  };
  for (int t = 1; t < threads; ++t) pool.emplace_back(guarded, t);
  guarded(0);
  for (auto& th : pool) th.join();
  if (err) std::rethrow_exception(err);
}

// x·U split by columns of U over our own threads, each with single-threaded BLAS: small-n
// products are memory-bound, and OpenBLAS's own threads spin badly on a busy machine.
template <typename T>
void parallel_xu(const T* x, int64_t n, int64_t d1, const T* U, int64_t k, T* z, int threads) {
  threads = int(std::min<int64_t>({int64_t(threads), k / 64 + 1,
                                   std::max<int64_t>(1, n * d1 * k / (1 << 20))}));
  // Column slices in multiples of 16 so each starts on a cache-line boundary of U's rows.
  const int64_t per = ((k + threads - 1) / threads + 15) / 16 * 16;
  // OpenBLAS's setting is process-wide (as in whitened_errors): concurrent callers take turns
  // so that each restores what it found. Restored even on exceptions.
  static std::mutex blas_setting;
  std::lock_guard<std::mutex> lock(blas_setting);
  struct BlasThreads {
    int saved = scipy_openblas_get_num_threads();
    BlasThreads() { scipy_openblas_set_num_threads(1); }
    ~BlasThreads() { scipy_openblas_set_num_threads(saved); }
  } one_blas_thread;
  run_parallel(threads, [&](int t) {
    const int64_t c0 = std::min(k, t * per), c1 = std::min(k, c0 + per);
    if (c0 < c1) gemm_xu(x, n, d1, U, k, c0, c1, z);
  });
}

// 32-byte vectors (AVX; two SSE registers without it), element-aligned so any float row works.
template <typename T> struct Vec32;
template <> struct Vec32<float> { typedef float type __attribute__((vector_size(32), aligned(4))); };
template <> struct Vec32<double> { typedef double type __attribute__((vector_size(32), aligned(8))); };

// True when every index in r[0, m) lies in [0, k). Branch-free, so it vectorizes.
template <typename I>
bool indices_in_range(const I* r, int64_t m, int64_t k) {
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < m; ++i) {
    lo = std::min<int64_t>(lo, r[i]);
    hi = std::max<int64_t>(hi, r[i]);
  }
  return lo >= 0 && hi < k;
}

// One task: output columns [j0, j1) for the row chunk whose zᵀ (k×NB, rows padded with
// zeros up to NB) starts at zt; writes rows [i0, i0 + nb) of y. NB is a compile-time width
// so the per-nonzero axpy is a fixed number of vector FMAs. Returns false on a bad index.
template <int NB, typename T, typename I>
bool sparse_block(const T* __restrict zt, int64_t nb, int64_t k, const T* values, const I* indices,
                  int64_t s, int64_t d2, const T* bias, int64_t j0, int64_t j1, int64_t i0,
                  T* __restrict acc, T* y) {
  const int64_t jb = j1 - j0;
  for (int64_t jj = 0; jj < jb; ++jj) {
    const T b = bias ? bias[j0 + jj] : T(0);
    for (int i = 0; i < NB; ++i) acc[jj * NB + i] = b;
  }
  for (int64_t t = 0; t < s; ++t) {
    const T* __restrict v = values + t * d2 + j0;
    const I* __restrict r = indices + t * d2 + j0;
    if (!indices_in_range(r, jb, k)) return false;
    if constexpr (NB == 1) {
      for (int64_t jj = 0; jj < jb; ++jj) acc[jj] += v[jj] * zt[r[jj]];
    } else if constexpr (NB * sizeof(T) < 32) {  // not used (NB is at least one vector)
      for (int64_t jj = 0; jj < jb; ++jj)
        for (int i = 0; i < NB; ++i) acc[jj * NB + i] += v[jj] * zt[int64_t(r[jj]) * NB + i];
    } else {
      // Whole-row vector ops: GCC/Clang vector extensions; plain loops here get vectorized
      // across jj with gathers, several times slower.
      using V = typename Vec32<T>::type;
      constexpr int NV = NB * int(sizeof(T)) / 32;
      const V* zv = reinterpret_cast<const V*>(zt);
      V* av = reinterpret_cast<V*>(acc);
      for (int64_t jj = 0; jj < jb; ++jj) {
        const T vj = v[jj];
        const V* zr = zv + int64_t(r[jj]) * NV;
        V* a = av + jj * NV;
        for (int i = 0; i < NV; ++i) a[i] += vj * zr[i];
      }
    }
  }
  for (int64_t i = 0; i < nb; ++i) {
    T* yi = y + (i0 + i) * d2 + j0;
    for (int64_t jj = 0; jj < jb; ++jj) yi[jj] = acc[jj * NB + i];
  }
  return true;
}

template <typename T, typename I>
void factorized_matmul_impl(const T* x, int64_t n, int64_t d1, const T* U, int64_t k,
                            const T* values, const I* indices, int64_t s, int64_t d2, const T* bias,
                            T* y, int num_threads) {
  const char* fn = "factorized_matmul";
  constexpr int64_t kBlasMax = std::numeric_limits<int>::max();
  ROCKETKIT_CHECK(n >= 0 && d1 >= 1 && d2 >= 1 && k >= 1, fn,
                  "need n >= 0 and d1, d2, k >= 1, got n=", n, " d1=", d1, " d2=", d2, " k=", k);
  ROCKETKIT_CHECK(s >= 1 && s <= k, fn, "need 1 <= s <= k, got s=", s, " k=", k);
  ROCKETKIT_CHECK(n <= kBlasMax && d1 <= kBlasMax && k <= kBlasMax && d2 <= kBlasMax, fn,
                  "n, d1, k and d2 must be below 2^31");
  ROCKETKIT_CHECK(num_threads >= 0, fn, "num_threads must be >= 0, got ", num_threads);
  ROCKETKIT_CHECK(x && U && values && indices && y, fn, "null buffer");
  if (n == 0) return;

  const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  const int max_threads = num_threads > 0 ? num_threads : hw;
  std::vector<T> z(size_t(n) * size_t(k));
  parallel_xu(x, n, d1, U, k, z.data(), max_threads);

  // zᵀ by row chunk: chunk c (rows [c·R, c·R + nb)) is a k×NB block at offset c·R·k, its
  // columns past nb zero. NB = 1 for a single row, else the smallest of 4, 8, 16 that is ≥ n
  // and fills a 32-byte vector.
  constexpr int kLanes = 32 / int(sizeof(T));
  const int NB = n == 1 ? 1 : std::max<int>(kLanes, n <= 4 ? 4 : n <= 8 ? 8 : int(kRowChunk));
  const int64_t chunks = (n + NB - 1) / NB;
  std::vector<T> zt;
  const T* ztp = z.data();
  if (NB > 1) {
    zt.assign(size_t(chunks * NB * k), T(0));
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t i0 = c * NB, nb = std::min<int64_t>(NB, n - i0);
      T* blk = zt.data() + c * NB * k;
      for (int64_t i = 0; i < nb; ++i)
        for (int64_t r = 0; r < k; ++r) blk[r * NB + i] = z[(i0 + i) * k + r];
    }
    ztp = zt.data();
  }

  const int64_t jb = std::max<int64_t>(16, kAccBytes / int64_t(sizeof(T)) / NB);
  const int64_t col_blocks = (d2 + jb - 1) / jb;
  const int64_t tasks = chunks * col_blocks;
  const int64_t work = n * s * d2;
  const int threads = int(std::min<int64_t>({int64_t(max_threads), tasks,
                                   std::max<int64_t>(1, work / kMinWorkPerThread)}));

  std::atomic<int64_t> next{0};
  std::atomic<bool> bad{false};
  run_parallel(threads, [&](int) {
    std::vector<T> acc(size_t(jb * NB));
    for (int64_t task; !bad.load(std::memory_order_relaxed) && (task = next++) < tasks;) {
      const int64_t c = task / col_blocks, j0 = (task % col_blocks) * jb;
      const int64_t i0 = c * NB, nb = std::min<int64_t>(NB, n - i0), j1 = std::min(d2, j0 + jb);
      const T* blk = ztp + c * NB * k;
      bool ok;
      switch (NB) {
        case 1: ok = sparse_block<1>(blk, nb, k, values, indices, s, d2, bias, j0, j1, i0, acc.data(), y); break;
        case 4: ok = sparse_block<4>(blk, nb, k, values, indices, s, d2, bias, j0, j1, i0, acc.data(), y); break;
        case 8: ok = sparse_block<8>(blk, nb, k, values, indices, s, d2, bias, j0, j1, i0, acc.data(), y); break;
        default: ok = sparse_block<16>(blk, nb, k, values, indices, s, d2, bias, j0, j1, i0, acc.data(), y);
      }
      if (!ok) bad = true;
    }
  });
  ROCKETKIT_CHECK(!bad, fn, "an index of C is outside [0, k = ", k, ")");
}

}  // namespace

void factorized_matmul(const float* x, int64_t n, int64_t d1, const float* U, int64_t k,
                       const float* values, const int16_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads);
}
void factorized_matmul(const float* x, int64_t n, int64_t d1, const float* U, int64_t k,
                       const float* values, const int32_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads);
}
void factorized_matmul(const double* x, int64_t n, int64_t d1, const double* U, int64_t k,
                       const double* values, const int16_t* indices, int64_t s, int64_t d2,
                       const double* bias, double* y, int num_threads) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads);
}
void factorized_matmul(const double* x, int64_t n, int64_t d1, const double* U, int64_t k,
                       const double* values, const int32_t* indices, int64_t s, int64_t d2,
                       const double* bias, double* y, int num_threads) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads);
}

}  // namespace rocketkit
