// Helpers shared by the CUDA launchers: the current stream, dtype mapping to the kernels' storage
// types, row layouts, the launch check, the row top-k (chunked partial + merge, or a sort for large
// k) and the product of a few float32 rows with a table.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cuda_launch.h"

namespace mtp_ext {
namespace cuda {

namespace kc = kernels::cuda;

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Checks the last launch (never synchronizes).
#define MTP_EXT_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

kc::DType storage_type(const at::Tensor& t);

// Layout of a [rows, V] view: 2-D tensors, or [B, L, V] tensors as B * L rows.
kc::RowLayout rows_layout(const at::Tensor& x2d);
kc::RowLayout batch_rows_layout(const at::Tensor& x3d);

// Value checks that must read device data (tree validity, non-negative weights, index ranges)
// synchronize with the device, so the CUDA launchers skip them unless MTP_EXT_CUDA_VALUE_CHECKS=1;
// never while the stream is being captured into a CUDA graph.
bool value_checks_enabled();

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

// The top-k of the rows of logits = z[rows, D] . table[V, D]^T by the streaming kernels
// (unembed_kernels.cu: float32 products, or tensor cores for 16-bit tables where the device has
// them), which read the table once for all rows and never write the logits: out_val[rows, k] as
// `mode` says (LogProb or None; out_val may be undefined for None) and out_id[rows, k] (int64),
// best first, ties toward the lower row of the table. Returns false, doing nothing, where those
// kernels do not serve the sizes (more than kUnembedMaxRows rows, k > 64, a
// depth not a multiple of 8, unaligned or non-contiguous table rows); the caller then computes the
// logits and calls row_topk.
bool unembed_topk(const at::Tensor& z, const at::Tensor& table, int64_t k, kc::TopkOut mode,
                  const at::Tensor& out_val, const at::Tensor& out_id);

// A device buffer of `bytes` bytes on `like`'s device for a kernel's workspace (undefined for 0).
at::Tensor workspace(size_t bytes, const at::Tensor& like);

// The data of an optional tensor (an input, an output or a workspace), null where undefined.
inline void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}
template <typename T>
const T* const_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// out[rows, N] (float32) = a[rows, K] (float32) . table[N, K]^T, the table read in its own dtype.
at::Tensor rows_dot(const at::Tensor& a, const at::Tensor& table);

}  // namespace cuda
}  // namespace mtp_ext
