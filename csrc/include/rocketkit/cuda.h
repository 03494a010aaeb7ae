// CUDA backend: the same operations on device buffers. Every pointer named *_dev is
// device memory; `stream` is a cudaStream_t (nullptr = default stream), and the work is
// ordered after what the caller queued on it. Builds without CUDA link csrc/cuda/no_cuda.cpp,
// whose functions throw std::runtime_error; a CUDA build without a visible GPU throws
// std::runtime_error "[fn] no CUDA device is visible ..." before touching any pointer.
//
// cuBLAS and cuSOLVER are not linked: they are loaded (dlopen) on the first whitened_errors
// call, from the process (torch loads them), the loader path, the folders given to
// set_cuda_library_dirs, or the CUDA toolkit found at build time.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "rocketkit/mckp.h"

namespace rocketkit::cuda {

struct ErrorsOptions {
  /// SVD of the reduced r×r layer factor: "auto" (cuSOLVER gesvdp, the polar-decomposition
  /// SVD, redone with gesvd, the QR-iteration SVD, when gesvdp reports a perturbation above
  /// 1e-12·σ_max or fails), "gesvdp" (fail instead) or "gesvd".
  std::string svd = "auto";
  /// Candidate pipelines (stream + workspace) in flight; 0 = automatic (2 for large layers,
  /// 4 for small ones), always capped by free GPU memory.
  int max_streams = 0;
};

struct ErrorsStats {
  std::string svd;                 ///< the SVD that was used ("" for a zero or empty layer)
  double svd_error_estimate = 0;   ///< gesvdp's reported perturbation of σ (0 for gesvd)
  int streams = 0;                 ///< candidate pipelines used
  int ridge_reruns = 0;            ///< candidates whose G needed the ridge loop
  double basis_seconds = 0;        ///< validation and the per-layer precompute (wall clock)
  double candidates_seconds = 0;   ///< all candidates (wall clock, synchronized)
  double candidate_flops = 0;      ///< fp64 flops of the candidate phase (syrk, gemm, potrf, trsm)
};

/// As rocketkit::whitened_errors, fp64 throughout; W_dev d1×d2 and S_dev d1×d1 row-major,
/// candidates on the host (n×2), e_weight_dev and e_output_dev device arrays of length n.
/// All four device pointers must be memory of one GPU, which is made current for the call.
/// Returns when the errors are written (they are also ordered on `stream`).
/// Throws std::invalid_argument on bad input (as the CPU version; W and S are checked on the
/// device), std::runtime_error on a CUDA, cuBLAS or cuSOLVER failure or missing library, and
/// "[whitened_errors] out of GPU memory ..." when the workspace does not fit.
ErrorsStats whitened_errors(const double* W_dev, const double* S_dev, int64_t d1, int64_t d2,
                            const int64_t* candidates, int64_t n, double* e_weight_dev,
                            double* e_output_dev, void* stream, const ErrorsOptions& options = {});

struct MckpDeviceResult : MckpResult {
  double dp_gpu_ms = 0;  ///< GPU time of the DP kernels (CUDA events), walk-back excluded
};

/// As rocketkit::solve_mckp: identical choice, curve and objective. errors_dev and params_dev
/// on the device (copied to the host for the plan: validation, pruning, LP bound), offsets on
/// the host. The DP and its back-pointers stay on the device; only the final DP row (the
/// curve) and the chosen positions come back.
MckpDeviceResult solve_mckp(const double* errors_dev, const int64_t* params_dev,
                            const int64_t* offsets, int64_t num_layers, int64_t budget,
                            int64_t buckets, void* stream);

/// Element types of column_sparse_matmul.
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

/// The column-sparse half of a factorized forward, y = z·C (+ bias), on the device:
/// y[i, j] = bias[j] + Σ_{t<s} z[i, idx[t, j]]·val[t, j] (z = x·U comes from cuBLAS).
/// z is n×k, values and indices s×d2 (row-major), bias d2 or null, y n×d2; z, values, bias and
/// y share `dtype`, indices are int16 (index_bytes = 2) or int32 (4). Sums are fp32.
/// An index outside [0, k) is never dereferenced: it contributes nothing and, when
/// bad_index_dev is not null, sets *bad_index_dev = 1 (the caller zeroes it beforehand).
/// Asynchronous on `stream`. Throws std::invalid_argument on bad sizes.
void column_sparse_matmul(const void* z_dev, int64_t n, int64_t k, const void* values_dev,
                          const void* indices_dev, int index_bytes, int64_t s, int64_t d2,
                          const void* bias_dev, void* y_dev, DType dtype, int* bad_index_dev,
                          void* stream);

/// Extra folders searched for libcublas/libcusolver (e.g. the nvidia-* wheels' lib folders).
void set_cuda_library_dirs(const std::vector<std::string>& dirs);

}  // namespace rocketkit::cuda
