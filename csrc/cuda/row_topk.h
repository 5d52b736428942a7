// The top-k of the rows of a [rows, V] view on the device (topk_kernels.cu): a partial top-k per
// chunk of the vocabulary and a merge, or, for large k, a full ranking by a stable sort.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "launch_helpers.h"

namespace mtp_ext {
namespace cuda {

// Top-k over the rows of x (k >= 1): out_val[rows, k] (float32, as `mode` says; undefined for
// None) and out_id[rows, k] (int64), best first, ties toward the lower id; row_max [rows] receives
// each row's maximum ignoring NaN when defined. `x` is only used for its data and dtype.
void row_topk(const at::Tensor& x, int64_t rows, int64_t vocab, kc::RowLayout layout, float scale,
              int64_t k, kc::TopkOut mode, const at::Tensor& out_val, const at::Tensor& out_id,
              const at::Tensor& row_max);

// The full ranking of the rows of x: (keys [rows, V] int32, ids [rows, V] int64), contiguous, a
// stable descending sort of the rank keys (NaN first, ties keep the lower id first).
std::tuple<at::Tensor, at::Tensor> sorted_ranking(const at::Tensor& x, int64_t rows, int64_t vocab,
                                                  kc::RowLayout layout);

}  // namespace cuda
}  // namespace mtp_ext
