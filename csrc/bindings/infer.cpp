// Exports the factorized-layer kernel. Dtypes and shapes are prepared in _native.py; here we
// only dispatch on dtype and release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "arrays.h"
#include "rocketkit/check.h"
#include "rocketkit/infer.h"

namespace py = pybind11;
using rocketkit_bindings::aligned;

namespace {

// T: x, bias and y; W: U and values as NumPy holds them; K: the kernel's weight type (W itself,
// or a half-precision type whose bits NumPy holds as int16).
template <typename T, typename I, typename W = T, typename K = W>
py::array_t<T> run(const py::array& x, const py::array& U, const py::array& values,
                   const py::array& indices, const py::object& bias, int num_threads, bool check_indices) {
  const char* fn = "factorized_matmul";
  ROCKETKIT_CHECK(x.ndim() == 2 && U.ndim() == 2 && values.ndim() == 2 && indices.ndim() == 2, fn,
                  "x, U, values and indices must be 2-D");
  const int64_t n = x.shape(0), d1 = x.shape(1), k = U.shape(1), s = values.shape(0),
                d2 = values.shape(1);
  ROCKETKIT_CHECK(U.shape(0) == d1, fn, "U has ", U.shape(0), " rows, x has ", d1, " columns");
  ROCKETKIT_CHECK(indices.shape(0) == s && indices.shape(1) == d2, fn, "indices (", indices.shape(0),
                  ", ", indices.shape(1), ") must match values (", s, ", ", d2, ")");
  auto xa = aligned(py::array_t<T, py::array::c_style>::ensure(x));
  auto Ua = aligned(py::array_t<W, py::array::c_style>::ensure(U));
  auto va = aligned(py::array_t<W, py::array::c_style>::ensure(values));
  auto ia = aligned(py::array_t<I, py::array::c_style>::ensure(indices));
  ROCKETKIT_CHECK(xa && Ua && va && ia, fn, "unexpected dtypes");
  py::array_t<T, py::array::c_style> ba;
  if (!bias.is_none()) {
    ba = aligned(py::array_t<T, py::array::c_style>::ensure(bias));
    ROCKETKIT_CHECK(ba && ba.ndim() == 1 && ba.shape(0) == d2, fn, "bias must have ", d2, " entries");
  }
  py::array_t<T> y({py::ssize_t(n), py::ssize_t(d2)});
  const T* b = bias.is_none() ? nullptr : ba.data();
  T* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    rocketkit::factorized_matmul(xa.data(), n, d1, reinterpret_cast<const K*>(Ua.data()), k,
                                 reinterpret_cast<const K*>(va.data()), ia.data(), s, d2, b, yp, num_threads,
                                 check_indices);
  }
  return y;
}

}  // namespace

void bind_infer(py::module_& m) {
  m.def(
      "factorized_matmul",
      [](const py::array& x, const py::array& U, const py::array& values, const py::array& indices,
         const py::object& bias, int num_threads, bool check_indices) -> py::array {
        const bool f32 = x.dtype().is(py::dtype::of<float>());
        const bool i16 = indices.dtype().is(py::dtype::of<int16_t>());
        ROCKETKIT_CHECK(f32 || x.dtype().is(py::dtype::of<double>()), "factorized_matmul",
                        "x must be float32 or float64");
        ROCKETKIT_CHECK(i16 || indices.dtype().is(py::dtype::of<int32_t>()), "factorized_matmul",
                        "indices must be int16 or int32");
        if (f32) return i16 ? run<float, int16_t>(x, U, values, indices, bias, num_threads, check_indices)
                            : run<float, int32_t>(x, U, values, indices, bias, num_threads, check_indices);
        return i16 ? run<double, int16_t>(x, U, values, indices, bias, num_threads, check_indices)
                   : run<double, int32_t>(x, U, values, indices, bias, num_threads, check_indices);
      },
      py::arg("x"), py::arg("U"), py::arg("values"), py::arg("indices"), py::arg("bias"),
      py::arg("num_threads") = 0,
      // false only for callers that validated the indices once (FactorizedLinear); an index
      // outside [0, k) is then undefined behaviour.
      py::arg("check_indices") = true);
  m.def(
      "factorized_matmul_half",
      [](const py::array& x, const py::array& U, const py::array& values, const py::array& indices,
         const py::object& bias, const std::string& weight_dtype, int num_threads, bool check_indices) -> py::array {
        const char* fn = "factorized_matmul";
        ROCKETKIT_CHECK(x.dtype().is(py::dtype::of<float>()), fn, "x must be float32 for half-precision weights");
        ROCKETKIT_CHECK(U.dtype().is(py::dtype::of<int16_t>()) && values.dtype().is(py::dtype::of<int16_t>()), fn,
                        "half-precision U and values must arrive as int16 bit patterns");
        ROCKETKIT_CHECK(weight_dtype == "bfloat16" || weight_dtype == "float16", fn,
                        "weight_dtype must be bfloat16 or float16, got ", weight_dtype);
        const bool i16 = indices.dtype().is(py::dtype::of<int16_t>());
        ROCKETKIT_CHECK(i16 || indices.dtype().is(py::dtype::of<int32_t>()), fn, "indices must be int16 or int32");
        using rocketkit::bfloat16_t;
        using rocketkit::float16_t;
        if (weight_dtype == "bfloat16")
          return i16 ? run<float, int16_t, int16_t, bfloat16_t>(x, U, values, indices, bias, num_threads, check_indices)
                     : run<float, int32_t, int16_t, bfloat16_t>(x, U, values, indices, bias, num_threads, check_indices);
        return i16 ? run<float, int16_t, int16_t, float16_t>(x, U, values, indices, bias, num_threads, check_indices)
                   : run<float, int32_t, int16_t, float16_t>(x, U, values, indices, bias, num_threads, check_indices);
      },
      py::arg("x"), py::arg("U"), py::arg("values"), py::arg("indices"), py::arg("bias"), py::arg("weight_dtype"),
      py::arg("num_threads") = 0, py::arg("check_indices") = true);
}
