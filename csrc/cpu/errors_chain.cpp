// Profiling all candidates of a layer by mask updates along chains of similar candidates.
//
// Neighbouring candidates in (cr, ks) keep almost the same entries of C (the same mask rule
// applied to nearly the same k and s), so along a chain the products the errors need,
// G = C_m C_mᵀ and Z = C_m·B (B = N or V, d2×r), are updated by the entries the mask gains or
// loses instead of being rebuilt. With Δ = M_new − M_old (sparse, |Δ| ≪ nnz):
//   Z_new = Z_old + Δ·B
//   G_new = G_old + X + Xᵀ,  X = ½·Δ·(M_old + M_new)ᵀ = Δ·(M_old + ½Δ)ᵀ
// so a step costs 2|Δ|(r + k) flops in a sparse × dense product, against k²·d2 + 2k·d2·r for
// the dense rebuild; the Cholesky and triangular solve of each candidate stay dense. Rows the
// mask empties are reset to exact zeros, so a dropped atom makes G exactly singular (and takes
// the ridge) as in the dense computation. Chains are short (drift stays at rounding level) and
// fixed by the candidate list alone, so results do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include <cblas.h>

#include "errors_impl.h"
#include "rocketkit/check.h"

namespace rocketkit::errors_detail {
namespace {

constexpr int64_t kChainLength = 48;

// Eight doubles, loaded and stored unaligned; the compiler maps it to the widest vectors the
// target has (one AVX-512 register, two AVX2 registers).
typedef double Vec8 __attribute__((vector_size(64), aligned(8)));
inline Vec8 load8(const double* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(double* p, Vec8 v) { std::memcpy(p, &v, sizeof(v)); }

#if defined(__AVX512F__)
constexpr int kVecs = 8;  // 64 columns: 8 of the 32 vector registers hold a row's partial sums
#else
constexpr int kVecs = 4;  // 32 columns in 8 of the 16 AVX2 registers
#endif
constexpr int64_t kBlock = 8 * kVecs;
constexpr int64_t kRowsOfB = 512;  // a kBlock-wide slice of this many rows of B stays in L2

// out[i, :w] += Σ_p val[p]·B[col[p], :w] over the CSR rows i (columns ascending within a row).
// Each pass takes a kBlock-wide column slice and a kRowsOfB-row chunk of B, so the B rows that
// the nonzeros pick at random come from L2, while each output row's slice sits in registers.
void csr_times_dense_add(const std::vector<int32_t>& rowptr, const std::vector<int32_t>& col,
                         const std::vector<double>& val, int64_t rows, int64_t d2, const double* B,
                         int64_t ldb, int64_t w, double* out, int64_t ldo, std::vector<int32_t>& cursor) {
  cursor.resize(rows);
  for (int64_t c0 = 0; c0 < w; c0 += kBlock) {
    const int64_t cw = std::min(kBlock, w - c0);
    std::copy(rowptr.begin(), rowptr.begin() + rows, cursor.begin());
    for (int64_t j1 = kRowsOfB; j1 < d2 + kRowsOfB; j1 += kRowsOfB) {
      for (int64_t i = 0; i < rows; ++i) {
        int32_t p = cursor[i];
        const int32_t end = rowptr[i + 1];
        if (p == end || col[p] >= j1) continue;
        double* o = out + i * ldo + c0;
        if (cw == kBlock) {
          Vec8 acc[kVecs];
          for (int t = 0; t < kVecs; ++t) acc[t] = load8(o + 8 * t);
          for (; p < end && col[p] < j1; ++p) {
            const double v = val[p];
            const double* src = B + int64_t(col[p]) * ldb + c0;
            for (int t = 0; t < kVecs; ++t) acc[t] += v * load8(src + 8 * t);
          }
          for (int t = 0; t < kVecs; ++t) store8(o + 8 * t, acc[t]);
        } else {
          for (; p < end && col[p] < j1; ++p) {
            const double v = val[p];
            const double* src = B + int64_t(col[p]) * ldb + c0;
            for (int64_t t = 0; t < cw; ++t) o[t] += v * src[t];
          }
        }
        cursor[i] = p;
      }
    }
  }
}

struct Chain {
  std::vector<int64_t> members;  // candidate indices, in chain order
  double cost = 0;               // rough flops, to schedule the longest chains first
};

// How far apart two masked candidates' masks are, roughly, as a fraction of the nonzeros: the
// change of s (entries every column gains or loses) plus the change of the masked share 1 − s/k
// (entries that trade places). Fitted on the default grid's masks of synthetic layers; it only
// steers the order, never the result beyond rounding.
double mask_distance(int64_t k0, int64_t s0, int64_t k1, int64_t s1) {
  const double share0 = double(s0) / double(k0), share1 = double(s1) / double(k1);
  return std::fabs(std::log(double(s1) / double(s0))) + 1.3 * std::fabs(share1 - share0);
}

// Past this distance a dense restart did better than a step (fewest updated entries on the
// default grid's synthetic layers).
constexpr double kChainCut = 0.3;

// Direct candidates (no mask) go to `direct`; the rest are visited by nearest neighbour in
// mask_distance from the smallest k (ties to the lower index), and the path is cut into chains
// of at most kChainLength, and wherever a step is longer than kChainCut.
std::vector<Chain> make_chains(const LayerBasis& b, const int64_t* cand, int64_t n,
                               std::vector<int64_t>& direct) {
  std::vector<int64_t> left;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t k = cand[2 * c], s = cand[2 * c + 1];
    if (s == k && b.sigma[k - 1] * b.sigma[k - 1] > 0) direct.push_back(c);
    else left.push_back(c);
  }
  std::vector<Chain> chains;
  if (left.empty()) return chains;
  size_t first = 0;
  for (size_t t = 1; t < left.size(); ++t)
    if (cand[2 * left[t]] < cand[2 * left[first]]) first = t;
  std::vector<int64_t> path{left[first]};
  std::vector<double> jump{0.0};
  left.erase(left.begin() + first);
  while (!left.empty()) {
    const int64_t at = path.back();
    size_t best = 0;
    double best_d = std::numeric_limits<double>::infinity();
    for (size_t t = 0; t < left.size(); ++t) {
      const int64_t c = left[t];
      const double d = mask_distance(cand[2 * at], cand[2 * at + 1], cand[2 * c], cand[2 * c + 1]);
      if (d < best_d || (d == best_d && c < left[best])) {
        best_d = d;
        best = t;
      }
    }
    path.push_back(left[best]);
    jump.push_back(best_d);
    left.erase(left.begin() + best);
  }
  for (size_t i = 0; i < path.size();) {
    Chain ch;
    ch.members.push_back(path[i++]);
    while (i < path.size() && int64_t(ch.members.size()) < kChainLength && jump[i] <= kChainCut)
      ch.members.push_back(path[i++]);
    // The dense start is the expensive step: begin at the cheaper end.
    if (cand[2 * ch.members.back()] < cand[2 * ch.members.front()])
      std::reverse(ch.members.begin(), ch.members.end());
    for (int64_t c : ch.members) {
      const double k = double(cand[2 * c]);
      ch.cost += k * k * double(b.r) + k * double(b.d2);
    }
    const double k0 = double(cand[2 * ch.members.front()]);
    ch.cost += k0 * k0 * double(b.d2) + 2 * k0 * double(b.d2) * double(b.r);
    chains.push_back(std::move(ch));
  }
  std::stable_sort(chains.begin(), chains.end(), [](const Chain& a, const Chain& c) { return a.cost > c.cost; });
  return chains;
}

// The state of one chain: the current mask and the products it determines.
class ChainState {
 public:
  ChainState(const LayerBasis& b, const ColumnOrder& order)
      : b_(b), order_(order), B_(b.N.data()), nb_(b.nb) {}

  void run(const Chain& chain, const int64_t* cand, double* e_weight, double* e_output) {
    kmax_ = 0;
    for (int64_t c : chain.members) kmax_ = std::max(kmax_, cand[2 * c]);
    const int64_t d2 = b_.d2;
    Z_.assign(size_t(kmax_) * nb_, 0.0);
    Gb_.assign(size_t(kmax_) * kmax_, 0.0);
    R_.assign(size_t(kmax_) * kmax_, 0.0);
    CmT_.assign(size_t(d2) * kmax_, 0.0);
    p_.assign(d2, 0);
    row_count_.assign(kmax_, 0);
    bool first = true;
    for (int64_t c : chain.members) {
      const int64_t k = cand[2 * c], s = cand[2 * c + 1];
      if (first) start(k, s);
      else step(k, s);
      first = false;
      errors(k, e_weight + c, e_output + c);
    }
  }

 private:
  double coef(int64_t i, int64_t j) const { return b_.sigma[i] * b_.Vt[j * b_.r + i]; }

  // Dense products for the chain's first candidate. Column j's mask is the rows < k among the
  // first p_[j] entries of its order (select_column stops there), so (k, p_[j]) is its state.
  void start(int64_t k, int64_t s) {
    const int64_t d2 = b_.d2, kord = order_.kord;
    for (int64_t j = 0; j < d2; ++j) {
      const int32_t* o = order_.rows.data() + j * kord;
      int64_t p = 0;
      for (int64_t t = 0; t < s; ++p) {
        const int32_t i = o[p];
        if (i >= k) continue;
        CmT_[j * kmax_ + i] = coef(i, j);
        ++row_count_[i];
        ++t;
      }
      p_[j] = int32_t(p);
    }
    scipy_cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, int(k), int(d2), 1.0, CmT_.data(),
                      int(kmax_), 0.0, Gb_.data(), int(kmax_));
    scipy_cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(k), int(nb_), int(d2), 1.0,
                      CmT_.data(), int(kmax_), B_, int(nb_), 0.0, Z_.data(), int(nb_));
    k_ = k;
    s_ = s;
  }

  // From (k_, s_) to (k, s): per column only the order positions between the old and the new
  // prefix length and the rows between the old and the new k can change, so a column costs
  // |Δp| + |Δk| instead of a rescan of its prefix.
  void step(int64_t k, int64_t s) {
    const int64_t d2 = b_.d2, kord = order_.kord;
    d_row_.clear();
    d_col_.clear();
    d_val_.clear();
    const int64_t k0 = k_, klo = std::min(k, k0);
    for (int64_t j = 0; j < d2; ++j) {
      const int32_t* o = order_.rows.data() + j * kord;
      const int32_t* ps = order_.pos.data() + j * kord;
      const int64_t p0 = p_[j];
      // Rows < k among the first p0 positions, then move the prefix until it holds s of them
      // and ends on one (the shortest such prefix, as select_column takes).
      int64_t cnt = s_;
      if (k > k0) {
        for (int64_t i = k0; i < k; ++i) cnt += ps[i] < p0;
      } else {
        for (int64_t i = k; i < k0; ++i) cnt -= ps[i] < p0;
      }
      int64_t p = p0;
      if (cnt < s) {
        for (; cnt < s; ++p) cnt += o[p] < k;
      } else {
        for (; cnt > s || o[p - 1] >= k; --p) cnt -= o[p - 1] < k;
      }
      // Positions between the two prefixes change rows below both k's; rows between the two
      // k's change by their own position.
      const double sign = p > p0 ? 1.0 : -1.0;
      for (int64_t t = std::min(p, p0), t1 = std::max(p, p0); t < t1; ++t) {
        const int32_t i = o[t];
        if (i < klo) delta(i, j, sign);
      }
      if (k > k0) {
        for (int64_t i = k0; i < k; ++i)
          if (ps[i] < p) delta(int32_t(i), j, 1.0);
      } else {
        for (int64_t i = k; i < k0; ++i)
          if (ps[i] < p0) delta(int32_t(i), j, -1.0);
      }
      p_[j] = int32_t(p);
    }
    const int64_t width = std::max(k, k_);
    if (!d_val_.empty()) {
      to_csr();
      // X = Δ·(M_old + ½Δ)ᵀ: halfway updates of CmT are exact (a kept entry c becomes ½c, then 0).
      for (size_t p = 0; p < d_val_.size(); ++p) CmT_[int64_t(d_col_[p]) * kmax_ + d_row_[p]] += 0.5 * d_val_[p];
      csr_times_dense_add(rowptr_, csr_col_, csr_val_, width, d2, CmT_.data(), kmax_, width, R_.data(),
                          kmax_, cursor_);
      for (size_t p = 0; p < d_val_.size(); ++p) CmT_[int64_t(d_col_[p]) * kmax_ + d_row_[p]] += 0.5 * d_val_[p];
      csr_times_dense_add(rowptr_, csr_col_, csr_val_, width, d2, B_, nb_, nb_, Z_.data(), nb_, cursor_);
      for (int64_t i = 0; i < width; ++i)
        if (row_count_[i] == 0 && rowptr_[i + 1] > rowptr_[i]) clear_row(i);
    }
    k_ = k;
    s_ = s;
  }

  // Entry (i, j) enters (sign +1) or leaves (−1) the mask.
  void delta(int32_t i, int64_t j, double sign) {
    push_delta(i, j, sign * coef(i, j));
    row_count_[i] += sign > 0 ? 1 : -1;
  }

  void push_delta(int32_t i, int64_t j, double v) {
    d_row_.push_back(i);
    d_col_.push_back(int32_t(j));
    d_val_.push_back(v);
  }

  void to_csr() {
    rowptr_.assign(kmax_ + 1, 0);
    for (int32_t i : d_row_) ++rowptr_[i + 1];
    for (int64_t i = 0; i < kmax_; ++i) rowptr_[i + 1] += rowptr_[i];
    csr_col_.resize(d_val_.size());
    csr_val_.resize(d_val_.size());
    cursor_.assign(rowptr_.begin(), rowptr_.end() - 1);
    for (size_t p = 0; p < d_val_.size(); ++p) {
      const int32_t q = cursor_[d_row_[p]]++;
      csr_col_[q] = d_col_[p];
      csr_val_[q] = d_val_[p];
    }
  }

  // An atom no column keeps any more: its row and column of G and its row of Z are exactly 0.
  void clear_row(int64_t i) {
    std::fill(Z_.begin() + i * nb_, Z_.begin() + (i + 1) * nb_, 0.0);
    for (int64_t t = 0; t < kmax_; ++t) {
      Gb_[i * kmax_ + t] = Gb_[t * kmax_ + i] = 0.0;
      R_[i * kmax_ + t] = R_[t * kmax_ + i] = 0.0;
    }
  }

  void errors(int64_t k, double* e_w, double* e_o) {
    G_.resize(size_t(k) * k);
    L_.resize(size_t(k) * k);
    for (int64_t a = 0; a < k; ++a)
      for (int64_t c = 0; c <= a; ++c) {
        const double g = Gb_[a * kmax_ + c] + R_[a * kmax_ + c] + R_[c * kmax_ + a];
        G_[a * k + c] = G_[c * k + a] = g;
      }
    const double eps = cholesky_with_ridge(G_.data(), k, L_.data());
    errors_from_products(b_, k, L_.data(), eps, Z_.data(), nb_, ps_, e_w, e_o);
  }

  const LayerBasis& b_;
  const ColumnOrder& order_;
  const double* B_;  // N (d2×nb_): the chains keep Z = C_m·N
  int64_t nb_;
  int64_t kmax_ = 0, k_ = 0, s_ = 0;
  std::vector<double> Z_, Gb_, R_, CmT_, G_, L_;
  std::vector<int32_t> p_;  // per column: the mask is the rows < k_ among its first p_ positions
  std::vector<int64_t> row_count_;
  std::vector<int32_t> d_row_, d_col_, rowptr_, cursor_, csr_col_;
  std::vector<double> d_val_, csr_val_;
  ProductScratch ps_;
};

}  // namespace

void profile_candidates(const LayerBasis& b, const int64_t* cand, int64_t n, double* e_weight,
                        double* e_output, int threads) {
  std::vector<int64_t> direct;
  const std::vector<Chain> chains = make_chains(b, cand, n, direct);
  for (int64_t c : direct) tail_errors(b, cand[2 * c], cand[2 * c + 1], e_weight + c, e_output + c);
  if (chains.empty()) return;
  int64_t kord = 0;
  for (const Chain& ch : chains)
    for (int64_t c : ch.members) kord = std::max(kord, cand[2 * c]);
  const ColumnOrder order = column_order(b, kord, threads);
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, int64_t(chains.size()))));
  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&]() {
    try {
      ChainState state(b, order);
      for (size_t t; (t = next.fetch_add(1)) < chains.size();) state.run(chains[t], cand, e_weight, e_output);
    } catch (...) {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      next.store(chains.size());
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  if (failure) std::rethrow_exception(failure);
}

void profile_layers(int64_t m, const std::function<LayerBasis(int64_t)>& make_basis,
                    const int64_t* const* cand, const int64_t* n, double* const* e_weight,
                    double* const* e_output, int threads) {
  struct Layer {
    LayerBasis b;
    ColumnOrder order;
    std::vector<Chain> chains;
  };
  std::vector<std::unique_ptr<Layer>> layers(m);
  std::vector<size_t> chains_left(m, 0);
  struct Task {
    int64_t layer;
    size_t chain;
    double cost;
  };
  std::vector<Task> ready;
  std::mutex mu;
  std::condition_variable cv;
  int64_t next_basis = 0, bases_left = m;
  std::exception_ptr failure;

  // Bases first (each a layer's serial stretch, run side by side), then the chains of every
  // layer, longest first, on whichever thread is free.
  auto worker = [&]() {
    std::unique_ptr<ChainState> state;
    int64_t state_layer = -1;
    std::unique_lock<std::mutex> lock(mu);
    while (!failure) {
      try {
        if (next_basis < m) {
          const int64_t l = next_basis++;
          lock.unlock();
          auto layer = std::make_unique<Layer>();
          layer->b = make_basis(l);
          std::vector<int64_t> direct;
          layer->chains = make_chains(layer->b, cand[l], n[l], direct);
          for (int64_t c : direct)
            tail_errors(layer->b, cand[l][2 * c], cand[l][2 * c + 1], e_weight[l] + c, e_output[l] + c);
          int64_t kord = 0;
          for (const Chain& ch : layer->chains)
            for (int64_t c : ch.members) kord = std::max(kord, cand[l][2 * c]);
          if (kord > 0) layer->order = column_order(layer->b, kord, 1);
          lock.lock();
          for (size_t t = 0; t < layer->chains.size(); ++t) ready.push_back({l, t, layer->chains[t].cost});
          chains_left[l] = layer->chains.size();
          if (chains_left[l] > 0) layers[l] = std::move(layer);
          --bases_left;
          cv.notify_all();
        } else if (!ready.empty()) {
          auto best = std::max_element(ready.begin(), ready.end(), [](const Task& a, const Task& c) {
            return a.cost < c.cost || (a.cost == c.cost && (a.layer > c.layer || (a.layer == c.layer && a.chain > c.chain)));
          });
          const Task task = *best;
          ready.erase(best);
          Layer& layer = *layers[task.layer];
          lock.unlock();
          if (state_layer != task.layer) {
            state = std::make_unique<ChainState>(layer.b, layer.order);
            state_layer = task.layer;
          }
          state->run(layer.chains[task.chain], cand[task.layer], e_weight[task.layer], e_output[task.layer]);
          lock.lock();
          if (--chains_left[task.layer] == 0) {  // its last chain: the basis can go
            if (state_layer == task.layer) state.reset(), state_layer = -1;
            layers[task.layer].reset();
          }
        } else if (bases_left == 0) {
          break;
        } else {
          cv.wait(lock);
        }
      } catch (...) {
        if (!lock.owns_lock()) lock.lock();
        if (!failure) failure = std::current_exception();
        cv.notify_all();
      }
    }
  };
  threads = int(std::max<int64_t>(1, threads));
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace rocketkit::errors_detail
