// Torch-free basics shared by the CPU and CUDA kernels: host/device qualifiers, the storage types of
// the half-precision dtypes, and their conversion to float.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MTP_HD __host__ __device__ __forceinline__
#else
#define MTP_HD inline
#endif

namespace mtp_ext {
namespace kernels {

// bfloat16 and IEEE float16 as raw bits; layout-compatible with at::BFloat16 / at::Half / __half.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

MTP_HD float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

MTP_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

MTP_HD float to_float(float x) { return x; }

MTP_HD float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

// Exact float16 -> float32 (normals, subnormals, infinities and NaN).
MTP_HD float to_float(f16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Subnormal or zero: mantissa * 2^-24, exact in float32.
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return bits_to_float(sign | float_to_bits(magnitude));
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round-to-nearest-even float32 -> bfloat16 (NaN stays NaN).
MTP_HD bf16 to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

// Round-to-nearest-even float32 -> float16: overflow to infinity, subnormals, NaN stays NaN.
MTP_HD f16 to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // 65520 and up round to infinity
  if (a >= 0x38800000u) {                                       // a float16 normal (>= 2^-14)
    uint32_t m = a - 0x38000000u;                               // exponent rebiased by 112
    m += 0xfffu + ((m >> 13) & 1u);
    return f16{uint16_t(sign | (m >> 13))};
  }
  // A subnormal (or zero) of float16: the value in units of 2^-24, rounded (1024 is the smallest
  // normal, which the encoding gives for free).
  const uint32_t e = a >> 23;
  if (e < 102) return f16{uint16_t(sign)};  // below 2^-25: rounds to zero
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 .. 24
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return f16{uint16_t(sign | q)};
}

}  // namespace kernels
}  // namespace mtp_ext
