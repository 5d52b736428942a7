// Unit tests of the torch-free kernel code, built and run by CMake/ctest without Python or torch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "../common.h"
#include "../dot_tile.h"
#include "../sampling.h"
#include "../softmax_math.h"
#include "../topk.h"
#include "../tree.h"

using namespace mtp_ext::kernels;

static int failures = 0;
#define EXPECT(cond)                                                    \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                       \
    }                                                                   \
  } while (0)

static void test_half_conversion() {
  // Every finite float16 converts exactly: compare against ldexp of its fields.
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const uint32_t exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
    const float sign = (bits & 0x8000u) ? -1.0f : 1.0f;
    const float got = to_float(f16{uint16_t(bits)});
    if (exponent == 0x1f) {
      EXPECT(mantissa ? std::isnan(got) : std::isinf(got));
      continue;
    }
    const float want = exponent == 0 ? sign * std::ldexp(float(mantissa), -24)
                                     : sign * std::ldexp(float(1024 + mantissa), int(exponent) - 25);
    if (got != want || std::signbit(got) != std::signbit(want)) {
      std::fprintf(stderr, "f16 bits %04x: got %g want %g\n", bits, got, want);
      ++failures;
      return;
    }
  }
  EXPECT(to_float(bf16{0x3f80}) == 1.0f);
  EXPECT(to_float(to_bf16(1.00390625f)) == 1.0f);  // ties to even
}

static void test_exp() {
  double worst = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f * float(i) / 200000.0f;
    const double want = std::exp(double(x));
    const double rel = std::fabs(exp_nonpositive(x) - want) / want;
    worst = rel > worst ? rel : worst;
  }
  std::printf("exp_nonpositive worst relative error on [-87, 0]: %.3g\n", worst);
  EXPECT(worst < 5e-7);
  EXPECT(exp_nonpositive(-std::numeric_limits<float>::infinity()) == 0.0f);
  EXPECT(exp_nonpositive(-1000.0f) == 0.0f);
  EXPECT(std::isnan(exp_nonpositive(std::nanf(""))));
  EXPECT(exp_nonpositive(0.0f) == 1.0f);
}

static void test_softmax_stats() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  std::vector<float> x(1237);
  for (float& v : x) v = normal(rng);
  double max = -1e30, sum = 0;
  for (float v : x) max = v > max ? v : max;
  for (float v : x) sum += std::exp((v - max) * 0.5);
  SoftmaxStats whole, left, right;
  whole.add_block(x.data(), 1237, block_max(x.data(), 1237), 0.5f);
  left.add_block(x.data(), 600, block_max(x.data(), 600), 0.5f);
  right.add_block(x.data() + 600, 637, block_max(x.data() + 600, 637), 0.5f);
  left.merge(right, 0.5f);
  EXPECT(whole.max == float(max) && left.max == float(max));
  EXPECT(std::fabs(whole.sum - sum) / sum < 1e-5);
  EXPECT(std::fabs(left.sum - sum) / sum < 1e-5);
}

static void test_topk() {
  const float x[] = {1.0f, 3.0f, 3.0f, -1.0f, std::nanf(""), 3.0f, 2.0f};
  TopK top(4);
  top.push_block(x, 7, 0);
  const std::vector<Candidate> best = top.take_sorted();
  EXPECT(best.size() == 4);
  EXPECT(best[0].id == 4);  // NaN ranks first
  EXPECT(best[1].id == 1 && best[2].id == 2 && best[3].id == 5);  // ties toward the lower id
  EXPECT(argmax_row(x, 4) == 1);
  EXPECT(block_has_nan(x, 7) && !block_has_nan(x, 4));
  std::vector<float> wide(37, 1.0f);
  EXPECT(!block_has_nan(wide.data(), 37));
  wide[35] = std::nanf("");
  EXPECT(block_has_nan(wide.data(), 37) && !block_has_nan(wide.data(), 35));
  wide[3] = std::nanf("");
  EXPECT(block_has_nan(wide.data(), 16));
}

static void test_tree() {
  // Root 0; children 1, 2 of the root; 3 child of 1; 4 child of 2.
  const int64_t parents[] = {-1, 0, 0, 1, 2};
  const int64_t draft[] = {9, 5, 6, 7, 8};
  const int64_t targets[] = {6, 0, 8, 0, 3};  // root -> 6 (node 2) -> 8 (node 4) -> bonus 3
  int64_t tokens[5], path[5];
  const int64_t accepted =
      walk_tree(draft, parents, 5, [&](int64_t n) { return targets[n]; }, tokens, path);
  EXPECT(accepted == 2);
  EXPECT(tokens[0] == 6 && tokens[1] == 8 && tokens[2] == 3 && tokens[3] == -1);
  EXPECT(path[0] == 0 && path[1] == 2 && path[2] == 4 && path[3] == -1);
  EXPECT(first_invalid_parent(parents, 5) == -1);
  const int64_t bad[] = {-1, 0, 2};
  EXPECT(first_invalid_parent(bad, 3) == 2);

  float mask[5 * 7];
  int64_t depth[5];
  build_tree_mask<float>(parents, 5, 2, 1.0f, 0.0f, mask, depth);
  EXPECT(depth[4] == 2 && depth[3] == 2 && depth[0] == 0);
  // Node 4 sees the prefix (2), the root, node 2 and itself.
  const float row4[7] = {1, 1, 1, 0, 1, 0, 1};
  for (int j = 0; j < 7; ++j) EXPECT(mask[4 * 7 + j] == row4[j]);
}

static void test_sampling() {
  // Two-token distribution with p = (0.25, 0.75) at temperature 1.
  const float x[] = {0.0f, std::log(3.0f)};
  SamplingScratch s;
  EXPECT(sample_row(x, 2, 1.0f, 0, 1.0f, 0.2f, s) == 0);
  EXPECT(sample_row(x, 2, 1.0f, 0, 1.0f, 0.3f, s) == 1);
  EXPECT(sample_row(x, 2, 1.0f, 1, 1.0f, 0.0f, s) == 1);  // top_k = 1 keeps token 1 only
  EXPECT(sample_row(x, 2, 1.0f, 0, 0.5f, 0.0f, s) == 1);  // nucleus 0.5 keeps token 1 only
  // A uniform outside [0, 1) is clamped into it: never a token of no mass past either end.
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  const float edges[] = {-inf, 0.0f, 1.0f, -inf};
  EXPECT(sample_row(edges, 4, 1.0f, 0, 1.0f, -0.5f, s) == 1);
  EXPECT(sample_row(edges, 4, 1.0f, 0, 1.0f, nan, s) == 1);
  EXPECT(sample_row(edges, 4, 1.0f, 0, 1.0f, 1.0f, s) == 2);
  EXPECT(clamp_uniform(2.0f) < 1.0f && clamp_uniform(nan) == 0.0f && clamp_uniform(0.5f) == 0.5f);
  // The +inf logits share the whole mass, equally.
  const float infs[] = {3.0f, inf, 5.0f, inf};
  EXPECT(sample_row(infs, 4, 1.0f, 0, 1.0f, 0.2f, s) == 1);
  EXPECT(sample_row(infs, 4, 1.0f, 0, 1.0f, 0.7f, s) == 3);
  EXPECT(sample_row(infs, 4, 1.0f, 0, 0.5f, 0.7f, s) == 1);  // the nucleus keeps the first only
  // No distribution (all -inf, or a NaN): the greedy token.
  const float none[] = {-inf, -inf, -inf};
  const float nans[] = {1.0f, nan, inf, nan};
  EXPECT(sample_row(none, 3, 1.0f, 0, 1.0f, 0.9f, s) == 0);
  EXPECT(sample_row(nans, 4, 1.0f, 2, 0.9f, 0.9f, s) == 1);
  // The largest scale (1 / the smallest temperature): the argmax, no NaN.
  const float close[] = {1.0f, 1.0001f, 0.5f};
  EXPECT(sample_row(close, 3, std::numeric_limits<float>::max(), 0, 1.0f, 0.99f, s) == 1);
}

static void test_dot_rows() {
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> uni(-1, 1);
  // 1 to 3 rows (edges), 4 (one 4 x 4 tile), 8 and 16 (8 x 2 tiles), 13 (8 + 4 + 1), 19
  for (const int64_t ra : {1, 3, 4, 7, 8, 13, 16, 19}) {
    const int64_t rb = 11, depth = 37;
    std::vector<float> a(ra * depth), b(rb * depth), out(ra * rb);
    for (float& v : a) v = uni(rng);
    for (float& v : b) v = uni(rng);
    dot_rows(a.data(), depth, ra, b.data(), depth, rb, depth, out.data(), rb);
    for (int64_t i = 0; i < ra; ++i)
      for (int64_t j = 0; j < rb; ++j) {
        double want = 0;
        for (int64_t d = 0; d < depth; ++d) want += double(a[i * depth + d]) * b[j * depth + d];
        EXPECT(std::fabs(out[i * rb + j] - want) < 1e-4);
      }
  }
}

static void test_dot_rows_bf16() {
#if MTP_EXT_HAS_BF16_DOT
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uni(-1, 1);
  for (const int64_t ra : {1, 4, 6, 8, 13, 16}) {
    const int64_t rb = 9, depth = 70;  // a tail of 6 after two 32-wide steps
    std::vector<bf16> a(ra * depth), b(rb * depth);
    for (bf16& v : a) v = to_bf16(uni(rng));
    for (bf16& v : b) v = to_bf16(uni(rng));
    std::vector<float> out(ra * rb);
    dot_rows_bf16(a.data(), depth, ra, b.data(), depth, rb, depth, out.data(), rb);
    for (int64_t i = 0; i < ra; ++i)
      for (int64_t j = 0; j < rb; ++j) {
        double want = 0;
        for (int64_t d = 0; d < depth; ++d)
          want += double(to_float(a[i * depth + d])) * to_float(b[j * depth + d]);
        EXPECT(std::fabs(out[i * rb + j] - want) < 1e-4);
      }
  }
  std::printf("bfloat16 dot products (AVX-512 BF16) checked\n");
#else
  std::printf("bfloat16 dot products: not compiled (no AVX-512 BF16 on this target)\n");
#endif
}

int main() {
  test_half_conversion();
  test_exp();
  test_softmax_stats();
  test_topk();
  test_tree();
  test_sampling();
  test_dot_rows();
  test_dot_rows_bf16();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all kernel tests passed\n");
  return 0;
}
