// CPU MCKP solver: exact dominance pruning, the LP bound on the lower convex hulls, and a
// bucketed min-plus DP with compact back-pointers, threaded over buckets.
#include "rocketkit/mckp.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <system_error>
#include <thread>

#include "rocketkit/check.h"

namespace rocketkit {
namespace {

constexpr const char* kFn = "solve_mckp";
constexpr int64_t kMaxBuckets = std::numeric_limits<int32_t>::max() - 1;  // costs are int32
constexpr int64_t kMaxDpCandidates = 65536;                               // uint16 back-pointers
// Buckets per tile: the tile's best values and arg-mins (2 × 8 KiB) stay in L1.
constexpr int64_t kTile = 1024;

struct Point {
  int64_t p;
  double e;
};

// Physical memory in bytes, or 0 if the system does not say.
uint64_t physical_memory() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? uint64_t(pages) * uint64_t(page) : 0;
}

void check_memory(int64_t num_layers, int64_t buckets, int bytes) {
  // Back-pointer matrix plus three rows of doubles (two DP rows and the curve).
  const unsigned __int128 need = (unsigned __int128)num_layers * uint64_t(buckets + 1) * bytes +
                                 (unsigned __int128)3 * 8 * uint64_t(buckets + 1);
  const uint64_t have = physical_memory();
  ROCKETKIT_CHECK(have == 0 || need <= have, kFn, "buckets=", buckets, " with ", num_layers,
                  " layers needs ", uint64_t(need >> 20), " MiB for the DP, more than the ",
                  have >> 20, " MiB of memory; use fewer buckets");
}

// Lower convex hull of a Pareto front sorted by params ascending (errors strictly
// decreasing), without collinear points, so hull slopes strictly increase.
std::vector<Point> lower_hull(const std::vector<Point>& front) {
  std::vector<Point> h;
  for (const Point& q : front) {
    while (h.size() >= 2) {
      const Point& a = h[h.size() - 2];
      const Point& b = h.back();
      // Drop b unless the slope a→b is strictly below b→q.
      const long double lhs = ((long double)b.e - a.e) * (long double)(q.p - b.p);
      const long double rhs = ((long double)q.e - b.e) * (long double)(b.p - a.p);
      if (lhs < rhs) break;
      h.pop_back();
    }
    h.push_back(q);
  }
  return h;
}

struct Segment {
  double slope;
  int64_t layer;
  int64_t step;  // hull point step → step+1
};

// LP relaxation: every layer starts at its smallest candidate, then hull segments are bought
// in order of error saved per parameter until the slack runs out (the last one fractionally).
double lp_bound(const std::vector<std::vector<Point>>& hulls, int64_t slack) {
  std::vector<Segment> segs;
  for (int64_t l = 0; l < int64_t(hulls.size()); ++l) {
    double prev_slope = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j + 1 < int64_t(hulls[l].size()); ++j) {
      const Point& a = hulls[l][j];
      const Point& b = hulls[l][j + 1];
      // Rounding must not reorder a layer's own segments.
      const double slope = std::max(prev_slope, (b.e - a.e) / double(b.p - a.p));
      segs.push_back({slope, l, j});
      prev_slope = slope;
    }
  }
  std::sort(segs.begin(), segs.end(), [](const Segment& x, const Segment& y) {
    if (x.slope != y.slope) return x.slope < y.slope;
    if (x.layer != y.layer) return x.layer < y.layer;
    return x.step < y.step;
  });
  std::vector<int64_t> at(hulls.size(), 0);
  int64_t left = slack;
  double fractional = 0;
  for (const Segment& s : segs) {
    const Point& a = hulls[s.layer][s.step];
    const Point& b = hulls[s.layer][s.step + 1];
    const int64_t dp = b.p - a.p;
    if (dp <= left) {
      left -= dp;
      at[s.layer] = s.step + 1;
    } else {
      fractional = (b.e - a.e) * (double(left) / double(dp));
      break;
    }
  }
  double sum = 0;  // layer order, the order in which the DP adds errors
  for (size_t l = 0; l < hulls.size(); ++l) sum += hulls[l][at[l]].e;
  return sum + fractional;
}

// Completion count of one layer's tiles. Waiters spin briefly (a tile takes microseconds),
// then sleep: an idle core lets the OS move a preempted worker onto it, which yielding
// would not (this matters when other processes share a 2-core machine).
class TileCounter {
 public:
  void wait_until(int64_t target) {
    for (int spins = 0; spins < 2000; ++spins) {
      if (done_.load(std::memory_order_acquire) >= target) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    sleepers_.fetch_add(1);  // seq_cst, paired with add(): one of the two sees the other
    {
      std::unique_lock<std::mutex> lk(m_);
      cv_.wait(lk, [&] { return done_.load() >= target; });
    }
    sleepers_.fetch_sub(1);
  }
  void add(int64_t target) {
    if (done_.fetch_add(1) + 1 == target && sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
  }

 private:
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::mutex m_;
  std::condition_variable cv_;
};

// best[i] = min(best[i], src[i] + e), arg[i] = c where it improved (strictly: ties keep
// the earlier, lower-index candidate). Same-width arrays so that it compiles to AVX blends.
inline void min_plus_update(const double* __restrict src, double e, double c,
                            double* __restrict best, double* __restrict arg, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = src[i] + e;
    const bool better = v < best[i];
    best[i] = better ? v : best[i];
    arg[i] = better ? c : arg[i];
  }
}

// kGroup candidates in one pass, in index order so ties still go to the lower index: the
// tile's best/arg are loaded and stored once per group instead of once per candidate.
constexpr int kGroup = 4;

inline void min_plus_update_group(const double* const* src, const double* e, const double* c,
                                  double* __restrict best, double* __restrict arg, int64_t n) {
  const double* __restrict s0 = src[0];
  const double* __restrict s1 = src[1];
  const double* __restrict s2 = src[2];
  const double* __restrict s3 = src[3];
  const double e0 = e[0], e1 = e[1], e2 = e[2], e3 = e[3];
  const double c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  for (int64_t i = 0; i < n; ++i) {
    double b = best[i], a = arg[i];
    const double v0 = s0[i] + e0, v1 = s1[i] + e1, v2 = s2[i] + e2, v3 = s3[i] + e3;
    a = v0 < b ? c0 : a;
    b = v0 < b ? v0 : b;
    a = v1 < b ? c1 : a;
    b = v1 < b ? v1 : b;
    a = v2 < b ? c2 : a;
    b = v2 < b ? v2 : b;
    a = v3 < b ? c3 : a;
    b = v3 < b ? v3 : b;
    best[i] = b;
    arg[i] = a;
  }
}

// One layer's DP over buckets [b0, b1): cur[b] = min_c prev[b − cost_c] + err_c.
//
// Rows saturate: with cap = min(B, Σ of the largest cost of each layer so far), every candidate of
// every layer so far fits below cap, so cur[b] = cur[cap] for b ≥ cap, with the same arg-min (the
// same sums in the same order). Buckets above cap copy that value instead of recomputing it; a
// tile lying wholly above cap computes bucket cap alone. Results are bit-identical to the full DP.
template <typename BP>
void dp_tile(const double* __restrict prev, double* __restrict cur, BP* __restrict bp_row,
             int64_t b0, int64_t b1, int64_t cap, const int32_t* cost, const double* err, int64_t n,
             double* __restrict arg) {
  if (b0 > cap) {
    double v = std::numeric_limits<double>::infinity();
    int64_t a = 0;
    for (int64_t c = 0; c < n; ++c) {
      if (cost[c] > cap) continue;
      const double x = prev[cap - cost[c]] + err[c];
      if (x < v) {
        v = x;
        a = c;
      }
    }
    for (int64_t b = b0; b < b1; ++b) {
      cur[b] = v;
      bp_row[b] = static_cast<BP>(a);
    }
    return;
  }
  const int64_t full_end = b1;
  b1 = std::min(b1, cap + 1);
  const int64_t len = b1 - b0;
  double* best = cur + b0;
  for (int64_t i = 0; i < len; ++i) {
    best[i] = std::numeric_limits<double>::infinity();
    arg[i] = 0;
  }
  int64_t group[kGroup];
  int filled = 0;
  // A short last group is padded with never-winning candidates (error +inf).
  auto flush = [&](int count) {
    int64_t off[kGroup];
    int64_t last = 0;
    for (int j = 0; j < count; ++j) {
      const int64_t w = cost[group[j]];
      off[j] = w > b0 ? w - b0 : 0;  // first slot of the tile this candidate fits
      last = std::max(last, off[j]);
    }
    // Slots before `last` take the group's candidates one by one, still in index order.
    for (int j = 0; j < count; ++j) {
      const int64_t c = group[j];
      if (off[j] < last)
        min_plus_update(prev + b0 + off[j] - cost[c], err[c], double(c), best + off[j],
                        arg + off[j], last - off[j]);
    }
    const double* src[kGroup];
    double e[kGroup], idx[kGroup];
    for (int j = 0; j < kGroup; ++j) {
      const bool real = j < count;
      src[j] = prev + b0 + last - (real ? cost[group[j]] : 0);
      e[j] = real ? err[group[j]] : std::numeric_limits<double>::infinity();
      idx[j] = real ? double(group[j]) : 0.0;
    }
    min_plus_update_group(src, e, idx, best + last, arg + last, len - last);
  };
  for (int64_t c = 0; c < n; ++c) {
    if (cost[c] >= b1) continue;  // does not fit any slot of this tile
    group[filled++] = c;
    if (filled == kGroup) {
      flush(kGroup);
      filled = 0;
    }
  }
  if (filled) flush(filled);
  for (int64_t i = 0; i < len; ++i) bp_row[b0 + i] = static_cast<BP>(arg[i]);
  for (int64_t b = b1; b < full_end; ++b) {  // saturated: bucket cap is this tile's last computed
    cur[b] = cur[b1 - 1];
    bp_row[b] = bp_row[b1 - 1];
  }
}

template <typename BP>
std::vector<double> run_dp(const detail::MckpPlan& plan, int num_threads, BP* bp) {
  const int64_t L = plan.num_layers;
  const int64_t width = plan.buckets + 1;
  const int64_t tiles = (width + kTile - 1) / kTile;
  // Row 0 starts as "no layers chosen yet": error 0 within any bucket budget.
  std::vector<double> rows[2] = {std::vector<double>(width, 0.0), std::vector<double>(width)};
  int threads = num_threads > 0 ? num_threads : int(std::max(1u, std::thread::hardware_concurrency()));
  threads = int(std::min<int64_t>(threads, tiles));

  // Threads take a layer's tiles from a shared counter and start layer l+1 once all of
  // layer l's tiles are done (its row is complete and nobody still reads the row that
  // layer l+1 overwrites). No barrier: a thread the OS delays (another process on a
  // 2-core machine) holds nobody up unless it is inside a tile. A tile's result does not
  // depend on which thread computes it, hence results do not depend on the thread count.
  std::vector<int64_t> cap(L);
  for (int64_t l = 0, sum = 0; l < L; ++l) {
    int64_t widest = 0;
    for (int64_t c = plan.layer_begin[l]; c < plan.layer_begin[l + 1]; ++c) widest = std::max<int64_t>(widest, plan.cost[c]);
    sum = std::min(width - 1, sum + widest);
    cap[l] = sum;
  }
  std::unique_ptr<std::atomic<int64_t>[]> next_tile(new std::atomic<int64_t>[L]);
  std::unique_ptr<TileCounter[]> done_tiles(new TileCounter[L]);
  for (int64_t l = 0; l < L; ++l) next_tile[l].store(0, std::memory_order_relaxed);
  auto work = [&] {
    std::vector<double> arg(kTile);
    for (int64_t l = 0; l < L; ++l) {
      if (l > 0) done_tiles[l - 1].wait_until(tiles);
      const double* prev = rows[l & 1].data();
      double* cur = rows[(l + 1) & 1].data();
      const int64_t c0 = plan.layer_begin[l];
      const int64_t n = plan.layer_begin[l + 1] - c0;
      for (int64_t t; (t = next_tile[l].fetch_add(1, std::memory_order_relaxed)) < tiles;) {
        const int64_t b0 = t * kTile;
        dp_tile(prev, cur, bp + l * width, b0, std::min(width, b0 + kTile), cap[l], plan.cost.data() + c0,
                plan.err.data() + c0, n, arg.data());
        done_tiles[l].add(tiles);
      }
    }
  };

  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  } catch (const std::system_error&) {
    // Fewer threads than asked: the ones running take all the tiles.
  }
  work();
  for (auto& th : pool) th.join();
  return std::move(rows[L & 1]);
}

template <typename BP>
std::vector<int32_t> walk_back(const detail::MckpPlan& plan, int64_t bucket, const BP* bp) {
  const int64_t width = plan.buckets + 1;
  std::vector<int32_t> position(plan.num_layers);
  for (int64_t l = plan.num_layers - 1; l >= 0; --l) {
    const int32_t c = bp[l * width + bucket];
    position[l] = c;
    bucket -= plan.cost[plan.layer_begin[l] + c];
  }
  if (bucket < 0) ROCKETKIT_FAIL(kFn, "internal error: back-pointers overran the bucket budget");
  return position;
}

}  // namespace

namespace detail {

void check_offsets(const int64_t* offsets, int64_t num_layers) {
  ROCKETKIT_CHECK(num_layers >= 1, kFn, "need at least one layer, got ", num_layers);
  ROCKETKIT_CHECK(offsets != nullptr, kFn, "offsets is null");
  ROCKETKIT_CHECK(offsets[0] == 0, kFn, "offsets[0] must be 0, got ", offsets[0]);
  for (int64_t l = 0; l < num_layers; ++l)
    ROCKETKIT_CHECK(offsets[l + 1] > offsets[l], kFn, "layer ", l, " has no candidates (offsets[",
                    l, "] = ", offsets[l], ", offsets[", l + 1, "] = ", offsets[l + 1], ")");
}

MckpPlan plan_mckp(const double* errors, const int64_t* params, const int64_t* offsets,
                   int64_t num_layers, int64_t budget, int64_t buckets) {
  check_offsets(offsets, num_layers);
  ROCKETKIT_CHECK(errors != nullptr && params != nullptr, kFn, "errors or params is null");
  ROCKETKIT_CHECK(buckets >= 1 && buckets <= kMaxBuckets, kFn, "buckets must be in [1, ",
                  kMaxBuckets, "], got ", buckets);
  ROCKETKIT_CHECK(budget >= 0, kFn, "budget must be non-negative, got ", budget);
  check_memory(num_layers, buckets, 1);

  MckpPlan plan;
  plan.num_layers = num_layers;
  plan.buckets = buckets;
  plan.budget = budget;
  std::vector<int64_t> layer_min(num_layers);
  int64_t sum_max = 0;
  for (int64_t l = 0; l < num_layers; ++l) {
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
    for (int64_t i = offsets[l]; i < offsets[l + 1]; ++i) {
      ROCKETKIT_CHECK(std::isfinite(errors[i]) && errors[i] >= 0, kFn, "errors must be finite and ",
                      "non-negative; layer ", l, " candidate ", i - offsets[l], " has ", errors[i]);
      ROCKETKIT_CHECK(params[i] >= 0, kFn, "params must be non-negative; layer ", l, " candidate ",
                      i - offsets[l], " has ", params[i]);
      lo = std::min(lo, params[i]);
      hi = std::max(hi, params[i]);
    }
    layer_min[l] = lo;
    ROCKETKIT_CHECK(!__builtin_add_overflow(sum_max, hi, &sum_max), kFn,
                    "the sum over layers of the largest params overflows int64 at layer ", l);
    plan.min_params += lo;  // ≤ sum_max, cannot overflow
  }
  ROCKETKIT_CHECK(budget >= plan.min_params, kFn, "budget ", budget,
                  " is infeasible: the smallest feasible budget is ", plan.min_params);
  plan.slack = budget - plan.min_params;
  plan.bucket_width = double(plan.slack) / double(buckets);

  std::vector<std::vector<Point>> hulls(num_layers);
  std::vector<int64_t> order;
  std::vector<Point> front;
  std::vector<int64_t> front_index, kept;
  plan.layer_begin.assign(1, 0);
  int64_t widest = 0;
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t o = offsets[l], n = offsets[l + 1] - o;
    order.resize(n);
    std::iota(order.begin(), order.end(), int64_t(0));
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      if (params[o + a] != params[o + b]) return params[o + a] < params[o + b];
      if (errors[o + a] != errors[o + b]) return errors[o + a] < errors[o + b];
      return a < b;
    });
    // Pareto front: params ascending, errors strictly decreasing.
    front.clear();
    front_index.clear();
    for (int64_t a : order) {
      if (front.empty() || errors[o + a] < front.back().e) {
        front.push_back({params[o + a], errors[o + a]});
        front_index.push_back(a);
      }
    }
    plan.kept_candidates += int64_t(front.size());
    hulls[l] = lower_hull(front);

    // Rounded-up bucket costs: Σ ceil(d·B/slack) ≤ B implies Σ d ≤ slack. Costs are
    // non-decreasing along the front; of equal costs only the last (least error) can win.
    kept.clear();
    int64_t last_cost = -1;
    for (size_t j = 0; j < front.size(); ++j) {
      const uint64_t d = uint64_t(front[j].p - layer_min[l]);
      unsigned __int128 c;
      if (plan.slack == 0)
        c = d == 0 ? 0 : (unsigned __int128)buckets + 1;
      else
        c = ((unsigned __int128)d * uint64_t(buckets) + uint64_t(plan.slack) - 1) / uint64_t(plan.slack);
      if (c > (unsigned __int128)buckets) break;
      if (int64_t(c) == last_cost) kept.back() = int64_t(j);
      else kept.push_back(int64_t(j));
      last_cost = int64_t(c);
    }
    // DP iterates a layer's candidates in original index order: ties go to the lower index.
    std::sort(kept.begin(), kept.end(),
              [&](int64_t a, int64_t b) { return front_index[a] < front_index[b]; });
    ROCKETKIT_CHECK(int64_t(kept.size()) <= kMaxDpCandidates, kFn, "layer ", l, " keeps ",
                    kept.size(), " candidates after pruning; at most ", kMaxDpCandidates,
                    " are supported (uint16 back-pointers)");
    for (int64_t j : kept) {
      const uint64_t d = uint64_t(front[j].p - layer_min[l]);
      const int64_t c = plan.slack == 0 ? 0
                        : int64_t(((unsigned __int128)d * uint64_t(buckets) + uint64_t(plan.slack) - 1) /
                                  uint64_t(plan.slack));
      plan.cost.push_back(int32_t(c));
      plan.err.push_back(front[j].e);
      plan.index.push_back(front_index[j]);
    }
    widest = std::max<int64_t>(widest, int64_t(kept.size()));
    plan.layer_begin.push_back(int64_t(plan.cost.size()));
  }
  plan.backpointer_bytes = widest <= 256 ? 1 : 2;
  check_memory(num_layers, buckets, plan.backpointer_bytes);
  plan.lower_bound = lp_bound(hulls, plan.slack);
  return plan;
}

int64_t best_bucket(const std::vector<double>& curve) {
  const double best = curve.back();
  int64_t b = int64_t(curve.size()) - 1;
  while (b > 0 && curve[b - 1] == best) --b;  // the curve is non-increasing
  return b;
}

MckpResult finish_mckp(const MckpPlan& plan, const double* errors, const int64_t* params,
                       const int64_t* offsets, std::vector<double> curve,
                       const std::vector<int32_t>& position) {
  MckpResult r;
  r.choice.resize(plan.num_layers);
  for (int64_t l = 0; l < plan.num_layers; ++l) {
    const int64_t n = plan.layer_begin[l + 1] - plan.layer_begin[l];
    if (position[l] < 0 || position[l] >= n)
      ROCKETKIT_FAIL(kFn, "internal error: bad back-pointer ", position[l], " at layer ", l);
    const int64_t c = plan.index[plan.layer_begin[l] + position[l]];
    r.choice[l] = c;
    r.error += errors[offsets[l] + c];
    r.params += params[offsets[l] + c];  // Σ max params fits int64 (checked)
  }
  if (r.params > plan.budget)
    ROCKETKIT_FAIL(kFn, "internal error: the solution uses ", r.params, " params, over the budget ",
                   plan.budget);
  // LP ≤ integer optimum ≤ DP objective; rounding in the bound's sums may lift it by an ulp
  // above a DP objective that attains it.
  r.lower_bound = std::min(plan.lower_bound, r.error);
  r.curve = std::move(curve);
  r.min_params = plan.min_params;
  r.bucket_width = plan.bucket_width;
  r.kept_candidates = plan.kept_candidates;
  return r;
}

}  // namespace detail

MckpResult solve_mckp(const double* errors, const int64_t* params, const int64_t* offsets,
                      int64_t num_layers, int64_t budget, int64_t buckets, int num_threads) {
  ROCKETKIT_CHECK(num_threads >= 0, kFn, "num_threads must be >= 0, got ", num_threads);
  const detail::MckpPlan plan = detail::plan_mckp(errors, params, offsets, num_layers, budget, buckets);
  const size_t cells = size_t(plan.num_layers) * size_t(plan.buckets + 1);
  std::vector<double> curve;
  std::vector<int32_t> position;
  if (plan.backpointer_bytes == 1) {
    std::unique_ptr<uint8_t[]> bp(new uint8_t[cells]);  // every cell is written by the DP
    curve = run_dp(plan, num_threads, bp.get());
    position = walk_back(plan, detail::best_bucket(curve), bp.get());
  } else {
    std::unique_ptr<uint16_t[]> bp(new uint16_t[cells]);
    curve = run_dp(plan, num_threads, bp.get());
    position = walk_back(plan, detail::best_bucket(curve), bp.get());
  }
  return detail::finish_mckp(plan, errors, params, offsets, std::move(curve), position);
}

}  // namespace rocketkit
