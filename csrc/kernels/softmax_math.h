// Vectorizable float32 building blocks for softmax-style reductions over blocks of a row.
// Written as plain loops over fixed lanes so the compiler emits SIMD code for the target ISA.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"
#include "simd.h"

namespace mtp_ext {
namespace kernels {

// The vector type of the row loops: 16 lanes (one AVX-512 register, or two AVX2 ones).
typedef v16f vrow;
constexpr int kRowLanes = lanes<vrow>();

// exp(x) for x <= 0 with about 2 ulp error; 0 for x below -87.3 (and for -inf); NaN stays NaN.
inline float exp_nonpositive(float x) { return exp_nonpositive(splat<v8f>(x))[0]; }

// Largest value of x[0..n) ignoring NaN; -inf when there is none.
inline float block_max(const float* x, int64_t n) {
  vrow lane = splat<vrow>(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kRowLanes <= n; i += kRowLanes) {
    const vrow v = loadv<vrow>(x + i);
    lane = v > lane ? v : lane;
  }
  float m = hmax(lane);
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Whether any of x[0..n) is NaN.
inline bool block_has_nan(const float* x, int64_t n) {
  using mask = decltype(splat<vrow>(0.0f) != splat<vrow>(0.0f));
  mask any = mask{};
  int64_t i = 0;
  for (; i + kRowLanes <= n; i += kRowLanes) {
    const vrow v = loadv<vrow>(x + i);
    any |= v != v;
  }
  bool found = false;
  for (int j = 0; j < kRowLanes; ++j) found |= any[j] != 0;
  for (; i < n; ++i) found |= x[i] != x[i];
  return found;
}

// sum_i exp((x[i] - max) * scale); NaN if any x is NaN.
inline float block_sum_exp(const float* x, int64_t n, float max, float scale) {
  vrow acc0 = splat<vrow>(0.0f), acc1 = splat<vrow>(0.0f);
  int64_t i = 0;
  for (; i + 2 * kRowLanes <= n; i += 2 * kRowLanes) {
    acc0 += exp_nonpositive((loadv<vrow>(x + i) - max) * scale);
    acc1 += exp_nonpositive((loadv<vrow>(x + i + kRowLanes) - max) * scale);
  }
  for (; i + kRowLanes <= n; i += kRowLanes) acc0 += exp_nonpositive((loadv<vrow>(x + i) - max) * scale);
  float s = hsum(acc0 + acc1);
  for (; i < n; ++i) s += exp_nonpositive((x[i] - max) * scale);
  return s;
}

// out[i] += weight * exp((x[i] - max) * scale)
inline void block_add_scaled_exp(const float* x, int64_t n, float max, float scale, float weight,
                                 float* out) {
  int64_t i = 0;
  for (; i + kRowLanes <= n; i += kRowLanes)
    storev(out + i, loadv<vrow>(out + i) + weight * exp_nonpositive((loadv<vrow>(x + i) - max) * scale));
  for (; i < n; ++i) out[i] += weight * exp_nonpositive((x[i] - max) * scale);
}

// Streaming softmax statistics of a row: sum = sum_i exp((x_i - max) * scale).
struct SoftmaxStats {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;

  // Adds a block whose maximum (ignoring NaN) is block_max.
  void add_block(const float* x, int64_t n, float bmax, float scale) {
    if (bmax > max) {
      sum = sum == 0.0f ? 0.0f : sum * exp_nonpositive((max - bmax) * scale);
      max = bmax;
    }
    if (max == -std::numeric_limits<float>::infinity()) {
      // Every value so far is -inf (or NaN): only NaN contributes, as NaN.
      for (int64_t i = 0; i < n; ++i)
        if (x[i] != x[i]) sum = x[i];
      return;
    }
    sum += block_sum_exp(x, n, max, scale);
  }

  void merge(const SoftmaxStats& other, float scale) {
    if (other.max > max) {
      sum = (sum == 0.0f ? 0.0f : sum * exp_nonpositive((max - other.max) * scale)) + other.sum;
      max = other.max;
    } else if (other.sum != 0.0f || other.sum != other.sum) {
      sum += other.max == max ? other.sum : other.sum * exp_nonpositive((other.max - max) * scale);
    }
  }

  // log of the normalizer of softmax(x * scale): max * scale + log(sum).
  float log_normalizer(float scale) const { return max * scale + std::log(sum); }
};

// Loads n elements at stride into a float buffer.
template <typename T>
inline void load_block(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i * stride]);
  }
}

}  // namespace kernels
}  // namespace mtp_ext
