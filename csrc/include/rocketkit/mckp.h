// Multiple-choice knapsack over layers: pick one candidate per layer, minimising the
// summed error under a total parameter budget, by dynamic programming over buckets.
//
// Discretization: only the slack budget − min_params is bucketed. A candidate's cost is
// ceil((p − min_l p) / bucket_width) buckets, rounded UP with exact integer arithmetic, so
// any solution the DP returns satisfies Σ params ≤ budget (checked again in int64).
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
/// @param params      offsets[num_layers] parameter counts, ≥ 0; Σ_l max params must fit int64.
/// @param offsets     num_layers+1, offsets[0] = 0, increasing (every layer non-empty).
/// @param budget      maximum Σ params; below min_params throws std::invalid_argument naming it.
/// @param buckets     DP resolution over the slack budget − min_params (≥ 1). Memory:
///                    num_layers·(buckets+1) back-pointer bytes (uint8), twice that (uint16)
///                    when a layer keeps more than 256 candidates after pruning.
/// @param num_threads 0 = all hardware threads. Results do not depend on it.
///
/// Dominated candidates (no fewer params and no less error than another) are dropped first.
/// Ties between equally good choices go to the lower candidate index of a layer.
/// Throws std::invalid_argument on bad input (a layer keeping more than 65536 candidates
/// included).
MckpResult solve_mckp(const double* errors, const int64_t* params, const int64_t* offsets,
                      int64_t num_layers, int64_t budget, int64_t buckets, int num_threads = 0);

namespace detail {

/// Host-side preparation shared by the CPU and CUDA solvers: validation, dominance pruning,
/// the LP bound, and rounded-up bucket costs. Layer l's DP candidates are
/// [layer_begin[l], layer_begin[l+1]) of cost/err/index, in increasing original index.
struct MckpPlan {
  int64_t num_layers = 0;
  int64_t buckets = 0;
  int64_t budget = 0;
  int64_t min_params = 0;
  int64_t slack = 0;
  double bucket_width = 0;
  double lower_bound = 0;
  int64_t kept_candidates = 0;   ///< after exact dominance pruning
  int backpointer_bytes = 1;     ///< 1 (uint8) or 2 (uint16)
  std::vector<int64_t> layer_begin;  ///< num_layers+1
  std::vector<int32_t> cost;         ///< buckets, in [0, buckets]
  std::vector<double> err;
  std::vector<int64_t> index;        ///< candidate index within its layer
};

/// Checks num_layers ≥ 1, offsets[0] = 0 and every layer non-empty (std::invalid_argument).
void check_offsets(const int64_t* offsets, int64_t num_layers);

/// Validates everything, prunes and buckets; host pointers only.
MckpPlan plan_mckp(const double* errors, const int64_t* params, const int64_t* offsets,
                   int64_t num_layers, int64_t budget, int64_t buckets);

/// Smallest bucket whose curve value equals curve[buckets]: the walk-back starts there.
int64_t best_bucket(const std::vector<double>& curve);

/// Builds the result from the DP's final row `curve` (buckets+1) and `position`
/// (num_layers: the chosen entry of each layer's DP candidates); checks Σ params ≤ budget.
MckpResult finish_mckp(const MckpPlan& plan, const double* errors, const int64_t* params,
                       const int64_t* offsets, std::vector<double> curve,
                       const std::vector<int32_t>& position);

}  // namespace detail

}  // namespace rocketkit
