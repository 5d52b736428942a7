// The decode-size unembedding with a running top-k on CUDA cores: logits = z[rows, D] .
// table[V, D]^T for at most 64 float32 rows, streamed once over the table (in its own dtype) with, per row, a
// running top-k and online softmax statistics (unembed_topk.cuh). The [rows, V] logits are never
// written: each block writes the k best candidates and the softmax statistics of its slice of the
// vocabulary, in the layout of launch_topk_partial, and launch_topk_merge finishes
// (fused_mtp_heads, verify_tree_from_hidden). Float32 tables, and devices without bfloat16 tensor
// cores, take this kernel; 16-bit tables on compute capability 8.0 and newer take the tensor-core
// kernel of mma_kernels.cu.
//
// Block (256 threads = 16 x 16): a contiguous slice of the vocabulary, in tiles of 128 table rows.
// A tile's logits are the register tiles of rows_dot_table (dense_kernels.cu): stages of 32 depth
// elements of z ([RB, 32]) and of the table ([128, 32]) in shared memory as float, each thread a
// [RB / 16, 8] tile of logits; the next stage is loaded into registers (16-byte loads, raw bits)
// while the current one is multiplied. A half-warp (the 16 threads of one ty) then holds whole
// rows of the tile (16 lanes x 8 columns = 128), so the fold into the running state needs no
// shared memory.
#include "mma_launch.h"
#include "unembed_topk.cuh"

namespace mtp_ext {
namespace kernels {
namespace cuda {
namespace {

constexpr int kUVB = kUFoldCols;  // table rows per tile
constexpr int kUDK = 32;          // depth per stage

// Eight consecutive elements as raw bits (16-byte aligned): converted to float only when they are
// stored to shared memory, so the loads stay in flight while the previous stage is multiplied.
template <typename T>
struct Raw8 {
  uint4 v;
};
template <>
struct Raw8<float> {
  float4 a, b;
};

__device__ __forceinline__ void load_raw8(const float* p, Raw8<float>& r) {
  r.a = __ldg(reinterpret_cast<const float4*>(p));
  r.b = __ldg(reinterpret_cast<const float4*>(p) + 1);
}
template <typename T>
__device__ __forceinline__ void load_raw8(const T* p, Raw8<T>& r) {
  r.v = __ldg(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void zero_raw8(Raw8<float>& r) {
  r.a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  r.b = r.a;
}
template <typename T>
__device__ __forceinline__ void zero_raw8(Raw8<T>& r) {
  r.v = make_uint4(0u, 0u, 0u, 0u);  // +0.0 in float16 and bfloat16
}
__device__ __forceinline__ void unpack8(const Raw8<float>& r, float* out) {
  out[0] = r.a.x, out[1] = r.a.y, out[2] = r.a.z, out[3] = r.a.w;
  out[4] = r.b.x, out[5] = r.b.y, out[6] = r.b.z, out[7] = r.b.w;
}
__device__ __forceinline__ void unpack8(const Raw8<f16>& r, float* out) {
  const uint32_t w[4] = {r.v.x, r.v.y, r.v.z, r.v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
__device__ __forceinline__ void unpack8(const Raw8<bf16>& r, float* out) {
  const uint32_t w[4] = {r.v.x, r.v.y, r.v.z, r.v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <typename T, int RB>
struct UnembedShared {
  __align__(16) float zs[kUDK][RB];
  __align__(16) float ws[kUDK][kUVB + 4];
  FinalRanking fin;
};

// Per-thread share of one stage's loads: ZQ float4 of z, WQ groups of 8 table elements.
template <int RB>
struct StageShape {
  static constexpr int kZ4 = RB * kUDK / 4;  // float4 of z per stage
  static constexpr int ZQ = (kZ4 + kUThreads - 1) / kUThreads;
  static constexpr int WQ = kUVB * kUDK / 8 / kUThreads;
};

template <typename T, int RB>
__device__ __forceinline__ void load_stage(const float* __restrict__ z, int64_t rows,
                                           int64_t depth, const T* __restrict__ w,
                                           int64_t w_row_stride, int64_t v0, int64_t v_end,
                                           int64_t d0, float4 (&zr)[StageShape<RB>::ZQ],
                                           Raw8<T> (&wr)[StageShape<RB>::WQ]) {
  using S = StageShape<RB>;
  const int tid = threadIdx.x;
#pragma unroll
  for (int q = 0; q < S::ZQ; ++q) {
    const int e = tid + q * kUThreads;
    const int r = e / (kUDK / 4), dq = (e % (kUDK / 4)) * 4;
    // depth % 8 == 0: a group of 4 is all in range or all out.
    if (e < S::kZ4 && r < rows && d0 + dq < depth) {
      zr[q] = __ldg(reinterpret_cast<const float4*>(z + r * depth + d0 + dq));
    } else {
      zr[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
#pragma unroll
  for (int q = 0; q < S::WQ; ++q) {
    const int e = tid + q * kUThreads;
    const int v = e / (kUDK / 8), dd = (e % (kUDK / 8)) * 8;
    const int64_t gv = v0 + v, gd = d0 + dd;
    if (gv < v_end && gd < depth) {
      load_raw8(w + gv * w_row_stride + gd, wr[q]);
    } else {
      zero_raw8(wr[q]);
    }
  }
}

template <typename T, int RB>
__device__ __forceinline__ void store_stage(UnembedShared<T, RB>& sh,
                                            const float4 (&zr)[StageShape<RB>::ZQ],
                                            const Raw8<T> (&wr)[StageShape<RB>::WQ]) {
  using S = StageShape<RB>;
  const int tid = threadIdx.x;
#pragma unroll
  for (int q = 0; q < S::ZQ; ++q) {
    const int e = tid + q * kUThreads;
    if (e < S::kZ4) {
      const int r = e / (kUDK / 4), dq = (e % (kUDK / 4)) * 4;
      sh.zs[dq][r] = zr[q].x;
      sh.zs[dq + 1][r] = zr[q].y;
      sh.zs[dq + 2][r] = zr[q].z;
      sh.zs[dq + 3][r] = zr[q].w;
    }
  }
#pragma unroll
  for (int q = 0; q < S::WQ; ++q) {
    const int e = tid + q * kUThreads;
    const int v = e / (kUDK / 8), dd = (e % (kUDK / 8)) * 8;
    float vals[8];
    unpack8(wr[q], vals);
#pragma unroll
    for (int j = 0; j < 8; ++j) sh.ws[dd + j][v] = vals[j];
  }
}

// Block b takes table rows [b * per_block, min(vocab, (b + 1) * per_block)), per_block a multiple
// of kUVB. z: [rows, depth] float32 contiguous, rows <= RB; w: [vocab, depth] with rows
// w_row_stride apart, 16-byte aligned, depth % 8 == 0. Writes, for every row r < rows and this
// block c (chunks = gridDim.x): part_max/part_sum[r * chunks + c] (unless part_max is null) and
// the block's k best as keys and ids, best first, padded with key 0 and id 0x7fffffff, at
// cand_key/cand_id[(r * chunks + c) * k ..].
template <typename T, int RB>
__global__ void __launch_bounds__(kUThreads) unembed_topk_partial_kernel(
    const float* __restrict__ z, int64_t rows, int64_t depth, const T* __restrict__ w,
    int64_t w_row_stride, int64_t vocab, int64_t per_block, int k, float* __restrict__ part_max,
    float* __restrict__ part_sum, uint32_t* __restrict__ cand_key,
    int32_t* __restrict__ cand_id) {
  constexpr int TR = RB / 16;
  using S = StageShape<RB>;
  __shared__ UnembedShared<T, RB> sh;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t v_begin = blockIdx.x * per_block;
  const int64_t v_end = v_begin + per_block < vocab ? v_begin + per_block : vocab;
  const int64_t depth_stages = (depth + kUDK - 1) / kUDK;
  const int64_t stages = ((v_end - v_begin + kUVB - 1) / kUVB) * depth_stages;
  const bool with_stats = part_max != nullptr;

  RunningTopk<TR> top;
  top.init(k);
  float acc[TR][8];
#pragma unroll
  for (int i = 0; i < TR; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  float4 zr[S::ZQ];
  Raw8<T> wr[S::WQ];
  if (stages > 0) load_stage<T, RB>(z, rows, depth, w, w_row_stride, v_begin, v_end, 0, zr, wr);
  for (int64_t s = 0; s < stages; ++s) {
    const int64_t tile = s / depth_stages, ds = s % depth_stages;
    const int64_t v0 = v_begin + tile * kUVB;
    store_stage<T, RB>(sh, zr, wr);
    __syncthreads();
    if (s + 1 < stages) {
      const int64_t next_tile = (s + 1) / depth_stages, next_ds = (s + 1) % depth_stages;
      load_stage<T, RB>(z, rows, depth, w, w_row_stride, v_begin + next_tile * kUVB, v_end,
                        next_ds * kUDK, zr, wr);
    }
    tile_fma<RB, kUDK, kUVB + 4>(sh.zs, sh.ws, tx, ty, acc);
    __syncthreads();  // the next iteration overwrites the stage
    if (ds != depth_stages - 1) continue;
    // The tile is complete: fold each row's 128 logits (8 per lane of its half-warp). This branch
    // is block-uniform (s is), so every lane reaches the shuffles of the fold.
#pragma unroll
    for (int i = 0; i < TR; ++i) {
      top.fold(i, acc[i], v0, v_end, ty * TR + i < rows, with_stats);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    }
  }
  top.finish(rows, k, with_stats, sh.fin, part_max, part_sum, cand_key, cand_id);
}

// Table rows per tile (and per block, a whole number of tiles) of the kernel serving `dtype`.
int tile_rows(DType dtype) { return mma_available(dtype) ? kMmaTile : kUVB; }

int64_t tiles_per_block(int64_t vocab, int64_t chunks, int tile) {
  return ceil_div(ceil_div(vocab, tile), chunks);
}

}  // namespace

namespace {

// An attribute of the current device, or `fallback` when the query fails or gives less than 1
// (the failure is cleared: a failed query is not a launch error).
int device_attribute_or(cudaDeviceAttr attr, int fallback) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess || value < 1) {
    cudaGetLastError();
    return fallback;
  }
  return value;
}

}  // namespace

int device_sms() { return device_attribute_or(cudaDevAttrMultiProcessorCount, 132); }
int device_l2_bytes() { return device_attribute_or(cudaDevAttrL2CacheSize, 0); }
int device_smem_per_sm() {
  return device_attribute_or(cudaDevAttrMaxSharedMemoryPerMultiprocessor, 0);
}
int device_compute_major() { return device_attribute_or(cudaDevAttrComputeCapabilityMajor, 0); }

bool unembed_topk_fits(int64_t rows, int64_t depth, const void* w, DType dtype,
                       int64_t w_row_stride, int64_t vocab, int k) {
  const int64_t item = dtype == DType::F32 ? 4 : 2;
  return rows >= 1 && rows <= kUnembedMaxRows && k >= 1 && k <= kTopkMaxK && k <= vocab &&
         vocab < (int64_t(1) << 31) - kMmaTile && depth >= 8 && depth % 8 == 0 &&
         (w_row_stride * item) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

size_t unembed_topk_workspace(int64_t rows, int64_t depth, DType dtype) {
  return mma_available(dtype) ? unembed_mma_workspace(rows, depth) : 0;
}

int64_t unembed_topk_chunks(int64_t rows, int64_t vocab, int k, DType dtype) {
  const int tile = tile_rows(dtype);
  const int64_t tiles = ceil_div(vocab, tile);
  // Resident blocks per SM. CUDA cores: about 4 with 16-row tiles, 1 with 64-row ones
  // (register-bound); tensor cores: bound by shared memory.
  const int64_t per_sm = tile == kMmaTile ? unembed_mma_blocks_per_sm(rows) : rows <= 16 ? 4 : 2;
  int64_t chunks = static_cast<int64_t>(device_sms()) * per_sm;
  const int64_t merge_cap = kTopkMaxMerge / k;  // what launch_topk_merge accepts
  if (chunks > merge_cap) chunks = merge_cap;
  if (chunks > tiles) chunks = tiles;
  if (chunks < 1) chunks = 1;
  // Every block gets whole tiles and at least one.
  return ceil_div(tiles, tiles_per_block(vocab, chunks, tile));
}

void launch_unembed_topk_partial(const float* z, int64_t rows, int64_t depth, const void* w,
                                 DType dtype, int64_t w_row_stride, int64_t vocab, int k,
                                 int64_t chunks, float* part_max, float* part_sum,
                                 uint32_t* cand_key, int32_t* cand_id, void* workspace,
                                 cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return;
  const int tile = tile_rows(dtype);
  const int64_t per_block = tiles_per_block(vocab, chunks, tile) * tile;
  if (tile == kMmaTile) {
    launch_unembed_topk_partial_mma(z, rows, depth, w, dtype, w_row_stride, vocab, k, chunks,
                                    per_block, part_max, part_sum, cand_key, cand_id, workspace,
                                    stream);
    return;
  }
  const unsigned grid = static_cast<unsigned>(chunks);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* wt = static_cast<const T*>(w);
    if (rows <= 16) {
      unembed_topk_partial_kernel<T, 16><<<grid, kUThreads, 0, stream>>>(
          z, rows, depth, wt, w_row_stride, vocab, per_block, k, part_max, part_sum, cand_key,
          cand_id);
    } else {
      unembed_topk_partial_kernel<T, 64><<<grid, kUThreads, 0, stream>>>(
          z, rows, depth, wt, w_row_stride, vocab, per_block, k, part_max, part_sum, cand_key,
          cand_id);
    }
  });
}

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
