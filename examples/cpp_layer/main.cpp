// cpp_layer IN.bin OUT.bin: runs one factorized layer, y = x·U·C (+ bias), with rocketkit_infer.
//
// IN.bin (little-endian):  8 bytes "RKLAYER1"; int64 n, d1, k, s, d2, has_bias; then fp32
// x (n×d1), fp32 U (d1×k), fp32 values (s×d2), int32 indices (s×d2, rows of C in [0, k)),
// and fp32 bias (d2) when has_bias is 1. Every matrix is row-major (docs/format.md: column j of
// C holds values[t·d2 + j] at row indices[t·d2 + j], t < s).
// OUT.bin: y as raw fp32, n×d2 row-major.
// Exit 0 on success, 2 on bad usage, an unreadable file or a layer the library rejects.
#include <rocketkit/infer.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

class Reader {
 public:
  explicit Reader(const std::string& path) : path_(path), in_(path, std::ios::binary) {
    if (!in_) throw std::runtime_error(path + ": cannot open");
  }

  template <typename T>
  std::vector<T> read(int64_t count, const char* what) {
    if (count < 0 || count > (int64_t(1) << 40) / int64_t(sizeof(T)))
      throw std::runtime_error(path_ + ": " + what + " has an impossible size " + std::to_string(count));
    std::vector<T> v(static_cast<size_t>(count));
    if (!in_.read(reinterpret_cast<char*>(v.data()), std::streamsize(count * int64_t(sizeof(T)))))
      throw std::runtime_error(path_ + ": truncated while reading " + what);
    return v;
  }

  bool at_end() { return in_.peek() == std::char_traits<char>::eof(); }

 private:
  std::string path_;
  std::ifstream in_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN.bin OUT.bin\n", argv[0]);
    return 2;
  }
  try {
    Reader in(argv[1]);
    const std::vector<char> magic = in.read<char>(8, "the magic");
    if (std::memcmp(magic.data(), "RKLAYER1", 8) != 0) throw std::runtime_error(std::string(argv[1]) + ": not an RKLAYER1 file");
    const std::vector<int64_t> h = in.read<int64_t>(6, "the header");
    const int64_t n = h[0], d1 = h[1], k = h[2], s = h[3], d2 = h[4];
    const bool has_bias = h[5] != 0;
    for (int i = 0; i < 5; ++i)  // keeps the products below from overflowing; the library checks the rest
      if (h[i] < 0 || h[i] >= (int64_t(1) << 31))
        throw std::runtime_error(std::string(argv[1]) + ": header entry " + std::to_string(i) + " = " +
                                 std::to_string(h[i]) + " is outside [0, 2^31)");
    const std::vector<float> x = in.read<float>(n * d1, "x");
    const std::vector<float> U = in.read<float>(d1 * k, "U");
    const std::vector<float> values = in.read<float>(s * d2, "values");
    const std::vector<int32_t> indices = in.read<int32_t>(s * d2, "indices");
    const std::vector<float> bias = has_bias ? in.read<float>(d2, "bias") : std::vector<float>();
    if (!in.at_end()) throw std::runtime_error(std::string(argv[1]) + ": trailing bytes after the layer");

    std::vector<float> y(size_t(n * d2));
    // Indices are checked against [0, k) as they are read: they come from a file.
    rocketkit::factorized_matmul(x.data(), n, d1, U.data(), k, values.data(), indices.data(), s, d2,
                                 has_bias ? bias.data() : nullptr, y.data(), /*num_threads=*/0,
                                 /*check_indices=*/true);

    std::ofstream out(argv[2], std::ios::binary);
    if (!out.write(reinterpret_cast<const char*>(y.data()), std::streamsize(y.size() * sizeof(float))))
      throw std::runtime_error(std::string(argv[2]) + ": write failed");
    std::printf("n=%lld d1=%lld k=%lld s=%lld d2=%lld bias=%s: wrote %s\n", static_cast<long long>(n),
                static_cast<long long>(d1), static_cast<long long>(k), static_cast<long long>(s),
                static_cast<long long>(d2), has_bias ? "yes" : "no", argv[2]);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
