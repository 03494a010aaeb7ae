// Compile-time check of mathlibs.h against the real cuBLAS/cuSOLVER headers. CMake adds this
// file wherever those headers are found (it defines no symbol); elsewhere it is not built.
// Enum parameters and results are compared as int, which is how the C ABI passes them.
#include <cublas_v2.h>
#include <cusolverDn.h>

#include <type_traits>

#include "mathlibs.h"

namespace {

template <typename T, bool = std::is_enum<T>::value>
struct AsAbi {
  using type = T;
};
template <typename T>
struct AsAbi<T, true> {
  using type = int;
};

template <typename F>
struct AbiOf;
template <typename R, typename... A>
struct AbiOf<R (*)(A...)> {
  using type = typename AsAbi<R>::type (*)(typename AsAbi<A>::type...);
};

template <typename Real, typename Ours>
constexpr bool same_abi = std::is_same<typename AbiOf<Real>::type, typename AbiOf<Ours>::type>::value;

namespace L = rocketkit::cuda::lib;

static_assert(same_abi<decltype(&cublasCreate_v2), L::BlasCreateFn>, "cublasCreate_v2");
static_assert(same_abi<decltype(&cublasDestroy_v2), L::BlasDestroyFn>, "cublasDestroy_v2");
static_assert(same_abi<decltype(&cublasSetStream_v2), L::BlasSetStreamFn>, "cublasSetStream_v2");
static_assert(same_abi<decltype(&cublasSetMathMode), L::BlasSetMathModeFn>, "cublasSetMathMode");
static_assert(same_abi<decltype(&cublasDgemm_v2), L::DgemmFn>, "cublasDgemm_v2");
static_assert(same_abi<decltype(&cublasDsyrk_v2), L::DsyrkFn>, "cublasDsyrk_v2");
static_assert(same_abi<decltype(&cublasDtrsm_v2), L::DtrsmFn>, "cublasDtrsm_v2");
static_assert(same_abi<decltype(&cublasDtrmm_v2), L::DtrmmFn>, "cublasDtrmm_v2");
static_assert(same_abi<decltype(&cublasDgeam), L::DgeamFn>, "cublasDgeam");
static_assert(same_abi<decltype(&cusolverDnCreate), L::SolverCreateFn>, "cusolverDnCreate");
static_assert(same_abi<decltype(&cusolverDnDestroy), L::SolverDestroyFn>, "cusolverDnDestroy");
static_assert(same_abi<decltype(&cusolverDnSetStream), L::SolverSetStreamFn>, "cusolverDnSetStream");
static_assert(same_abi<decltype(&cusolverDnCreateParams), L::ParamsCreateFn>, "cusolverDnCreateParams");
static_assert(same_abi<decltype(&cusolverDnDestroyParams), L::ParamsDestroyFn>, "cusolverDnDestroyParams");
static_assert(same_abi<decltype(&cusolverDnXgeqrf_bufferSize), L::XgeqrfBufferFn>, "Xgeqrf_bufferSize");
static_assert(same_abi<decltype(&cusolverDnXgeqrf), L::XgeqrfFn>, "cusolverDnXgeqrf");
static_assert(same_abi<decltype(&cusolverDnDorgqr_bufferSize), L::DorgqrBufferFn>, "Dorgqr_bufferSize");
static_assert(same_abi<decltype(&cusolverDnDorgqr), L::DorgqrFn>, "cusolverDnDorgqr");
static_assert(same_abi<decltype(&cusolverDnXpotrf_bufferSize), L::XpotrfBufferFn>, "Xpotrf_bufferSize");
static_assert(same_abi<decltype(&cusolverDnXpotrf), L::XpotrfFn>, "cusolverDnXpotrf");
static_assert(same_abi<decltype(&cusolverDnXsyevd_bufferSize), L::XsyevdBufferFn>, "Xsyevd_bufferSize");
static_assert(same_abi<decltype(&cusolverDnXsyevd), L::XsyevdFn>, "cusolverDnXsyevd");
static_assert(same_abi<decltype(&cusolverDnXgesvd_bufferSize), L::XgesvdBufferFn>, "Xgesvd_bufferSize");
static_assert(same_abi<decltype(&cusolverDnXgesvd), L::XgesvdFn>, "cusolverDnXgesvd");
static_assert(same_abi<decltype(&cusolverDnXgesvdp_bufferSize), L::XgesvdpBufferFn>, "Xgesvdp_bufferSize");
static_assert(same_abi<decltype(&cusolverDnXgesvdp), L::XgesvdpFn>, "cusolverDnXgesvdp");

static_assert(CUBLAS_STATUS_SUCCESS == L::kSuccess && CUSOLVER_STATUS_SUCCESS == L::kSuccess, "status");
static_assert(CUBLAS_OP_N == L::kOpN && CUBLAS_OP_T == L::kOpT, "cublasOperation_t");
static_assert(CUBLAS_FILL_MODE_LOWER == L::kFillLower && CUBLAS_FILL_MODE_UPPER == L::kFillUpper, "fill");
static_assert(CUBLAS_SIDE_LEFT == L::kSideLeft && CUBLAS_SIDE_RIGHT == L::kSideRight, "side");
static_assert(CUBLAS_DIAG_NON_UNIT == L::kDiagNonUnit, "diag");
static_assert(CUSOLVER_EIG_MODE_NOVECTOR == L::kEigNoVector && CUSOLVER_EIG_MODE_VECTOR == L::kEigVector,
              "cusolverEigMode_t");
static_assert(CUBLAS_DEFAULT_MATH == L::kBlasDefaultMath, "cublasMath_t");
static_assert(std::is_same<cublasHandle_t, L::BlasHandle>::value, "cublasHandle_t");
static_assert(std::is_same<cusolverDnHandle_t, L::SolverHandle>::value, "cusolverDnHandle_t");
static_assert(std::is_same<cusolverDnParams_t, L::SolverParams>::value, "cusolverDnParams_t");

}  // namespace
