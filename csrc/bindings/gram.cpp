#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "arrays.h"
#include "rocketkit/gram.h"

namespace py = pybind11;
using rocketkit_bindings::aligned;

namespace {
using CArrayD = py::array_t<double, py::array::c_style>;

// H is updated in place, so it must be the caller's own buffer, not a converted copy.
double* writable_square(const char* fn, py::array& H) {
  if (!py::isinstance<CArrayD>(H) || H.ndim() != 2 || H.shape(0) != H.shape(1) || !H.writeable() ||
      !(H.flags() & py::array::c_style) || reinterpret_cast<std::uintptr_t>(H.data()) % alignof(double))
    throw std::invalid_argument(std::string("[") + fn +
                                "] H must be a writable, aligned, C-contiguous float64 (d, d) array");
  return static_cast<double*>(H.mutable_data());
}
}  // namespace

void bind_gram(py::module_& m) {
  m.def(
      "gram_accumulate",
      [](py::array H, CArrayD X) {
        double* h = writable_square("gram_accumulate", H);
        X = aligned(X);
        if (X.ndim() != 2 || X.shape(1) != H.shape(0))
          throw std::invalid_argument("[gram_accumulate] X must be (n, d) for H of shape (d, d)");
        const int64_t n = X.shape(0), d = X.shape(1);
        py::gil_scoped_release nogil;
        rocketkit::gram_accumulate(h, X.data(), n, d);
      },
      py::arg("H"), py::arg("X"));
  m.def(
      "gram_symmetrize",
      [](py::array H) {
        double* h = writable_square("gram_symmetrize", H);
        const int64_t d = H.shape(0);
        py::gil_scoped_release nogil;
        rocketkit::gram_symmetrize(h, d);
      },
      py::arg("H"));
}
