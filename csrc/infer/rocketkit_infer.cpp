// The checkpoint side of rocketkit_infer: config.json's "rocketkit" section and the tensors
// of one factorized layer (names and layout in docs/format.md).
#include <algorithm>
#include <fstream>
#include <stdexcept>

#include "rocketkit/infer.h"
#include "safetensors.h"

namespace rocketkit {
namespace {

using infer::Json;

[[noreturn]] void fail(const std::string& where, const std::string& msg) {
  throw std::invalid_argument(where + ": " + msg);
}

int64_t field_int(const Json& rec, const char* key, const std::string& where) {
  const Json* v = rec.find(key);
  if (!v) fail(where, std::string("missing \"") + key + "\"");
  return v->as_int(where + " \"" + key + "\"");
}

}  // namespace

Checkpoint::Checkpoint(const std::string& folder) : folder_(folder) {
  while (folder_.size() > 1 && folder_.back() == '/') folder_.pop_back();
  const std::string cfg_path = folder_ + "/config.json";
  const Json cfg = infer::read_json_file(cfg_path);
  const Json* sec = cfg.find("rocketkit");
  if (!sec || sec->type != Json::Type::Object)
    fail(cfg_path, "no \"rocketkit\" section (not a rocketkit checkpoint)");
  const Json* ver = sec->find("format_version");
  if (!ver) fail(cfg_path, "rocketkit section has no format_version");
  format_version_ = int(ver->as_int(cfg_path + ": format_version"));
  if (format_version_ < 1 || format_version_ > kCheckpointFormatVersion)
    fail(cfg_path, "rocketkit format_version " + std::to_string(format_version_) + ", this library reads 1 to " +
                       std::to_string(kCheckpointFormatVersion));
  const Json* layers = sec->find("layers");
  if (!layers || layers->type != Json::Type::Array) fail(cfg_path, "rocketkit section has no \"layers\" list");
  for (const Json& rec : layers->items) {
    const Json* name = rec.find("name");
    if (!name || name->type != Json::Type::String) fail(cfg_path, "a rocketkit layer record has no \"name\"");
    const std::string where = cfg_path + ": layer '" + name->text + "'";
    FactorizedLayerInfo li;
    li.name = name->text;
    li.d1 = field_int(rec, "d1", where);
    li.d2 = field_int(rec, "d2", where);
    li.k = field_int(rec, "k", where);
    li.s = field_int(rec, "s", where);
    const Json* idx = rec.find("index_dtype");
    if (!idx || (idx->text != "int16" && idx->text != "int32")) fail(where, "index_dtype must be \"int16\" or \"int32\"");
    li.index_dtype = idx->text;
    if (li.d1 < 1 || li.d2 < 1 || li.k < 1 || li.s < 1 || li.s > li.k || li.k > std::min(li.d1, li.d2))
      fail(where, "needs 1 <= s <= k <= min(d1, d2), got d1=" + std::to_string(li.d1) + " d2=" +
                      std::to_string(li.d2) + " k=" + std::to_string(li.k) + " s=" + std::to_string(li.s));
    if ((li.k <= 32767) != (li.index_dtype == "int16"))
      fail(where, "index_dtype " + li.index_dtype + " does not match k=" + std::to_string(li.k));
    layers_.push_back(std::move(li));
  }

  const std::string index_path = folder_ + "/model.safetensors.index.json";
  if (std::ifstream(index_path).good()) {
    const Json index = infer::read_json_file(index_path);
    const Json* wm = index.find("weight_map");
    if (!wm || wm->type != Json::Type::Object || wm->fields.empty()) fail(index_path, "no weight_map");
    for (const auto& [tensor, file] : wm->fields) {
      if (file.type != Json::Type::String || file.text.empty() || file.text.find('/') != std::string::npos)
        fail(index_path, "weight_map entry for '" + tensor + "' is not a file name in the folder");
      const std::string full = folder_ + "/" + file.text;
      auto it = std::find(files_.begin(), files_.end(), full);
      const size_t fi = size_t(it - files_.begin());
      if (it == files_.end()) files_.push_back(full);
      tensor_file_.emplace_back(tensor, fi);
    }
  } else {
    files_.push_back(folder_ + "/model.safetensors");
    const infer::SafetensorsFile st(files_.back());
    for (const auto& kv : st.tensors()) tensor_file_.emplace_back(kv.first, 0);
  }
  std::sort(tensor_file_.begin(), tensor_file_.end());
}

FactorizedLayer Checkpoint::load_layer(const std::string& name) const {
  auto li = std::find_if(layers_.begin(), layers_.end(), [&](const FactorizedLayerInfo& l) { return l.name == name; });
  if (li == layers_.end()) fail(folder_ + "/config.json", "no factorized layer '" + name + "'");
  auto file_of = [&](const std::string& tensor) -> const std::string* {
    auto it = std::lower_bound(tensor_file_.begin(), tensor_file_.end(), std::make_pair(tensor, size_t(0)));
    return it != tensor_file_.end() && it->first == tensor ? &files_[it->second] : nullptr;
  };
  FactorizedLayer layer;
  layer.info = *li;
  const FactorizedLayerInfo& L = layer.info;
  auto open = [&](const std::string& tensor) {
    const std::string* f = file_of(tensor);
    if (!f) fail(folder_, "tensor '" + tensor + "' is in no safetensors file of the checkpoint");
    return infer::SafetensorsFile(*f);
  };
  layer.U = open(name + ".U").read_float(name + ".U", {L.d1, L.k});
  layer.values = open(name + ".C_values").read_float(name + ".C_values", {L.s, L.d2});
  const std::string idx_name = name + ".C_indices";
  const infer::SafetensorsFile idx_file = open(idx_name);
  std::vector<int32_t> indices = idx_file.read_index(idx_name, {L.s, L.d2}, L.index_dtype == "int16" ? "I16" : "I32");
  for (size_t i = 0; i < indices.size(); ++i)
    if (indices[i] < 0 || indices[i] >= L.k)
      fail(idx_file.path(), "tensor '" + idx_name + "' has index " + std::to_string(indices[i]) +
                                " at flat position " + std::to_string(i) + ", outside [0, " + std::to_string(L.k) + ")");
  // int16 halves the index bytes the kernel streams (every index is < k ≤ 32767 here).
  if (L.index_dtype == "int16")
    layer.indices16.assign(indices.begin(), indices.end());
  else
    layer.indices32 = std::move(indices);
  if (file_of(name + ".bias")) layer.bias = open(name + ".bias").read_float(name + ".bias", {L.d2});
  return layer;
}

void FactorizedLayer::forward(const float* x, int64_t n, float* y, int num_threads) const {
  const float* b = bias.empty() ? nullptr : bias.data();
  const size_t nnz = size_t(info.s * info.d2);
  if (U.size() != size_t(info.d1 * info.k) || values.size() != nnz || (b && bias.size() != size_t(info.d2)) ||
      (indices16.size() == nnz) == (indices32.size() == nnz))
    throw std::invalid_argument("[FactorizedLayer::forward] layer '" + info.name +
                                "': U, values, bias or indices do not have the sizes of its info");
  if (!indices16.empty())
    factorized_matmul(x, n, info.d1, U.data(), info.k, values.data(), indices16.data(), info.s, info.d2, b, y,
                      num_threads);
  else
    factorized_matmul(x, n, info.d1, U.data(), info.k, values.data(), indices32.data(), info.s, info.d2, b, y,
                      num_threads);
}

}  // namespace rocketkit
