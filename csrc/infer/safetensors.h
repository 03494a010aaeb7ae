// A strict reader for safetensors files and the small JSON subset rocketkit needs.
//
// safetensors: 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data; offsets are relative to the byte after the header. Every inconsistency
// (truncation, offsets out of range or overlapping, size ≠ numel·itemsize) is a
// std::invalid_argument naming the file (and tensor).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace rocketkit::infer {

/// A parsed JSON value (objects keep their keys sorted; duplicate keys are an error).
struct Json {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0;
  std::string text;  ///< the string, or the number's literal text (exact integers)
  std::vector<Json> items;
  std::map<std::string, Json> fields;

  /// Parses a whole document; throws std::invalid_argument("<where>: ...") on any error.
  static Json parse(const std::string& doc, const std::string& where);
  const Json* find(const std::string& key) const;  ///< null when absent or not an object
  bool is_integer() const;                          ///< a number written without '.', 'e'
  int64_t as_int(const std::string& what) const;    ///< throws unless an exact integer
};

/// Reads and parses a JSON file; throws std::invalid_argument naming it.
Json read_json_file(const std::string& path);

struct TensorInfo {
  std::string dtype;            ///< "F32", "BF16", "F16", "F64", "I16", "I32", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  ///< byte range in the data section
};

/// Bytes per element of a safetensors dtype, 0 when unknown.
size_t dtype_size(const std::string& dtype);

class SafetensorsFile {
 public:
  /// Reads and validates the header only.
  explicit SafetensorsFile(const std::string& path);
  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo& info(const std::string& name) const;  ///< throws naming file and tensor

  /// The tensor as fp32 (F32/F64/BF16/F16 accepted), checked against `shape`.
  std::vector<float> read_float(const std::string& name, const std::vector<int64_t>& shape) const;
  /// The tensor as int32 (I16/I32 accepted), checked against `shape` and `dtype` if non-empty.
  std::vector<int32_t> read_index(const std::string& name, const std::vector<int64_t>& shape,
                                  const std::string& dtype) const;

 private:
  std::vector<unsigned char> read_bytes(const std::string& name, const TensorInfo& t) const;
  void check_shape(const std::string& name, const TensorInfo& t,
                   const std::vector<int64_t>& shape) const;
  std::string path_;
  uint64_t data_start_ = 0, file_size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
};

}  // namespace rocketkit::infer
