// cuBLAS and cuSOLVER, loaded with dlopen on the first call that needs them.
//
// Why: `_C` must import on machines without a GPU, a driver or the CUDA math libraries, and a
// build machine (CI) may have nvcc and the CUDA runtime but no cuBLAS/cuSOLVER headers or
// libraries at all. So nothing links against them: this file declares the few C entry points
// rocketkit calls (their documented ABI: C enums are passed as int, handles are opaque
// pointers), and mathlibs.cpp resolves them at run time. mathlibs_abi_check.cpp, compiled
// wherever the real headers are found, checks every declaration here against them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <library_types.h>

// Same tags as the real headers, so that the ABI check can compare pointer types exactly.
struct cublasContext;
struct cusolverDnContext;
struct cusolverDnParams;

namespace rocketkit::cuda::lib {

using BlasHandle = cublasContext*;
using SolverHandle = cusolverDnContext*;
using SolverParams = cusolverDnParams*;

// Enumerator values of cublas_api.h and cusolver_common.h (checked in mathlibs_abi_check.cpp).
constexpr int kSuccess = 0;  // CUBLAS_STATUS_SUCCESS, CUSOLVER_STATUS_SUCCESS
constexpr int kOpN = 0, kOpT = 1;
constexpr int kFillLower = 0, kFillUpper = 1;
constexpr int kSideLeft = 0, kSideRight = 1;
constexpr int kDiagNonUnit = 0;
constexpr int kEigNoVector = 0, kEigVector = 1;
constexpr int kBlasDefaultMath = 0;  // CUBLAS_DEFAULT_MATH: no TF32, no fp64 emulation

// cuBLAS (v2 API).
using BlasCreateFn = int (*)(BlasHandle*);
using BlasDestroyFn = int (*)(BlasHandle);
using BlasSetStreamFn = int (*)(BlasHandle, cudaStream_t);
using BlasSetMathModeFn = int (*)(BlasHandle, int);
using DgemmFn = int (*)(BlasHandle, int, int, int, int, int, const double*, const double*, int,
                        const double*, int, const double*, double*, int);
using DsyrkFn = int (*)(BlasHandle, int, int, int, int, const double*, const double*, int,
                        const double*, double*, int);
using DtrsmFn = int (*)(BlasHandle, int, int, int, int, int, int, const double*, const double*,
                        int, double*, int);
using DtrmmFn = int (*)(BlasHandle, int, int, int, int, int, int, const double*, const double*,
                        int, const double*, int, double*, int);
using DgeamFn = int (*)(BlasHandle, int, int, int, int, const double*, const double*, int,
                        const double*, const double*, int, double*, int);

// cuSOLVER dense (64-bit API, plus the legacy orgqr that has no 64-bit twin).
using SolverCreateFn = int (*)(SolverHandle*);
using SolverDestroyFn = int (*)(SolverHandle);
using SolverSetStreamFn = int (*)(SolverHandle, cudaStream_t);
using ParamsCreateFn = int (*)(SolverParams*);
using ParamsDestroyFn = int (*)(SolverParams);
using XgeqrfBufferFn = int (*)(SolverHandle, SolverParams, int64_t, int64_t, cudaDataType,
                               const void*, int64_t, cudaDataType, const void*, cudaDataType,
                               size_t*, size_t*);
using XgeqrfFn = int (*)(SolverHandle, SolverParams, int64_t, int64_t, cudaDataType, void*,
                         int64_t, cudaDataType, void*, cudaDataType, void*, size_t, void*, size_t,
                         int*);
using DorgqrBufferFn = int (*)(SolverHandle, int, int, int, const double*, int, const double*,
                               int*);
using DorgqrFn = int (*)(SolverHandle, int, int, int, double*, int, const double*, double*, int,
                         int*);
using XpotrfBufferFn = int (*)(SolverHandle, SolverParams, int, int64_t, cudaDataType, const void*,
                               int64_t, cudaDataType, size_t*, size_t*);
using XpotrfFn = int (*)(SolverHandle, SolverParams, int, int64_t, cudaDataType, void*, int64_t,
                         cudaDataType, void*, size_t, void*, size_t, int*);
using XsyevdBufferFn = int (*)(SolverHandle, SolverParams, int, int, int64_t, cudaDataType,
                               const void*, int64_t, cudaDataType, const void*, cudaDataType,
                               size_t*, size_t*);
using XsyevdFn = int (*)(SolverHandle, SolverParams, int, int, int64_t, cudaDataType, void*,
                         int64_t, cudaDataType, void*, cudaDataType, void*, size_t, void*, size_t,
                         int*);
using XgesvdBufferFn = int (*)(SolverHandle, SolverParams, signed char, signed char, int64_t,
                               int64_t, cudaDataType, const void*, int64_t, cudaDataType,
                               const void*, cudaDataType, const void*, int64_t, cudaDataType,
                               const void*, int64_t, cudaDataType, size_t*, size_t*);
using XgesvdFn = int (*)(SolverHandle, SolverParams, signed char, signed char, int64_t, int64_t,
                         cudaDataType, void*, int64_t, cudaDataType, void*, cudaDataType, void*,
                         int64_t, cudaDataType, void*, int64_t, cudaDataType, void*, size_t, void*,
                         size_t, int*);
using XgesvdpBufferFn = int (*)(SolverHandle, SolverParams, int, int, int64_t, int64_t,
                                cudaDataType, const void*, int64_t, cudaDataType, const void*,
                                cudaDataType, const void*, int64_t, cudaDataType, const void*,
                                int64_t, cudaDataType, size_t*, size_t*);
using XgesvdpFn = int (*)(SolverHandle, SolverParams, int, int, int64_t, int64_t, cudaDataType,
                          void*, int64_t, cudaDataType, void*, cudaDataType, void*, int64_t,
                          cudaDataType, void*, int64_t, cudaDataType, void*, size_t, void*, size_t,
                          int*, double*);

struct MathLibs {
  BlasCreateFn blas_create;
  BlasDestroyFn blas_destroy;
  BlasSetStreamFn blas_set_stream;
  BlasSetMathModeFn blas_set_math_mode;
  DgemmFn dgemm;
  DsyrkFn dsyrk;
  DtrsmFn dtrsm;
  DtrmmFn dtrmm;
  DgeamFn dgeam;
  SolverCreateFn solver_create;
  SolverDestroyFn solver_destroy;
  SolverSetStreamFn solver_set_stream;
  ParamsCreateFn params_create;
  ParamsDestroyFn params_destroy;
  XgeqrfBufferFn xgeqrf_buffer;
  XgeqrfFn xgeqrf;
  DorgqrBufferFn dorgqr_buffer;
  DorgqrFn dorgqr;
  XpotrfBufferFn xpotrf_buffer;
  XpotrfFn xpotrf;
  XsyevdBufferFn xsyevd_buffer;
  XsyevdFn xsyevd;
  XgesvdBufferFn xgesvd_buffer;
  XgesvdFn xgesvd;
  XgesvdpBufferFn xgesvdp_buffer;
  XgesvdpFn xgesvdp;
  std::string blas_path, solver_path;  ///< the files that were loaded
};

/// Extra folders searched for the libraries (e.g. the nvidia-* wheels' lib folders), tried
/// after the loader's own search path; takes effect at the next load attempt.
void set_library_dirs(const std::vector<std::string>& dirs);

/// The loaded libraries. Throws std::runtime_error "[fn] ..." naming what was tried when
/// cuBLAS or cuSOLVER cannot be loaded; a later call tries again.
const MathLibs& math_libs(const char* fn);

/// A cuBLAS handle and a cuSOLVER handle (with its params object) for the current device,
/// taken from a process-wide pool and returned to it on destruction. Handles are never
/// destroyed (the driver frees them at exit), so no destructor runs after CUDA shuts down.
class HandleLease {
 public:
  explicit HandleLease(const char* fn);
  ~HandleLease();
  HandleLease(const HandleLease&) = delete;
  HandleLease& operator=(const HandleLease&) = delete;
  BlasHandle blas() const { return blas_; }
  SolverHandle solver() const { return solver_; }
  SolverParams params() const { return params_; }
  /// Binds both handles to `stream`.
  void set_stream(cudaStream_t stream, const char* fn) const;

 private:
  int device_ = 0;
  BlasHandle blas_ = nullptr;
  SolverHandle solver_ = nullptr;
  SolverParams params_ = nullptr;
};

}  // namespace rocketkit::cuda::lib
