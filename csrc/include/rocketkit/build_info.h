// What this build of the core contains.
#pragma once
#include <string>

namespace rocketkit {

/// True when the CUDA backend was compiled in (not whether a GPU is present).
bool cuda_compiled();

/// True when the CUDA backend was compiled in and at least one GPU is visible.
bool has_cuda();

/// Number of visible CUDA devices (0 without a CUDA build or without a GPU).
int cuda_device_count();

/// Name of CUDA device `device`, or "" when unavailable.
std::string cuda_device_name(int device);

/// One-line JSON object: version, compiler, cuda, blas, native_arch, sanitize.
std::string build_info_json();

}  // namespace rocketkit
