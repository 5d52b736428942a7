// Running top-k selection on the host: a bounded heap whose top is the worst kept candidate.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ranking.h"

namespace mtp_ext {
namespace kernels {

struct BetterFirst {
  bool operator()(const Candidate& a, const Candidate& b) const { return better(a, b); }
};

class TopK {
 public:
  explicit TopK(int64_t k = 0) { reset(k); }

  void reset(int64_t k) {
    k_ = k;
    heap_.clear();
    heap_.reserve(static_cast<size_t>(k));
  }

  int64_t k() const { return k_; }
  int64_t size() const { return static_cast<int64_t>(heap_.size()); }
  bool full() const { return size() >= k_; }

  // The worst kept candidate's value; only meaningful when full().
  float threshold() const { return heap_.front().value; }

  // Cheap pre-check on a value alone: false only when no candidate of this value can enter.
  bool may_enter(float value) const { return !full() || !ranks_above(threshold(), value); }

  void push(float value, int64_t id) {
    const Candidate c{value, id};
    if (!full()) {
      heap_.push_back(c);
      std::push_heap(heap_.begin(), heap_.end(), BetterFirst());
    } else if (k_ > 0 && better(c, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), BetterFirst());
      heap_.back() = c;
      std::push_heap(heap_.begin(), heap_.end(), BetterFirst());
    }
  }

  // Offers n consecutive values x[0..n) with ids id0, id0 + 1, ...
  void push_block(const float* x, int64_t n, int64_t id0) {
    for (int64_t i = 0; i < n; ++i) {
      if (may_enter(x[i])) push(x[i], id0 + i);
    }
  }

  // The kept candidates, best first. Leaves the selection empty.
  std::vector<Candidate> take_sorted() {
    std::sort_heap(heap_.begin(), heap_.end(), BetterFirst());
    std::vector<Candidate> out;
    out.swap(heap_);
    return out;
  }

 private:
  int64_t k_ = 0;
  std::vector<Candidate> heap_;
};

}  // namespace kernels
}  // namespace mtp_ext
