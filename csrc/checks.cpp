#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/safe_numerics.h>

#include <limits>
#include <sstream>

#include "kernels/tree.h"

namespace mtp_ext {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << "[";
  for (int64_t i = 0; i < t.dim(); ++i) out << (i ? ", " : "") << t.size(i);
  out << "]";
  return out.str();
}

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", s);
}

void check_index(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
                   t.scalar_type());
}

void check_dims(const at::Tensor& t, int64_t dims, const char* layout, const char* op,
                const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must have ", dims, " dims ", layout,
                    ", got shape ", shape_str(t));
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                       const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op,
                const char* name, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": ", name, " must have ", what, " = ", expected,
                    " in dim ", dim, ", got shape ", shape_str(t));
}

void check_k(int64_t k, int64_t vocab, const char* op, const char* name) {
  TORCH_CHECK_VALUE(k >= 1 && k <= vocab, op, ": ", name, " must be in [1, V] = [1, ", vocab,
                    "], got ", k);
}

void check_output_size(at::IntArrayRef sizes, int64_t elem_bytes, const char* op,
                       const char* what) {
  int64_t bytes = elem_bytes;
  bool overflow = false;
  for (const int64_t n : sizes) overflow = overflow || c10::mul_overflows(bytes, n, &bytes);
  TORCH_CHECK_VALUE(!overflow, op, ": ", what, " = ", sizes,
                    " is too large: it would need more than 2^63 - 1 bytes");
}

void check_norm_weight(const c10::optional<at::Tensor>& norm_weight, const at::Tensor& hidden,
                       int64_t depth, const char* op) {
  if (!norm_weight.has_value()) return;
  check_floating(*norm_weight, op, "norm_weight");
  check_dims(*norm_weight, 1, "[D]", op, "norm_weight");
  check_size(*norm_weight, 0, depth, op, "norm_weight", "D");
  check_same_device(hidden, *norm_weight, op, "hidden", "norm_weight");
}

void check_temperature(double temperature, const char* op, bool zero_is_greedy) {
  if (zero_is_greedy && temperature == 0) return;
  const double largest = std::numeric_limits<float>::max(), smallest = 1.0 / largest;
  TORCH_CHECK_VALUE(temperature >= smallest && temperature <= largest, op, ": temperature must be ",
                    zero_is_greedy ? "0 (greedy) or " : "", "in [", smallest, ", ", largest,
                    "] (it and 1 / temperature finite in float32), got ", temperature);
}

void check_softmax_topk(const at::Tensor& logits, int64_t k, double temperature) {
  const char* op = "mtp_ext.softmax_topk";
  check_floating(logits, op, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1, op, ": logits must have at least 1 dim [..., V], got shape ",
                    shape_str(logits));
  check_k(k, logits.size(-1), op, "k");
  check_temperature(temperature, op, /*zero_is_greedy=*/false);
}

namespace {
// The inputs marginalize and topk_marginalize share.
void check_mixture(const at::Tensor& next_logits, const at::Tensor& weights, const char* op) {
  check_floating(next_logits, op, "next_logits");
  check_floating(weights, op, "weights");
  check_dims(next_logits, 3, "[B, L, V]", op, "next_logits");
  check_dims(weights, 2, "[B, L]", op, "weights");
  check_same_device(next_logits, weights, op, "next_logits", "weights");
  TORCH_CHECK_VALUE(weights.size(0) == next_logits.size(0) && weights.size(1) == next_logits.size(1),
                    op, ": weights must have shape [B, L] = [", next_logits.size(0), ", ",
                    next_logits.size(1), "] to match next_logits, got ", shape_str(weights));
  TORCH_CHECK_VALUE(next_logits.size(2) >= 1, op, ": next_logits must have V >= 1, got shape ",
                    shape_str(next_logits));
}
}  // namespace

void check_marginalize(const at::Tensor& next_logits, const at::Tensor& weights) {
  const char* op = "mtp_ext.marginalize";
  check_mixture(next_logits, weights, op);
  check_output_size({next_logits.size(0), next_logits.size(2)}, 4, op,
                    "the output [B, V] (next_logits' B and V)");
}

void check_topk_marginalize(const at::Tensor& next_logits, const at::Tensor& weights, int64_t m) {
  const char* op = "mtp_ext.topk_marginalize";
  check_mixture(next_logits, weights, op);
  check_k(m, next_logits.size(2), op, "m");
  check_output_size({next_logits.size(0), m}, 8, op, "the outputs [B, m] (next_logits' B, m)");
}

void check_fused_mtp_heads(const at::Tensor& hidden, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lm_head,
                           int64_t k, const c10::optional<at::Tensor>& norm_weight, double eps,
                           const c10::optional<at::Tensor>& vocab_ids) {
  const char* op = "mtp_ext.fused_mtp_heads";
  check_floating(hidden, op, "hidden");
  check_floating(lm_head, op, "lm_head");
  check_dims(hidden, 2, "[N, D]", op, "hidden");
  check_dims(lm_head, 2, "[V, D]", op, "lm_head");
  const int64_t d = hidden.size(1);
  check_size(lm_head, 1, d, op, "lm_head", "D");
  check_same_device(hidden, lm_head, op, "hidden", "lm_head");
  if (weight.has_value()) {
    check_floating(*weight, op, "weight");
    check_dims(*weight, 3, "[H, D, D]", op, "weight");
    check_size(*weight, 1, d, op, "weight", "D");
    check_size(*weight, 2, d, op, "weight", "D");
    check_same_device(hidden, *weight, op, "hidden", "weight");
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(weight.has_value(), op,
                      ": bias must be None when weight is None (a head without a residual "
                      "block), got bias of shape ",
                      shape_str(*bias));
    check_floating(*bias, op, "bias");
    check_dims(*bias, 2, "[H, D]", op, "bias");
    check_size(*bias, 0, weight->size(0), op, "bias", "H");
    check_size(*bias, 1, d, op, "bias", "D");
    check_same_device(hidden, *bias, op, "hidden", "bias");
  }
  check_norm_weight(norm_weight, hidden, d, op);
  check_k(k, lm_head.size(0), op, "k");
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
  if (vocab_ids.has_value()) {
    check_index(*vocab_ids, op, "vocab_ids");
    check_dims(*vocab_ids, 1, "[V]", op, "vocab_ids");
    check_size(*vocab_ids, 0, lm_head.size(0), op, "vocab_ids", "V (the rows of lm_head)");
    check_same_device(hidden, *vocab_ids, op, "hidden", "vocab_ids");
  }
  check_output_size({hidden.size(0), num_heads(weight), k}, 8, op,
                    "the outputs [N, H, k] (hidden's N, weight's H, k)");
}

int64_t num_heads(const c10::optional<at::Tensor>& weight) {
  return weight.has_value() ? weight->size(0) : 1;
}

void check_small_batch_linear(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  const char* op = "mtp_ext.small_batch_linear";
  check_floating(x, op, "x");
  check_floating(weight, op, "weight");
  check_dims(x, 2, "[M, K]", op, "x");
  check_dims(weight, 2, "[N, K]", op, "weight");
  check_size(weight, 1, x.size(1), op, "weight", "K");
  check_same_device(x, weight, op, "x", "weight");
  if (bias.has_value()) {
    check_floating(*bias, op, "bias");
    check_dims(*bias, 1, "[N]", op, "bias");
    check_size(*bias, 0, weight.size(0), op, "bias", "N");
    check_same_device(x, *bias, op, "x", "bias");
  }
  check_output_size({x.size(0), weight.size(0)}, 4, op, "the output [M, N] (x's M, weight's N)");
}

void check_parents_shape(const at::Tensor& parents, const char* op) {
  check_index(parents, op, "parents");
  TORCH_CHECK_VALUE(parents.dim() == 1 || parents.dim() == 2, op,
                    ": parents must have 1 dim [T] or 2 dims [B, T], got shape ",
                    shape_str(parents));
}

at::ScalarType check_tree_attention_mask(const at::Tensor& parents, int64_t prefix_len,
                                         const c10::optional<at::ScalarType>& dtype) {
  const char* op = "mtp_ext.tree_attention_mask";
  check_parents_shape(parents, op);
  TORCH_CHECK_VALUE(prefix_len >= 0, op, ": prefix_len must be >= 0, got ", prefix_len);
  const at::ScalarType mask_dtype = dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(at::isFloatingType(mask_dtype), op, ": dtype must be a floating dtype, got ",
                   mask_dtype);
  // The mask [..., T, prefix_len + T] must have a size that int64 counts, in bytes.
  const int64_t t = parents.size(-1);
  int64_t width = 0, bytes = static_cast<int64_t>(at::elementSize(mask_dtype));
  bool overflow = c10::add_overflows(prefix_len, t, &width);
  for (const int64_t n : parents.sizes()) {
    overflow = overflow || c10::mul_overflows(bytes, n, &bytes);
  }
  overflow = overflow || c10::mul_overflows(bytes, width, &bytes);
  TORCH_CHECK_VALUE(!overflow, op, ": prefix_len = ", prefix_len,
                    " is too large: the mask [..., T, prefix_len + T] with parents of shape ",
                    shape_str(parents), " would need more than 2^63 - 1 bytes of ", mask_dtype);
  return mask_dtype;
}

at::Tensor empty_tree_mask(const at::Tensor& parents, int64_t prefix_len, at::ScalarType dtype) {
  auto shape = parents.sizes().vec();
  shape.push_back(prefix_len + parents.size(-1));
  const auto describe = [&] {
    std::ostringstream out;
    out << "mtp_ext.tree_attention_mask: the mask for prefix_len = " << prefix_len << ", of shape "
        << at::IntArrayRef(shape) << " and dtype " << dtype << ", needs "
        << c10::multiply_integers(shape) * static_cast<int64_t>(at::elementSize(dtype))
        << " bytes: ";
    return out.str();
  };
  try {
    return at::empty(shape, parents.options().dtype(dtype));
  } catch (const c10::OutOfMemoryError& e) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, describe(), e.what_without_backtrace());
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, describe(), e.what_without_backtrace());
  }
  return at::Tensor();
}

void check_tree_inputs(const at::Tensor& draft_tokens, const at::Tensor& parents, const char* op) {
  check_index(draft_tokens, op, "draft_tokens");
  check_dims(draft_tokens, 2, "[B, T]", op, "draft_tokens");
  check_parents_shape(parents, op);
  const int64_t b = draft_tokens.size(0), t = draft_tokens.size(1);
  TORCH_CHECK_VALUE(t >= 1, op, ": draft_tokens must have T >= 1 (the root), got shape ",
                    shape_str(draft_tokens));
  TORCH_CHECK_VALUE(parents.size(-1) == t && (parents.dim() == 1 || parents.size(0) == b), op,
                    ": parents must have shape [T] = [", t, "] or [B, T] = [", b, ", ", t,
                    "], got ", shape_str(parents));
  check_same_device(draft_tokens, parents, op, "draft_tokens", "parents");
}

void check_verify_tree_from_hidden(const at::Tensor& draft_tokens, const at::Tensor& parents,
                                   const at::Tensor& hidden, const at::Tensor& lm_head,
                                   const c10::optional<at::Tensor>& norm_weight, double eps) {
  const char* op = "mtp_ext.verify_tree_from_hidden";
  check_tree_inputs(draft_tokens, parents, op);
  check_floating(hidden, op, "hidden");
  check_floating(lm_head, op, "lm_head");
  check_dims(hidden, 3, "[B, T, D]", op, "hidden");
  check_dims(lm_head, 2, "[V, D]", op, "lm_head");
  const int64_t b = draft_tokens.size(0), t = draft_tokens.size(1);
  TORCH_CHECK_VALUE(hidden.size(0) == b && hidden.size(1) == t, op,
                    ": hidden must have shape [B, T, D] with [B, T] = [", b, ", ", t, "], got ",
                    shape_str(hidden));
  check_size(lm_head, 1, hidden.size(2), op, "lm_head", "D");
  TORCH_CHECK_VALUE(lm_head.size(0) >= 1, op, ": lm_head must have V >= 1 rows, got shape ",
                    shape_str(lm_head));
  check_same_device(draft_tokens, hidden, op, "draft_tokens", "hidden");
  check_same_device(hidden, lm_head, op, "hidden", "lm_head");
  check_norm_weight(norm_weight, hidden, hidden.size(2), op);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

void check_verify_tree(const at::Tensor& draft_tokens, const at::Tensor& parents,
                       const at::Tensor& target_logits, double temperature, int64_t top_k,
                       double top_p, const c10::optional<at::Tensor>& uniforms) {
  const char* op = "mtp_ext.verify_tree";
  check_tree_inputs(draft_tokens, parents, op);
  check_floating(target_logits, op, "target_logits");
  check_dims(target_logits, 3, "[B, T, V]", op, "target_logits");
  const int64_t b = draft_tokens.size(0), t = draft_tokens.size(1);
  TORCH_CHECK_VALUE(target_logits.size(0) == b && target_logits.size(1) == t, op,
                    ": target_logits must have shape [B, T, V] with [B, T] = [", b, ", ", t,
                    "], got ", shape_str(target_logits));
  TORCH_CHECK_VALUE(target_logits.size(2) >= 1, op, ": target_logits must have V >= 1, got shape ",
                    shape_str(target_logits));
  check_same_device(draft_tokens, target_logits, op, "draft_tokens", "target_logits");
  check_temperature(temperature, op, /*zero_is_greedy=*/true);
  TORCH_CHECK_VALUE(top_k >= 0, op, ": top_k must be >= 0 (0 keeps all), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, op, ": top_p must be in (0, 1], got ", top_p);
  if (temperature > 0) {
    TORCH_CHECK_VALUE(uniforms.has_value(), op,
                      ": uniforms [B, T] are required when temperature > 0 (got None)");
  }
  if (uniforms.has_value()) {
    check_floating(*uniforms, op, "uniforms");
    TORCH_CHECK_VALUE(uniforms->dim() == 2 && uniforms->size(0) == b && uniforms->size(1) == t, op,
                      ": uniforms must have shape [B, T] = [", b, ", ", t, "], got ",
                      shape_str(*uniforms));
    check_same_device(draft_tokens, *uniforms, op, "draft_tokens", "uniforms");
  }
}

void check_compact_kv(const at::Tensor& cache, const at::Tensor& path,
                      const at::Tensor& num_accepted, int64_t prefix_len) {
  const char* op = "mtp_ext.compact_kv";
  check_dims(cache, 4, "[B, heads, S, head_dim]", op, "cache");
  check_index(path, op, "path");
  check_index(num_accepted, op, "num_accepted");
  check_dims(path, 2, "[B, T]", op, "path");
  check_dims(num_accepted, 1, "[B]", op, "num_accepted");
  check_size(path, 0, cache.size(0), op, "path", "B");
  check_size(num_accepted, 0, cache.size(0), op, "num_accepted", "B");
  check_same_device(cache, path, op, "cache", "path");
  check_same_device(cache, num_accepted, op, "cache", "num_accepted");
  TORCH_CHECK_VALUE(prefix_len >= 0, op, ": prefix_len must be >= 0, got ", prefix_len);
  // prefix_len + T <= S, compared without computing the sum (prefix_len may be near 2^63).
  const int64_t t = path.size(1), s = cache.size(2);
  TORCH_CHECK_VALUE(t <= s && prefix_len <= s - t, op,
                    ": the tree must fit in the cache: prefix_len + T <= S, got prefix_len = ",
                    prefix_len, ", T = ", t, " (path shape ", shape_str(path), ") and S = ", s,
                    " (cache shape ", shape_str(cache), ")");
  TORCH_CHECK_VALUE(cache.stride(3) == 1, op,
                    ": cache must be contiguous in its last dim (head_dim), got strides ",
                    cache.strides());
  TORCH_CHECK_VALUE(at::has_internal_overlap(cache) != at::MemOverlap::Yes, op,
                    ": cache is written in place, so its entries must not share memory (an "
                    "expanded tensor), got shape ",
                    shape_str(cache), " and strides ", cache.strides());
}

namespace {
std::tuple<at::Tensor, at::Tensor> topk_outputs(const at::Tensor& like, at::IntArrayRef shape) {
  return {at::empty(shape, like.options().dtype(at::kFloat)),
          at::empty(shape, like.options().dtype(at::kLong))};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> prepare_softmax_topk(const at::Tensor& logits, int64_t k,
                                                        double temperature) {
  check_softmax_topk(logits, k, temperature);
  auto shape = logits.sizes().vec();
  shape.back() = k;
  return topk_outputs(logits, shape);
}

std::tuple<at::Tensor, at::Tensor> prepare_fused_mtp_heads(
    const at::Tensor& hidden, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lm_head, int64_t k,
    const c10::optional<at::Tensor>& norm_weight, double eps,
    const c10::optional<at::Tensor>& vocab_ids) {
  check_fused_mtp_heads(hidden, weight, bias, lm_head, k, norm_weight, eps, vocab_ids);
  return topk_outputs(hidden, {hidden.size(0), num_heads(weight), k});
}

void check_tree_values(const at::Tensor& parents, const char* op) {
  const int64_t t = parents.size(-1);
  const int64_t rows = parents.dim() == 2 ? parents.size(0) : 1;
  const int64_t* p = parents.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t bad = kernels::first_invalid_parent(p + r * t, t);
    if (bad < 0) continue;
    if (bad == 0) {
      TORCH_CHECK_VALUE(false, op, ": parents must be a tree rooted at node 0: parents[",
                        (parents.dim() == 2 ? std::to_string(r) + ", " : std::string()),
                        "0] must be -1, got ", p[r * t]);
    }
    TORCH_CHECK_VALUE(false, op, ": parents must satisfy 0 <= parents[i] < i, got parents[",
                      (parents.dim() == 2 ? std::to_string(r) + ", " : std::string()), bad,
                      "] = ", p[r * t + bad]);
  }
}

void check_uniforms_values(const at::Tensor& uniforms, const char* op) {
  const int64_t t = uniforms.size(1);
  const float* u = uniforms.const_data_ptr<float>();
  for (int64_t i = 0; i < uniforms.numel(); ++i) {
    TORCH_CHECK_VALUE(u[i] >= 0.0f && u[i] < 1.0f, op, ": uniforms must be in [0, 1), got ", u[i],
                      " at [", i / t, ", ", i % t, "]");
  }
}

void check_nonnegative(const at::Tensor& weights, const char* op, const char* name) {
  if (weights.numel() == 0) return;
  const at::Tensor bad = (weights < 0) | weights.isnan();
  if (bad.any().item<bool>()) {
    const int64_t flat = bad.flatten().nonzero().select(0, 0).item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": ", name, " must be non-negative, got ",
                      weights.flatten().select(0, flat).item<double>(), " at flat index ", flat);
  }
}

void check_accepted_paths(const at::Tensor& path, const at::Tensor& num_accepted,
                          const char* op) {
  const int64_t b = path.size(0), t = path.size(1);
  const int64_t* pp = path.const_data_ptr<int64_t>();
  const int64_t* np = num_accepted.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK_VALUE(np[i] >= 0 && np[i] < t, op, ": num_accepted[", i,
                      "] must be in [0, T) = [0, ", t, "), got ", np[i]);
    for (int64_t j = 0; j <= np[i]; ++j) {
      TORCH_CHECK_VALUE(pp[i * t + j] >= j && pp[i * t + j] < t, op, ": path[", i, ", ", j,
                        "] must be a node index in [", j, ", T) = [", j, ", ", t, "), got ",
                        pp[i * t + j]);
    }
  }
}

void check_vocab_ids_values(const at::Tensor& vocab_ids, const char* op) {
  const int64_t* ids = vocab_ids.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < vocab_ids.numel(); ++j) {
    TORCH_CHECK_VALUE(ids[j] >= 0, op,
                      ": vocab_ids must hold non-negative token ids (the full-vocabulary id of "
                      "each row of lm_head), got vocab_ids[",
                      j, "] = ", ids[j]);
  }
}

}  // namespace mtp_ext
