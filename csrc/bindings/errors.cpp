#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "arrays.h"
#include "rocketkit/cuda.h"
#include "rocketkit/errors.h"

namespace py = pybind11;
using rocketkit_bindings::aligned;

namespace {
// Shapes are read before the core sees raw pointers, so check them here.
void check_shapes(const char* fn, const py::array& W, const py::array& S) {
  if (W.ndim() != 2 || S.ndim() != 2 || S.shape(0) != W.shape(0) || S.shape(1) != W.shape(0))
    throw std::invalid_argument(std::string("[") + fn + "] W must be 2-D (d1, d2) and S (d1, d1)");
}
}  // namespace
using CArrayD = py::array_t<double, py::array::c_style>;
using CArrayI64 = py::array_t<int64_t, py::array::c_style>;

void bind_errors(py::module_& m) {
  m.def(
      "whitened_errors",
      [](CArrayD W, CArrayD S, CArrayI64 candidates, int num_threads) {
        W = aligned(W), S = aligned(S), candidates = aligned(candidates);
        check_shapes("whitened_errors", W, S);
        if (candidates.ndim() != 2 || candidates.shape(1) != 2)
          throw std::invalid_argument("[whitened_errors] candidates must be (n, 2)");
        const int64_t d1 = W.shape(0), d2 = W.shape(1), n = candidates.shape(0);
        CArrayD e_w(n), e_o(n);
        {
          py::gil_scoped_release nogil;
          rocketkit::whitened_errors(W.data(), S.data(), d1, d2, candidates.data(), n,
                                     e_w.mutable_data(), e_o.mutable_data(), num_threads);
        }
        return py::make_tuple(e_w, e_o);
      },
      py::arg("W"), py::arg("S"), py::arg("candidates"), py::arg("num_threads") = 0);

  m.def(
      "whitened_errors_layers",
      [](py::list Ws, py::list Ss, py::list candidates, int num_threads) {
        if (Ws.size() != Ss.size() || Ws.size() != candidates.size())
          throw std::invalid_argument("[whitened_errors] need one S and one candidate array per weight");
        const int64_t m = int64_t(Ws.size());
        std::vector<CArrayD> W, S, e_w, e_o;
        std::vector<CArrayI64> cand;
        std::vector<const double*> Wp, Sp;
        std::vector<const int64_t*> cp;
        std::vector<double*> ewp, eop;
        std::vector<int64_t> d1, d2, n;
        for (int64_t l = 0; l < m; ++l) {
          W.push_back(aligned(Ws[l].cast<CArrayD>()));
          S.push_back(aligned(Ss[l].cast<CArrayD>()));
          cand.push_back(aligned(candidates[l].cast<CArrayI64>()));
          check_shapes("whitened_errors", W[l], S[l]);
          if (cand[l].ndim() != 2 || cand[l].shape(1) != 2)
            throw std::invalid_argument("[whitened_errors] candidates must be (n, 2)");
          d1.push_back(W[l].shape(0));
          d2.push_back(W[l].shape(1));
          n.push_back(cand[l].shape(0));
          e_w.emplace_back(n[l]);
          e_o.emplace_back(n[l]);
          Wp.push_back(W[l].data());
          Sp.push_back(S[l].data());
          cp.push_back(cand[l].data());
          ewp.push_back(e_w[l].mutable_data());
          eop.push_back(e_o[l].mutable_data());
        }
        {
          py::gil_scoped_release nogil;
          rocketkit::whitened_errors_layers(m, Wp.data(), Sp.data(), d1.data(), d2.data(), cp.data(),
                                            n.data(), ewp.data(), eop.data(), num_threads);
        }
        py::list out;
        for (int64_t l = 0; l < m; ++l) out.append(py::make_tuple(e_w[l], e_o[l]));
        return out;
      },
      py::arg("Ws"), py::arg("Ss"), py::arg("candidates"), py::arg("num_threads") = 0);

  m.def(
      "factorize",
      [](CArrayD W, CArrayD S, int64_t k, int64_t s) {
        W = aligned(W), S = aligned(S);
        check_shapes("factorize", W, S);
        const int64_t d1 = W.shape(0), d2 = W.shape(1);
        if (k < 1 || k > std::min(d1, d2) || s < 1 || s > k)
          throw std::invalid_argument("[factorize] need 1 <= s <= k <= min(d1, d2)");
        CArrayD U({d1, k}), values({s, d2});
        py::array_t<int32_t, py::array::c_style> indices({s, d2});
        double ridge = 0;
        {
          py::gil_scoped_release nogil;
          rocketkit::factorize(W.data(), S.data(), d1, d2, k, s, U.mutable_data(),
                               values.mutable_data(), indices.mutable_data(), &ridge);
        }
        return py::make_tuple(U, values, indices, ridge);
      },
      py::arg("W"), py::arg("S"), py::arg("k"), py::arg("s"));

  m.def(
      "whitened_errors_cuda",
      [](uintptr_t W, uintptr_t S, int64_t d1, int64_t d2, CArrayI64 candidates, uintptr_t e_w,
         uintptr_t e_o, uintptr_t stream, std::string svd, int max_streams) {
        candidates = aligned(candidates);
        if (candidates.ndim() != 2 || candidates.shape(1) != 2)
          throw std::invalid_argument("[whitened_errors] candidates must be (n, 2)");
        rocketkit::cuda::ErrorsOptions options;
        options.svd = std::move(svd);
        options.max_streams = max_streams;
        rocketkit::cuda::ErrorsStats st;
        {
          py::gil_scoped_release nogil;
          st = rocketkit::cuda::whitened_errors(
              reinterpret_cast<const double*>(W), reinterpret_cast<const double*>(S), d1, d2,
              candidates.data(), candidates.shape(0), reinterpret_cast<double*>(e_w),
              reinterpret_cast<double*>(e_o), reinterpret_cast<void*>(stream), options);
        }
        py::dict d;
        d["svd"] = st.svd;
        d["svd_error_estimate"] = st.svd_error_estimate;
        d["streams"] = st.streams;
        d["ridge_reruns"] = st.ridge_reruns;
        d["basis_seconds"] = st.basis_seconds;
        d["candidates_seconds"] = st.candidates_seconds;
        d["candidate_flops"] = st.candidate_flops;
        return d;
      },
      py::arg("W_ptr"), py::arg("S_ptr"), py::arg("d1"), py::arg("d2"), py::arg("candidates"),
      py::arg("e_weight_ptr"), py::arg("e_output_ptr"), py::arg("stream"), py::arg("svd") = "auto",
      py::arg("max_streams") = 0);
}
