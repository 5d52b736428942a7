// CPU kernel of fused_mtp_heads. The residual blocks (x + SiLU(W x + b), optional RMSNorm) are small
// [N, D] x [D, D] products done by ATen in float32; the expensive part, the shared unembedding, is
// streamed once: each thread takes a slice of lm_head, computes the logits of all N x H rows for a
// block of vocabulary rows at a time with a register-tiled kernel, and folds them into running
// log-sum-exp statistics and top-k per row. The [N, H, V] logits are never written.
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/dot_tile.h"
#include "cpu_utils.h"

namespace mtp_ext {
namespace cpu {
namespace {

constexpr int64_t kVocabBlock = 48;

// [N, H, D] float32 contiguous head features.
at::Tensor head_features(const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& norm_weight, double eps) {
  const at::Tensor x = hidden.to(at::kFloat);
  at::Tensor y = at::matmul(x.unsqueeze(0), weight.to(at::kFloat).transpose(1, 2));  // [H, N, D]
  if (bias.has_value()) y.add_(bias->to(at::kFloat).unsqueeze(1));
  at::Tensor z = at::silu(y).add_(x.unsqueeze(0));
  if (norm_weight.has_value()) {
    z = z * at::rsqrt(z.pow(2).mean(-1, true).add_(eps)) * norm_weight->to(at::kFloat);
  }
  return z.transpose(0, 1).contiguous();
}

struct RowState {
  std::vector<SoftmaxStats> stats;
  std::vector<TopK> top;
};

// Streams lm_head rows [begin, end) against feats[rows, D], updating one RowState.
template <typename T>
void stream_vocab(const float* feats, int64_t rows, int64_t depth, const T* table, int64_t begin,
                  int64_t end, RowState& state) {
  std::vector<float> converted;
  if (!std::is_same<T, float>::value) converted.resize(static_cast<size_t>(kVocabBlock * depth));
  std::vector<float> logits(static_cast<size_t>(rows * kVocabBlock));
  for (int64_t v = begin; v < end; v += kVocabBlock) {
    const int64_t nb = std::min(kVocabBlock, end - v);
    const float* block;
    if constexpr (std::is_same<T, float>::value) {
      block = table + v * depth;
    } else {
      kernels::load_block(table + v * depth, 1, nb * depth, converted.data());
      block = converted.data();
    }
    kernels::dot_rows(feats, depth, rows, block, depth, nb, depth, logits.data(), kVocabBlock);
    for (int64_t r = 0; r < rows; ++r) {
      const float* lr = logits.data() + r * kVocabBlock;
      const float bmax = kernels::block_max(lr, nb);
      SoftmaxStats& st = state.stats[r];
      st.add_block(lr, nb, bmax, 1.0f);
      if (state.top[r].may_enter(bmax) || st.sum != st.sum) state.top[r].push_block(lr, nb, v);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> fused_mtp_heads_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lm_head, int64_t k, const c10::optional<at::Tensor>& norm_weight,
    double eps) {
  check_fused_mtp_heads(hidden, weight, bias, lm_head, k, norm_weight, eps);
  const int64_t n = hidden.size(0), heads = weight.size(0), depth = hidden.size(1);
  const int64_t vocab = lm_head.size(0);
  at::Tensor logprobs = at::empty({n, heads, k}, hidden.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({n, heads, k}, hidden.options().dtype(at::kLong));
  const int64_t rows = n * heads;
  if (rows == 0) return {logprobs, ids};

  const at::Tensor feats = head_features(hidden, weight, bias, norm_weight, eps);
  const at::Tensor table = lm_head.contiguous();
  const int64_t blocks = (vocab + kVocabBlock - 1) / kVocabBlock;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  std::vector<RowState> states(static_cast<size_t>(parts));

  dispatch_floating(lm_head.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
      for (int64_t p = first; p < last; ++p) {
        const auto [b0, b1] = chunk_bounds(blocks, parts, p);
        RowState& state = states[p];
        state.stats.assign(static_cast<size_t>(rows), SoftmaxStats());
        state.top.assign(static_cast<size_t>(rows), TopK(k));
        stream_vocab<T>(feats.const_data_ptr<float>(), rows, depth, data_as<T>(table),
                        b0 * kVocabBlock, std::min(vocab, b1 * kVocabBlock), state);
      }
    });
  });

  float* lp = logprobs.data_ptr<float>();
  int64_t* id_out = ids.data_ptr<int64_t>();
  at::parallel_for(0, rows, 8, [&](int64_t first, int64_t last) {
    TopK top;
    for (int64_t r = first; r < last; ++r) {
      SoftmaxStats st;
      top.reset(k);
      for (RowState& state : states) {
        st.merge(state.stats[r], 1.0f);
        for (const Candidate& c : state.top[r].take_sorted()) top.push(c.value, c.id);
      }
      const float log_z = st.log_normalizer(1.0f);
      const std::vector<Candidate> best = top.take_sorted();
      for (int64_t j = 0; j < k; ++j) {
        lp[r * k + j] = best[j].value - log_z;
        id_out[r * k + j] = best[j].id;
      }
    }
  });
  return {logprobs, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) { m.impl("fused_mtp_heads", &fused_mtp_heads_cpu); }

}  // namespace cpu
}  // namespace mtp_ext
