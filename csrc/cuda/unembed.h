// Few float32 rows against a table read in its own dtype: their product (rows_dot: the
// unembedding's logits, the small-batch linear layer), the top-k of each row of that product
// (unembed_topk: the unembedding of fused_mtp_heads and verify_tree_from_hidden), and the final
// RMSNorm those rows go through first (final_norm_rows).
#pragma once

#include <ATen/ATen.h>

#include "launch_helpers.h"

namespace mtp_ext {
namespace cuda {

// out[rows, N] (float32) = a[rows, K] (float32) . table[N, K]^T, the table read in its own dtype.
at::Tensor rows_dot(const at::Tensor& a, const at::Tensor& table);

// The top-k of the rows of logits = z[rows, D] . table[V, D]^T: out_val[rows, k] as `mode` says
// (LogProb or None; out_val may be undefined for None) and out_id[rows, k] (int64), best first,
// ties toward the lower row of the table. Where the streaming kernels serve the sizes (at most
// kUnembedMaxRows rows, k <= 64, a depth that is a multiple of 8, aligned contiguous table rows)
// they read the table once for all rows and never write the logits (unembed_kernels.cu: float32
// products, or tensor cores for 16-bit tables where the device has them); otherwise the logits are
// computed by rows_dot and ranked by row_topk.
void unembed_topk(const at::Tensor& z, const at::Tensor& table, int64_t k, kc::TopkOut mode,
                  const at::Tensor& out_val, const at::Tensor& out_id);

// The `rows` rows of x ([..., D], any floating dtype) as a float32 contiguous [rows, D] tensor,
// each multiplied by rsqrt(mean(row^2) + eps) * norm_weight when norm_weight is given; x itself is
// never written.
at::Tensor final_norm_rows(const at::Tensor& x, int64_t rows,
                           const c10::optional<at::Tensor>& norm_weight, double eps);

}  // namespace cuda
}  // namespace mtp_ext
