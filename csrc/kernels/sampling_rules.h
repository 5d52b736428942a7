// The rules of sampling that the CPU and CUDA kernels share (host and device code; the definition
// is mtp_ext.reference.target_tokens): how a uniform outside [0, 1) is read, where the mass of a
// row holding +inf lies, and which rows have no distribution to sample from.
#pragma once

#include "common.h"

namespace mtp_ext {
namespace kernels {

// u clamped into [0, 1): NaN and negative values read as 0, values of 1 and above as the largest
// float32 below 1. The CPU kernel rejects such uniforms; the CUDA kernels, which check them only on
// request, read them this way, so an inverse CDF never runs past either end of a row.
MTP_HD float clamp_uniform(float u) {
  return u >= 0.0f ? (u < 1.0f ? u : bits_to_float(0x3f7fffffu)) : 0.0f;
}

// Whether a row has a distribution to sample from, given its maximum ignoring NaN and whether it
// holds a NaN: not when it holds a NaN or every logit is -inf. Such a row gives its greedy token
// (the highest-ranked one: the first NaN, else id 0).
MTP_HD bool has_distribution(float max_ignoring_nan, bool has_nan) {
  return !has_nan && max_ignoring_nan > bits_to_float(0xff800000u);
}

// The exponent of a logit's unnormalized sampling mass, exp((v - mx) * scale), in a row with a
// distribution whose maximum is mx. A row holding +inf shares its whole mass equally among its +inf
// logits: 0 for those, -inf for the others (where v - mx would be NaN or -inf).
MTP_HD float mass_exponent(float v, float mx, float scale) {
  const float inf = bits_to_float(0x7f800000u);
  if (mx == inf) return v == inf ? 0.0f : -inf;
  return (v - mx) * scale;
}

}  // namespace kernels
}  // namespace mtp_ext
