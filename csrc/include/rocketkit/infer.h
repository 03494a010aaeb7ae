// Inference with factorized layers, y = x·U·C + b, and a reader for rocketkit checkpoints.
//
// Conventions (as in the checkpoint, docs/format.md): a layer maps d1 inputs to d2 outputs;
// U is d1×k; C is k×d2 and column-sparse: column j holds values[t·d2 + j] at row
// indices[t·d2 + j] for t < s (values and indices are s×d2, row-major). Every buffer is
// row-major and contiguous. Nothing here includes Python or torch.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace rocketkit {

/// y = x·U·C (+ bias), computed as z = x·U (BLAS), then y[:, j] = Σ_t z[:, idx[t,j]]·val[t,j].
///
/// @param x        n×d1 input (n ≥ 0; n = 0 does nothing).
/// @param U        d1×k.
/// @param values   s×d2, the nonzeros of C.
/// @param indices  s×d2, their rows in [0, k) (int16 or int32).
/// @param bias     d2 entries, or null.
/// @param y        out, n×d2.
/// @param num_threads 0 = all hardware threads, for both x·U (split by columns of U, each part
///                    with single-threaded BLAS) and the column-sparse product.
/// @param check_indices true: every index is checked against [0, k) as it is read (fused
///                    into the loads; an index outside is never dereferenced). false: the
///                    caller guarantees the range (e.g. checked once on load); an index
///                    outside [0, k) is then undefined behaviour.
/// Requires 1 ≤ s ≤ k, d1, d2 ≥ 1 and n, d1, k < 2^31 (BLAS ints). Throws std::invalid_argument
/// on bad sizes, or (when checking) on an index outside [0, k) — then y is left partly written.
void factorized_matmul(const float* x, int64_t n, int64_t d1, const float* U, int64_t k,
                       const float* values, const int16_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads = 0,
                       bool check_indices = true);
void factorized_matmul(const float* x, int64_t n, int64_t d1, const float* U, int64_t k,
                       const float* values, const int32_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads = 0,
                       bool check_indices = true);
void factorized_matmul(const double* x, int64_t n, int64_t d1, const double* U, int64_t k,
                       const double* values, const int16_t* indices, int64_t s, int64_t d2,
                       const double* bias, double* y, int num_threads = 0,
                       bool check_indices = true);
void factorized_matmul(const double* x, int64_t n, int64_t d1, const double* U, int64_t k,
                       const double* values, const int32_t* indices, int64_t s, int64_t d2,
                       const double* bias, double* y, int num_threads = 0,
                       bool check_indices = true);

/// Storage-only half-precision weight types (the bits of a bf16 / IEEE fp16 number). The kernels
/// read them as stored and compute in fp32.
struct bfloat16_t {
  uint16_t bits;
};
struct float16_t {
  uint16_t bits;
};

/// The same product with bf16 or fp16 U and values: x, bias and y are fp32, U and values are
/// widened to fp32 as they are read (so each weight byte is streamed once, at half the fp32
/// bytes). Same requirements and errors as above.
void factorized_matmul(const float* x, int64_t n, int64_t d1, const bfloat16_t* U, int64_t k,
                       const bfloat16_t* values, const int16_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads = 0, bool check_indices = true);
void factorized_matmul(const float* x, int64_t n, int64_t d1, const bfloat16_t* U, int64_t k,
                       const bfloat16_t* values, const int32_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads = 0, bool check_indices = true);
void factorized_matmul(const float* x, int64_t n, int64_t d1, const float16_t* U, int64_t k,
                       const float16_t* values, const int16_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads = 0, bool check_indices = true);
void factorized_matmul(const float* x, int64_t n, int64_t d1, const float16_t* U, int64_t k,
                       const float16_t* values, const int32_t* indices, int64_t s, int64_t d2,
                       const float* bias, float* y, int num_threads = 0, bool check_indices = true);

/// One factorized layer as listed in a checkpoint's config.json ("rocketkit" → "layers").
struct FactorizedLayerInfo {
  std::string name;         ///< module name, e.g. "model.layers.3.mlp.down_proj"
  int64_t d1 = 0, d2 = 0;   ///< in and out features
  int64_t k = 0, s = 0;     ///< rank and nonzeros per column of C
  std::string index_dtype;  ///< "int16" or "int32"
};

/// A factorized layer loaded into memory, weights in fp32 (bf16/f16/f64 converted on load).
struct FactorizedLayer {
  FactorizedLayerInfo info;
  std::vector<float> U;          ///< d1×k
  std::vector<float> values;     ///< s×d2
  /// s×d2, each in [0, k), kept in the checkpoint's index dtype: exactly one of the two is
  /// filled (indices16 when info.index_dtype is "int16", i.e. k ≤ 32767, else indices32).
  std::vector<int16_t> indices16;
  std::vector<int32_t> indices32;
  std::vector<float> bias;  ///< d2 entries, or empty when the layer has none

  /// y (n×d2) = x (n×d1)·U·C + bias, fp32. Indices are range-checked as they are read (the
  /// fields are public and may have changed since load_layer checked them).
  void forward(const float* x, int64_t n, float* y, int num_threads = 0) const;
};

/// A rocketkit checkpoint folder: config.json with a "rocketkit" section and model.safetensors
/// (or shards listed in model.safetensors.index.json). Opening reads only headers.
class Checkpoint {
 public:
  /// Throws std::invalid_argument naming the file on a missing/malformed config, index or
  /// safetensors header, or an unsupported format_version.
  explicit Checkpoint(const std::string& folder);

  const std::string& folder() const { return folder_; }
  int format_version() const { return format_version_; }
  const std::vector<FactorizedLayerInfo>& layers() const { return layers_; }

  /// Loads one factorized layer by module name; checks every tensor's dtype and shape against
  /// the config and every index against [0, k). Throws std::invalid_argument naming the file
  /// and tensor on any mismatch, truncation or out-of-range index.
  FactorizedLayer load_layer(const std::string& name) const;

 private:
  std::string folder_;
  int format_version_ = 0;
  std::vector<FactorizedLayerInfo> layers_;
  std::vector<std::string> files_;                          // safetensors files, full paths
  std::vector<std::pair<std::string, size_t>> tensor_file_;  // tensor name -> index in files_
};

/// The newest checkpoint format version this library reads. It reads every version from 1 up:
/// version 2 only added config.json fields for transformers (the tensors and the section are the same).
constexpr int kCheckpointFormatVersion = 2;

}  // namespace rocketkit
