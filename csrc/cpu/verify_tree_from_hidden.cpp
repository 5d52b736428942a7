// CPU kernel of verify_tree_from_hidden: greedy tree verification straight from the last hidden
// states. The final RMSNorm is applied to the B x T rows, the output layer is streamed once for all
// of them with a running argmax per row (the [B, T, V] logits are never written), then each row's
// tree is walked.
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/dot_tile.h"
#include "../kernels/ranking.h"
#include "cpu_utils.h"
#include "table_stream.h"
#include "tree_walk.h"

namespace mtp_ext {
namespace cpu {
namespace {

using kernels::better;

// The target token of each of the `rows` = B * T nodes: the argmax of its logits (its hidden
// state, normed when norm_weight is given, times lm_head^T), from one pass over lm_head.
std::vector<int64_t> argmax_targets(const at::Tensor& hidden, const at::Tensor& lm_head,
                                    const c10::optional<at::Tensor>& norm_weight, double eps,
                                    int64_t rows) {
  const int64_t depth = hidden.size(2), vocab = lm_head.size(0);
  const at::Tensor table = lm_head.contiguous();
  const int64_t parts = table_parts(vocab);
  std::vector<std::vector<Candidate>> best(static_cast<size_t>(parts));
  std::vector<std::vector<float>> scratch(static_cast<size_t>(parts));
  for (int64_t p = 0; p < parts; ++p) {
    best[p].assign(static_cast<size_t>(rows), Candidate{-std::numeric_limits<float>::infinity(), -1});
    scratch[p].resize(static_cast<size_t>(rows * kTableBlock));
  }
  // Folds one block of logits [rows, kTableBlock] into the part's running argmax per row; a block
  // is scanned element by element only when its maximum (or a NaN) can beat the running best.
  auto fold = [&](int64_t part, const float* logits, int64_t v, int64_t nb) {
    for (int64_t r = 0; r < rows; ++r) {
      Candidate& top = best[part][r];
      const float* lr = logits + r * kTableBlock;
      if (top.id >= 0 && !(kernels::block_max(lr, nb) > top.value) &&
          !kernels::block_has_nan(lr, nb))
        continue;
      for (int64_t j = 0; j < nb; ++j) {
        if (top.id < 0 || kernels::ranks_above(lr[j], top.value)) top = {lr[j], v + j};
      }
    }
  };
  bool done = false;
#if MTP_EXT_HAS_BF16_DOT
  if (!norm_weight.has_value() && hidden.scalar_type() == at::kBFloat16 &&
      lm_head.scalar_type() == at::kBFloat16) {
    // A bfloat16 model's normed states against its bfloat16 output layer: pair dot products on
    // the stored bits (exact products, float32 sums), half the bytes of the converted path.
    const at::Tensor hb = hidden.reshape({rows, depth}).contiguous();
    const auto* hp = data_as<kernels::bf16>(hb);
    const auto* wp = data_as<kernels::bf16>(table);
    for_each_table_block(vocab, [&](int64_t part, int64_t v, int64_t nb) {
      float* logits = scratch[part].data();
      kernels::dot_rows_bf16(hp, depth, rows, wp + v * depth, depth, nb, depth, logits, kTableBlock);
      fold(part, logits, v, nb);
    });
    done = true;
  }
#endif
  if (!done) {
    const at::Tensor z = rms_norm_f32(hidden.reshape({rows, depth}), norm_weight, eps).contiguous();
    const float* zp = z.const_data_ptr<float>();
    dispatch_floating(lm_head.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      stream_table(data_as<T>(table), vocab, depth,
                   [&](int64_t part, const float* block, int64_t v, int64_t nb) {
                     float* logits = scratch[part].data();
                     kernels::dot_rows(zp, depth, rows, block, depth, nb, depth, logits, kTableBlock);
                     fold(part, logits, v, nb);
                   });
    });
  }
  std::vector<int64_t> target(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    Candidate top = best[0][r];
    for (int64_t p = 1; p < parts; ++p)
      if (best[p][r].id >= 0 && better(best[p][r], top)) top = best[p][r];
    target[r] = top.id;
  }
  return target;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_from_hidden_cpu(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& hidden,
    const at::Tensor& lm_head, const c10::optional<at::Tensor>& norm_weight, double eps) {
  const char* op = "mtp_ext.verify_tree_from_hidden";
  check_verify_tree_from_hidden(draft_tokens, parents, hidden, lm_head, norm_weight, eps);
  const at::Tensor par = parents.contiguous();
  check_tree_values(par, op);
  const int64_t t = draft_tokens.size(1), rows = draft_tokens.size(0) * t;
  std::vector<int64_t> target;
  if (rows > 0) target = argmax_targets(hidden, lm_head, norm_weight, eps, rows);
  // The targets are known: a walk is a few reads, so only large batches take several threads.
  return walk_trees(draft_tokens, par, 64, [&] {
    return [&](int64_t i, int64_t node) { return target[i * t + node]; };
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("verify_tree_from_hidden", &verify_tree_from_hidden_cpu);
}

}  // namespace cpu
}  // namespace mtp_ext
