// Small dense products on the host: out[r, j] = sum_d a[r, d] * b[j, d] for a few rows of `a`
// (activations) against a block of rows of `b` (a weight matrix in nn.Linear layout), register-tiled
// so each loaded vector of `b` serves several rows of `a`. Uses GCC/Clang vector extensions, which
// become AVX2/FMA (or SSE) instructions depending on the target flags.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"
#include "simd.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define MTP_EXT_HAS_BF16_DOT 1
#else
#define MTP_EXT_HAS_BF16_DOT 0
#endif

namespace mtp_ext {
namespace kernels {

// The weight rows are streamed from memory once; while a tile multiplies rows [0, RB) of b, this
// asks for the same columns of the next RB rows (the next tile's, contiguous in the weight), so the
// stream overlaps the arithmetic instead of waiting for it (without it, 8 rows of SmolLM2's output
// layer cost about the 1-row stream time plus the 8-row arithmetic). Prefetches never fault, past
// the end of the weight included.
template <int RB, typename T>
inline void prefetch_next_rows(const T* b, int64_t ldb, int64_t d) {
  for (int j = 0; j < RB; ++j) __builtin_prefetch(b + (RB + j) * ldb + d, 0, 3);
}

// With AVX-512 (32 vector registers) a 4 x 4 tile of 16-lane accumulators (16 + 4 + 1 registers);
// otherwise (16 AVX2 registers) a 4 x 3 tile of 8-lane ones. The 16-lane vectors halve the
// instructions per multiply-add against 8-lane ones (and double the multiply rate on CPUs with two
// full-width AVX-512 FMA units).
#if defined(__AVX512F__)
typedef v16f vdot;
constexpr int kTileA = 4, kTileB = 4;
#else
typedef v8f vdot;
constexpr int kTileA = 4, kTileB = 3;
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
// Sums each of 16 vectors of 16 floats and stores the 16 sums as a 4 x 4 block (v[4 * i + j] to
// out[i * ldo + j]): a butterfly of 15 adds and 30 shuffles, against 16 separate horizontal sums.
inline void sum16_to_4x4(const __m512* v, float* out, int64_t ldo) {
  __m512 a[8], b[4], c[2];
  for (int p = 0; p < 8; ++p)  // 128-bit lane: [v0 0+2, v1 0+2, v0 1+3, v1 1+3]
    a[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]),
                         _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
  for (int p = 0; p < 4; ++p)  // 128-bit lane: one partial sum of each of 4 vectors
    b[p] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * p], a[2 * p + 1], 0x44),
                         _mm512_shuffle_ps(a[2 * p], a[2 * p + 1], 0xEE));
  for (int p = 0; p < 2; ++p)
    c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], 0xDD));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                                 _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  alignas(64) float sums[16];
  _mm512_store_ps(sums, d);
  for (int i = 0; i < 4; ++i) std::memcpy(out + i * ldo, sums + 4 * i, 4 * sizeof(float));
}
#endif

// Tile of RA rows of a by RB rows of b; both row-major with leading dims lda / ldb; out has ldo.
template <int RA, int RB>
inline void dot_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth,
                     float* out, int64_t ldo) {
  constexpr int L = lanes<vdot>();
  vdot acc[RA][RB];
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) acc[i][j] = vdot{};
  int64_t d = 0;
  for (; d + L <= depth; d += L) {
    vdot bv[RB];
    for (int j = 0; j < RB; ++j) bv[j] = loadv<vdot>(b + j * ldb + d);
    prefetch_next_rows<RB>(b, ldb, d);
    for (int i = 0; i < RA; ++i) {
      const vdot av = loadv<vdot>(a + i * lda + d);
      for (int j = 0; j < RB; ++j) acc[i][j] += av * bv[j];
    }
  }
#if defined(__AVX512F__)
  if constexpr (RA == 4 && RB == 4 && L == 16) {
    __m512 v[16];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) v[4 * i + j] = (__m512)acc[i][j];
    sum16_to_4x4(v, out, ldo);
    if (d < depth)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          for (int64_t t = d; t < depth; ++t) out[i * ldo + j] += a[i * lda + t] * b[j * ldb + t];
    return;
  }
#endif
  for (int i = 0; i < RA; ++i) {
    for (int j = 0; j < RB; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t t = d; t < depth; ++t) s += a[i * lda + t] * b[j * ldb + t];
      out[i * ldo + j] = s;
    }
  }
}

// Covers out[rows_a, rows_b] with Tile::run<RA, RB> calls: kA x kB tiles, then the edges one row
// of a or b at a time. Tile::run(a, lda, b, ldb, depth, out, ldo) computes one RA x RB tile.
template <int kA, int kB, typename Tile, typename TA, typename TB>
inline void for_each_tile(const TA* a, int64_t lda, int64_t rows_a, const TB* b, int64_t ldb,
                          int64_t rows_b, int64_t depth, float* out, int64_t ldo) {
  int64_t j = 0;
  for (; j + kB <= rows_b; j += kB) {
    int64_t i = 0;
    for (; i + kA <= rows_a; i += kA)
      Tile::template run<kA, kB>(a + i * lda, lda, b + j * ldb, ldb, depth, out + i * ldo + j, ldo);
    for (; i < rows_a; ++i)
      Tile::template run<1, kB>(a + i * lda, lda, b + j * ldb, ldb, depth, out + i * ldo + j, ldo);
  }
  for (; j < rows_b; ++j) {
    int64_t i = 0;
    for (; i + kA <= rows_a; i += kA)
      Tile::template run<kA, 1>(a + i * lda, lda, b + j * ldb, ldb, depth, out + i * ldo + j, ldo);
    for (; i < rows_a; ++i)
      Tile::template run<1, 1>(a + i * lda, lda, b + j * ldb, ldb, depth, out + i * ldo + j, ldo);
  }
}

struct FloatTile {
  template <int RA, int RB>
  static void run(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth,
                  float* out, int64_t ldo) {
    dot_tile<RA, RB>(a, lda, b, ldb, depth, out, ldo);
  }
};

// out[rows_a, rows_b] (leading dim ldo) = a[rows_a, depth] . b[rows_b, depth]^T.
inline void dot_rows(const float* a, int64_t lda, int64_t rows_a, const float* b, int64_t ldb,
                     int64_t rows_b, int64_t depth, float* out, int64_t ldo) {
  for_each_tile<kTileA, kTileB, FloatTile>(a, lda, rows_a, b, ldb, rows_b, depth, out, ldo);
}

#if MTP_EXT_HAS_BF16_DOT
// GCC 12's AVX-512 headers warn spuriously about _mm512_reduce_add_ps's internal temporaries.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// bfloat16 x bfloat16 with float32 accumulation by the AVX-512 BF16 pair dot product (VDPBF16PS):
// half the bytes of a converted float32 path and twice the multiply rate.
template <int RA, int RB>
inline void dot_tile_bf16(const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t depth,
                          float* out, int64_t ldo) {
  __m512 acc[RA][RB];
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= depth; d += 32) {
    __m512bh bv[RB];
    for (int j = 0; j < RB; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + j * ldb + d);
    prefetch_next_rows<RB>(b, ldb, d);
    for (int i = 0; i < RA; ++i) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a + i * lda + d);
      for (int j = 0; j < RB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
  if constexpr (RA == 4 && RB == 4) {
    __m512 v[16];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) v[4 * i + j] = acc[i][j];
    sum16_to_4x4(v, out, ldo);
    if (d < depth)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          for (int64_t t = d; t < depth; ++t)
            out[i * ldo + j] += to_float(a[i * lda + t]) * to_float(b[j * ldb + t]);
    return;
  }
  for (int i = 0; i < RA; ++i) {
    for (int j = 0; j < RB; ++j) {
      float s = _mm512_reduce_add_ps(acc[i][j]);
      for (int64_t t = d; t < depth; ++t) s += to_float(a[i * lda + t]) * to_float(b[j * ldb + t]);
      out[i * ldo + j] = s;
    }
  }
}

struct Bf16Tile {
  template <int RA, int RB>
  static void run(const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t depth,
                  float* out, int64_t ldo) {
    dot_tile_bf16<RA, RB>(a, lda, b, ldb, depth, out, ldo);
  }
};

// out[rows_a, rows_b] = a[rows_a, depth] . b[rows_b, depth]^T, all bfloat16 in, float32 out.
inline void dot_rows_bf16(const bf16* a, int64_t lda, int64_t rows_a, const bf16* b, int64_t ldb,
                          int64_t rows_b, int64_t depth, float* out, int64_t ldo) {
  for_each_tile<4, 4, Bf16Tile>(a, lda, rows_a, b, ldb, rows_b, depth, out, ldo);
}
#pragma GCC diagnostic pop
#endif

}  // namespace kernels
}  // namespace mtp_ext
