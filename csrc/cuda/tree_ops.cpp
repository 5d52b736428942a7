// CUDA launchers of verify_tree, verify_tree_from_hidden, tree_attention_mask and compact_kv.
//
// verify_tree_from_hidden normalizes the B x T rows, then (up to 64 rows) streams lm_head once with
// a running argmax per row (unembed_topk), never writing the [B, T, V] logits; more rows compute
// the logits and take the row top-1. Both then walk the trees as verify_tree does.
//
// verify_tree computes the target token of every node (argmax: the row top-1; sampling: a scan in
// id order after the top-k / top-p cut, from the row top-k for top_k <= 64 or from a sorted
// ranking otherwise), then walks each row's tree in one thread. Everything stays on the device.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

#include "../checks.h"
#include "row_topk.h"
#include "unembed.h"

namespace mtp_ext {
namespace cuda {
namespace {

void check_parents_values(const at::Tensor& parents, const char* op) {
  if (value_checks_enabled()) check_tree_values(parents.cpu().contiguous(), op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> walk(const at::Tensor& draft_tokens,
                                                    const at::Tensor& par,
                                                    const at::Tensor& targets) {
  const int64_t b = draft_tokens.size(0), t = draft_tokens.size(1);
  const auto idx = draft_tokens.options().dtype(at::kLong);
  at::Tensor num_accepted = at::empty({b}, idx);
  at::Tensor tokens = at::empty({b, t}, idx);
  at::Tensor path = at::empty({b, t}, idx);
  if (b == 0) return {num_accepted.zero_(), tokens, path};
  const at::Tensor draft = draft_tokens.contiguous();
  kc::launch_walk_tree(draft.const_data_ptr<int64_t>(), par.const_data_ptr<int64_t>(),
                       par.dim() == 2 ? t : 0, targets.const_data_ptr<int64_t>(), b, t,
                       num_accepted.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(),
                       path.data_ptr<int64_t>(), stream());
  MTP_EXT_CHECK_LAUNCH();
  return {num_accepted, tokens, path};
}

// Sampled target tokens [rows] of the rows of x (see kernels::sample_row).
void sample_targets(const at::Tensor& x, int64_t rows, int64_t vocab, kc::RowLayout layout,
                    double temperature, int64_t top_k, double top_p, const at::Tensor& u,
                    const at::Tensor& targets) {
  const float scale = static_cast<float>(1.0 / temperature);  // finite: check_temperature
  const float p = static_cast<float>(top_p);
  const cudaStream_t s = stream();
  const bool all_kept = (top_k <= 0 || top_k >= vocab) && p >= 1.0f;
  if (all_kept) {
    kc::launch_sample_scan(x.const_data_ptr(), storage_type(x), rows, vocab, layout, scale, nullptr,
                           nullptr, u.const_data_ptr<float>(), targets.data_ptr<int64_t>(), s);
    MTP_EXT_CHECK_LAUNCH();
    return;
  }
  const int64_t limit = top_k > 0 && top_k < vocab ? top_k : vocab;
  if (limit <= kc::kTopkMaxK && kc::topk_chunks(vocab) * limit <= kc::kTopkMaxMerge) {
    // The top-k candidates (logits, best first) and the row maxima, then top-p among them.
    const auto f32 = x.options().dtype(at::kFloat);
    at::Tensor values = at::empty({rows, limit}, f32);
    at::Tensor ids = at::empty({rows, limit}, x.options().dtype(at::kLong));
    at::Tensor row_max = at::empty({rows}, f32);
    row_topk(x, rows, vocab, layout, scale, limit, kc::TopkOut::Raw, values, ids, row_max);
    kc::launch_sample_candidates(rows, static_cast<int>(limit), values.const_data_ptr<float>(),
                                 ids.const_data_ptr<int64_t>(), row_max.const_data_ptr<float>(),
                                 scale, p, u.const_data_ptr<float>(), targets.data_ptr<int64_t>(),
                                 s);
    MTP_EXT_CHECK_LAUNCH();
    return;
  }
  // The full ranking: a stable descending sort of the rank keys, the top-k / top-p cut on it, then
  // the scan over the kept tokens.
  at::Tensor sorted_keys, sorted_ids;
  std::tie(sorted_keys, sorted_ids) = sorted_ranking(x, rows, vocab, layout);
  at::Tensor keep_key = at::empty({rows}, x.options().dtype(at::kInt));
  at::Tensor keep_id = at::empty({rows}, x.options().dtype(at::kLong));
  kc::launch_nucleus_from_sorted(rows, vocab, sorted_keys.const_data_ptr<int32_t>(),
                                 sorted_ids.const_data_ptr<int64_t>(), scale, limit, p,
                                 keep_key.data_ptr<int32_t>(), keep_id.data_ptr<int64_t>(), s);
  MTP_EXT_CHECK_LAUNCH();
  kc::launch_sample_scan(x.const_data_ptr(), storage_type(x), rows, vocab, layout, scale,
                         keep_key.const_data_ptr<int32_t>(), keep_id.const_data_ptr<int64_t>(),
                         u.const_data_ptr<float>(), targets.data_ptr<int64_t>(), s);
  MTP_EXT_CHECK_LAUNCH();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cuda(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& target_logits,
    double temperature, int64_t top_k, double top_p, const c10::optional<at::Tensor>& uniforms) {
  const char* op = "mtp_ext.verify_tree";
  check_verify_tree(draft_tokens, parents, target_logits, temperature, top_k, top_p, uniforms);
  check_cuda_vocab(target_logits.size(2), op, "target_logits");
  const c10::cuda::CUDAGuard guard(draft_tokens.device());
  const at::Tensor par = parents.contiguous();
  check_parents_values(par, op);
  const int64_t b = draft_tokens.size(0), t = draft_tokens.size(1), vocab = target_logits.size(2);
  const int64_t rows = b * t;
  at::Tensor targets = at::empty({rows}, draft_tokens.options().dtype(at::kLong));
  if (rows > 0) {
    const kc::RowLayout layout = batch_rows_layout(target_logits);
    if (temperature > 0) {
      const at::Tensor u = uniforms->to(at::kFloat).contiguous();
      // Without the check, the kernels clamp each uniform into [0, 1) (kernels::clamp_uniform).
      if (value_checks_enabled()) check_uniforms_values(u.cpu(), op);
      sample_targets(target_logits, rows, vocab, layout, temperature, top_k, top_p, u, targets);
    } else {
      row_topk(target_logits, rows, vocab, layout, 1.0f, 1, kc::TopkOut::None, at::Tensor(),
               targets.view({rows, 1}), at::Tensor());
    }
  }
  return walk(draft_tokens, par, targets);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_from_hidden_cuda(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& hidden,
    const at::Tensor& lm_head, const c10::optional<at::Tensor>& norm_weight, double eps) {
  const char* op = "mtp_ext.verify_tree_from_hidden";
  check_verify_tree_from_hidden(draft_tokens, parents, hidden, lm_head, norm_weight, eps);
  check_cuda_vocab(lm_head.size(0), op, "lm_head");
  check_cuda_rows(draft_tokens.size(0) * draft_tokens.size(1), op, "the nodes B * T");
  const c10::cuda::CUDAGuard guard(draft_tokens.device());
  const at::Tensor par = parents.contiguous();
  check_parents_values(par, op);
  const int64_t rows = draft_tokens.size(0) * draft_tokens.size(1);
  at::Tensor targets = at::empty({rows}, draft_tokens.options().dtype(at::kLong));
  if (rows > 0) {
    // The argmax of each node's logits (up to 64 rows streamed over lm_head, never written).
    unembed_topk(final_norm_rows(hidden, rows, norm_weight, eps), lm_head, 1, kc::TopkOut::None,
                 at::Tensor(), targets.view({rows, 1}));
  }
  return walk(draft_tokens, par, targets);
}

std::tuple<at::Tensor, at::Tensor> tree_attention_mask_cuda(const at::Tensor& parents,
                                                            int64_t prefix_len,
                                                            c10::optional<at::ScalarType> dtype) {
  const char* op = "mtp_ext.tree_attention_mask";
  const at::ScalarType mask_dtype = check_tree_attention_mask(parents, prefix_len, dtype);
  const c10::cuda::CUDAGuard guard(parents.device());
  const at::Tensor par = parents.contiguous();
  check_parents_values(par, op);
  const int64_t t = par.size(-1), rows = par.dim() == 2 ? par.size(0) : 1;
  at::Tensor mask = empty_tree_mask(par, prefix_len, mask_dtype);
  at::Tensor depth = at::empty(par.sizes(), par.options());
  uint64_t hidden_bits = 0;
  int elem_bytes = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask_dtype, "tree_attention_mask", [&] {
    const scalar_t lowest = std::numeric_limits<scalar_t>::lowest();
    static_assert(sizeof(scalar_t) <= sizeof(hidden_bits), "mask element too wide");
    std::memcpy(&hidden_bits, &lowest, sizeof(scalar_t));
    elem_bytes = static_cast<int>(sizeof(scalar_t));
  });
  kc::launch_tree_mask(par.const_data_ptr<int64_t>(), par.dim() == 2 ? t : 0, rows, t, prefix_len,
                       elem_bytes, hidden_bits, mask.data_ptr(), depth.data_ptr<int64_t>(),
                       stream());
  MTP_EXT_CHECK_LAUNCH();
  return {mask, depth};
}

void compact_kv_cuda(const at::Tensor& cache, const at::Tensor& path,
                     const at::Tensor& num_accepted, int64_t prefix_len) {
  const char* op = "mtp_ext.compact_kv";
  check_compact_kv(cache, path, num_accepted, prefix_len);
  const c10::cuda::CUDAGuard guard(cache.device());
  const at::Tensor p = path.contiguous(), n = num_accepted.contiguous();
  const int64_t b = cache.size(0), t = path.size(1);
  if (value_checks_enabled()) check_accepted_paths(p.cpu(), n.cpu(), op);
  const int64_t item = cache.element_size();
  kc::launch_compact_kv(static_cast<char*>(cache.data_ptr()), b, cache.size(1),
                        cache.stride(0) * item, cache.stride(1) * item, cache.stride(2) * item,
                        cache.size(3) * item, p.const_data_ptr<int64_t>(), t, t,
                        n.const_data_ptr<int64_t>(), prefix_len, stream());
  MTP_EXT_CHECK_LAUNCH();
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CUDA, m) {
  m.impl("verify_tree", &verify_tree_cuda);
  m.impl("verify_tree_from_hidden", &verify_tree_from_hidden_cuda);
  m.impl("tree_attention_mask", &tree_attention_mask_cuda);
  m.impl("compact_kv", &compact_kv_cuda);
}

}  // namespace cuda
}  // namespace mtp_ext
