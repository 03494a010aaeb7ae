// Bindings of the CUDA-only entry points that are not a twin of a CPU function: the
// column-sparse product of the factorized forward, and where to look for cuBLAS/cuSOLVER.
// Raw device pointers come from torch tensors (data_ptr()) in python/rocketkit/_native.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "rocketkit/check.h"
#include "rocketkit/cuda.h"

namespace py = pybind11;

void bind_cuda(py::module_& m) {
  m.def(
      "column_sparse_matmul_cuda",
      [](uintptr_t z, int64_t n, int64_t k, uintptr_t values, uintptr_t indices, int index_bytes,
         int64_t s, int64_t d2, uintptr_t bias, uintptr_t y, int dtype, uintptr_t bad_index,
         uintptr_t stream) {
        ROCKETKIT_CHECK(dtype >= 0 && dtype <= 2, "factorized_matmul", "dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
        py::gil_scoped_release nogil;
        rocketkit::cuda::column_sparse_matmul(
            reinterpret_cast<const void*>(z), n, k, reinterpret_cast<const void*>(values),
            reinterpret_cast<const void*>(indices), index_bytes, s, d2,
            reinterpret_cast<const void*>(bias), reinterpret_cast<void*>(y),
            static_cast<rocketkit::cuda::DType>(dtype), reinterpret_cast<int*>(bad_index),
            reinterpret_cast<void*>(stream));
      },
      py::arg("z_ptr"), py::arg("n"), py::arg("k"), py::arg("values_ptr"), py::arg("indices_ptr"),
      py::arg("index_bytes"), py::arg("s"), py::arg("d2"), py::arg("bias_ptr"), py::arg("y_ptr"),
      py::arg("dtype"), py::arg("bad_index_ptr"), py::arg("stream"));
  m.def("cuda_set_library_dirs", &rocketkit::cuda::set_cuda_library_dirs, py::arg("dirs"),
        "Extra folders searched for libcublas/libcusolver at the first CUDA errors call.");
}
