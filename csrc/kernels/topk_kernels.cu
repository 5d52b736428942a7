// CUDA kernels of softmax_topk, marginalize and topk_marginalize, and the row top-k that
// fused_mtp_heads and verify_tree reuse.
//
// Pass 1 (one block per vocabulary chunk of one row): the chunk is read from device memory once,
// converted to ranking keys in shared memory while its softmax statistics are accumulated, and
// its k best keys are selected there (radix select). Pass 2 (one block per row) merges the
// chunks' statistics and candidates.
//
// topk_marginalize reads the logits once when it can prove its answer from that one read (the
// certified path, below); rows it cannot prove take a second pass that computes the marginal of
// each chunk on the fly from the row statistics. The [B, V] marginal is never written.
#include <algorithm>

#include "cuda_common.cuh"
#include "mma_launch.h"  // device_sms, device_l2_bytes

namespace mtp_ext {
namespace kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kStreamBlocksPerSm = 3;  // marginalize_stream_kernel's blocks per multiprocessor
constexpr int64_t kStreamMinChunk = 1024;

// Shared state of the partial kernels.
struct PartialShared {
  uint32_t keys[kTopkChunk];
  uint32_t sel_key[kTopkMaxK];
  int32_t sel_index[kTopkMaxK];
  float scratch[2 * kThreads / kWarp];
  TopkShared topk;
};

// Stores the chunk's k best (or fewer, padded with key 0) as [k] keys and global ids.
__device__ __forceinline__ void select_chunk(PartialShared& sh, int n, int k, int64_t first_id,
                                             uint32_t* out_key, int32_t* out_id) {
  const int kk = k < n ? k : n;
  block_topk<kThreads>(
      sh.keys, n, kk, [&](int32_t i) { return static_cast<int64_t>(i); }, sh.sel_key,
      sh.sel_index, sh.topk, [&](int rank, uint32_t key, int32_t index) {
        out_key[rank] = key;
        out_id[rank] = static_cast<int32_t>(first_id + index);
      });
  for (int j = kk + threadIdx.x; j < k; j += kThreads) {
    out_key[j] = 0u;
    out_id[j] = 0x7fffffff;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 3) topk_partial_kernel(
    const T* __restrict__ x, int64_t rows, int64_t vocab, RowLayout layout, float scale, int k,
    float* __restrict__ part_max, float* __restrict__ part_sum, uint32_t* __restrict__ cand_key,
    int32_t* __restrict__ cand_id) {
  __shared__ PartialShared sh;
  const int64_t chunks = gridDim.x;
  const int64_t chunk = blockIdx.x;
  const int64_t begin = chunk * kTopkChunk;
  const int n = static_cast<int>(vocab - begin < kTopkChunk ? vocab - begin : kTopkChunk);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const T* p = x + row_offset(layout, row) + begin * layout.v_stride;
    Stats st = stats_empty();
    block_for_each<kThreads>(p, n, layout.v_stride, [&](int i, float v) {
      stats_add(st, v, scale);
      if (k > 0) sh.keys[i] = rank_key(v);
    });
    st = block_stats<kThreads>(st, scale, sh.scratch);
    if (threadIdx.x == 0 && part_max != nullptr) {
      part_max[row * chunks + chunk] = st.max;
      part_sum[row * chunks + chunk] = st.sum;
    }
    if (k > 0) {
      __syncthreads();
      select_chunk(sh, n, k, begin, cand_key + (row * chunks + chunk) * k,
                   cand_id + (row * chunks + chunk) * k);
    }
    __syncthreads();
  }
}

// acc + c * exp(v - mx) with one rounding of the product and sum: the second pass and the
// certified path compute the marginal of a token with exactly these operations, in path order.
__device__ __forceinline__ float marginal_term(float c, float v, float mx, float acc) {
  return fmaf(c, expf(v - mx), acc);
}

// The marginal over a chunk, computed on the fly, and its best m candidates. Rows with
// skip[b] != 0 (already answered by the certified path) are left alone.
template <typename T>
__global__ void __launch_bounds__(kThreads, 3) marginal_topk_partial_kernel(
    const T* __restrict__ x, int64_t batch, int64_t paths, int64_t vocab, RowLayout layout,
    const float* __restrict__ coef, const float* __restrict__ row_max, int m,
    const int32_t* __restrict__ skip, uint32_t* __restrict__ cand_key,
    int32_t* __restrict__ cand_id) {
  __shared__ PartialShared sh;
  float* s_acc = reinterpret_cast<float*>(sh.keys);  // the marginal, then its keys in place
  const int64_t chunks = gridDim.x;
  const int64_t chunk = blockIdx.x;
  const int64_t begin = chunk * kTopkChunk;
  const int n = static_cast<int>(vocab - begin < kTopkChunk ? vocab - begin : kTopkChunk);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    if (skip != nullptr && skip[b] != 0) continue;  // the same for the whole block
    for (int i = threadIdx.x; i < n; i += kThreads) s_acc[i] = 0.0f;
    __syncthreads();
    for (int64_t l = 0; l < paths; ++l) {
      const float c = coef[b * paths + l];
      // As the CPU kernel: a zero weight adds nothing, even to NaN logits.
      if (c != 0.0f) {
        const float mx = row_max[b * paths + l];
        const T* p = x + row_offset(layout, b * paths + l) + begin * layout.v_stride;
        block_for_each<kThreads>(p, n, layout.v_stride, [&](int i, float v) {
          s_acc[i] = marginal_term(c, v, mx, s_acc[i]);
        });
      }
      __syncthreads();  // the next path may split the chunk between threads differently
    }
    for (int i = threadIdx.x; i < n; i += kThreads) sh.keys[i] = rank_key(s_acc[i]);
    __syncthreads();
    select_chunk(sh, n, m, begin, cand_key + (b * chunks + chunk) * m,
                 cand_id + (b * chunks + chunk) * m);
    __syncthreads();
  }
}

// Merge of the chunks of one row: statistics, then the k best of chunks * k candidates (ordered
// by chunk, then by rank: equal keys appear in id order, as block_topk requires).
__global__ void __launch_bounds__(kThreads) topk_merge_kernel(
    int64_t rows, int64_t chunks, int k, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const uint32_t* __restrict__ cand_key,
    const int32_t* __restrict__ cand_id, TopkOut mode, float scale, float* __restrict__ out_val,
    int64_t* __restrict__ out_id, float* __restrict__ row_max, const int32_t* __restrict__ skip) {
  extern __shared__ uint32_t dyn[];
  __shared__ TopkShared sh;
  __shared__ uint32_t sel_key[kTopkMaxK];
  __shared__ int32_t sel_index[kTopkMaxK];
  __shared__ float scratch[2 * kThreads / kWarp];
  const int n = static_cast<int>(chunks * k);
  uint32_t* keys = dyn;
  int32_t* ids = reinterpret_cast<int32_t*>(dyn + n);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    if (skip != nullptr && skip[row] != 0) continue;  // the same for the whole block
    Stats st = stats_empty();
    if (part_max != nullptr) {
      for (int64_t c = threadIdx.x; c < chunks; c += kThreads)
        st = stats_merge(st, Stats{part_max[row * chunks + c], part_sum[row * chunks + c]}, scale);
      st = block_stats<kThreads>(st, scale, scratch);
    }
    for (int i = threadIdx.x; i < n; i += kThreads) {
      keys[i] = cand_key[row * n + i];
      ids[i] = cand_id[row * n + i];
    }
    __syncthreads();
    if (threadIdx.x == 0 && row_max != nullptr) row_max[row] = st.max;
    const float log_z = st.max * scale + logf(st.sum);
    block_topk<kThreads>(
        keys, n, k, [&](int32_t i) { return static_cast<int64_t>(ids[i]); }, sel_key, sel_index,
        sh, [&](int rank, uint32_t key, int32_t index) {
          const float v = key_value(key);
          out_id[row * k + rank] = ids[index];
          if (mode == TopkOut::None) return;
          float o = v;
          if (mode == TopkOut::Prob) o = expf((v - st.max) * scale) / st.sum;
          if (mode == TopkOut::LogProb) o = v - log_z;
          out_val[row * k + rank] = o;
        });
  }
}

__global__ void stats_merge_kernel(int64_t rows, int64_t chunks, const float* __restrict__ part_max,
                                   const float* __restrict__ part_sum, float scale,
                                   float* __restrict__ row_max, float* __restrict__ row_sum) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  Stats st = stats_empty();
  for (int64_t c = 0; c < chunks; ++c)
    st = stats_merge(st, Stats{part_max[row * chunks + c], part_sum[row * chunks + c]}, scale);
  row_max[row] = st.max;
  row_sum[row] = st.sum;
}

template <typename T>
__global__ void rank_keys_kernel(const T* __restrict__ x, int64_t rows, int64_t vocab,
                                 RowLayout layout, int32_t* __restrict__ keys) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const T* p = x + row_offset(layout, row);
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < vocab;
         i += int64_t(gridDim.x) * blockDim.x)
      keys[row * vocab + i] = signed_key(rank_key(load_f(p + i * layout.v_stride)));
  }
}

__global__ void topk_from_sorted_kernel(int64_t rows, int k, const int32_t* __restrict__ sorted_keys,
                                        int64_t key_stride, const int64_t* __restrict__ sorted_ids,
                                        int64_t id_stride, const float* __restrict__ row_max,
                                        const float* __restrict__ row_sum, TopkOut mode,
                                        float scale, float* __restrict__ out_val,
                                        int64_t* __restrict__ out_id) {
  const int64_t total = rows * k;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / k, j = e % k;
    const float v = key_value(unsigned_key(sorted_keys[row * key_stride + j]));
    out_id[e] = sorted_ids[row * id_stride + j];
    if (mode == TopkOut::None) continue;
    float o = v;
    if (mode == TopkOut::Prob) o = expf((v - row_max[row]) * scale) / row_sum[row];
    if (mode == TopkOut::LogProb) o = v - (row_max[row] * scale + logf(row_sum[row]));
    out_val[e] = o;
  }
}

// The weights of batch row b summed in path order, as the CPU kernel sums them.
__device__ __forceinline__ float weight_total(const float* weights, int64_t b, int64_t paths) {
  float total = 0.0f;
  for (int64_t l = 0; l < paths; ++l) total += weights[b * paths + l];
  return total;
}

// A path's coefficient: its weight (divided by the row's total when asked; an all-zero row gives
// zeros) over its softmax normalizer.
__device__ __forceinline__ float plan_coef(float w, float total, float sum, bool renormalize) {
  if (renormalize) w = total > 0.0f ? w / total : 0.0f;
  return w / sum;
}

// Weights and statistics into per-(b, l) coefficients; one thread per batch row, summing the
// weights in order as the CPU kernel does.
__global__ void marginal_plan_kernel(int64_t batch, int64_t paths, int64_t chunks,
                                     const float* __restrict__ part_max,
                                     const float* __restrict__ part_sum,
                                     const float* __restrict__ weights, bool renormalize,
                                     float* __restrict__ coef, float* __restrict__ row_max) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  const float total = weight_total(weights, b, paths);
  for (int64_t l = 0; l < paths; ++l) {
    const int64_t r = b * paths + l;
    Stats st = stats_empty();
    for (int64_t c = 0; c < chunks; ++c)
      st = stats_merge(st, Stats{part_max[r * chunks + c], part_sum[r * chunks + c]}, 1.0f);
    coef[r] = plan_coef(weights[r], total, st.sum, renormalize);
    row_max[r] = st.max;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) marginalize_kernel(
    const T* __restrict__ x, int64_t batch, int64_t paths, int64_t vocab, RowLayout layout,
    const float* __restrict__ coef, const float* __restrict__ row_max, float* __restrict__ out) {
  constexpr int kPer = 4;
  const int64_t begin = blockIdx.x * int64_t(kThreads * kPer);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    float acc[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[j] = 0.0f;
    for (int64_t l = 0; l < paths; ++l) {
      const float c = coef[b * paths + l];
      if (c == 0.0f) continue;
      const float mx = row_max[b * paths + l];
      const T* p = x + row_offset(layout, b * paths + l);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t i = begin + j * kThreads + threadIdx.x;
        if (i < vocab) acc[j] = marginal_term(c, load_f(p + i * layout.v_stride), mx, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t i = begin + j * kThreads + threadIdx.x;
      if (i < vocab) out[b * vocab + i] = acc[j];
    }
  }
}

// ---- marginalize from one read of device memory (the streamed path) ----------------------------
// One persistent launch. Its work is 2 * B * C items, C chunks of `chunk` tokens per batch row
// (all paths of the row): the chunk's softmax statistics (phase 1), then, once its row's
// statistics are all in, the chunk's marginal (phase 2). Blocks claim items from a queue, in an
// order that puts each chunk's phase 2 `lag` claims after its phase 1: the chunk is read again
// while it is still in L2, so device memory is read once. The block whose phase-1 item completes
// a row merges the row's statistics into the plan (coef, row_max) and publishes it (ready[b]).
// A phase-2 item waits only on phase-1 items claimed before it (lag >= C), which running blocks
// hold, so no block waits on a block that has not started.

using Claim = unsigned long long;  // the queue's counter (atomicAdd's 64-bit type)

struct StreamItem {
  bool stats;     // phase 1 (statistics) or phase 2 (marginal)
  int64_t index;  // b * C + c
};

// The k-th claim: phase 1 of items 0 .. lag - 1, then phase 2 of item i and phase 1 of item
// lag + i in turn, then the last lag items' phase 2.
__device__ __forceinline__ StreamItem stream_item(int64_t k, int64_t n1, int64_t lag) {
  if (k < lag) return {true, k};
  const int64_t j = k - lag, pairs = n1 - lag;
  if (j < 2 * pairs) return j % 2 == 0 ? StreamItem{false, j / 2} : StreamItem{true, lag + j / 2};
  return {false, pairs + (j - 2 * pairs)};
}

// Phase 1: each warp's statistics of its share of the chunk, per path, into
// part_*[(b * L + l) * C + c][warp].
template <typename T>
__device__ __forceinline__ void stream_stats(const T* __restrict__ x, int64_t b, int64_t c,
                                             int64_t chunks, int64_t paths, RowLayout layout,
                                             int64_t begin, int n, float* __restrict__ part_max,
                                             float* __restrict__ part_sum) {
  constexpr int kWarps = kThreads / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t l = 0; l < paths; ++l) {
    const int64_t r = b * paths + l;
    const T* p = x + row_offset(layout, r) + begin * layout.v_stride;
    Stats st = stats_empty();
    block_for_each<kThreads>(p, n, layout.v_stride, [&](int, float v) { stats_add(st, v, 1.0f); });
    st = warp_stats(st, 1.0f);
    if (lane == 0) {
      part_max[(r * chunks + c) * kWarps + warp] = st.max;
      part_sum[(r * chunks + c) * kWarps + warp] = st.sum;
    }
  }
}

// The plan of batch row b from its C * 8 partial statistics per path (one warp per path; written
// by other blocks, so read from L2).
__device__ __forceinline__ void stream_plan(int64_t b, int64_t chunks, int64_t paths,
                                            const float* __restrict__ part_max,
                                            const float* __restrict__ part_sum,
                                            const float* __restrict__ weights, bool renormalize,
                                            float* __restrict__ coef, float* __restrict__ row_max) {
  constexpr int kWarps = kThreads / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t parts = chunks * kWarps;
  for (int64_t l = warp; l < paths; l += kWarps) {
    const int64_t r = b * paths + l;
    Stats st = stats_empty();
    for (int64_t j = lane; j < parts; j += kWarp)
      st = stats_merge(st, Stats{__ldcg(part_max + r * parts + j), __ldcg(part_sum + r * parts + j)},
                       1.0f);
    st = warp_stats(st, 1.0f);
    if (lane == 0) {
      coef[r] = plan_coef(weights[r], weight_total(weights, b, paths), st.sum, renormalize);
      row_max[r] = st.max;
    }
  }
}

// Phase 2: out[b, begin .. begin + n) from the published plan.
template <typename T>
__device__ __forceinline__ void stream_marginal(const T* __restrict__ x, int64_t b, int64_t paths,
                                                int64_t vocab, RowLayout layout, int64_t begin,
                                                int n, const float* __restrict__ coef,
                                                const float* __restrict__ row_max, float* s_acc,
                                                float* __restrict__ out) {
  // Each thread zeroes and then accumulates the same elements (block_for_each hands group g of
  // eight to thread g % kThreads on every path), so the paths need no barrier between them.
  for (int g = threadIdx.x; g * 8 < n; g += kThreads)
    for (int j = 0; j < 8 && g * 8 + j < n; ++j) s_acc[g * 8 + j] = 0.0f;
  for (int64_t l = 0; l < paths; ++l) {
    const int64_t r = b * paths + l;
    const float c = __ldcg(coef + r);
    if (c == 0.0f) continue;  // as the CPU kernel: a zero weight adds nothing, even to NaN
    const float mx = __ldcg(row_max + r);
    const T* p = x + row_offset(layout, r) + begin * layout.v_stride;
    block_for_each<kThreads>(p, n, layout.v_stride, [&](int i, float v) {
      s_acc[i] = marginal_term(c, v, mx, s_acc[i]);
    });
  }
  __syncthreads();  // written out in consecutive order
  for (int i = threadIdx.x; i < n; i += kThreads) out[b * vocab + begin + i] = s_acc[i];
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kStreamBlocksPerSm) marginalize_stream_kernel(
    const T* __restrict__ x, int64_t batch, int64_t paths, int64_t vocab, RowLayout layout,
    int chunk, int64_t lag, int64_t per_block, const float* __restrict__ weights,
    bool renormalize, Claim* next, int* arrived, int* ready,
    float* __restrict__ part_max, float* __restrict__ part_sum, float* __restrict__ coef,
    float* __restrict__ row_max, float* __restrict__ out) {
  extern __shared__ float s_acc[];  // [chunk]
  __shared__ Claim s_claim;
  __shared__ int s_last;
  const int64_t chunks = (vocab + chunk - 1) / chunk, n1 = batch * chunks;
  for (int64_t taken = 0; taken < per_block; ++taken) {
    __syncthreads();  // s_claim, s_last and s_acc are free again
    if (threadIdx.x == 0) s_claim = atomicAdd(next, Claim{1});
    __syncthreads();
    if (s_claim >= static_cast<Claim>(2 * n1)) return;
    const StreamItem item = stream_item(static_cast<int64_t>(s_claim), n1, lag);
    const int64_t b = item.index / chunks, c = item.index % chunks, begin = c * chunk;
    const int n = static_cast<int>(vocab - begin < chunk ? vocab - begin : chunk);
    if (!item.stats) {
      if (threadIdx.x == 0) {
        while (*reinterpret_cast<volatile int*>(ready + b) == 0) __nanosleep(200);
        __threadfence();  // the plan is read after the flag
      }
      __syncthreads();
      stream_marginal(x, b, paths, vocab, layout, begin, n, coef, row_max, s_acc, out);
      continue;
    }
    // The fences around the counter and the flag follow cooperative groups' grid barrier: the
    // block's writes, then a barrier, then one thread's fence and atomic.
    stream_stats(x, b, c, chunks, paths, layout, begin, n, part_max, part_sum);
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();  // the block's partials are visible before its arrival is counted
      s_last = atomicAdd(arrived + b, 1) == static_cast<int>(chunks - 1);
      __threadfence();  // and the other blocks' partials are read after it
    }
    __syncthreads();
    if (s_last) {  // the row's last chunk: plan the row and publish it
      stream_plan(b, chunks, paths, part_max, part_sum, weights, renormalize, coef, row_max);
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence();  // the plan is visible before the flag
        atomicExch(ready + b, 1);
      }
    }
  }
}

// ---- topk_marginalize from one read of the logits (the certified path) -------------------------
// Pass 1 (one block per chunk and batch row, all paths) reads the chunk once. For each path it
// accumulates the chunk's softmax statistics (as topk_partial_kernel does) and keeps candidates:
// each warp's four best tokens of the path, of which the path's best P (= m) in the chunk stay.
// Each warp's share of the chunk (a group: the tokens whose groups of eight block_for_each hands to
// its threads, the same tokens on every path whatever the path's layout) gets a bound per path:
// every token of the group that is not a candidate has a key at most the group's best key left
// out (its fifth best, or a best four token past the path's P). The candidates' logits on every
// path are then gathered (the chunk was just read: they come from L2), in the logits' own dtype. Pass 2 (one block per batch
// row), once the row statistics give each path's coefficient c_l and maximum M_l, computes each
// candidate's exact marginal q = sum_l c_l exp(x_l - M_l) (marginal_term, path order) and bounds
// every other token by U_g = sum_l c_l exp(bound_l - M_l) of its group (q and U grow with each
// x_l). When the m-th best candidate exceeds every U_g (with a margin for the rounding of exp) and
// does not tie the (m+1)-th, the candidates' top m is the row's: pass 2 writes it and marks the
// row done. Other rows (NaN or infinite values, ties at the m-th place, a flat marginal, more
// than four of the best tokens in one group) are left to the second pass, which skips the rows
// marked done and computes the same values.

// A token as a ranking key and its id; better() is the order of the outputs.
struct KeyId {
  uint32_t key;
  int32_t id;
};
__device__ __forceinline__ bool better(KeyId a, KeyId b) {
  return a.key > b.key || (a.key == b.key && a.id < b.id);
}
__device__ __forceinline__ KeyId no_token() { return KeyId{0u, 0x7fffffff}; }

// The best N of the tokens offered so far, best first.
template <int N>
struct BestN {
  KeyId e[N];
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int j = 0; j < N; ++j) e[j] = no_token();
  }
  __device__ __forceinline__ void offer(KeyId x) {
    if (!better(x, e[N - 1])) return;
    // Insertion without branches on the position, so that e stays in registers: from the back,
    // each entry takes its predecessor (x ranks above it), x (x ranks between) or stays.
#pragma unroll
    for (int j = N - 1; j > 0; --j)
      e[j] = better(x, e[j - 1]) ? e[j - 1] : (better(x, e[j]) ? x : e[j]);
    if (better(x, e[0])) e[0] = x;
  }
};

// The best N of the warp (every lane gets them): each round merges two disjoint halves.
template <int N>
__device__ __forceinline__ BestN<N> warp_best(BestN<N> t) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    KeyId p[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      p[j].key = __shfl_xor_sync(0xffffffffu, t.e[j].key, o);
      p[j].id = __shfl_xor_sync(0xffffffffu, t.e[j].id, o);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) t.offer(p[j]);
  }
  return t;
}

constexpr int kCertWarps = kThreads / kWarp;
static_assert(kCertWarps == kCertifyGroups, "one bound group per warp");
constexpr int kPerWarp = 4;                          // candidates per warp and path
constexpr int kCertPerPath = kPerWarp * kCertWarps;  // warp candidates per path and chunk

template <typename T>
__global__ void __launch_bounds__(kThreads, 3) marginal_certify_partial_kernel(
    const T* __restrict__ x, int64_t batch, int paths, int64_t vocab, RowLayout layout, int chunk,
    int per_path, float* __restrict__ part_max, float* __restrict__ part_sum,
    uint32_t* __restrict__ bound, int32_t* __restrict__ cand_id, T* __restrict__ cand_x) {
  __shared__ uint32_t w_key[kCertifyMaxPaths * kCertPerPath];
  __shared__ int32_t w_id[kCertifyMaxPaths * kCertPerPath];
  __shared__ int32_t w_rank[kCertifyMaxPaths * kCertPerPath];
  __shared__ uint32_t w_fifth[kCertifyMaxPaths * kCertWarps];
  __shared__ int32_t cand[kCertifyMaxPaths * kCertifyMaxM];
  __shared__ float scratch[2 * kThreads / kWarp];
  const int64_t chunks = gridDim.x;
  const int64_t c = blockIdx.x;
  const int64_t begin = c * chunk;
  const int n = static_cast<int>(vocab - begin < chunk ? vocab - begin : chunk);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int k_cands = paths * per_path;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int l = 0; l < paths; ++l) {
      const T* p = x + row_offset(layout, b * paths + l) + begin * layout.v_stride;
      Stats st = stats_empty();
      BestN<kPerWarp + 1> best;
      best.clear();
      block_for_each<kThreads>(p, n, layout.v_stride, [&](int i, float v) {
        stats_add(st, v, 1.0f);
        best.offer(KeyId{rank_key(v), static_cast<int32_t>(begin + i)});
      });
      st = block_stats<kThreads>(st, 1.0f, scratch);
      if (threadIdx.x == 0) {
        part_max[(b * paths + l) * chunks + c] = st.max;
        part_sum[(b * paths + l) * chunks + c] = st.sum;
      }
      best = warp_best(best);
      if (lane == 0) {
#pragma unroll
        for (int j = 0; j < kPerWarp; ++j) {
          w_key[l * kCertPerPath + warp * kPerWarp + j] = best.e[j].key;
          w_id[l * kCertPerPath + warp * kPerWarp + j] = best.e[j].id;
        }
        w_fifth[l * kCertWarps + warp] = best.e[kPerWarp].key;
      }
    }
    __syncthreads();
    // Each path's best P of its warp candidates (ranked in the output order; placeholders, all
    // alike, by slot).
    for (int e = threadIdx.x; e < paths * kCertPerPath; e += kThreads) {
      const int l = e / kCertPerPath, j = e % kCertPerPath;
      const KeyId me{w_key[e], w_id[e]};
      int rank = 0;
      for (int j2 = 0; j2 < kCertPerPath; ++j2) {
        const KeyId other{w_key[l * kCertPerPath + j2], w_id[l * kCertPerPath + j2]};
        rank += better(other, me) || (other.key == me.key && other.id == me.id && j2 < j);
      }
      w_rank[e] = rank;
      if (rank < per_path) cand[l * per_path + rank] = me.key != 0u ? me.id : -1;
    }
    __syncthreads();
    // The groups' bounds: the fifth best, or the best candidate of the group that did not stay.
    for (int e = threadIdx.x; e < paths * kCertWarps; e += kThreads) {
      const int l = e / kCertWarps, w = e % kCertWarps;
      uint32_t key = w_fifth[e];
      for (int j = 0; j < kPerWarp; ++j) {
        const int slot = l * kCertPerPath + w * kPerWarp + j;
        if (w_rank[slot] >= per_path && w_key[slot] > key) key = w_key[slot];
      }
      bound[((b * chunks + c) * kCertWarps + w) * paths + l] = key;
    }
    // Candidates named by several paths count once (the first); their logits on every path.
    for (int e = threadIdx.x; e < k_cands; e += kThreads) {
      int32_t id = cand[e];
      for (int e2 = 0; id >= 0 && e2 < e; ++e2)
        if (cand[e2] == id) id = -1;
      const int64_t slot = (b * chunks + c) * k_cands + e;
      cand_id[slot] = id;
      for (int l = 0; l < paths; ++l)
        cand_x[slot * paths + l] =
            id >= 0 ? x[row_offset(layout, b * paths + l) + id * layout.v_stride] : T{};
    }
    __syncthreads();
  }
}

// Pass 2 of the certified path: one block per batch row (see above). done[b] = 1 when the row's
// top m is written to out_val / out_id, 0 when the second pass must find it.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) marginal_certify_kernel(
    int64_t batch, int paths, int64_t chunks, int m, const float* __restrict__ coef,
    const float* __restrict__ row_max, const uint32_t* __restrict__ bound,
    const int32_t* __restrict__ cand_id, const T* __restrict__ cand_x,
    float* __restrict__ out_val, int64_t* __restrict__ out_id, int32_t* __restrict__ done) {
  extern __shared__ uint32_t dyn[];
  __shared__ TopkShared sh;
  __shared__ uint32_t sel_key[kTopkMaxK];
  __shared__ int32_t sel_index[kTopkMaxK];
  __shared__ uint32_t top_key[kCertifyMaxM + 1];
  __shared__ int32_t top_id[kCertifyMaxM + 1];
  __shared__ float s_coef[kCertifyMaxPaths], s_max[kCertifyMaxPaths];
  __shared__ float scratch[kThreads / kWarp];
  __shared__ int iscratch[kThreads / kWarp];
  const int n = static_cast<int>(chunks * paths * m);  // candidates: L * m per chunk
  const int64_t groups = chunks * kCertWarps;
  uint32_t* keys = dyn;
  int32_t* ids = reinterpret_cast<int32_t*>(dyn + n);
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    for (int l = threadIdx.x; l < paths; l += kThreads) {
      s_coef[l] = coef[b * paths + l];
      s_max[l] = row_max[b * paths + l];
    }
    __syncthreads();
    // The bounds hold only for coefficients >= 0 (weights are, unless their check was skipped).
    int bad = 0;
    for (int l = 0; l < paths; ++l) bad |= !(s_coef[l] >= 0.0f);
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int32_t id = cand_id[b * n + i];
      if (id < 0) {
        keys[i] = 0u;  // below every value
        ids[i] = 0x7fffffff;
        continue;
      }
      float q = 0.0f;
      for (int l = 0; l < paths; ++l)
        if (s_coef[l] != 0.0f)
          q = marginal_term(s_coef[l], load_f(cand_x + (b * n + i) * paths + l), s_max[l], q);
      bad |= !isfinite(q);
      keys[i] = rank_key(q);
      ids[i] = id;
    }
    float u_max = 0.0f;
    for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
      float u = 0.0f;
      for (int l = 0; l < paths; ++l) {
        const uint32_t key = bound[(b * groups + g) * paths + l];
        if (s_coef[l] != 0.0f && key != 0u)
          u = marginal_term(s_coef[l], key_value(key), s_max[l], u);
      }
      bad |= !isfinite(u);
      u_max = fmaxf(u_max, u);
    }
    bad = block_sum<kThreads>(bad, iscratch);
    u_max = block_max<kThreads>(u_max, scratch);
    const int kk = m + 1 < n ? m + 1 : n;
    block_topk<kThreads>(
        keys, n, kk, [&](int32_t i) { return static_cast<int64_t>(ids[i]); }, sel_key, sel_index,
        sh, [&](int rank, uint32_t key, int32_t index) {
          top_key[rank] = key;
          top_id[rank] = ids[index];
        });
    if (threadIdx.x == 0) {
      // The m-th candidate must be a real token, not tie the next one, and beat every bound by
      // more than the few units in the last place that exp and the sum may be off by.
      const float tau = key_value(top_key[m - 1]);
      const bool ok = bad == 0 && top_key[m - 1] != 0u &&
                      (kk == m || top_key[m] < top_key[m - 1]) &&
                      tau > u_max * (1.0f + 1e-5f) + 1e-30f;
      done[b] = ok ? 1 : 0;
      if (ok) {
        for (int r = 0; r < m; ++r) {
          out_val[b * m + r] = key_value(top_key[r]);
          out_id[b * m + r] = top_id[r];
        }
      }
    }
    __syncthreads();
  }
}

unsigned grid_y(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxGridY ? (rows > 0 ? rows : 1) : kMaxGridY);
}

// The streamed marginalize's grid: the blocks resident at once.
int64_t stream_capacity() { return static_cast<int64_t>(kStreamBlocksPerSm) * device_sms(); }

// Claims between a chunk's phase 1 and its phase 2: at least a row (so that a row's phase 1 is
// all claimed before its phase 2), plus half the resident blocks so that the row's last phase-1
// items are likely done when its phase 2 is claimed; at most every item.
int64_t stream_lag(int64_t batch, int64_t chunks, int64_t capacity) {
  return std::min<int64_t>(batch * chunks, chunks + capacity / 2);
}

}  // namespace

void launch_topk_partial(const void* x, DType dtype, int64_t rows, int64_t vocab, RowLayout layout,
                         float scale, int k, float* part_max, float* part_sum, uint32_t* cand_key,
                         int32_t* cand_id, cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return;
  const dim3 grid(static_cast<unsigned>(topk_chunks(vocab)), grid_y(rows));
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    topk_partial_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), rows, vocab,
                                                         layout, scale, k, part_max, part_sum,
                                                         cand_key, cand_id);
  });
}

void launch_topk_merge(int64_t rows, int64_t chunks, int k, const float* part_max,
                       const float* part_sum, const uint32_t* cand_key, const int32_t* cand_id,
                       TopkOut mode, float scale, float* out_val, int64_t* out_id, float* row_max,
                       const int32_t* skip, cudaStream_t stream) {
  if (rows == 0) return;
  const size_t smem = static_cast<size_t>(chunks * k) * (sizeof(uint32_t) + sizeof(int32_t));
  allow_dynamic_smem<topk_merge_kernel>(smem);
  topk_merge_kernel<<<row_blocks(rows), kThreads, smem, stream>>>(rows, chunks, k, part_max, part_sum,
                                                      cand_key, cand_id, mode, scale, out_val,
                                                      out_id, row_max, skip);
}

void launch_stats_merge(int64_t rows, int64_t chunks, const float* part_max, const float* part_sum,
                        float scale, float* row_max, float* row_sum, cudaStream_t stream) {
  if (rows == 0) return;
  stats_merge_kernel<<<static_cast<unsigned>(ceil_div(rows, 128)), 128, 0, stream>>>(
      rows, chunks, part_max, part_sum, scale, row_max, row_sum);
}

void launch_rank_keys(const void* x, DType dtype, int64_t rows, int64_t vocab, RowLayout layout,
                      int32_t* keys, cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return;
  const int64_t blocks = ceil_div(vocab, kThreads);
  const dim3 grid(static_cast<unsigned>(blocks < 4096 ? blocks : 4096), grid_y(rows));
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    rank_keys_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), rows, vocab,
                                                      layout, keys);
  });
}

void launch_topk_from_sorted(int64_t rows, int k, const int32_t* sorted_keys, int64_t key_stride,
                             const int64_t* sorted_ids, int64_t id_stride, const float* row_max,
                             const float* row_sum, TopkOut mode, float scale, float* out_val,
                             int64_t* out_id, cudaStream_t stream) {
  const int64_t total = rows * k;
  if (total == 0) return;
  const int64_t blocks = ceil_div(total, kThreads);
  topk_from_sorted_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kThreads, 0,
                            stream>>>(rows, k, sorted_keys, key_stride, sorted_ids, id_stride,
                                      row_max, row_sum, mode, scale, out_val, out_id);
}

void launch_marginal_plan(int64_t batch, int64_t paths, int64_t chunks, const float* part_max,
                          const float* part_sum, const float* weights, bool renormalize,
                          float* coef, float* row_max, cudaStream_t stream) {
  if (batch == 0 || paths == 0) return;
  marginal_plan_kernel<<<static_cast<unsigned>(ceil_div(batch, 64)), 64, 0, stream>>>(
      batch, paths, chunks, part_max, part_sum, weights, renormalize, coef, row_max);
}

void launch_marginalize(const void* x, DType dtype, int64_t batch, int64_t paths, int64_t vocab,
                        RowLayout layout, const float* coef, const float* row_max, float* out,
                        cudaStream_t stream) {
  if (batch == 0 || vocab == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(vocab, kThreads * 4)), grid_y(batch));
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    marginalize_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), batch, paths,
                                                        vocab, layout, coef, row_max, out);
  });
}

int64_t marginal_stream_chunk(int64_t batch, int64_t paths, int64_t vocab, DType dtype) {
  if (batch < 1 || paths < 1 || vocab < 1) return 0;
  const int64_t l2 = device_l2_bytes(), blocks = stream_capacity();
  const int64_t elem = dtype == DType::F32 ? 4 : 2;
  // The largest chunk whose lag fits half the L2 (the rest: other traffic, and the
  // L2's halves), with enough items for the grid; 0 when not even kStreamMinChunk fits.
  for (int64_t chunk = kTopkChunk; chunk >= kStreamMinChunk; chunk /= 2) {
    const int64_t chunks = topk_chunks_of(vocab, chunk);
    const int64_t lag = stream_lag(batch, chunks, blocks);
    if (lag * paths * chunk * elem > l2 / 2) continue;
    if (2 * batch * chunks >= blocks || chunk == kStreamMinChunk) return chunk;
  }
  return 0;
}

int64_t marginal_stream_parts(int64_t vocab, int64_t chunk) {
  return topk_chunks_of(vocab, chunk) * (kThreads / kWarp);
}

void launch_marginalize_stream(const void* x, DType dtype, int64_t batch, int64_t paths,
                               int64_t vocab, RowLayout layout, int64_t chunk,
                               const float* weights, bool renormalize, int32_t* queue,
                               float* part_max, float* part_sum, float* coef, float* row_max,
                               float* out, cudaStream_t stream) {
  if (batch == 0 || vocab == 0) return;
  const int64_t chunks = topk_chunks_of(vocab, chunk), n1 = batch * chunks;
  const int64_t capacity = stream_capacity();
  const int64_t blocks = std::min<int64_t>(2 * n1, capacity);
  const int64_t lag = stream_lag(batch, chunks, capacity);
  const int64_t per_block = ceil_div(2 * n1, blocks);
  auto* next = reinterpret_cast<Claim*>(queue);
  int* arrived = queue + 2;
  int* ready = arrived + batch;
  const size_t smem = static_cast<size_t>(chunk) * sizeof(float);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    marginalize_stream_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        static_cast<const T*>(x), batch, paths, vocab, layout, static_cast<int>(chunk), lag,
        per_block, weights, renormalize, next, arrived, ready, part_max, part_sum, coef, row_max,
        out);
  });
}

void launch_marginal_topk_partial(const void* x, DType dtype, int64_t batch, int64_t paths,
                                  int64_t vocab, RowLayout layout, const float* coef,
                                  const float* row_max, int m, const int32_t* skip,
                                  uint32_t* cand_key, int32_t* cand_id, cudaStream_t stream) {
  if (batch == 0 || vocab == 0) return;
  const dim3 grid(static_cast<unsigned>(topk_chunks(vocab)), grid_y(batch));
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    marginal_topk_partial_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), batch, paths, vocab, layout, coef, row_max, m, skip, cand_key,
        cand_id);
  });
}

int64_t marginal_certify_chunk(int64_t batch, int64_t paths, int64_t vocab, int m) {
  if (paths < 1 || paths > kCertifyMaxPaths || m < 1 || m > kCertifyMaxM || vocab < 1) return 0;
  // The largest chunk whose candidates fit the merge; smaller ones while the grid is short of two
  // blocks per multiprocessor (pass 1 takes all paths of a chunk in one block).
  const auto cands = [&](int64_t chunk) { return topk_chunks_of(vocab, chunk) * paths * m; };
  int64_t chunk = kTopkChunk;
  while (chunk > kCertifyMinChunk && cands(chunk) > kTopkMaxMerge) chunk /= 2;
  if (cands(chunk) > kTopkMaxMerge) return 0;
  const int64_t target = 2 * static_cast<int64_t>(device_sms());
  while (chunk > kCertifyMinChunk && batch * topk_chunks_of(vocab, chunk) < target &&
         cands(chunk / 2) <= kTopkMaxMerge)
    chunk /= 2;
  return chunk;
}

void launch_marginal_certify_partial(const void* x, DType dtype, int64_t batch, int64_t paths,
                                     int64_t vocab, RowLayout layout, int64_t chunk, int m,
                                     float* part_max, float* part_sum, uint32_t* bound,
                                     int32_t* cand_id, void* cand_x, cudaStream_t stream) {
  if (batch == 0 || vocab == 0) return;
  const dim3 grid(static_cast<unsigned>(topk_chunks_of(vocab, chunk)), grid_y(batch));
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    marginal_certify_partial_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), batch, static_cast<int>(paths), vocab, layout,
        static_cast<int>(chunk), m, part_max, part_sum, bound, cand_id, static_cast<T*>(cand_x));
  });
}

void launch_marginal_certify(DType dtype, int64_t batch, int64_t paths, int64_t chunks, int m,
                             const float* coef, const float* row_max, const uint32_t* bound,
                             const int32_t* cand_id, const void* cand_x, float* out_val,
                             int64_t* out_id, int32_t* done, cudaStream_t stream) {
  if (batch == 0) return;
  const size_t smem =
      static_cast<size_t>(chunks * paths * m) * (sizeof(uint32_t) + sizeof(int32_t));
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    allow_dynamic_smem<marginal_certify_kernel<T>>(smem);
    marginal_certify_kernel<T><<<row_blocks(batch), kThreads, smem, stream>>>(
        batch, static_cast<int>(paths), chunks, m, coef, row_max, bound, cand_id,
        static_cast<const T*>(cand_x), out_val, out_id, done);
  });
}

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
