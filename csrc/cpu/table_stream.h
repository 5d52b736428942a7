// Streaming a weight matrix table[V, D] (nn.Linear / unembedding layout) once, in blocks of rows,
// split into one contiguous slice per thread. Each block arrives as float32 (converted from
// float16/bfloat16 into a per-thread buffer, or read in place for float32), so callers can multiply
// a few activation rows against it with kernels::dot_rows and fold the result into their own
// per-thread state.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../kernels/softmax_math.h"
#include "cpu_utils.h"

namespace mtp_ext {
namespace cpu {

constexpr int64_t kTableBlock = 48;  // table rows per block: a multiple of the dot tile's 3 or 4

// Number of slices the table is cut into: one per thread, at most one per block.
inline int64_t table_parts(int64_t rows) {
  const int64_t blocks = (rows + kTableBlock - 1) / kTableBlock;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
}

// Calls on_rows(part, first_row, num_rows) for every block of `rows` table rows, each part (a
// contiguous slice, part in [0, table_parts(rows))) on one thread, its blocks in order.
template <typename OnRows>
void for_each_table_block(int64_t rows, OnRows&& on_rows) {
  const int64_t blocks = (rows + kTableBlock - 1) / kTableBlock;
  const int64_t parts = table_parts(rows);
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const auto [b0, b1] = chunk_bounds(blocks, parts, p);
      for (int64_t v = b0 * kTableBlock; v < std::min(rows, b1 * kTableBlock); v += kTableBlock)
        on_rows(p, v, std::min(kTableBlock, rows - v));
    }
  });
}

// Calls on_block(part, block, first_row, num_rows) for every block of `rows` table rows, where
// `block` points at num_rows x depth float32 values (row-major), converted into a per-part buffer
// unless the table is float32.
template <typename T, typename OnBlock>
void stream_table(const T* table, int64_t rows, int64_t depth, OnBlock&& on_block) {
  std::vector<std::vector<float>> converted(
      std::is_same<T, float>::value ? 0 : static_cast<size_t>(table_parts(rows)));
  for_each_table_block(rows, [&](int64_t p, int64_t v, int64_t nb) {
    if constexpr (std::is_same<T, float>::value) {
      on_block(p, table + v * depth, v, nb);
    } else {
      std::vector<float>& buf = converted[p];
      buf.resize(static_cast<size_t>(kTableBlock * depth));
      kernels::load_block(table + v * depth, 1, nb * depth, buf.data());
      on_block(p, static_cast<const float*>(buf.data()), v, nb);
    }
  });
}

}  // namespace cpu
}  // namespace mtp_ext
