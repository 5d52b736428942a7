// CUDA kernels of softmax_topk, marginalize and topk_marginalize, and the row top-k that
// fused_mtp_heads and verify_tree reuse.
//
// Pass 1 (one block per vocabulary chunk of one row): the chunk is read from device memory once,
// converted to ranking keys in shared memory while its softmax statistics are accumulated, and
// its k best keys are selected there (radix select). Pass 2 (one block per row) merges the
// chunks' statistics and candidates. topk_marginalize computes the marginal of a chunk on the fly
// in pass 1 (after a statistics pass over the logits) and never writes it.
#include "cuda_common.cuh"

namespace mtp_ext {
namespace kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

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
__global__ void __launch_bounds__(kThreads) topk_partial_kernel(
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

// The marginal over a chunk, computed on the fly, and its best m candidates.
template <typename T>
__global__ void __launch_bounds__(kThreads) marginal_topk_partial_kernel(
    const T* __restrict__ x, int64_t batch, int64_t paths, int64_t vocab, RowLayout layout,
    const float* __restrict__ coef, const float* __restrict__ row_max, int m,
    uint32_t* __restrict__ cand_key, int32_t* __restrict__ cand_id) {
  __shared__ PartialShared sh;
  float* s_acc = reinterpret_cast<float*>(sh.keys);  // the marginal, then its keys in place
  const int64_t chunks = gridDim.x;
  const int64_t chunk = blockIdx.x;
  const int64_t begin = chunk * kTopkChunk;
  const int n = static_cast<int>(vocab - begin < kTopkChunk ? vocab - begin : kTopkChunk);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int i = threadIdx.x; i < n; i += kThreads) s_acc[i] = 0.0f;
    __syncthreads();
    for (int64_t l = 0; l < paths; ++l) {
      const float c = coef[b * paths + l];
      // As the CPU kernel: a zero weight adds nothing, even to NaN logits.
      if (c != 0.0f) {
        const float mx = row_max[b * paths + l];
        const T* p = x + row_offset(layout, b * paths + l) + begin * layout.v_stride;
        block_for_each<kThreads>(p, n, layout.v_stride,
                                 [&](int i, float v) { s_acc[i] += c * expf(v - mx); });
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
    int64_t* __restrict__ out_id, float* __restrict__ row_max) {
  extern __shared__ uint32_t dyn[];
  __shared__ TopkShared sh;
  __shared__ uint32_t sel_key[kTopkMaxK];
  __shared__ int32_t sel_index[kTopkMaxK];
  __shared__ float scratch[2 * kThreads / kWarp];
  const int n = static_cast<int>(chunks * k);
  uint32_t* keys = dyn;
  int32_t* ids = reinterpret_cast<int32_t*>(dyn + n);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
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

// Weights and statistics into per-(b, l) coefficients; one thread per batch row, summing the
// weights in order as the CPU kernel does.
__global__ void marginal_plan_kernel(int64_t batch, int64_t paths, int64_t chunks,
                                     const float* __restrict__ part_max,
                                     const float* __restrict__ part_sum,
                                     const float* __restrict__ weights, bool renormalize,
                                     float* __restrict__ coef, float* __restrict__ row_max) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  float total = 0.0f;
  for (int64_t l = 0; l < paths; ++l) total += weights[b * paths + l];
  for (int64_t l = 0; l < paths; ++l) {
    const int64_t r = b * paths + l;
    Stats st = stats_empty();
    for (int64_t c = 0; c < chunks; ++c)
      st = stats_merge(st, Stats{part_max[r * chunks + c], part_sum[r * chunks + c]}, 1.0f);
    float w = weights[r];
    if (renormalize) w = total > 0.0f ? w / total : 0.0f;
    coef[r] = w / st.sum;
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
        if (i < vocab) acc[j] += c * expf(load_f(p + i * layout.v_stride) - mx);
      }
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t i = begin + j * kThreads + threadIdx.x;
      if (i < vocab) out[b * vocab + i] = acc[j];
    }
  }
}

unsigned grid_y(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxGridY ? (rows > 0 ? rows : 1) : kMaxGridY);
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
                       cudaStream_t stream) {
  if (rows == 0) return;
  const size_t smem = static_cast<size_t>(chunks * k) * (sizeof(uint32_t) + sizeof(int32_t));
  // Without the opt-in, static plus dynamic shared memory must fit in 48 KB; the kernel's own
  // static share (about 1.7 KB) counts too. A failed opt-in surfaces as the launch's error.
  static const size_t static_smem = [] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, topk_merge_kernel) == cudaSuccess ? attr.sharedSizeBytes
                                                                          : size_t{4096};
  }();
  if (smem + static_smem > 48 * 1024) {
    cudaFuncSetAttribute(topk_merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
  }
  const unsigned grid = static_cast<unsigned>(rows < 65535 * 16 ? rows : 65535 * 16);
  topk_merge_kernel<<<grid, kThreads, smem, stream>>>(rows, chunks, k, part_max, part_sum,
                                                      cand_key, cand_id, mode, scale, out_val,
                                                      out_id, row_max);
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

void launch_marginal_topk_partial(const void* x, DType dtype, int64_t batch, int64_t paths,
                                  int64_t vocab, RowLayout layout, const float* coef,
                                  const float* row_max, int m, uint32_t* cand_key,
                                  int32_t* cand_id, cudaStream_t stream) {
  if (batch == 0 || vocab == 0) return;
  const dim3 grid(static_cast<unsigned>(topk_chunks(vocab)), grid_y(batch));
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    marginal_topk_partial_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), batch, paths, vocab, layout, coef, row_max, m, cand_key,
        cand_id);
  });
}

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
