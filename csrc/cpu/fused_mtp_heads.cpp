// CPU kernel of fused_mtp_heads. The residual blocks (x + SiLU(W x + b), optional RMSNorm) are small
// [N, D] x [D, D] products done by ATen in float32; without weight the one head's features are
// x itself, normed when norm_weight is given. The expensive part, the shared unembedding, is
// streamed once: each thread takes a slice of lm_head, computes the logits of all N x H rows for a
// block of vocabulary rows at a time with a register-tiled kernel, and folds them into running
// log-sum-exp statistics and top-k per row. The [N, H, V] logits are never written.
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/dot_tile.h"
#include "cpu_utils.h"
#include "table_stream.h"

namespace mtp_ext {
namespace cpu {
namespace {

// [N, H, D] float32 contiguous head features; without weight, the one head's [N, 1, D] (hidden,
// normed when norm_weight is given).
at::Tensor head_features(const at::Tensor& hidden, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& norm_weight, double eps) {
  if (!weight.has_value()) return rms_norm_f32(hidden, norm_weight, eps).contiguous().unsqueeze(1);
  const at::Tensor x = hidden.to(at::kFloat);
  at::Tensor y = at::matmul(x.unsqueeze(0), weight->to(at::kFloat).transpose(1, 2));  // [H, N, D]
  if (bias.has_value()) y.add_(bias->to(at::kFloat).unsqueeze(1));
  const at::Tensor z = rms_norm_f32(at::silu(y).add_(x.unsqueeze(0)), norm_weight, eps);
  return z.transpose(0, 1).contiguous();
}

// Running log-sum-exp statistics and top-k of every row, for one slice of the vocabulary.
struct RowState {
  std::vector<SoftmaxStats> stats;
  std::vector<TopK> top;
  std::vector<float> logits;  // [rows, kTableBlock] scratch
};

std::tuple<at::Tensor, at::Tensor> fused_mtp_heads_cpu(
    const at::Tensor& hidden, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lm_head, int64_t k,
    const c10::optional<at::Tensor>& norm_weight, double eps,
    const c10::optional<at::Tensor>& vocab_ids) {
  at::Tensor logprobs, ids;
  std::tie(logprobs, ids) =
      prepare_fused_mtp_heads(hidden, weight, bias, lm_head, k, norm_weight, eps, vocab_ids);
  if (vocab_ids.has_value()) {
    check_vocab_ids_values(vocab_ids->contiguous(), "mtp_ext.fused_mtp_heads");
  }
  const int64_t n = hidden.size(0), heads = num_heads(weight), depth = hidden.size(1);
  const int64_t vocab = lm_head.size(0);
  const int64_t rows = n * heads;
  if (rows == 0) return {logprobs, ids};

  const at::Tensor feats = head_features(hidden, weight, bias, norm_weight, eps);
  const at::Tensor table = lm_head.contiguous();
  const float* z = feats.const_data_ptr<float>();
  std::vector<RowState> states(static_cast<size_t>(table_parts(vocab)));
  for (RowState& state : states) {
    state.stats.assign(static_cast<size_t>(rows), SoftmaxStats());
    state.top.assign(static_cast<size_t>(rows), TopK(k));
    state.logits.resize(static_cast<size_t>(rows * kTableBlock));
  }
  dispatch_floating(lm_head.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    stream_table(data_as<T>(table), vocab, depth,
                 [&](int64_t part, const float* block, int64_t v, int64_t nb) {
                   RowState& state = states[part];
                   float* logits = state.logits.data();
                   kernels::dot_rows(z, depth, rows, block, depth, nb, depth, logits, kTableBlock);
                   for (int64_t r = 0; r < rows; ++r)
                     fold_block(logits + r * kTableBlock, nb, v, 1.0f, state.stats[r],
                                &state.top[r]);
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
  if (vocab_ids.has_value()) ids = vocab_ids->take(ids);
  return {logprobs, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) { m.impl("fused_mtp_heads", &fused_mtp_heads_cpu); }

}  // namespace cpu
}  // namespace mtp_ext
