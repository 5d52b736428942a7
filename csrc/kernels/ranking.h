// The one ranking every op uses: value descending, NaN above every number, ties toward the lower id.
#pragma once

#include <cstdint>

#include "common.h"

namespace mtp_ext {
namespace kernels {

struct Candidate {
  float value;
  int64_t id;
};

// True when a ranks strictly above b by value alone (NaN above numbers, NaN equal to NaN).
MTP_HD bool ranks_above(float a, float b) {
  if (a != a) return b == b;
  if (b != b) return false;
  return a > b;
}

// Total order on candidates: by value, then the lower id first.
MTP_HD bool better(const Candidate& a, const Candidate& b) {
  if (ranks_above(a.value, b.value)) return true;
  if (ranks_above(b.value, a.value)) return false;
  return a.id < b.id;
}

}  // namespace kernels
}  // namespace mtp_ext
