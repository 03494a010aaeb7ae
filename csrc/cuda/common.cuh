// Host-side helpers shared by the CUDA sources: error checks, RAII for device memory,
// streams and events, and the device the caller's pointers live on.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "mathlibs.h"
#include "rocketkit/check.h"

#define ROCKETKIT_CUDA_OK(fn, expr)                                                           \
  do {                                                                                        \
    const cudaError_t err_ = (expr);                                                          \
    if (err_ != cudaSuccess) {                                                                \
      cudaGetLastError();                                                                     \
      ROCKETKIT_FAIL(fn, #expr, ": ", cudaGetErrorName(err_), " (", cudaGetErrorString(err_), \
                     ")");                                                                    \
    }                                                                                         \
  } while (0)

#define ROCKETKIT_LIB_OK(fn, what, expr)                                           \
  do {                                                                             \
    const int st_ = (expr);                                                        \
    if (st_ != ::rocketkit::cuda::lib::kSuccess)                                   \
      ROCKETKIT_FAIL(fn, what, " failed with status ", st_, " (" #expr ")");       \
  } while (0)

namespace rocketkit::cuda::detail {

/// Device memory freed on scope exit. Allocation failure says how much was asked and free.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t n, const char* fn) { allocate(n, fn); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }

  void allocate(size_t n, const char* fn) {
    release();
    if (n == 0) return;
    const cudaError_t err = cudaMalloc(&ptr_, n * sizeof(T));
    if (err != cudaSuccess) {
      cudaGetLastError();
      ptr_ = nullptr;
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      ROCKETKIT_FAIL(fn, "out of GPU memory: ", (n * sizeof(T)) >> 20, " MiB asked, ", free_b >> 20,
                     " MiB free of ", total_b >> 20, " MiB (", cudaGetErrorName(err), ")");
    }
    n_ = n;
  }
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    n_ = 0;
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

/// A non-blocking stream, destroyed on scope exit.
class Stream {
 public:
  explicit Stream(const char* fn) { ROCKETKIT_CUDA_OK(fn, cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

/// An event (without timing unless asked), destroyed on scope exit.
class Event {
 public:
  explicit Event(const char* fn, bool timing = false) {
    ROCKETKIT_CUDA_OK(fn, cudaEventCreateWithFlags(&e_, timing ? cudaEventDefault : cudaEventDisableTiming));
  }
  ~Event() {
    if (e_) cudaEventDestroy(e_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

/// `after` waits for everything queued on `before` so far.
inline void stream_wait(cudaStream_t after, cudaStream_t before, const Event& ev, const char* fn) {
  ROCKETKIT_CUDA_OK(fn, cudaEventRecord(ev.get(), before));
  ROCKETKIT_CUDA_OK(fn, cudaStreamWaitEvent(after, ev.get(), 0));
}

/// Makes the device that owns `ptr` current for the scope (and restores the previous one).
/// Throws std::invalid_argument when `ptr` is not memory the GPU can address.
class DeviceOf {
 public:
  DeviceOf(const void* ptr, const char* what, const char* fn) {
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
    if (err != cudaSuccess) {
      cudaGetLastError();
      ROCKETKIT_CHECK(false, fn, what, " is not a CUDA pointer (", cudaGetErrorName(err), ")");
    }
    ROCKETKIT_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, fn,
                    what, " must be GPU memory (a CUDA tensor's data_ptr()), got ",
                    attr.type == cudaMemoryTypeHost ? "pinned host memory" : "host memory");
    device_ = attr.device;
    ROCKETKIT_CUDA_OK(fn, cudaGetDevice(&saved_));
    if (saved_ != device_) ROCKETKIT_CUDA_OK(fn, cudaSetDevice(device_));
  }
  ~DeviceOf() {
    if (saved_ >= 0 && saved_ != device_) cudaSetDevice(saved_);
  }
  DeviceOf(const DeviceOf&) = delete;
  DeviceOf& operator=(const DeviceOf&) = delete;
  int device() const { return device_; }

  /// Throws unless `other` is memory of the same device.
  void check_same(const void* other, const char* what, const char* fn) const {
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, other);
    if (err != cudaSuccess) {
      cudaGetLastError();
      ROCKETKIT_CHECK(false, fn, what, " is not a CUDA pointer (", cudaGetErrorName(err), ")");
    }
    ROCKETKIT_CHECK((attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) &&
                        attr.device == device_,
                    fn, what, " must be memory of GPU ", device_, " like the first argument");
  }

 private:
  int device_ = 0;
  int saved_ = -1;
};

inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 65535LL * 32) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return unsigned(b < max_blocks ? b : max_blocks);
}

}  // namespace rocketkit::cuda::detail
