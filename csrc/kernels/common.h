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

}  // namespace kernels
}  // namespace mtp_ext
