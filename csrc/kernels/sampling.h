// Choosing the target token of one row of logits on the host: argmax, or inverse-CDF sampling after
// temperature, top-k and top-p (the definition is mtp_ext.reference.target_tokens).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ranking.h"
#include "sampling_rules.h"
#include "softmax_math.h"
#include "topk.h"

namespace mtp_ext {
namespace kernels {

// Index of the highest-ranked value of x[0..n) (NaN first, ties toward the lower index).
inline int64_t argmax_row(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (ranks_above(x[i], x[best])) best = i;
  }
  return best;
}

struct SamplingScratch {
  std::vector<float> prob;
  std::vector<Candidate> ranked;
  std::vector<int64_t> kept;
};

// Inverse-CDF sample from softmax(x * scale) (scale = 1 / temperature, a finite float32) restricted
// by top_k (0: all) and top_p, with the uniform u in [0, 1) (clamped into it). x has n > 0 float32
// values. The rules of sampling_rules.h apply: the +inf logits of a row share its mass, and a row
// holding a NaN, or only -inf, gives its greedy token. Masses are summed in double: over a large
// vocabulary a float32 running sum loses the tail and moves the top-p boundary.
inline int64_t sample_row(const float* x, int64_t n, float scale, int64_t top_k, float top_p,
                          float u, SamplingScratch& s) {
  const float max = block_max(x, n);
  if (!has_distribution(max, block_has_nan(x, n))) return argmax_row(x, n);
  u = clamp_uniform(u);
  s.prob.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) s.prob[i] = exp_nonpositive(mass_exponent(x[i], max, scale));

  const bool all_kept = (top_k <= 0 || top_k >= n) && top_p >= 1.0f;
  if (all_kept) {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += s.prob[i];
    const double threshold = u * total;
    double cum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      cum += s.prob[i];
      if (cum > threshold) return i;
    }
    return n - 1;
  }

  // The top-k set first (unordered, O(n)); then for top-p, rank (by logit) only as long a prefix
  // of it as needed: it starts at 64 and grows 4x until it holds the nucleus.
  s.ranked.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) s.ranked[i] = Candidate{x[i], i};
  const auto begin = s.ranked.begin();
  const int64_t limit = top_k > 0 && top_k < n ? top_k : n;
  if (limit < n) std::nth_element(begin, begin + limit, s.ranked.end(), BetterFirst());
  int64_t keep = limit;
  if (top_p < 1.0f) {
    double mass = 0.0;  // the nucleus is measured against the mass that top-k keeps
    for (int64_t j = 0; j < limit; ++j) mass += s.prob[s.ranked[j].id];
    for (int64_t prefix = std::min<int64_t>(64, limit);; prefix = std::min(4 * prefix, limit)) {
      if (prefix < limit) std::nth_element(begin, begin + prefix, begin + limit, BetterFirst());
      std::sort(begin, begin + prefix, BetterFirst());
      double before = 0.0;
      int64_t j = 0;
      for (; j < prefix; ++j) {
        if (j > 0 && !(before < top_p)) break;
        before += s.prob[s.ranked[j].id] / mass;
      }
      if (j < prefix || prefix == limit) {
        keep = j;
        break;
      }
    }
  }
  s.kept.resize(static_cast<size_t>(keep));
  for (int64_t j = 0; j < keep; ++j) s.kept[j] = s.ranked[j].id;
  std::sort(s.kept.begin(), s.kept.end());
  double total = 0.0;
  for (int64_t id : s.kept) total += s.prob[id];
  const double threshold = u * total;
  double cum = 0.0;
  for (int64_t id : s.kept) {
    cum += s.prob[id];
    if (cum > threshold) return id;
  }
  return s.kept.back();
}

}  // namespace kernels
}  // namespace mtp_ext
