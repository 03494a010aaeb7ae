// Device discovery for the CUDA backend.
#include <cuda_runtime.h>

#include "rocketkit/build_info.h"

namespace rocketkit {

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int n = 0;
  // No driver or no GPU: report zero devices rather than failing the import.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

bool has_cuda() { return cuda_device_count() > 0; }

std::string cuda_device_name(int device) {
  cudaDeviceProp prop;
  if (device < 0 || device >= cuda_device_count()) return "";
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "";
  return prop.name;
}

}  // namespace rocketkit
