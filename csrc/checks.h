// Argument checks shared by the CPU and CUDA launchers. Each message names the op, the argument,
// what was expected and what came. Value problems raise ValueError, dtype problems TypeError.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace mtp_ext {

std::string shape_str(const at::Tensor& t);

void check_floating(const at::Tensor& t, const char* op, const char* name);
void check_index(const at::Tensor& t, const char* op, const char* name);
void check_dims(const at::Tensor& t, int64_t dims, const char* layout, const char* op,
                const char* name);
void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                       const char* name_b);
void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op,
                const char* name, const char* what);
void check_k(int64_t k, int64_t vocab, const char* op, const char* name);
// Raises a ValueError naming `what` (an output and the arguments its sizes come from) when
// an output of shape `sizes` with elements of `elem_bytes` bytes would not fit in int64 bytes.
void check_output_size(at::IntArrayRef sizes, int64_t elem_bytes, const char* op,
                       const char* what);
void check_norm_weight(const c10::optional<at::Tensor>& norm_weight, const at::Tensor& hidden,
                       int64_t depth, const char* op);

// temperature in [1 / FLT_MAX, FLT_MAX]: it and 1 / temperature are finite float32 values (or 0,
// greedy, when zero_is_greedy).
void check_temperature(double temperature, const char* op, bool zero_is_greedy);
void check_softmax_topk(const at::Tensor& logits, int64_t k, double temperature);
void check_marginalize(const at::Tensor& next_logits, const at::Tensor& weights);
void check_topk_marginalize(const at::Tensor& next_logits, const at::Tensor& weights, int64_t m);
// weight None: one head without a residual block (bias must then be None).
void check_fused_mtp_heads(const at::Tensor& hidden, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lm_head,
                           int64_t k, const c10::optional<at::Tensor>& norm_weight, double eps,
                           const c10::optional<at::Tensor>& vocab_ids);
// The heads fused_mtp_heads computes: weight's H, or 1 without weight.
int64_t num_heads(const c10::optional<at::Tensor>& weight);
void check_verify_tree(const at::Tensor& draft_tokens, const at::Tensor& parents,
                       const at::Tensor& target_logits, double temperature, int64_t top_k,
                       double top_p, const c10::optional<at::Tensor>& uniforms);
void check_parents_shape(const at::Tensor& parents, const char* op);
// Checks tree_attention_mask's parents (shape), prefix_len (>= 0, and a mask whose size in bytes
// fits in int64) and dtype; returns the mask dtype.
at::ScalarType check_tree_attention_mask(const at::Tensor& parents, int64_t prefix_len,
                                         const c10::optional<at::ScalarType>& dtype);
// The uninitialized mask [..., T, prefix_len + T] of `dtype` on parents' device (arguments
// checked); an allocation failure raises the same error type with prefix_len and the bytes named.
at::Tensor empty_tree_mask(const at::Tensor& parents, int64_t prefix_len, at::ScalarType dtype);
void check_tree_inputs(const at::Tensor& draft_tokens, const at::Tensor& parents, const char* op);
void check_verify_tree_from_hidden(const at::Tensor& draft_tokens, const at::Tensor& parents,
                                   const at::Tensor& hidden, const at::Tensor& lm_head,
                                   const c10::optional<at::Tensor>& norm_weight, double eps);
void check_small_batch_linear(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias);
void check_compact_kv(const at::Tensor& cache, const at::Tensor& path,
                      const at::Tensor& num_accepted, int64_t prefix_len);

// The prologue both backends share: check the arguments, then return the uninitialized outputs
// (values float32, ids int64): softmax_topk's [..., k], fused_mtp_heads' [N, H, k] ([N, 1, k]
// without weight).
std::tuple<at::Tensor, at::Tensor> prepare_softmax_topk(const at::Tensor& logits, int64_t k,
                                                        double temperature);
std::tuple<at::Tensor, at::Tensor> prepare_fused_mtp_heads(
    const at::Tensor& hidden, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lm_head, int64_t k,
    const c10::optional<at::Tensor>& norm_weight, double eps,
    const c10::optional<at::Tensor>& vocab_ids);

// Host-side value checks (read the tensors; CPU launchers only).
void check_tree_values(const at::Tensor& parents_cpu_contiguous, const char* op);
// uniforms [B, T] float32 contiguous on the CPU: every value in [0, 1).
void check_uniforms_values(const at::Tensor& uniforms, const char* op);
void check_nonnegative(const at::Tensor& weights, const char* op, const char* name);
// compact_kv's path [B, T] and num_accepted [B] (int64, contiguous, on the host): 0 <=
// num_accepted[b] < T and j <= path[b, j] < T for j <= num_accepted[b].
void check_accepted_paths(const at::Tensor& path_cpu_contiguous,
                          const at::Tensor& num_accepted_cpu_contiguous, const char* op);
// vocab_ids (int64, contiguous, on the host) must hold non-negative ids. Their upper bound, the
// full vocabulary's size, is not an argument of the op and is not checked.
void check_vocab_ids_values(const at::Tensor& vocab_ids_cpu_contiguous, const char* op);

}  // namespace mtp_ext
