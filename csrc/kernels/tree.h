// Tree structure on the host: validation, the verification walk, the attention mask and the
// key/value compaction. Trees are given by parents[T] with parents[0] = -1 and 0 <= parents[i] < i.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace mtp_ext {
namespace kernels {

// Index of the first node that breaks the tree rules, or -1 when the tree is valid.
inline int64_t first_invalid_parent(const int64_t* parents, int64_t num_nodes) {
  if (num_nodes > 0 && parents[0] != -1) return 0;
  for (int64_t i = 1; i < num_nodes; ++i) {
    if (parents[i] < 0 || parents[i] >= i) return i;
  }
  return -1;
}

// Walks from the root to the lowest-index child whose draft token equals the target token of the
// current node, until there is none. target_of(node) gives the target token of a node; it is called
// only for the nodes on the accepted path. Writes tokens[0..accepted] (accepted draft tokens, then
// the bonus token) and path[0..accepted]; the rest of both rows is set to -1. Returns accepted.
// Host and device code (the CUDA walk runs this same function).
template <typename TargetFn>
MTP_HD int64_t walk_tree(const int64_t* draft, const int64_t* parents, int64_t num_nodes,
                  TargetFn&& target_of, int64_t* tokens, int64_t* path) {
  for (int64_t i = 0; i < num_nodes; ++i) tokens[i] = path[i] = -1;
  if (num_nodes == 0) return 0;
  int64_t node = 0, accepted = 0;
  path[0] = 0;
  while (true) {
    const int64_t target = target_of(node);
    int64_t next = -1;
    for (int64_t c = node + 1; c < num_nodes; ++c) {
      if (parents[c] == node && draft[c] == target) {
        next = c;
        break;
      }
    }
    if (next < 0) {
      tokens[accepted] = target;
      return accepted;
    }
    tokens[accepted] = draft[next];
    ++accepted;
    path[accepted] = next;
    node = next;
  }
}

// Fills mask[T, prefix_len + T] (row-major) with `visible` where node i may attend (the prefix,
// itself and its ancestors) and `hidden` elsewhere, and depth[T] with each node's depth.
template <typename M>
void build_tree_mask(const int64_t* parents, int64_t num_nodes, int64_t prefix_len, M visible,
                     M hidden, M* mask, int64_t* depth) {
  const int64_t width = prefix_len + num_nodes;
  for (int64_t i = 0; i < num_nodes; ++i) {
    M* row = mask + i * width;
    for (int64_t j = 0; j < prefix_len; ++j) row[j] = visible;
    for (int64_t j = 0; j < num_nodes; ++j) row[prefix_len + j] = hidden;
    for (int64_t j = i; j >= 0; j = parents[j]) row[prefix_len + j] = visible;
    depth[i] = i == 0 ? 0 : depth[parents[i]] + 1;
  }
}

// Moves entry prefix_len + path[j] to prefix_len + j for j = 0..accepted along the sequence axis of
// one [heads, S, head_dim] slice given as bytes: `heads` blocks `head_stride` bytes apart, each with
// S entries of `entry_bytes` bytes that are `seq_stride` bytes apart.
inline void compact_path(char* base, int64_t heads, int64_t head_stride, int64_t seq_stride,
                         int64_t entry_bytes, const int64_t* path, int64_t accepted,
                         int64_t prefix_len) {
  for (int64_t j = 0; j <= accepted; ++j) {
    const int64_t src = prefix_len + path[j];
    const int64_t dst = prefix_len + j;
    if (src == dst) continue;
    for (int64_t h = 0; h < heads; ++h) {
      char* head = base + h * head_stride;
      std::memmove(head + dst * seq_stride, head + src * seq_stride, entry_bytes);
    }
  }
}

}  // namespace kernels
}  // namespace mtp_ext
