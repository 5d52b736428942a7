// CPU kernels of marginalize and topk_marginalize. Pass 1: softmax statistics of each of the B x L
// rows. Pass 2, over vocabulary chunks: the weighted mixture of the L softmaxes, written out
// (marginalize) or fed straight into a running top-m so the [B, V] marginal never exists
// (topk_marginalize).
#include <torch/library.h>

#include "../checks.h"
#include "cpu_utils.h"

namespace mtp_ext {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;

// Per-(b, l) multipliers w[b, l] / sum_v exp(x - max), and the row maxima.
struct MixturePlan {
  std::vector<float> coef;
  std::vector<float> max;
};

template <typename T>
MixturePlan plan_mixture(const at::Tensor& x, const at::Tensor& weights, bool renormalize) {
  const int64_t b = x.size(0), l = x.size(1), vocab = x.size(2);
  const T* base = data_as<T>(x);
  const int64_t sb = x.stride(0), sl = x.stride(1), sv = x.stride(2);
  std::vector<SoftmaxStats> stats;
  rows_stats_topk<T>(
      b * l, vocab, sv, [&](int64_t r) { return base + (r / l) * sb + (r % l) * sl; }, 1.0f, 0,
      stats, nullptr);
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  const float* wp = w.const_data_ptr<float>();
  MixturePlan plan;
  plan.coef.resize(static_cast<size_t>(b * l));
  plan.max.resize(static_cast<size_t>(b * l));
  for (int64_t i = 0; i < b; ++i) {
    float total = 0.0f;
    for (int64_t j = 0; j < l; ++j) total += wp[i * l + j];
    for (int64_t j = 0; j < l; ++j) {
      float wj = wp[i * l + j];
      if (renormalize) wj = total > 0.0f ? wj / total : 0.0f;
      const SoftmaxStats& st = stats[i * l + j];
      plan.coef[i * l + j] = wj / st.sum;
      plan.max[i * l + j] = st.max;
    }
  }
  return plan;
}

// out[0..n) = marginal of row b over vocabulary [begin, begin + n).
template <typename T>
void mixture_chunk(const at::Tensor& x, const MixturePlan& plan, int64_t b, int64_t begin,
                   int64_t n, float* out) {
  const int64_t l = x.size(1);
  const T* base = data_as<T>(x);
  float buf[kChunk];
  std::fill(out, out + n, 0.0f);
  for (int64_t j = 0; j < l; ++j) {
    const float coef = plan.coef[b * l + j];
    if (coef == 0.0f) continue;
    const T* row = base + b * x.stride(0) + j * x.stride(1);
    kernels::load_block(row + begin * x.stride(2), x.stride(2), n, buf);
    kernels::block_add_scaled_exp(buf, n, plan.max[b * l + j], 1.0f, coef, out);
  }
}

at::Tensor marginalize_cpu(const at::Tensor& next_logits, const at::Tensor& weights,
                           bool renormalize) {
  const char* op = "mtp_ext.marginalize";
  check_marginalize(next_logits, weights);
  check_nonnegative(weights, op, "weights");
  const int64_t b = next_logits.size(0), vocab = next_logits.size(2);
  at::Tensor out = at::zeros({b, vocab}, next_logits.options().dtype(at::kFloat));
  if (b == 0 || next_logits.size(1) == 0) return out;
  float* o = out.data_ptr<float>();
  dispatch_floating(next_logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const MixturePlan plan = plan_mixture<T>(next_logits, weights, renormalize);
    const int64_t chunks = (vocab + kChunk - 1) / kChunk;
    at::parallel_for(0, b * chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t u = first; u < last; ++u) {
        const int64_t row = u / chunks, begin = (u % chunks) * kChunk;
        mixture_chunk<T>(next_logits, plan, row, begin, std::min(kChunk, vocab - begin),
                         o + row * vocab + begin);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_marginalize_cpu(const at::Tensor& next_logits,
                                                        const at::Tensor& weights, int64_t m,
                                                        bool renormalize) {
  const char* op = "mtp_ext.topk_marginalize";
  check_topk_marginalize(next_logits, weights, m);
  check_nonnegative(weights, op, "weights");
  const int64_t b = next_logits.size(0), vocab = next_logits.size(2);
  at::Tensor probs = at::zeros({b, m}, next_logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({b, m}, next_logits.options().dtype(at::kLong));
  if (b == 0) return {probs, ids};
  if (next_logits.size(1) == 0) {
    // An empty mixture is all zeros: the top-m are the first m ids.
    ids.copy_(at::arange(m, ids.options()).expand({b, m}));
    return {probs, ids};
  }
  float* p_out = probs.data_ptr<float>();
  int64_t* id_out = ids.data_ptr<int64_t>();
  dispatch_floating(next_logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const MixturePlan plan = plan_mixture<T>(next_logits, weights, renormalize);
    const int64_t chunks = (vocab + kChunk - 1) / kChunk;
    std::vector<std::vector<Candidate>> part(static_cast<size_t>(b * chunks));
    at::parallel_for(0, b * chunks, 1, [&](int64_t first, int64_t last) {
      float mix[kChunk];
      TopK top;
      for (int64_t u = first; u < last; ++u) {
        const int64_t row = u / chunks, begin = (u % chunks) * kChunk;
        const int64_t n = std::min(kChunk, vocab - begin);
        mixture_chunk<T>(next_logits, plan, row, begin, n, mix);
        top.reset(std::min(m, n));
        top.push_block(mix, n, begin);
        part[u] = top.take_sorted();
      }
    });
    at::parallel_for(0, b, 1, [&](int64_t first, int64_t last) {
      TopK top;
      for (int64_t row = first; row < last; ++row) {
        top.reset(m);
        for (int64_t c = 0; c < chunks; ++c)
          for (const Candidate& cand : part[row * chunks + c]) top.push(cand.value, cand.id);
        const std::vector<Candidate> best = top.take_sorted();
        for (int64_t j = 0; j < m; ++j) {
          p_out[row * m + j] = best[j].value;
          id_out[row * m + j] = best[j].id;
        }
      }
    });
  });
  return {probs, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("marginalize", &marginalize_cpu);
  m.impl("topk_marginalize", &topk_marginalize_cpu);
}

}  // namespace cpu
}  // namespace mtp_ext
