// CUDA launchers of fused_mtp_heads and small_batch_linear.
//
// fused_mtp_heads: the heads' blocks x . weight[h]^T (each weight read once for all rows), the
// residual SiLU + RMSNorm kernel, then the unembedding of the N x H rows with the top-k and
// log-softmax. Without weight there is one head and no block: the hidden states go through the
// final RMSNorm (when norm_weight is given) straight to the unembedding. Up to 64 rows (k <= 64)
// one streaming kernel reads lm_head once, in its dtype, for all rows, keeping a running top-k and
// log-sum-exp per row; the [N, H, V] logits are never written (unembed_topk). Beyond that the
// logits are computed (lm_head read once per 64 rows, or cuBLAS past 256 rows) and ranked by the
// row top-k. At more than 256 rows (or more than 65535 heads, a grid's limit) the heads' products
// go through ATen (cuBLAS, float32) too.
// With 16-bit weights on compute capability 8.0 and newer the heads' products and the
// unembedding run on tensor cores (kernels/mma_kernels.cu).
#include <torch/library.h>

#include "../checks.h"
#include "unembed.h"

namespace mtp_ext {
namespace cuda {
namespace {

constexpr int64_t kMaxGridZ = 65535;  // CUDA's limit on gridDim.z: the heads of one launch

// [N * H, D] float32 contiguous: the residual blocks x + SiLU(x . weight[h]^T + bias[h]), normed
// when norm_weight is given.
at::Tensor head_features(const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& norm_weight, double eps) {
  const int64_t n = hidden.size(0), heads = weight.size(0), depth = hidden.size(1);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor x = hidden.to(at::kFloat).contiguous();
  at::Tensor y;  // [N, H, D] float32: x . weight[h]^T
  if (n <= 256 && heads <= kMaxGridZ) {
    y = at::empty({n, heads, depth}, f32);
    const at::Tensor w = weight.contiguous();
    if (depth == 0) {
      y.zero_();
    } else {
      const kc::DType dtype = storage_type(w);
      const at::Tensor scratch =
          workspace(kc::rows_dot_table_workspace(n, depth, 0, w.const_data_ptr(), dtype, depth,
                                                 depth, depth * depth, heads),
                    x);
      kc::launch_rows_dot_table(x.const_data_ptr<float>(), n, depth, depth, 0, w.const_data_ptr(),
                                dtype, depth, depth, depth * depth, y.data_ptr<float>(),
                                heads * depth, depth, heads,
                                data_or_null(scratch), stream());
      MTP_EXT_CHECK_LAUNCH();
    }
  } else {
    y = at::matmul(x.unsqueeze(0), weight.to(at::kFloat).transpose(1, 2))  // [H, N, D]
            .transpose(0, 1)
            .contiguous();
  }
  at::Tensor b, nw;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  if (norm_weight.has_value()) nw = norm_weight->to(at::kFloat).contiguous();
  kc::launch_head_features(x.const_data_ptr<float>(), y.const_data_ptr<float>(),
                           const_data_or_null<float>(b),
                           const_data_or_null<float>(nw),
                           static_cast<float>(eps), n, heads, depth, y.data_ptr<float>(), stream());
  MTP_EXT_CHECK_LAUNCH();
  return y.view({n * heads, depth});
}

std::tuple<at::Tensor, at::Tensor> fused_mtp_heads_cuda(
    const at::Tensor& hidden, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lm_head, int64_t k,
    const c10::optional<at::Tensor>& norm_weight, double eps,
    const c10::optional<at::Tensor>& vocab_ids) {
  const char* op = "mtp_ext.fused_mtp_heads";
  at::Tensor logprobs, ids;
  std::tie(logprobs, ids) =
      prepare_fused_mtp_heads(hidden, weight, bias, lm_head, k, norm_weight, eps, vocab_ids);
  const int64_t rows = hidden.size(0) * num_heads(weight);
  check_cuda_vocab(lm_head.size(0), op, "lm_head");
  check_cuda_rows(rows, op, "the head rows N * H");
  const c10::cuda::CUDAGuard guard(hidden.device());
  if (vocab_ids.has_value() && value_checks_enabled()) {
    check_vocab_ids_values(vocab_ids->cpu().contiguous(), op);
  }
  if (rows == 0) return {logprobs, ids};

  // Without weight the one head's features are the (normed) hidden states themselves.
  const at::Tensor z = weight.has_value()
                           ? head_features(hidden, *weight, bias, norm_weight, eps)
                           : final_norm_rows(hidden, rows, norm_weight, eps);
  unembed_topk(z, lm_head, k, kc::TopkOut::LogProb, logprobs.view({rows, k}),
               ids.view({rows, k}));
  if (vocab_ids.has_value()) ids = vocab_ids->take(ids);
  return {logprobs, ids};
}

at::Tensor small_batch_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias) {
  check_small_batch_linear(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), n = weight.size(0);
  at::Tensor out = rows_dot(x, weight);
  if (bias.has_value() && m > 0 && n > 0) out.add_(bias->to(at::kFloat));
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CUDA, m) {
  m.impl("fused_mtp_heads", &fused_mtp_heads_cuda);
  m.impl("small_batch_linear", &small_batch_linear_cuda);
}

}  // namespace cuda
}  // namespace mtp_ext
