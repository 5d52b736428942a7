// The one place where every mtp_ext op schema is declared. Kernels register per backend in
// csrc/cpu and csrc/cuda; fakes for torch.compile live in mtp_ext/ops.py; the definitions are the
// functions of mtp_ext/reference.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A dummy Python module: importing mtp_ext._C loads this library and runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mtp_ext, m) {
  // Top-k of softmax(logits / temperature) over the last dim: (probs[..., k] f32, ids[..., k] i64).
  m.def("softmax_topk(Tensor logits, int k, float temperature=1.0) -> (Tensor, Tensor)");
  // q[b] = sum_l w[b, l] * softmax(next_logits[b, l]): probs[B, V] f32.
  m.def("marginalize(Tensor next_logits, Tensor weights, bool renormalize=True) -> Tensor");
  // Top-m of marginalize without writing the [B, V] marginal: (probs[B, m] f32, ids[B, m] i64).
  m.def(
      "topk_marginalize(Tensor next_logits, Tensor weights, int m, bool renormalize=True) -> "
      "(Tensor, Tensor)");
  // H residual heads through the shared lm_head, top-k log-softmax per head, one pass over lm_head.
  // Without weight: one head that is the final norm and the unembedding alone ([N, 1, k]).
  m.def(
      "fused_mtp_heads(Tensor hidden, Tensor? weight, Tensor? bias, Tensor lm_head, int k, "
      "Tensor? norm_weight=None, float eps=1e-6, Tensor? vocab_ids=None) -> (Tensor, Tensor)");
  // Greedy or sampled tree verification: (num_accepted[B], tokens[B, T], path[B, T]), all i64.
  m.def(
      "verify_tree(Tensor draft_tokens, Tensor parents, Tensor target_logits, float "
      "temperature=0.0, int top_k=0, float top_p=1.0, Tensor? uniforms=None) -> (Tensor, Tensor, "
      "Tensor)");
  // Additive mask [..., T, prefix_len + T] (float32 unless dtype is given) and node depths [..., T].
  m.def(
      "tree_attention_mask(Tensor parents, int prefix_len, ScalarType? dtype=None) -> (Tensor, "
      "Tensor)");
  // Greedy verify_tree from the last hidden states: final RMSNorm, output layer and per-node argmax
  // fused in one pass over lm_head (the [B, T, V] logits are never written), then the tree walk.
  m.def(
      "verify_tree_from_hidden(Tensor draft_tokens, Tensor parents, Tensor hidden, Tensor lm_head, "
      "Tensor? norm_weight=None, float eps=1e-6) -> (Tensor, Tensor, Tensor)");
  // y[M, N] = x[M, K] . weight[N, K]^T + bias for few rows: each weight row is read once for all.
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // In place: cache[b, :, prefix_len + j] = cache[b, :, prefix_len + path[b, j]], j <= num_accepted[b].
  m.def("compact_kv(Tensor(a!) cache, Tensor path, Tensor num_accepted, int prefix_len) -> ()");
}
