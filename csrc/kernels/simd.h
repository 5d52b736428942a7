// Eight-lane float32 vectors through GCC/Clang vector extensions: AVX2/FMA instructions when the
// target has them, SSE pairs (or scalar code) otherwise. Host code only.
#pragma once

#include <cstdint>
#include <cstring>

namespace mtp_ext {
namespace kernels {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

inline float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float hmax8(v8f v) {
  float m = v[0];
  for (int j = 1; j < 8; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// exp(x) lane-wise for x <= 0: about 2 ulp; 0 below -87.3 (and for -inf); NaN stays NaN.
inline v8f exp8_nonpositive(v8f x) {
  const v8f lowest = splat8(-87.3f);
  const v8f round = splat8(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8i underflow = x < lowest;
  const v8f xc = underflow ? lowest : x;
  const v8f shifted = xc * splat8(1.44269504088896341f) + round;
  const v8f n = shifted - round;
  v8f r = xc - n * splat8(0.693145751953125f);
  r = r - n * splat8(1.428606765330187e-06f);
  v8f p = splat8(1.0f / 720.0f);
  p = p * r + splat8(1.0f / 120.0f);
  p = p * r + splat8(1.0f / 24.0f);
  p = p * r + splat8(1.0f / 6.0f);
  p = p * r + splat8(0.5f);
  p = p * r + splat8(1.0f);
  p = p * r + splat8(1.0f);
  const v8i e = ((v8i)shifted - (v8i)round) + 127;
  const v8f y = p * (v8f)(e << 23);
  const v8f zero = splat8(0.0f);
  const v8f finite = underflow ? zero : y;
  return x != x ? x : finite;
}

}  // namespace kernels
}  // namespace mtp_ext
