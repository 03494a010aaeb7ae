// CPU kernel for factorized layers, y = x·U·C + b.
//
// Step 1, z = x·U (n×k): BLAS, column slices of U over our threads, single-threaded BLAS each.
// Step 2, the column-sparse product y[:, j] = b[j] + Σ_t values[t, j]·z[:, indices[t, j]].
//   values and indices are s×d2 row-major, so a row t is contiguous across output columns.
//   n = 1: vectorized across output columns, gathering from z (k entries, in L1).
//   n > 1: z transposed into chunks of NB inputs (k×NB each, in L2), so one nonzero is one
//          contiguous axpy of NB lanes, vectorized across inputs.
//   Both keep each column's accumulator in registers over a tile of kRowTile consecutive t and
//   give each task a block of columns, so values/indices stream from memory once per chunk.
// Index checks are fused into the loads (one unsigned compare per vector of indices); callers
// that validated the indices once may skip them. bf16/fp16 weights are read as stored and
// widened to fp32 on the fly (x·U converts one L2-sized tile of U at a time for BLAS), so a
// half-precision layer streams half the bytes of an fp32 one.
#include "rocketkit/infer.h"

#include <algorithm>
#include <atomic>
#include <cblas.h>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "rocketkit/check.h"

namespace rocketkit {
namespace {

// Tile sizes; the -D overrides exist for tuning runs only.
#ifndef ROCKETKIT_INFER_ROW_TILE
#define ROCKETKIT_INFER_ROW_TILE 8
#endif
#ifndef ROCKETKIT_INFER_GATHER_ROW_TILE
#define ROCKETKIT_INFER_GATHER_ROW_TILE 4
#endif
#ifndef ROCKETKIT_INFER_GATHER_COLS
#define ROCKETKIT_INFER_GATHER_COLS 1024
#endif
// n > 1: t per register-held accumulator pass.
constexpr int64_t kRowTile = ROCKETKIT_INFER_ROW_TILE;
// n = 1: t per pass. Each pass streams this many rows of values and indices at once, few
// enough for the hardware prefetcher to follow every stream.
constexpr int64_t kGatherRowTile = ROCKETKIT_INFER_GATHER_ROW_TILE;
// n = 1: least columns per task. A task is a contiguous column range (long sequential reads
// per row), four per thread so that a thread slowed by a busy machine is helped out.
constexpr int64_t kGatherCols = ROCKETKIT_INFER_GATHER_COLS;
constexpr int64_t kAccBytes = 16 * 1024;        // n > 1: accumulator block per task (L1)
// Vector operations (one per nonzero and vector of inputs) per extra thread of the sparse
// step, and multiply-adds per extra thread of x·U: a thread is started per call, which costs
// tens of microseconds (far more on a busy machine), so small layers stay single-threaded.
constexpr int64_t kMinSparseWorkPerThread = 1 << 18;
constexpr int64_t kMinGemmWorkPerThread = 1 << 21;

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

// ---- half-precision weights ----------------------------------------------------------------

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(bfloat16_t v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float widen(float16_t v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.bits);
#else
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16, exp = (v.bits >> 10) & 0x1fu, mant = v.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf, nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else {
    const float f = float(mant) * 5.9604644775390625e-8f;  // subnormal (or zero): mant·2⁻²⁴
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// dst[0, m) = src[0, m) in fp32.
template <typename W>
void widen_row(const W* __restrict src, float* __restrict dst, int64_t m) {
  int64_t i = 0;
  if constexpr (std::is_same_v<W, bfloat16_t>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for (; i < m; ++i) d[i] = uint32_t(s[i]) << 16;  // vectorizes
  }
#if defined(__F16C__)
  if constexpr (std::is_same_v<W, float16_t>)
    for (; i + 8 <= m; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < m; ++i) dst[i] = widen(src[i]);
}

constexpr int64_t kWidenTileBytes = 256 * 1024;  // fp32 tile of U per BLAS call (fits L2)

// z[:, c0:c1) = x·U[:, c0:c1) for half-precision U: row tiles of U widened into `tile`, each
// multiplied by BLAS and accumulated.
template <typename W>
void gemm_xu_widened(const float* x, int64_t n, int64_t d1, const W* U, int64_t k, int64_t c0, int64_t c1,
                     float* z, std::vector<float>& tile) {
  const int64_t cols = c1 - c0;
  const int64_t rows = std::clamp<int64_t>(kWidenTileBytes / 4 / cols, 8, d1);
  tile.resize(size_t(rows * cols));
  for (int64_t r0 = 0; r0 < d1; r0 += rows) {
    const int64_t r1 = std::min(d1, r0 + rows);
    for (int64_t r = r0; r < r1; ++r) widen_row(U + r * k + c0, tile.data() + (r - r0) * cols, cols);
    const float beta = r0 == 0 ? 0.0f : 1.0f;
    if (n == 1)
      scipy_cblas_sgemv(CblasRowMajor, CblasTrans, int(r1 - r0), int(cols), 1.0f, tile.data(), int(cols), x + r0, 1,
                        beta, z + c0, 1);
    else
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(cols), int(r1 - r0), 1.0f, x + r0,
                        int(d1), tile.data(), int(cols), beta, z + c0, int(k));
  }
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
template <typename T, typename W>
void parallel_xu(const T* x, int64_t n, int64_t d1, const W* U, int64_t k, T* z, int threads) {
  threads = int(std::min<int64_t>({int64_t(threads), k / 64 + 1,
                                   std::max<int64_t>(1, n * d1 * k / kMinGemmWorkPerThread)}));
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
    if (c0 >= c1) return;
    if constexpr (std::is_same_v<T, W>) {
      gemm_xu(x, n, d1, U, k, c0, c1, z);
    } else {
      std::vector<float> tile;
      gemm_xu_widened(x, n, d1, U, k, c0, c1, z, tile);
    }
  });
}

// A buffer aligned to 64 bytes (one cache line, one AVX-512 vector).
template <typename T>
struct AlignedBuffer {
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<T[], Free> p;
  explicit AlignedBuffer(size_t n)
      : p(static_cast<T*>(::operator new[](std::max<size_t>(1, n) * sizeof(T), std::align_val_t(64)))) {}
  T* get() const { return p.get(); }
};

// ---- n = 1 ---------------------------------------------------------------------------------

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bfloat16_t* p) {
  const __m512i u = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, u, 16));  // maskz: see the gather below
}
inline __m512 load16(const float16_t* p) {
  return _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif
#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bfloat16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
#if defined(__F16C__)
inline __m256 load8(const float16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif
#endif

// y[j0, j1) = bias + Σ_t values[t, j]·z[indices[t, j]]. Returns false on an index outside [0, k)
// (only when kCheck). Columns advance by one vector inside a tile of kGatherRowTile rows t, so the
// accumulator stays in a register across the tile while z is gathered from L1.
template <bool kCheck, typename T, typename W, typename I>
bool gather_block(const T* __restrict z, int64_t k, const W* __restrict values, const I* __restrict indices,
                  int64_t s, int64_t d2, const T* bias, int64_t j0, int64_t j1, T* __restrict y) {
  for (int64_t j = j0; j < j1; ++j) y[j] = bias ? bias[j] : T(0);
  for (int64_t t0 = 0; t0 < s; t0 += kGatherRowTile) {
    const int64_t t1 = std::min(s, t0 + kGatherRowTile);
    int64_t j = j0;
#if defined(__AVX512F__) && !defined(ROCKETKIT_INFER_NO_GATHER)
    if constexpr (std::is_same_v<T, float>) {
      const __m512i kv = _mm512_set1_epi32(int(k));
      __mmask16 bad = 0;
      for (; j + 16 <= j1; j += 16) {
        __m512 acc = _mm512_loadu_ps(y + j);
        for (int64_t t = t0; t < t1; ++t) {
          __m512i r;
          if constexpr (sizeof(I) == 2)
            r = _mm512_maskz_cvtepi16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(indices + t * d2 + j)));
          else
            r = _mm512_loadu_si512(indices + t * d2 + j);
          // Negative indices are huge as unsigned, so one compare covers both ends.
          if constexpr (kCheck) bad |= _mm512_cmpge_epu32_mask(r, kv);
          // Masked forms with a zero source: the unmasked intrinsics start from an undefined
          // register, which GCC 12 reports as possibly uninitialized.
          const __mmask16 lanes = kCheck ? _mm512_cmplt_epu32_mask(r, kv) : __mmask16(0xFFFF);
          const __m512 zr = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, r, z, 4);
          acc = _mm512_fmadd_ps(load16(values + t * d2 + j), zr, acc);
        }
        _mm512_storeu_ps(y + j, acc);
      }
      if (bad) return false;
    }
#elif defined(__AVX2__) && !defined(ROCKETKIT_INFER_NO_GATHER)
#if defined(__F16C__)
    if constexpr (std::is_same_v<T, float>) {
#else
    if constexpr (std::is_same_v<T, float> && !std::is_same_v<W, float16_t>) {
#endif
      const __m256i kmax = _mm256_set1_epi32(int(k - 1));
      __m256i ok = _mm256_set1_epi32(-1);
      for (; j + 8 <= j1; j += 8) {
        __m256 acc = _mm256_loadu_ps(y + j);
        for (int64_t t = t0; t < t1; ++t) {
          __m256i r;
          if constexpr (sizeof(I) == 2)
            r = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(indices + t * d2 + j)));
          else
            r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(indices + t * d2 + j));
          __m256 zr;
          if constexpr (kCheck) {
            // In range iff max_u32(r, k−1) == k−1 (negative indices are huge as unsigned).
            const __m256i in = _mm256_cmpeq_epi32(_mm256_max_epu32(r, kmax), kmax);
            ok = _mm256_and_si256(ok, in);
            zr = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), z, r, _mm256_castsi256_ps(in), 4);
          } else {
            zr = _mm256_i32gather_ps(z, r, 4);
          }
          acc = _mm256_fmadd_ps(load8(values + t * d2 + j), zr, acc);
        }
        _mm256_storeu_ps(y + j, acc);
      }
      if (kCheck && _mm256_movemask_epi8(ok) != -1) return false;
    }
#endif
    for (; j < j1; ++j) {
      T acc = y[j];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = indices[t * d2 + j];
        if (kCheck && uint64_t(r) >= uint64_t(k)) return false;
        acc += widen(values[t * d2 + j]) * z[r];
      }
      y[j] = acc;
    }
  }
  return true;
}

// ---- n > 1 ---------------------------------------------------------------------------------

template <typename T, int Bytes> struct Vec;
template <> struct Vec<float, 32> { typedef float type __attribute__((vector_size(32), aligned(32))); };
template <> struct Vec<float, 64> { typedef float type __attribute__((vector_size(64), aligned(64))); };
template <> struct Vec<double, 32> { typedef double type __attribute__((vector_size(32), aligned(32))); };
template <> struct Vec<double, 64> { typedef double type __attribute__((vector_size(64), aligned(64))); };

// One task: output columns [j0, j1) for the chunk of inputs whose zᵀ (k×NB, NB = NV vectors of
// VB bytes, lanes past nb zero) starts at zt; writes rows [i0, i0 + nb) of y through acc
// (jb×NB, aligned). Returns false on a bad index (only when kCheck).
template <bool kCheck, int VB, int NV, typename T, typename W, typename I>
bool rows_block(const T* __restrict zt, int64_t k, const W* __restrict values, const I* __restrict indices,
                int64_t s, int64_t d2, const T* bias, int64_t j0, int64_t j1, int64_t i0, int64_t nb,
                T* __restrict acc, T* __restrict y) {
  using V = typename Vec<T, VB>::type;
  constexpr int NB = NV * VB / int(sizeof(T));
  const int64_t jb = j1 - j0;
  V* av = reinterpret_cast<V*>(acc);
  const V* zv = reinterpret_cast<const V*>(zt);
  for (int64_t jj = 0; jj < jb; ++jj) {
    const T b = bias ? bias[j0 + jj] : T(0);
    for (int i = 0; i < NV; ++i) av[jj * NV + i] = V{} + b;
  }
  for (int64_t t0 = 0; t0 < s; t0 += kRowTile) {
    const int64_t t1 = std::min(s, t0 + kRowTile);
    for (int64_t jj = 0; jj < jb; ++jj) {
      V a[NV];
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) a[i] = av[jj * NV + i];
      const W* v = values + j0 + jj;
      const I* r = indices + j0 + jj;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = r[t * d2];
        if (kCheck && uint64_t(row) >= uint64_t(k)) return false;
        const T vt = widen(v[t * d2]);
        const V* zr = zv + row * NV;
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) a[i] += vt * zr[i];
      }
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) av[jj * NV + i] = a[i];
    }
  }
  for (int64_t i = 0; i < nb; ++i) {
    T* yi = y + (i0 + i) * d2 + j0;
    for (int64_t jj = 0; jj < jb; ++jj) yi[jj] = acc[jj * NB + i];
  }
  return true;
}

// Vector shapes for the n > 1 kernel: NB inputs per chunk as NV vectors of VB bytes.
struct RowShape {
  int vb, nv, nb;
};

template <typename T>
RowShape row_shape(int64_t n) {
  constexpr int L32 = 32 / int(sizeof(T)), L64 = 64 / int(sizeof(T));
  const RowShape shapes[] = {{32, 1, L32}, {64, 1, L64}, {64, 2, 2 * L64}, {64, 4, 4 * L64}};
  // Work per nonzero ≈ chunks·(vectors + 2 scalar loads); the smallest wins, padding included.
  RowShape best = shapes[0];
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  for (const RowShape& sh : shapes) {
    const int64_t cost = (n + sh.nb - 1) / sh.nb * (sh.nv * (sh.vb / 32) + 2);
    if (cost < best_cost) best = sh, best_cost = cost;
  }
  return best;
}

template <bool kCheck, typename T, typename W, typename I>
bool rows_block_dispatch(const RowShape& sh, const T* zt, int64_t k, const W* values, const I* indices,
                         int64_t s, int64_t d2, const T* bias, int64_t j0, int64_t j1, int64_t i0,
                         int64_t nb, T* acc, T* y) {
  if (sh.vb == 32) return rows_block<kCheck, 32, 1>(zt, k, values, indices, s, d2, bias, j0, j1, i0, nb, acc, y);
  switch (sh.nv) {
    case 1: return rows_block<kCheck, 64, 1>(zt, k, values, indices, s, d2, bias, j0, j1, i0, nb, acc, y);
    case 2: return rows_block<kCheck, 64, 2>(zt, k, values, indices, s, d2, bias, j0, j1, i0, nb, acc, y);
    default: return rows_block<kCheck, 64, 4>(zt, k, values, indices, s, d2, bias, j0, j1, i0, nb, acc, y);
  }
}

template <bool kCheck, typename T, typename W, typename I>
bool sparse_product(const T* z, int64_t n, int64_t k, const W* values, const I* indices, int64_t s,
                    int64_t d2, const T* bias, T* y, int max_threads) {
  std::atomic<int64_t> next{0};
  std::atomic<bool> bad{false};
  if (n == 1) {
    const int threads = int(std::min<int64_t>({int64_t(max_threads), (d2 + kGatherCols - 1) / kGatherCols,
                                               std::max<int64_t>(1, s * d2 / kMinSparseWorkPerThread)}));
    const int64_t cols = std::max<int64_t>(kGatherCols, (d2 + 64 * threads - 1) / (64 * threads) * 16);
    const int64_t tasks = (d2 + cols - 1) / cols;
    run_parallel(threads, [&](int) {
      for (int64_t task; !bad.load(std::memory_order_relaxed) && (task = next++) < tasks;) {
        const int64_t j0 = task * cols, j1 = std::min(d2, j0 + cols);
        if (!gather_block<kCheck>(z, k, values, indices, s, d2, bias, j0, j1, y)) bad = true;
      }
    });
    return !bad;
  }

  // zᵀ by chunk: chunk c (inputs [c·NB, c·NB + nb)) is a k×NB block at offset c·NB·k, lanes
  // past nb zero.
  const RowShape sh = row_shape<T>(n);
  const int64_t NB = sh.nb, chunks = (n + NB - 1) / NB;
  AlignedBuffer<T> zt(size_t(chunks * NB * k));
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t i0 = c * NB, nb = std::min<int64_t>(NB, n - i0);
    T* blk = zt.get() + c * NB * k;
    for (int64_t r = 0; r < k; ++r) {
      for (int64_t i = 0; i < nb; ++i) blk[r * NB + i] = z[(i0 + i) * k + r];
      for (int64_t i = nb; i < NB; ++i) blk[r * NB + i] = T(0);
    }
  }
  const int64_t jb = std::max<int64_t>(16, kAccBytes / int64_t(sizeof(T)) / NB);
  const int64_t col_blocks = (d2 + jb - 1) / jb;
  const int64_t tasks = chunks * col_blocks;
  const int64_t work = chunks * sh.nv * s * d2;
  const int threads = int(std::min<int64_t>({int64_t(max_threads), tasks, std::max<int64_t>(1, work / kMinSparseWorkPerThread)}));
  run_parallel(threads, [&](int) {
    AlignedBuffer<T> acc(size_t(jb * NB));
    for (int64_t task; !bad.load(std::memory_order_relaxed) && (task = next++) < tasks;) {
      // Consecutive tasks share a column block, so its values/indices are reused from cache.
      const int64_t c = task % chunks, j0 = (task / chunks) * jb;
      const int64_t i0 = c * NB, nb = std::min<int64_t>(NB, n - i0), j1 = std::min(d2, j0 + jb);
      if (!rows_block_dispatch<kCheck>(sh, zt.get() + c * NB * k, k, values, indices, s, d2, bias, j0, j1, i0,
                                       nb, acc.get(), y))
        bad = true;
    }
  });
  return !bad;
}

template <typename T, typename W, typename I>
void factorized_matmul_impl(const T* x, int64_t n, int64_t d1, const W* U, int64_t k,
                            const W* values, const I* indices, int64_t s, int64_t d2, const T* bias,
                            T* y, int num_threads, bool check_indices) {
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

  // hardware_concurrency reads sysfs on every call (about 10 µs): ask once.
  static const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  const int max_threads = num_threads > 0 ? num_threads : hw;
  AlignedBuffer<T> z(size_t(n) * size_t(k));
  parallel_xu(x, n, d1, U, k, z.get(), max_threads);
  const bool ok = check_indices
                      ? sparse_product<true>(z.get(), n, k, values, indices, s, d2, bias, y, max_threads)
                      : sparse_product<false>(z.get(), n, k, values, indices, s, d2, bias, y, max_threads);
  ROCKETKIT_CHECK(ok, fn, "an index of C is outside [0, k = ", k, ")");
}

}  // namespace

void factorized_matmul(const float* x, int64_t n, int64_t d1, const float* U, int64_t k,
                       const float* values, const int16_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads, bool check_indices) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads, check_indices);
}
void factorized_matmul(const float* x, int64_t n, int64_t d1, const float* U, int64_t k,
                       const float* values, const int32_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads, bool check_indices) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads, check_indices);
}
void factorized_matmul(const double* x, int64_t n, int64_t d1, const double* U, int64_t k,
                       const double* values, const int16_t* indices, int64_t s, int64_t d2,
                       const double* bias, double* y, int num_threads, bool check_indices) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads, check_indices);
}
void factorized_matmul(const double* x, int64_t n, int64_t d1, const double* U, int64_t k,
                       const double* values, const int32_t* indices, int64_t s, int64_t d2,
                       const double* bias, double* y, int num_threads, bool check_indices) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads, check_indices);
}

void factorized_matmul(const float* x, int64_t n, int64_t d1, const bfloat16_t* U, int64_t k,
                       const bfloat16_t* values, const int16_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads, bool check_indices) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads, check_indices);
}
void factorized_matmul(const float* x, int64_t n, int64_t d1, const bfloat16_t* U, int64_t k,
                       const bfloat16_t* values, const int32_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads, bool check_indices) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads, check_indices);
}
void factorized_matmul(const float* x, int64_t n, int64_t d1, const float16_t* U, int64_t k,
                       const float16_t* values, const int16_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads, bool check_indices) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads, check_indices);
}
void factorized_matmul(const float* x, int64_t n, int64_t d1, const float16_t* U, int64_t k,
                       const float16_t* values, const int32_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads, bool check_indices) {
  factorized_matmul_impl(x, n, d1, U, k, values, indices, s, d2, bias, y, num_threads, check_indices);
}

}  // namespace rocketkit
