// CUDA backend: the same operations on device buffers. Every pointer named *_dev is
// device memory; `stream` is a cudaStream_t (nullptr = default stream). Builds without
// CUDA link csrc/cuda/no_cuda.cpp, whose functions throw std::runtime_error.
#pragma once
#include <cstdint>

#include "rocketkit/mckp.h"

namespace rocketkit::cuda {

/// As rocketkit::whitened_errors; W_dev d1×d2, S_dev d1×d1, candidates on the host (n×2),
/// e_weight_dev and e_output_dev device arrays of length n.
void whitened_errors(const double* W_dev, const double* S_dev, int64_t d1, int64_t d2,
                     const int64_t* candidates, int64_t n, double* e_weight_dev,
                     double* e_output_dev, void* stream);

using MckpDeviceResult = MckpResult;

/// As rocketkit::solve_mckp; errors_dev and params_dev on the device, offsets on the host.
MckpDeviceResult solve_mckp(const double* errors_dev, const int64_t* params_dev,
                            const int64_t* offsets, int64_t num_layers, int64_t budget,
                            int64_t buckets, void* stream);

}  // namespace rocketkit::cuda
