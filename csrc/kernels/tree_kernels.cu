// CUDA kernels of the tree ops: the verification walk (the same walk_tree as the CPU kernel),
// inverse-CDF sampling of the target tokens (the filtering and tie rules of kernels::sample_row),
// the tree attention mask and the in-place key/value compaction.
#include "cuda_common.cuh"
#include "sampling_rules.h"
#include "tree.h"

namespace mtp_ext {
namespace kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void walk_tree_kernel(const int64_t* __restrict__ draft,
                                 const int64_t* __restrict__ parents, int64_t parents_row_stride,
                                 const int64_t* __restrict__ targets, int64_t batch, int64_t nodes,
                                 int64_t* __restrict__ num_accepted, int64_t* __restrict__ tokens,
                                 int64_t* __restrict__ path) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  const int64_t* tg = targets + b * nodes;
  num_accepted[b] = walk_tree(
      draft + b * nodes, parents + b * parents_row_stride, nodes,
      [&](int64_t node) { return tg[node]; }, tokens + b * nodes, path + b * nodes);
}

// One block per row: the row maximum and first NaN, the kept mass, then a scan in ascending id
// order. A row without a distribution (sampling_rules.h) gives its greedy token.
template <typename T>
__global__ void __launch_bounds__(kThreads) sample_scan_kernel(
    const T* __restrict__ x, int64_t rows, int64_t vocab, RowLayout layout, float scale,
    const int32_t* __restrict__ keep_key, const int64_t* __restrict__ keep_id,
    const float* __restrict__ u, int64_t* __restrict__ target) {
  constexpr int kPer = 4;
  __shared__ float fscratch[kThreads / kWarp];
  __shared__ double dscratch[kThreads / kWarp];
  __shared__ int64_t iscratch[kThreads / kWarp];
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* p = x + row_offset(layout, row);
    const int64_t sv = layout.v_stride;
    float m = -__int_as_float(0x7f800000);
    int64_t nan_at = vocab;
    for (int64_t i = tid; i < vocab; i += kThreads) {
      const float v = load_f(p + i * sv);
      m = fmaxf(m, v);
      if (v != v && nan_at == vocab) nan_at = i;
    }
    const float mx = block_max<kThreads>(m, fscratch);
    const int64_t first_nan = block_min_i64<kThreads>(nan_at, iscratch);
    if (!has_distribution(mx, first_nan < vocab)) {
      if (tid == 0) target[row] = first_nan < vocab ? first_nan : 0;
      continue;  // the same branch for the whole block
    }
    const bool all = keep_key == nullptr;
    const uint32_t kk = all ? 0u : unsigned_key(keep_key[row]);
    const int64_t kid = all ? 0 : keep_id[row];
    auto kept = [&](int64_t i, float v) {
      if (all) return true;
      const uint32_t key = rank_key(v);
      return key > kk || (key == kk && i <= kid);
    };
    double mass = 0.0;
    int64_t last = -1;
    for (int64_t i = tid; i < vocab; i += kThreads) {
      const float v = load_f(p + i * sv);
      if (kept(i, v)) {
        mass += static_cast<double>(expf(mass_exponent(v, mx, scale)));
        last = i;
      }
    }
    const double total = block_sum<kThreads>(mass, dscratch);
    const int64_t last_kept = block_max_i64<kThreads>(last, iscratch);
    const double threshold = static_cast<double>(clamp_uniform(u[row])) * total;
    // The first kept token whose cumulative mass exceeds the threshold.
    const int64_t found = block_first_hit<kThreads, kPer>(
        vocab, dscratch, iscratch,
        [&](int64_t i) {
          const float v = load_f(p + i * sv);
          const bool keep = kept(i, v);
          return ScanTerm{keep ? static_cast<double>(expf(mass_exponent(v, mx, scale))) : 0.0,
                          keep};
        },
        [&](const ScanTerm& t, double before) { return t.eligible && before + t.mass > threshold; });
    if (tid == 0) target[row] = found < vocab ? found : last_kept;
    __syncthreads();
  }
}

// One block per row over a full descending ranking: the last token kept by top-k and top-p.
__global__ void __launch_bounds__(kThreads) nucleus_from_sorted_kernel(
    int64_t rows, int64_t vocab, const int32_t* __restrict__ sorted_keys,
    const int64_t* __restrict__ sorted_ids, float scale, int64_t limit, float top_p,
    int32_t* __restrict__ keep_key, int64_t* __restrict__ keep_id) {
  constexpr int kPer = 4;
  __shared__ double dscratch[kThreads / kWarp];
  __shared__ int64_t iscratch[kThreads / kWarp];
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int32_t* keys = sorted_keys + row * vocab;
    // NaN sorts first; the maximum ignoring NaN is the first other key.
    int64_t nans = 0;
    for (int64_t r = tid; r < vocab; r += kThreads) nans += unsigned_key(keys[r]) == 0xffffffffu;
    const int64_t first_number = block_sum<kThreads>(nans, iscratch);
    const float mx = first_number < vocab ? key_value(unsigned_key(keys[first_number]))
                                          : -__int_as_float(0x7f800000);
    double part = 0.0;
    for (int64_t r = tid; r < limit; r += kThreads)
      part += static_cast<double>(expf(mass_exponent(key_value(unsigned_key(keys[r])), mx, scale)));
    const double mass = block_sum<kThreads>(part, dscratch);
    int64_t keep = limit;
    if (top_p < 1.0f) {
      // keep = the smallest j in [1, limit) whose mass ranked before it, S_j, is not < top_p.
      keep = block_first_hit<kThreads, kPer>(
          limit, dscratch, iscratch,
          [&](int64_t r) {
            const float v = key_value(unsigned_key(keys[r]));
            return ScanTerm{static_cast<double>(expf(mass_exponent(v, mx, scale))) / mass, r >= 1};
          },
          [&](const ScanTerm& t, double before) {
            return t.eligible && !(before < static_cast<double>(top_p));
          });
    }
    if (tid == 0) {
      keep_key[row] = keys[keep - 1];
      keep_id[row] = sorted_ids[row * vocab + keep - 1];
    }
    __syncthreads();
  }
}

// One thread per row: top-p among the k best candidates, then the inverse CDF over the kept ones
// in ascending id order (the loops of kernels::sample_row). A row without a distribution
// (sampling_rules.h: its best candidate NaN or -inf) gives its greedy token, the best candidate.
__global__ void sample_candidates_kernel(int64_t rows, int k, const float* __restrict__ values,
                                         const int64_t* __restrict__ ids,
                                         const float* __restrict__ row_max, float scale,
                                         float top_p, const float* __restrict__ u,
                                         int64_t* __restrict__ target) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  const float* v = values + row * k;
  const int64_t* id = ids + row * k;
  const float mx = row_max[row];
  if (!has_distribution(mx, v[0] != v[0])) {
    target[row] = id[0];
    return;
  }
  float prob[kTopkMaxK];
  int64_t kept_id[kTopkMaxK];
  float kept_prob[kTopkMaxK];
  double mass = 0.0;
  for (int j = 0; j < k; ++j) {
    prob[j] = expf(mass_exponent(v[j], mx, scale));
    mass += prob[j];
  }
  int keep = k;
  if (top_p < 1.0f) {
    double before = 0.0;
    for (int j = 0; j < k; ++j) {
      if (j > 0 && !(before < static_cast<double>(top_p))) {
        keep = j;
        break;
      }
      before += prob[j] / mass;
    }
  }
  // The kept candidates in ascending id order (insertion sort; keep <= 64).
  for (int j = 0; j < keep; ++j) {
    int pos = j;
    while (pos > 0 && kept_id[pos - 1] > id[j]) {
      kept_id[pos] = kept_id[pos - 1];
      kept_prob[pos] = kept_prob[pos - 1];
      --pos;
    }
    kept_id[pos] = id[j];
    kept_prob[pos] = prob[j];
  }
  double total = 0.0;
  for (int j = 0; j < keep; ++j) total += kept_prob[j];
  const double threshold = static_cast<double>(clamp_uniform(u[row])) * total;
  double cum = 0.0;
  int64_t result = kept_id[keep - 1];
  for (int j = 0; j < keep; ++j) {
    cum += kept_prob[j];
    if (cum > threshold) {
      result = kept_id[j];
      break;
    }
  }
  target[row] = result;
}

template <typename U>
__global__ void tree_mask_kernel(const int64_t* __restrict__ parents, int64_t parents_row_stride,
                                 int64_t rows, int64_t nodes, int64_t prefix_len, U hidden,
                                 U* __restrict__ mask, int64_t* __restrict__ depth) {
  const int64_t width = prefix_len + nodes;
  const int64_t total = rows * nodes * width;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / (nodes * width), i = (e / width) % nodes, j = e % width;
    bool visible = true;
    if (j >= prefix_len) {
      const int64_t target = j - prefix_len;
      const int64_t* par = parents + r * parents_row_stride;
      int64_t a = i;
      // Up the ancestors (parent indices strictly decrease; a broken link ends the walk).
      while (a > target) {
        const int64_t up = par[a];
        if (up < 0 || up >= a) break;
        a = up;
      }
      visible = a == target;
    }
    mask[e] = visible ? U(0) : hidden;
  }
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < rows * nodes; e += stride) {
    const int64_t r = e / nodes, i = e % nodes;
    const int64_t* par = parents + r * parents_row_stride;
    int64_t a = i, d = 0;
    while (a > 0) {
      const int64_t up = par[a];
      if (up < 0 || up >= a) break;
      a = up;
      ++d;
    }
    depth[e] = d;
  }
}

// One thread per (batch row, head, W-byte piece of an entry): reads a group of path entries, then
// writes them; sources (path[j] >= j) are never written before they are read.
template <typename W>
__global__ void compact_kv_kernel(char* base, int64_t batch, int64_t heads, int64_t batch_stride,
                                  int64_t head_stride, int64_t seq_stride, int64_t pieces,
                                  const int64_t* __restrict__ path, int64_t path_row_stride,
                                  int64_t nodes, const int64_t* __restrict__ num_accepted,
                                  int64_t prefix_len) {
  constexpr int kGroup = 8;
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= batch * heads * pieces) return;
  const int64_t b = e / (heads * pieces), h = (e / pieces) % heads, c = e % pieces;
  const int64_t accepted = num_accepted[b];
  if (accepted < 0 || accepted >= nodes) return;
  char* head = base + b * batch_stride + h * head_stride + c * int64_t(sizeof(W));
  const int64_t* pr = path + b * path_row_stride;
  for (int64_t j0 = 0; j0 <= accepted; j0 += kGroup) {
    W buf[kGroup];
    int64_t src[kGroup];
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      const int64_t j = j0 + q;
      src[q] = -1;
      if (j <= accepted) {
        const int64_t s = pr[j];
        if (s > j && s < nodes) {
          src[q] = s;
          buf[q] = *reinterpret_cast<const W*>(head + (prefix_len + s) * seq_stride);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      if (src[q] >= 0) *reinterpret_cast<W*>(head + (prefix_len + j0 + q) * seq_stride) = buf[q];
    }
  }
}

}  // namespace

void launch_walk_tree(const int64_t* draft, const int64_t* parents, int64_t parents_row_stride,
                      const int64_t* targets, int64_t batch, int64_t nodes, int64_t* num_accepted,
                      int64_t* tokens, int64_t* path, cudaStream_t stream) {
  if (batch == 0) return;
  walk_tree_kernel<<<static_cast<unsigned>(ceil_div(batch, 64)), 64, 0, stream>>>(
      draft, parents, parents_row_stride, targets, batch, nodes, num_accepted, tokens, path);
}

void launch_sample_scan(const void* x, DType dtype, int64_t rows, int64_t vocab, RowLayout layout,
                        float scale, const int32_t* keep_key, const int64_t* keep_id,
                        const float* u, int64_t* target, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    sample_scan_kernel<T><<<row_blocks(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), rows, vocab, layout, scale, keep_key, keep_id, u, target);
  });
}

void launch_nucleus_from_sorted(int64_t rows, int64_t vocab, const int32_t* sorted_keys,
                                const int64_t* sorted_ids, float scale, int64_t limit, float top_p,
                                int32_t* keep_key, int64_t* keep_id, cudaStream_t stream) {
  if (rows == 0) return;
  nucleus_from_sorted_kernel<<<row_blocks(rows), kThreads, 0, stream>>>(
      rows, vocab, sorted_keys, sorted_ids, scale, limit, top_p, keep_key, keep_id);
}

void launch_sample_candidates(int64_t rows, int k, const float* values, const int64_t* ids,
                              const float* row_max, float scale, float top_p, const float* u,
                              int64_t* target, cudaStream_t stream) {
  if (rows == 0) return;
  sample_candidates_kernel<<<static_cast<unsigned>(ceil_div(rows, 64)), 64, 0, stream>>>(
      rows, k, values, ids, row_max, scale, top_p, u, target);
}

void launch_tree_mask(const int64_t* parents, int64_t parents_row_stride, int64_t rows,
                      int64_t nodes, int64_t prefix_len, int elem_bytes, uint64_t hidden_bits,
                      void* mask, int64_t* depth, cudaStream_t stream) {
  const int64_t total = rows * nodes * (prefix_len + nodes);
  if (rows * nodes == 0) return;
  const int64_t blocks = ceil_div(total > rows * nodes ? total : rows * nodes, kThreads);
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  switch (elem_bytes) {
    case 2:
      tree_mask_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(
          parents, parents_row_stride, rows, nodes, prefix_len, static_cast<uint16_t>(hidden_bits),
          static_cast<uint16_t*>(mask), depth);
      break;
    case 4:
      tree_mask_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(
          parents, parents_row_stride, rows, nodes, prefix_len, static_cast<uint32_t>(hidden_bits),
          static_cast<uint32_t*>(mask), depth);
      break;
    default:
      tree_mask_kernel<unsigned long long><<<grid, kThreads, 0, stream>>>(
          parents, parents_row_stride, rows, nodes, prefix_len,
          static_cast<unsigned long long>(hidden_bits), static_cast<unsigned long long*>(mask),
          depth);
      break;
  }
}

void launch_compact_kv(char* base, int64_t batch, int64_t heads, int64_t batch_stride,
                       int64_t head_stride, int64_t seq_stride, int64_t entry_bytes,
                       const int64_t* path, int64_t path_row_stride, int64_t nodes,
                       const int64_t* num_accepted, int64_t prefix_len, cudaStream_t stream) {
  if (batch * heads == 0 || entry_bytes == 0) return;
  // The widest piece that divides every offset.
  int width = 16;
  const uint64_t all = reinterpret_cast<uintptr_t>(base) | uint64_t(batch_stride) |
                       uint64_t(head_stride) | uint64_t(seq_stride) | uint64_t(entry_bytes);
  while (width > 1 && (all % width) != 0) width /= 2;
  const int64_t pieces = entry_bytes / width;
  const int64_t total = batch * heads * pieces;
  const unsigned grid = static_cast<unsigned>(ceil_div(total, 128));
  auto go = [&](auto tag) {
    using W = decltype(tag);
    compact_kv_kernel<W><<<grid, 128, 0, stream>>>(base, batch, heads, batch_stride, head_stride,
                                                   seq_stride, pieces, path, path_row_stride,
                                                   nodes, num_accepted, prefix_len);
  };
  switch (width) {
    case 16:
      go(uint4{});
      break;
    case 8:
      go(uint2{});
      break;
    case 4:
      go(uint32_t{});
      break;
    case 2:
      go(uint16_t{});
      break;
    default:
      go(uint8_t{});
      break;
  }
}

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
