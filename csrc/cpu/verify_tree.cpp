// CPU kernel of verify_tree: one task per batch row; the target token of a node (argmax or an
// inverse-CDF sample) is computed only for the nodes the walk visits, so a rejected subtree costs
// nothing.
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/sampling.h"
#include "cpu_utils.h"
#include "tree_walk.h"

namespace mtp_ext {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& target_logits,
    double temperature, int64_t top_k, double top_p, const c10::optional<at::Tensor>& uniforms) {
  const char* op = "mtp_ext.verify_tree";
  check_verify_tree(draft_tokens, parents, target_logits, temperature, top_k, top_p, uniforms);
  const at::Tensor par = parents.contiguous();
  check_tree_values(par, op);
  const int64_t t = draft_tokens.size(1), vocab = target_logits.size(2);
  const bool sampling = temperature > 0;
  float scale = 0.0f;  // 1 / temperature, a finite float32 (check_temperature)
  at::Tensor u;
  if (sampling) {
    scale = static_cast<float>(1.0 / temperature);
    u = uniforms->to(at::kFloat).contiguous();
    check_uniforms_values(u, op);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  dispatch_floating(target_logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* logits = data_as<T>(target_logits);
    const int64_t sb = target_logits.stride(0), st = target_logits.stride(1);
    const int64_t sv = target_logits.stride(2);
    // Each task converts a node's logits into its own float32 row buffer.
    out = walk_trees(draft_tokens, par, 1, [&] {
      return [&, row = std::vector<float>(static_cast<size_t>(vocab)),
              scratch = kernels::SamplingScratch()](int64_t i, int64_t node) mutable -> int64_t {
        kernels::load_block(logits + i * sb + node * st, sv, vocab, row.data());
        if (!sampling) return kernels::argmax_row(row.data(), vocab);
        return kernels::sample_row(row.data(), vocab, scale, top_k, static_cast<float>(top_p),
                                   u.const_data_ptr<float>()[i * t + node], scratch);
      };
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) { m.impl("verify_tree", &verify_tree_cpu); }

}  // namespace cpu
}  // namespace mtp_ext
