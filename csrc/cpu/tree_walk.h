// The verification walk of every batch row on the CPU, shared by the kernels of verify_tree and
// verify_tree_from_hidden: the outputs (num_accepted[B], tokens[B, T], path[B, T]) and the walk of
// each row's tree (kernels::walk_tree), given the target token of a node.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>

#include "../kernels/tree.h"

namespace mtp_ext {
namespace cpu {

// Walks the tree of every row of draft_tokens [B, T] (parents [T] or [B, T], int64 contiguous and
// valid). Rows are split into tasks of at least `grain` rows (at::parallel_for); each task calls
// make_targets() once, for its own state, and asks the callable it returns for targets(row, node),
// the target token of that node, only for the nodes the walk reaches. Rows of an empty batch have
// num_accepted 0.
template <typename MakeTargets>
std::tuple<at::Tensor, at::Tensor, at::Tensor> walk_trees(const at::Tensor& draft_tokens,
                                                          const at::Tensor& parents, int64_t grain,
                                                          MakeTargets&& make_targets) {
  const int64_t b = draft_tokens.size(0), t = draft_tokens.size(1);
  const auto idx = draft_tokens.options().dtype(at::kLong);
  at::Tensor num_accepted = at::zeros({b}, idx);
  at::Tensor tokens = at::empty({b, t}, idx);
  at::Tensor path = at::empty({b, t}, idx);
  if (b == 0) return {num_accepted, tokens, path};

  const at::Tensor draft = draft_tokens.contiguous();
  const int64_t* draft_rows = draft.const_data_ptr<int64_t>();
  const int64_t* parent_rows = parents.const_data_ptr<int64_t>();
  const int64_t parents_row_stride = parents.dim() == 2 ? t : 0;
  int64_t* acc = num_accepted.data_ptr<int64_t>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  int64_t* pth = path.data_ptr<int64_t>();
  at::parallel_for(0, b, grain, [&](int64_t first, int64_t last) {
    auto targets = make_targets();
    for (int64_t i = first; i < last; ++i) {
      acc[i] = kernels::walk_tree(
          draft_rows + i * t, parent_rows + i * parents_row_stride, t,
          [&](int64_t node) { return targets(i, node); }, tok + i * t, pth + i * t);
    }
  });
  return {num_accepted, tokens, path};
}

}  // namespace cpu
}  // namespace mtp_ext
