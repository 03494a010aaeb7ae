// Array preparation shared by the binding files.
#pragma once
#include <pybind11/numpy.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace rocketkit_bindings {

namespace py = pybind11;

/// `a`, or an aligned copy of it. pybind11's c_style array_t passes an unaligned NumPy buffer
/// through as is, and the core reads it through typed pointers (undefined behaviour).
template <typename T>
py::array_t<T, py::array::c_style> aligned(py::array_t<T, py::array::c_style> a) {
  if (!a || reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) == 0) return a;
  py::array_t<T, py::array::c_style> copy(std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()));
  std::memcpy(copy.mutable_data(), a.data(), size_t(a.nbytes()));
  return copy;
}

}  // namespace rocketkit_bindings
