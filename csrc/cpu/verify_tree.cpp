// CPU kernel of verify_tree: one task per batch row; the target token of a node (argmax or an
// inverse-CDF sample) is computed only for the nodes the walk visits, so a rejected subtree costs
// nothing.
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/sampling.h"
#include "../kernels/tree.h"
#include "cpu_utils.h"

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
  const int64_t b = draft_tokens.size(0), t = draft_tokens.size(1), vocab = target_logits.size(2);
  const auto idx = draft_tokens.options().dtype(at::kLong);
  at::Tensor num_accepted = at::zeros({b}, idx);
  at::Tensor tokens = at::empty({b, t}, idx);
  at::Tensor path = at::empty({b, t}, idx);
  if (b == 0) return {num_accepted, tokens, path};

  const at::Tensor draft = draft_tokens.contiguous();
  const bool sampling = temperature > 0;
  at::Tensor u;
  if (sampling) u = uniforms->to(at::kFloat).contiguous();
  const int64_t par_row_stride = par.dim() == 2 ? t : 0;
  int64_t* acc = num_accepted.data_ptr<int64_t>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  int64_t* pth = path.data_ptr<int64_t>();

  dispatch_floating(target_logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* logits = data_as<T>(target_logits);
    const int64_t sb = target_logits.stride(0), st = target_logits.stride(1);
    const int64_t sv = target_logits.stride(2);
    at::parallel_for(0, b, 1, [&](int64_t first, int64_t last) {
      std::vector<float> row(static_cast<size_t>(vocab));
      kernels::SamplingScratch scratch;
      for (int64_t i = first; i < last; ++i) {
        auto target_of = [&](int64_t node) -> int64_t {
          kernels::load_block(logits + i * sb + node * st, sv, vocab, row.data());
          if (!sampling) return kernels::argmax_row(row.data(), vocab);
          return kernels::sample_row(row.data(), vocab, static_cast<float>(temperature), top_k,
                                     static_cast<float>(top_p),
                                     u.const_data_ptr<float>()[i * t + node], scratch);
        };
        acc[i] = kernels::walk_tree(draft.const_data_ptr<int64_t>() + i * t,
                                    par.const_data_ptr<int64_t>() + i * par_row_stride, t,
                                    target_of, tok + i * t, pth + i * t);
      }
    });
  });
  return {num_accepted, tokens, path};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) { m.impl("verify_tree", &verify_tree_cpu); }

}  // namespace cpu
}  // namespace mtp_ext
