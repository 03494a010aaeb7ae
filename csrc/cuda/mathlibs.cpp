// Run-time loading of cuBLAS and cuSOLVER (see mathlibs.h for why nothing links them).
#include "mathlibs.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <map>
#include <mutex>

#include "rocketkit/check.h"
#include "rocketkit/cuda.h"

#ifndef ROCKETKIT_CUDA_LIBRARY_DIR
#define ROCKETKIT_CUDA_LIBRARY_DIR ""
#endif

namespace rocketkit::cuda::lib {
namespace {

std::mutex g_mutex;
std::vector<std::string> g_extra_dirs;
bool g_loaded = false;
MathLibs g_libs;

bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// The folders tried after the plain soname (which finds libraries already loaded, e.g. by
// torch, and those on LD_LIBRARY_PATH or in the ldconfig cache).
std::vector<std::string> search_dirs() {
  std::vector<std::string> dirs = g_extra_dirs;
  for (const char* d : {ROCKETKIT_CUDA_LIBRARY_DIR, "/usr/local/cuda/lib64",
                        "/usr/local/cuda/targets/x86_64-linux/lib"})
    if (d[0]) dirs.emplace_back(d);
  return dirs;
}

// dlopen of the first of `sonames` found, plain name first, then in each folder. Returns the
// handle (nullptr if none) and appends what failed to `tried`.
void* open_first(const std::vector<const char*>& sonames, std::string* path, std::string* tried) {
  for (const char* so : sonames) {
    if (void* h = ::dlopen(so, RTLD_NOW | RTLD_LOCAL)) {
      *path = so;
      return h;
    }
    if (tried) *tried += detail::concat("\n  ", so, ": ", ::dlerror());
    for (const std::string& dir : search_dirs()) {
      const std::string full = dir + "/" + so;
      if (!is_file(full)) continue;
      if (void* h = ::dlopen(full.c_str(), RTLD_NOW | RTLD_LOCAL)) {
        *path = full;
        return h;
      }
      if (tried) *tried += detail::concat("\n  ", full, ": ", ::dlerror());
    }
  }
  return nullptr;
}

template <typename F>
void resolve(void* handle, const char* name, F* out, std::string* missing) {
  *out = reinterpret_cast<F>(::dlsym(handle, name));
  if (!*out) *missing += detail::concat(" ", name);
}

// Loads everything or throws; the caller holds g_mutex.
void load(const char* fn) {
  // cuSOLVER's own dependencies are found by soname only (it has no RUNPATH): load them first
  // from wherever they are, so that its NEEDED entries resolve to the loaded copies. Each is
  // optional (older releases need fewer of them).
  std::string ignored;
  for (const auto& dep : std::vector<std::vector<const char*>>{
           {"libnvJitLink.so.13", "libnvJitLink.so.12"},
           {"libcusparse.so.12", "libcusparse.so.11"},
           {"libcublasLt.so.13", "libcublasLt.so.12"}})
    open_first(dep, &ignored, nullptr);

  std::string tried;
  MathLibs libs{};
  void* blas = open_first({"libcublas.so.13", "libcublas.so.12", "libcublas.so"}, &libs.blas_path,
                          &tried);
  if (!blas)
    ROCKETKIT_FAIL(fn, "cuBLAS could not be loaded; tried:", tried,
                   "\nInstall the CUDA toolkit or the nvidia-cublas wheel (torch's CUDA build "
                   "brings it), or add its folder to LD_LIBRARY_PATH.");
  tried.clear();
  void* solver = open_first({"libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"},
                            &libs.solver_path, &tried);
  if (!solver)
    ROCKETKIT_FAIL(fn, "cuSOLVER could not be loaded; tried:", tried,
                   "\nInstall the CUDA toolkit or the nvidia-cusolver wheel (torch's CUDA build "
                   "brings it), or add its folder to LD_LIBRARY_PATH.");

  std::string missing;
  resolve(blas, "cublasCreate_v2", &libs.blas_create, &missing);
  resolve(blas, "cublasDestroy_v2", &libs.blas_destroy, &missing);
  resolve(blas, "cublasSetStream_v2", &libs.blas_set_stream, &missing);
  resolve(blas, "cublasSetMathMode", &libs.blas_set_math_mode, &missing);
  resolve(blas, "cublasDgemm_v2", &libs.dgemm, &missing);
  resolve(blas, "cublasDsyrk_v2", &libs.dsyrk, &missing);
  resolve(blas, "cublasDtrsm_v2", &libs.dtrsm, &missing);
  resolve(blas, "cublasDtrmm_v2", &libs.dtrmm, &missing);
  resolve(blas, "cublasDgeam", &libs.dgeam, &missing);
  resolve(solver, "cusolverDnCreate", &libs.solver_create, &missing);
  resolve(solver, "cusolverDnDestroy", &libs.solver_destroy, &missing);
  resolve(solver, "cusolverDnSetStream", &libs.solver_set_stream, &missing);
  resolve(solver, "cusolverDnCreateParams", &libs.params_create, &missing);
  resolve(solver, "cusolverDnDestroyParams", &libs.params_destroy, &missing);
  resolve(solver, "cusolverDnXgeqrf_bufferSize", &libs.xgeqrf_buffer, &missing);
  resolve(solver, "cusolverDnXgeqrf", &libs.xgeqrf, &missing);
  resolve(solver, "cusolverDnDorgqr_bufferSize", &libs.dorgqr_buffer, &missing);
  resolve(solver, "cusolverDnDorgqr", &libs.dorgqr, &missing);
  resolve(solver, "cusolverDnXpotrf_bufferSize", &libs.xpotrf_buffer, &missing);
  resolve(solver, "cusolverDnXpotrf", &libs.xpotrf, &missing);
  resolve(solver, "cusolverDnXsyevd_bufferSize", &libs.xsyevd_buffer, &missing);
  resolve(solver, "cusolverDnXsyevd", &libs.xsyevd, &missing);
  resolve(solver, "cusolverDnXgesvd_bufferSize", &libs.xgesvd_buffer, &missing);
  resolve(solver, "cusolverDnXgesvd", &libs.xgesvd, &missing);
  resolve(solver, "cusolverDnXgesvdp_bufferSize", &libs.xgesvdp_buffer, &missing);
  resolve(solver, "cusolverDnXgesvdp", &libs.xgesvdp, &missing);
  if (!missing.empty())
    ROCKETKIT_FAIL(fn, "the loaded cuBLAS (", libs.blas_path, ") or cuSOLVER (", libs.solver_path,
                   ") lacks:", missing, " (CUDA 11.1 or newer is needed)");
  g_libs = libs;
  g_loaded = true;
}

struct Pool {
  std::vector<BlasHandle> blas;
  std::vector<SolverHandle> solver;
  std::vector<SolverParams> params;
};
std::map<int, Pool> g_pools;  // by device, under g_mutex

}  // namespace

void set_library_dirs(const std::vector<std::string>& dirs) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_extra_dirs = dirs;
}

const MathLibs& math_libs(const char* fn) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_loaded) load(fn);
  return g_libs;
}

HandleLease::HandleLease(const char* fn) {
  const MathLibs& L = math_libs(fn);
  if (cudaGetDevice(&device_) != cudaSuccess) {
    cudaGetLastError();
    ROCKETKIT_FAIL(fn, "no current CUDA device");
  }
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    Pool& p = g_pools[device_];
    if (!p.blas.empty()) {
      blas_ = p.blas.back(), solver_ = p.solver.back(), params_ = p.params.back();
      p.blas.pop_back(), p.solver.pop_back(), p.params.pop_back();
      return;
    }
  }
  int st = L.blas_create(&blas_);
  if (st != kSuccess) ROCKETKIT_FAIL(fn, "cublasCreate failed (status ", st, ")");
  st = L.blas_set_math_mode(blas_, kBlasDefaultMath);
  if (st == kSuccess) st = L.solver_create(&solver_);
  if (st == kSuccess) st = L.params_create(&params_);
  if (st != kSuccess) {
    // Not pooled: destroy what was made (CUDA is up, so this is safe here).
    if (params_) L.params_destroy(params_);
    if (solver_) L.solver_destroy(solver_);
    L.blas_destroy(blas_);
    ROCKETKIT_FAIL(fn, "creating the cuBLAS/cuSOLVER handles failed (status ", st, ")");
  }
}

HandleLease::~HandleLease() {
  std::lock_guard<std::mutex> lock(g_mutex);
  Pool& p = g_pools[device_];
  p.blas.push_back(blas_), p.solver.push_back(solver_), p.params.push_back(params_);
}

void HandleLease::set_stream(cudaStream_t stream, const char* fn) const {
  int st = g_libs.blas_set_stream(blas_, stream);
  if (st == kSuccess) st = g_libs.solver_set_stream(solver_, stream);
  if (st != kSuccess) ROCKETKIT_FAIL(fn, "binding the cuBLAS/cuSOLVER handles to a stream failed (status ", st, ")");
}

}  // namespace rocketkit::cuda::lib

namespace rocketkit::cuda {
void set_cuda_library_dirs(const std::vector<std::string>& dirs) { lib::set_library_dirs(dirs); }
}  // namespace rocketkit::cuda
