// rocketkit_layer_check CKPT LAYER INPUT.bin EXPECTED.bin [TOL]
//
// Loads one factorized layer of a rocketkit checkpoint with rocketkit_infer, runs it on
// INPUT.bin (raw little-endian fp32, n×d1 row-major; n = size / (4·d1)) and compares with
// EXPECTED.bin (raw fp32, n×d2). Passes (exit 0) when max |y − expected| ≤ TOL·max(1, max |expected|),
// TOL = 1e-4 by default; exit 1 on a mismatch, 2 on bad usage or unreadable input.
#include <rocketkit/infer.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <string>
#include <vector>

namespace {

std::vector<float> read_f32(const std::string& path, int64_t row_len, const char* what) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error(path + ": cannot open");
  const int64_t bytes = int64_t(f.tellg());
  if (bytes % (4 * row_len) != 0)
    throw std::runtime_error(path + ": " + std::to_string(bytes) + " bytes is not a whole number of " + what +
                             " rows of " + std::to_string(row_len) + " floats");
  std::vector<float> v(size_t(bytes / 4));
  f.seekg(0);
  if (!f.read(reinterpret_cast<char*>(v.data()), bytes)) throw std::runtime_error(path + ": read failed");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5 || argc > 6) {
    std::fprintf(stderr, "usage: %s CKPT LAYER INPUT.bin EXPECTED.bin [TOL]\n", argv[0]);
    return 2;
  }
  try {
    const double tol = argc == 6 ? std::atof(argv[5]) : 1e-4;
    const rocketkit::Checkpoint ckpt(argv[1]);
    const rocketkit::FactorizedLayer layer = ckpt.load_layer(argv[2]);
    const auto& L = layer.info;
    const std::vector<float> x = read_f32(argv[3], L.d1, "input");
    const int64_t n = int64_t(x.size()) / L.d1;
    const std::vector<float> expected = read_f32(argv[4], L.d2, "output");
    if (int64_t(expected.size()) != n * L.d2) {
      std::fprintf(stderr, "%s: %zu floats, expected n*d2 = %lld\n", argv[4], expected.size(),
                   static_cast<long long>(n * L.d2));
      return 2;
    }
    std::vector<float> y(expected.size());
    layer.forward(x.data(), n, y.data());
    double max_err = 0, max_ref = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      const double e = std::fabs(double(y[i]) - double(expected[i]));
      max_err = std::isnan(e) ? INFINITY : std::max(max_err, e);
      max_ref = std::max(max_ref, std::fabs(double(expected[i])));
    }
    const bool ok = max_err <= tol * std::max(1.0, max_ref);
    std::printf("layer %s: d1=%lld d2=%lld k=%lld s=%lld n=%lld bias=%s\n", L.name.c_str(),
                static_cast<long long>(L.d1), static_cast<long long>(L.d2), static_cast<long long>(L.k),
                static_cast<long long>(L.s), static_cast<long long>(n), layer.bias.empty() ? "no" : "yes");
    std::printf("max abs error %.3e (max |expected| %.3e, tolerance %.1e relative): %s\n", max_err, max_ref,
                tol, ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
