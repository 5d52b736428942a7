// Fixed-width float32 vectors through GCC/Clang vector extensions: v8f (8 lanes) and v16f (16
// lanes) become AVX2 / AVX-512 instructions when the target has them and are split into narrower
// ones otherwise, so the same code is correct everywhere and fast where the ISA allows. Host only.
#pragma once

#include <cstdint>
#include <cstring>

namespace mtp_ext {
namespace kernels {

typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));

template <typename V>
constexpr int lanes() {
  return static_cast<int>(sizeof(V) / sizeof(float));
}

template <typename V>
inline V splat(float x) {
  return V{} + x;
}

template <typename V>
inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
inline void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename V>
inline float hsum(V v) {
  // Pairwise, so the rounding does not depend on a long sequential chain.
  float buf[lanes<V>()];
  storev(buf, v);
  for (int width = lanes<V>() / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) buf[i] += buf[i + width];
  return buf[0];
}

template <typename V>
inline float hmax(V v) {
  float m = v[0];
  for (int j = 1; j < lanes<V>(); ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// exp(x) lane-wise for x <= 0: about 2 ulp; 0 below -87.3 (and for -inf); NaN stays NaN.
template <typename V>
inline V exp_nonpositive(V x) {
  using I = decltype(x < x);
  const V lowest = splat<V>(-87.3f);
  const V round = splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const I underflow = x < lowest;
  const V xc = underflow ? lowest : x;
  const V shifted = xc * 1.44269504088896341f + round;
  const V n = shifted - round;
  V r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  V p = splat<V>(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I e = ((I)shifted - (I)round) + 127;
  const V y = p * (V)(e << 23);
  const V finite = underflow ? splat<V>(0.0f) : y;
  return x != x ? x : finite;
}

}  // namespace kernels
}  // namespace mtp_ext
