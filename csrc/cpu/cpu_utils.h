// Helpers shared by the CPU launchers: dtype dispatch to the torch-free storage types, work
// splitting, and the blockwise scan of a row range (softmax statistics + optional running top-k).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../kernels/common.h"
#include "../kernels/softmax_math.h"
#include "../kernels/topk.h"

namespace mtp_ext {
namespace cpu {

using kernels::Candidate;
using kernels::SoftmaxStats;
using kernels::TopK;

constexpr int64_t kBlock = 512;  // floats per block converted into a stack buffer

// Calls f(T{}) with T = float, kernels::f16 or kernels::bf16 matching the dtype.
template <typename F>
void dispatch_floating(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(kernels::f16{});
      break;
    case at::kBFloat16:
      f(kernels::bf16{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "mtp_ext: unsupported floating dtype ", dtype);
  }
}

template <typename T>
const T* data_as(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

// How many pieces to cut each of `rows` rows of length `len` into so that both cores get work.
inline int64_t chunks_per_row(int64_t rows, int64_t len, int64_t min_chunk = 8192) {
  const int64_t threads = at::get_num_threads();
  if (rows >= 2 * threads) return 1;
  const int64_t wanted = (2 * threads + std::max<int64_t>(rows, 1) - 1) / std::max<int64_t>(rows, 1);
  return std::max<int64_t>(1, std::min(wanted, len / min_chunk));
}

// Bounds of chunk c of `chunks` over [0, len).
inline std::pair<int64_t, int64_t> chunk_bounds(int64_t len, int64_t chunks, int64_t c) {
  const int64_t size = (len + chunks - 1) / chunks;
  return {std::min(len, c * size), std::min(len, (c + 1) * size)};
}

// Folds the float32 values x[0..n) (ids first_id, first_id + 1, ...) into softmax statistics (with
// `scale`) and, when `top` is given, into a running top-k; the block is offered to the top-k only
// when its maximum (or a NaN, which makes the sum NaN) could enter it.
inline void fold_block(const float* x, int64_t n, int64_t first_id, float scale,
                       SoftmaxStats& stats, TopK* top) {
  const float bmax = kernels::block_max(x, n);
  stats.add_block(x, n, bmax, scale);
  if (top != nullptr && (top->may_enter(bmax) || stats.sum != stats.sum)) {
    top->push_block(x, n, first_id);
  }
}

// Scans x[begin*stride .. end*stride) block by block through fold_block.
template <typename T>
void scan_range(const T* x, int64_t stride, int64_t begin, int64_t end, float scale,
                SoftmaxStats& stats, TopK* top) {
  float buf[kBlock];
  for (int64_t s = begin; s < end; s += kBlock) {
    const int64_t n = std::min(kBlock, end - s);
    kernels::load_block(x + s * stride, stride, n, buf);
    fold_block(buf, n, s, scale, stats, top);
  }
}

// RMSNorm(x, eps) * norm_weight over the last dim, in float32 (x as float32 when no weight).
inline at::Tensor rms_norm_f32(const at::Tensor& x, const c10::optional<at::Tensor>& norm_weight,
                               double eps) {
  at::Tensor y = x.to(at::kFloat);
  if (!norm_weight.has_value()) return y;
  return y * at::rsqrt(y.pow(2).mean(-1, true).add_(eps)) * norm_weight->to(at::kFloat);
}

// Per-row softmax statistics and top-k, with long rows split across threads.
// row_ptr(r) gives the first element of row r; elements are `stride` apart; k = 0 skips the top-k.
// Returns stats[rows] and the top-k candidates of each row, best first (tops[r].size() == k).
template <typename T, typename RowPtr>
void rows_stats_topk(int64_t rows, int64_t len, int64_t stride, RowPtr&& row_ptr, float scale,
                     int64_t k, std::vector<SoftmaxStats>& stats,
                     std::vector<std::vector<Candidate>>* tops) {
  const int64_t chunks = chunks_per_row(rows, len);
  std::vector<SoftmaxStats> part(static_cast<size_t>(rows * chunks));
  std::vector<std::vector<Candidate>> part_top(k > 0 ? static_cast<size_t>(rows * chunks) : 0);
  at::parallel_for(0, rows * chunks, 1, [&](int64_t first, int64_t last) {
    TopK top;
    for (int64_t u = first; u < last; ++u) {
      const int64_t r = u / chunks, c = u % chunks;
      const auto [begin, end] = chunk_bounds(len, chunks, c);
      top.reset(std::min(k, end - begin));
      scan_range<T>(row_ptr(r), stride, begin, end, scale, part[u], k > 0 ? &top : nullptr);
      if (k > 0) part_top[u] = top.take_sorted();
    }
  });
  stats.assign(static_cast<size_t>(rows), SoftmaxStats());
  if (tops != nullptr) tops->assign(static_cast<size_t>(rows), {});
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    TopK top;
    for (int64_t r = first; r < last; ++r) {
      for (int64_t c = 0; c < chunks; ++c) stats[r].merge(part[r * chunks + c], scale);
      if (k == 0) continue;
      if (chunks == 1) {
        (*tops)[r] = std::move(part_top[r]);
        continue;
      }
      top.reset(k);
      for (int64_t c = 0; c < chunks; ++c)
        for (const Candidate& cand : part_top[r * chunks + c]) top.push(cand.value, cand.id);
      (*tops)[r] = top.take_sorted();
    }
  });
}

}  // namespace cpu
}  // namespace mtp_ext
