#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "arrays.h"
#include "rocketkit/check.h"
#include "rocketkit/cuda.h"
#include "rocketkit/mckp.h"

namespace py = pybind11;
using rocketkit_bindings::aligned;
using CArrayD = py::array_t<double, py::array::c_style>;
using CArrayI64 = py::array_t<int64_t, py::array::c_style>;

namespace {

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

py::dict to_dict(const rocketkit::MckpResult& r) {
  py::dict d;
  d["choice"] = to_array(r.choice);
  d["error"] = r.error;
  d["params"] = r.params;
  d["lower_bound"] = r.lower_bound;
  d["curve"] = to_array(r.curve);
  d["min_params"] = r.min_params;
  d["bucket_width"] = r.bucket_width;
  d["kept_candidates"] = r.kept_candidates;
  return d;
}

}  // namespace

void bind_mckp(py::module_& m) {
  m.def(
      "solve_mckp",
      [](CArrayD errors, CArrayI64 params, CArrayI64 offsets, int64_t budget, int64_t buckets,
         int num_threads) {
        errors = aligned(errors), params = aligned(params), offsets = aligned(offsets);
        // The core trusts offsets to index the flat arrays; only here are their lengths known.
        ROCKETKIT_CHECK(errors.ndim() == 1 && params.ndim() == 1 && offsets.ndim() == 1, "solve_mckp",
                        "errors, params and offsets must be 1-D");
        ROCKETKIT_CHECK(offsets.shape(0) >= 2, "solve_mckp", "offsets needs num_layers+1 >= 2 entries");
        ROCKETKIT_CHECK(errors.shape(0) == params.shape(0) &&
                            offsets.data()[offsets.shape(0) - 1] == errors.shape(0),
                        "solve_mckp", "errors (", errors.shape(0), ") and params (", params.shape(0),
                        ") must both have offsets[-1] = ", offsets.data()[offsets.shape(0) - 1],
                        " entries");
        rocketkit::MckpResult r;
        {
          py::gil_scoped_release nogil;
          r = rocketkit::solve_mckp(errors.data(), params.data(), offsets.data(),
                                    offsets.shape(0) - 1, budget, buckets, num_threads);
        }
        return to_dict(r);
      },
      py::arg("errors"), py::arg("params"), py::arg("offsets"), py::arg("budget"),
      py::arg("buckets"), py::arg("num_threads") = 0);

  m.def(
      "solve_mckp_cuda",
      [](uintptr_t errors, uintptr_t params, CArrayI64 offsets, int64_t budget, int64_t buckets,
         uintptr_t stream) {
        offsets = aligned(offsets);
        ROCKETKIT_CHECK(offsets.ndim() == 1 && offsets.shape(0) >= 2, "solve_mckp_cuda",
                        "offsets needs num_layers+1 >= 2 entries");
        rocketkit::cuda::MckpDeviceResult r;
        {
          py::gil_scoped_release nogil;
          r = rocketkit::cuda::solve_mckp(reinterpret_cast<const double*>(errors),
                                          reinterpret_cast<const int64_t*>(params), offsets.data(),
                                          offsets.shape(0) - 1, budget, buckets,
                                          reinterpret_cast<void*>(stream));
        }
        py::dict d = to_dict(r);
        d["dp_gpu_ms"] = r.dp_gpu_ms;
        return d;
      },
      py::arg("errors_ptr"), py::arg("params_ptr"), py::arg("offsets"), py::arg("budget"),
      py::arg("buckets"), py::arg("stream"));
}
