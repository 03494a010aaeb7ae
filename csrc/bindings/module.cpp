// rocketkit._C: wires the per-family bindings together. Bindings only export;
// argument preparation lives in python/rocketkit/_native.py.
#include <pybind11/pybind11.h>

#include "rocketkit/build_info.h"

namespace py = pybind11;

void bind_errors(py::module_& m);
void bind_gram(py::module_& m);
void bind_mckp(py::module_& m);
void bind_infer(py::module_& m);
void bind_cuda(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "rocketkit native core";
  m.def("build_info_json", &rocketkit::build_info_json);
  m.def("cuda_compiled", &rocketkit::cuda_compiled);
  m.def("has_cuda", &rocketkit::has_cuda);
  m.def("cuda_device_count", &rocketkit::cuda_device_count);
  m.def("cuda_device_name", &rocketkit::cuda_device_name, py::arg("device") = 0);
  bind_errors(m);
  bind_gram(m);
  bind_mckp(m);
  bind_infer(m);
  bind_cuda(m);
}
