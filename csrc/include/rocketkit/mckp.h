// Multiple-choice knapsack over layers: pick one candidate per layer, minimising the
// summed error under a total parameter budget, by dynamic programming over buckets.
#pragma once
#include <cstdint>
#include <vector>

namespace rocketkit {

struct MckpResult {
  std::vector<int64_t> choice;  ///< num_layers: chosen candidate index within each layer.
  double error = 0;             ///< Σ errors of the chosen candidates.
  int64_t params = 0;           ///< Σ params of the chosen candidates (≤ budget, always).
  double lower_bound = 0;       ///< LP (Lagrangian) relaxation optimum: no solution beats it.
  std::vector<double> curve;    ///< buckets+1: best error with Σ params ≤ min_params + b·bucket_width.
  int64_t min_params = 0;       ///< Σ over layers of the smallest candidate.
  double bucket_width = 0;      ///< parameters per bucket.
  int64_t kept_candidates = 0;  ///< candidates left after dominance pruning, all layers.
};

/// Solve the MCKP on the CPU.
///
/// Layer l owns candidates [offsets[l], offsets[l+1]) of the flat arrays.
/// @param errors      offsets[num_layers] finite, non-negative errors.
/// @param params      offsets[num_layers] parameter counts, ≥ 0.
/// @param offsets     num_layers+1, offsets[0] = 0, non-decreasing, each layer non-empty.
/// @param budget      maximum Σ params; below min_params throws std::invalid_argument naming it.
/// @param buckets     DP resolution over the slack budget − min_params (≥ 1).
/// @param num_threads 0 = all hardware threads.
MckpResult solve_mckp(const double* errors, const int64_t* params, const int64_t* offsets,
                      int64_t num_layers, int64_t budget, int64_t buckets, int num_threads = 0);

}  // namespace rocketkit
