#include "safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace rocketkit::infer {
namespace {

[[noreturn]] void fail(const std::string& where, const std::string& msg) {
  throw std::invalid_argument(where + ": " + msg);
}

class JsonParser {
 public:
  JsonParser(const std::string& doc, const std::string& where) : s_(doc), where_(where) {}

  Json document() {
    Json v = value(0);
    ws();
    if (pos_ != s_.size()) error("trailing characters");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 128;

  [[noreturn]] void error(const std::string& msg) {
    fail(where_, "invalid JSON at byte " + std::to_string(pos_) + ": " + msg);
  }
  void ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }
  char peek() {
    if (pos_ >= s_.size()) error("unexpected end (truncated?)");
    return s_[pos_];
  }
  void expect(const char* lit) {
    const size_t n = std::strlen(lit);
    if (s_.compare(pos_, n, lit) != 0) error(std::string("expected '") + lit + "'");
    pos_ += n;
  }

  Json value(int depth) {
    if (depth > kMaxDepth) error("nested too deeply");
    ws();
    Json v;
    switch (peek()) {
      case '{': {
        v.type = Json::Type::Object;
        ++pos_;
        ws();
        if (peek() == '}') { ++pos_; return v; }
        for (;;) {
          ws();
          if (peek() != '"') error("expected a key");
          std::string key = string();
          ws();
          if (peek() != ':') error("expected ':'");
          ++pos_;
          if (!v.fields.emplace(key, value(depth + 1)).second) error("duplicate key \"" + key + "\"");
          ws();
          const char c = peek();
          ++pos_;
          if (c == '}') return v;
          if (c != ',') error("expected ',' or '}'");
        }
      }
      case '[': {
        v.type = Json::Type::Array;
        ++pos_;
        ws();
        if (peek() == ']') { ++pos_; return v; }
        for (;;) {
          v.items.push_back(value(depth + 1));
          ws();
          const char c = peek();
          ++pos_;
          if (c == ']') return v;
          if (c != ',') error("expected ',' or ']'");
        }
      }
      case '"':
        v.type = Json::Type::String;
        v.text = string();
        return v;
      case 't': expect("true"); v.type = Json::Type::Bool; v.boolean = true; return v;
      case 'f': expect("false"); v.type = Json::Type::Bool; return v;
      case 'n': expect("null"); return v;
      default: return number();
    }
  }

  Json number() {
    const size_t start = pos_;
    if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
    auto digits = [&] {
      const size_t d = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      if (pos_ == d) error("expected a digit");
    };
    digits();
    if (pos_ < s_.size() && s_[pos_] == '.') { ++pos_; digits(); }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      digits();
    }
    Json v;
    v.type = Json::Type::Number;
    v.text = s_.substr(start, pos_ - start);
    v.number = std::strtod(v.text.c_str(), nullptr);
    return v;
  }

  static void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (pos_ + 4 > s_.size()) error("truncated \\u escape");
    uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      cp <<= 4;
      if (c >= '0' && c <= '9') cp |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') cp |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') cp |= uint32_t(c - 'A' + 10);
      else error("bad \\u escape");
    }
    return cp;
  }
  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      const char c = peek();
      ++pos_;
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("control character in string");
      if (c != '\\') { out += c; continue; }
      const char e = peek();
      ++pos_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(pos_, 2, "\\u") == 0) {
            pos_ += 2;
            const uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) error("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: error("bad escape");
      }
    }
  }

  const std::string& s_;
  const std::string& where_;
  size_t pos_ = 0;
};

int64_t checked_mul(int64_t a, int64_t b, const std::string& where) {
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) fail(where, "size overflows int64");
  return a * b;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  if (exp == 0) {  // zero or subnormal: man·2^-24
    const float f = std::ldexp(float(man), -24);
    return sign ? -f : f;
  }
  const uint32_t bits = exp == 0x1F ? (sign | 0x7F800000u | (man << 13))
                                    : (sign | ((exp + 112) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

Json Json::parse(const std::string& doc, const std::string& where) {
  return JsonParser(doc, where).document();
}

const Json* Json::find(const std::string& key) const {
  if (type != Type::Object) return nullptr;
  auto it = fields.find(key);
  return it == fields.end() ? nullptr : &it->second;
}

bool Json::is_integer() const {
  return type == Type::Number && text.find_first_of(".eE") == std::string::npos;
}

int64_t Json::as_int(const std::string& what) const {
  if (!is_integer()) throw std::invalid_argument(what + " must be an integer");
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno == ERANGE || *end) throw std::invalid_argument(what + " is out of the int64 range");
  return v;
}

Json read_json_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, "cannot open the file");
  std::ostringstream os;
  os << f.rdbuf();
  return Json::parse(os.str(), path);
}

size_t dtype_size(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "I8" || d == "U8" || d == "BOOL" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  return 0;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) fail(path, "cannot open the file");
  file_size_ = uint64_t(f.tellg());
  f.seekg(0);
  unsigned char len_bytes[8];
  if (file_size_ < 8 || !f.read(reinterpret_cast<char*>(len_bytes), 8))
    fail(path, "not a safetensors file (shorter than its 8-byte header length)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > file_size_ - 8) fail(path, "header length " + std::to_string(n) + " runs past the end of the file (truncated?)");
  if (n > (uint64_t(100) << 20)) fail(path, "header larger than 100 MB");
  std::string header(size_t(n), '\0');
  if (!f.read(header.data(), std::streamsize(n))) fail(path, "cannot read the header");
  data_start_ = 8 + n;
  const Json doc = Json::parse(header, path + " (safetensors header)");
  if (doc.type != Json::Type::Object) fail(path, "the safetensors header is not a JSON object");
  const uint64_t data_size = file_size_ - data_start_;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, v] : doc.fields) {
    if (name == "__metadata__") continue;
    const std::string where = path + ": tensor '" + name + "'";
    const Json* dt = v.find("dtype");
    const Json* sh = v.find("shape");
    const Json* off = v.find("data_offsets");
    if (!dt || dt->type != Json::Type::String || !sh || sh->type != Json::Type::Array || !off ||
        off->type != Json::Type::Array || off->items.size() != 2)
      fail(where, "needs dtype (string), shape (array) and data_offsets ([begin, end])");
    TensorInfo t;
    t.dtype = dt->text;
    const size_t item = dtype_size(t.dtype);
    if (!item) fail(where, "unknown dtype " + t.dtype);
    int64_t numel = 1;
    for (const Json& d : sh->items) {
      const int64_t dim = d.as_int(where + " shape entry");
      if (dim < 0) fail(where, "negative dimension");
      t.shape.push_back(dim);
      numel = checked_mul(numel, dim, where);
    }
    const int64_t b = off->items[0].as_int(where + " data_offsets"),
                  e = off->items[1].as_int(where + " data_offsets");
    if (b < 0 || e < b) fail(where, "bad data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "]");
    t.begin = uint64_t(b);
    t.end = uint64_t(e);
    if (t.end > data_size)
      fail(where, "data_offsets end " + std::to_string(e) + " is past the data section (" +
                      std::to_string(data_size) + " bytes; truncated file?)");
    if (uint64_t(checked_mul(numel, int64_t(item), where)) != t.end - t.begin)
      fail(where, "shape " + shape_str(t.shape) + " of " + t.dtype + " needs " +
                      std::to_string(numel * int64_t(item)) + " bytes but data_offsets span " +
                      std::to_string(t.end - t.begin));
    if (t.end > t.begin) ranges.emplace_back(t.begin, t.end);
    tensors_.emplace(name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) fail(path, "tensor data ranges overlap");
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(path_, "no tensor '" + name + "'");
  return it->second;
}

void SafetensorsFile::check_shape(const std::string& name, const TensorInfo& t,
                                  const std::vector<int64_t>& shape) const {
  if (t.shape != shape)
    fail(path_, "tensor '" + name + "' has shape " + shape_str(t.shape) + ", expected " + shape_str(shape));
}

std::vector<unsigned char> SafetensorsFile::read_bytes(const std::string& name, const TensorInfo& t) const {
  std::ifstream f(path_, std::ios::binary);
  if (!f) fail(path_, "cannot open the file");
  std::vector<unsigned char> out(size_t(t.end - t.begin));
  f.seekg(std::streamoff(data_start_ + t.begin));
  if (!f.read(reinterpret_cast<char*>(out.data()), std::streamsize(out.size())))
    fail(path_, "tensor '" + name + "': cannot read its data (truncated file?)");
  return out;
}

std::vector<float> SafetensorsFile::read_float(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorInfo& t = info(name);
  check_shape(name, t, shape);
  if (t.dtype != "F32" && t.dtype != "F64" && t.dtype != "BF16" && t.dtype != "F16")
    fail(path_, "tensor '" + name + "' has dtype " + t.dtype + ", expected F32, BF16, F16 or F64");
  const std::vector<unsigned char> raw = read_bytes(name, t);
  const size_t n = raw.size() / dtype_size(t.dtype);
  std::vector<float> out(n);
  // safetensors is little-endian, as is every platform rocketkit builds for.
  if (t.dtype == "F32") {
    std::memcpy(out.data(), raw.data(), raw.size());
  } else if (t.dtype == "F64") {
    for (size_t i = 0; i < n; ++i) {
      double d;
      std::memcpy(&d, raw.data() + 8 * i, 8);
      out[i] = float(d);
    }
  } else {
    const bool bf = t.dtype == "BF16";
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      out[i] = bf ? bf16_to_float(h) : f16_to_float(h);
    }
  }
  return out;
}

std::vector<int32_t> SafetensorsFile::read_index(const std::string& name, const std::vector<int64_t>& shape,
                                                 const std::string& dtype) const {
  const TensorInfo& t = info(name);
  check_shape(name, t, shape);
  if (t.dtype != "I16" && t.dtype != "I32")
    fail(path_, "tensor '" + name + "' has dtype " + t.dtype + ", expected I16 or I32");
  if (!dtype.empty() && t.dtype != dtype)
    fail(path_, "tensor '" + name + "' has dtype " + t.dtype + " but the config says " + dtype);
  const std::vector<unsigned char> raw = read_bytes(name, t);
  const size_t item = dtype_size(t.dtype), n = raw.size() / item;
  std::vector<int32_t> out(n);
  if (item == 4) {
    std::memcpy(out.data(), raw.data(), raw.size());
  } else {
    for (size_t i = 0; i < n; ++i) {
      int16_t h;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      out[i] = h;
    }
  }
  return out;
}

}  // namespace rocketkit::infer
