// The decode-size unembedding with a running top-k on tensor cores, for float16 and bfloat16 tables
// on devices of compute capability 8.0 and newer: logits = z[rows, D] . table[V, D]^T for at most
// 64 float32 rows, the table streamed once, the logits never written (the contract of
// launch_unembed_topk_partial, cuda_launch.h). At decode sizes the CUDA-core kernel
// (unembed_kernels.cu) does 2 * rows float32 operations per table element, which beyond about 16
// rows takes longer than reading the table; here the products run on tensor cores.
//
// Precision. Tensor cores multiply 16-bit operands, so each row of z is split into two parts of the
// table's type, z = scale * (hi + lo), scale a power of two per row that brings the row's largest
// magnitude just below 1 (float16 then neither overflows nor loses small elements to its range),
// and logits = scale * (hi . w + lo . w), accumulated in float32. hi + lo keeps 16 (bfloat16) or 22
// (float16) significant bits of each element of z, against float32's 24, so the logits agree with
// the float32 product of the CUDA-core kernel and the CPU kernel to about 2^-17 relative per term.
// A first small kernel writes the two parts (zero-padded) and the scales into the workspace.
//
// Block (256 threads = 8 warps): a contiguous slice of the vocabulary, in tiles of 256 table rows.
// Stages of 32 depth elements of the table ([256, 32]) and of hi and lo ([RB, 32] each) are copied
// to shared memory with cp.async, kStages - 1 stages ahead of the one being multiplied, so each
// block keeps about 40-60 KB of loads in flight. Warp (wm, wn) of a WM x WN grid owns an
// [RB / WM, 256 / WN] part of the tile's logits as FM x FN 16 x 16 wmma accumulators. When a
// tile's depth is complete, the accumulators go to shared memory and the block folds them, 128
// columns at a time, into the running top-k and softmax statistics of unembed_topk.cuh.
#include <cuda_pipeline.h>
#include <mma.h>

#include "unembed_mma.h"
#include "unembed_topk.cuh"

namespace mtp_ext {
namespace kernels {
namespace cuda {
namespace {

constexpr int kMDK = 32;         // depth per stage
constexpr int kMLd = kMDK + 8;   // row pitch of a staged tile in elements: 80 bytes, so the eight
                                 // 16-byte rows a fragment load reads fall in distinct banks
constexpr int kMStages = 3;      // stages in shared memory (two in flight while one is used)
constexpr int kSplitThreads = 256;

template <typename T>
struct MmaElement;
template <>
struct MmaElement<bf16> {
  using type = __nv_bfloat16;
};
template <>
struct MmaElement<f16> {
  using type = __half;
};

__device__ __forceinline__ bf16 round_to(bf16, float x) { return to_bf16(x); }
__device__ __forceinline__ f16 round_to(f16, float x) { return to_f16(x); }

// The shapes of the tensor-core kernel for RB (16, 32 or 64) rows.
template <int RB>
struct MmaShape {
  static constexpr int WM = RB >= 32 ? RB / 32 : 1;  // warps along the rows
  static constexpr int WN = 8 / WM;                  // and along the tile's 256 columns
  static constexpr int FM = RB / WM / 16;            // 16 x 16 accumulators per warp
  static constexpr int FN = kMmaTile / WN / 16;
  static constexpr int TR = RB / 16;  // rows per half-warp in the fold
  static constexpr int kZ = RB * kMLd;  // elements of hi (then lo) in a stage
  static constexpr int kStage = 2 * kZ + kMmaTile * kMLd;  // hi, lo, then the table's rows
  static constexpr int kFoldLd = kMmaTile + 4;  // row pitch of the folded logits, in floats
  static constexpr size_t kStageBytes = size_t(kStage) * 2;
  static constexpr size_t kFoldBytes = size_t(RB) * kFoldLd * sizeof(float) > sizeof(FinalRanking)
                                           ? size_t(RB) * kFoldLd * sizeof(float)
                                           : sizeof(FinalRanking);
  static constexpr size_t kSmem = kMStages * kStageBytes + kFoldBytes;
  // Blocks per SM that shared memory allows (85 KB for 16 rows, 108 KB for 32, 155 KB for 64, of
  // 228 KB per SM on sm_90, 164 KB on sm_80), which registers must allow too.
  static constexpr int kMinBlocks = RB <= 32 ? 2 : 1;
  // Per stage and thread: 16-byte copies of the table and of hi and lo.
  static constexpr int WQ = kMmaTile * kMDK / 8 / kUThreads;
  static constexpr int ZQ = (2 * RB * kMDK / 8 + kUThreads - 1) / kUThreads;
  static_assert(WM * WN == 8 && FM >= 1 && FN >= 1, "eight warps cover the tile");
  static_assert(kStageBytes % 128 == 0, "every stage starts 128-byte aligned");
};

int rows_tile(int64_t rows) { return rows <= 16 ? 16 : rows <= 32 ? 32 : 64; }
int64_t padded_depth(int64_t depth) { return ceil_div(depth, kMDK) * kMDK; }

// Row r of z (one block per row of the padded [rows_pad, depth_pad] parts): scale[r] = 2^e with
// |z[r, d]| < 2^e for every d (1 for a row of zeros, NaN or infinities), hi = z / 2^e rounded to
// T, lo = (z / 2^e - hi) rounded to T (0 where hi is not finite); zeros past rows and depth.
template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
    split_rows_kernel(const float* __restrict__ z, int64_t rows, int64_t depth, int64_t rows_pad,
                      int64_t depth_pad, T* __restrict__ hi, T* __restrict__ lo,
                      float* __restrict__ scale) {
  __shared__ float warp_max[kSplitThreads / kWarp];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  float m = 0.0f;
  if (r < rows)
    for (int64_t d = tid; d < depth; d += kSplitThreads) m = fmaxf(m, fabsf(z[r * depth + d]));
  for (int o = kWarp / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (tid % kWarp == 0) warp_max[tid / kWarp] = m;
  __syncthreads();
  m = warp_max[0];
  for (int w = 1; w < kSplitThreads / kWarp; ++w) m = fmaxf(m, warp_max[w]);
  // m < 2^(E - 126) for a biased exponent E; e is clamped so that 2^-e and 2^e are normal.
  int e = 0;
  if (m > 0.0f && m <= 3.402823466e38f) {
    e = static_cast<int>((__float_as_uint(m) >> 23) & 0xffu) - 126;
    e = e < -125 ? -125 : (e > 126 ? 126 : e);
  }
  const float down = __uint_as_float(static_cast<uint32_t>(127 - e) << 23);
  for (int64_t d = tid; d < depth_pad; d += kSplitThreads) {
    const float x = r < rows && d < depth ? z[r * depth + d] * down : 0.0f;
    const T h = round_to(T{}, x);
    const float hf = to_float(h);
    const bool finite = fabsf(hf) <= 3.402823466e38f;
    hi[r * depth_pad + d] = h;
    lo[r * depth_pad + d] = round_to(T{}, finite ? x - hf : 0.0f);
  }
  if (tid == 0) scale[r] = __uint_as_float(static_cast<uint32_t>(127 + e) << 23);
}

// One stage: table rows [v0, v0 + 256) (clamped to the table; the fold ignores rows >= v_end) and
// depth [d0, d0 + 32) (zero-filled past depth), and the same depth of hi and lo.
template <typename T, int RB>
__device__ __forceinline__ void issue_stage(T* stage, const T* __restrict__ w, int64_t w_row_stride,
                                            int64_t vocab, int64_t depth, const T* __restrict__ hi,
                                            const T* __restrict__ lo, int64_t depth_pad,
                                            int64_t v0, int64_t d0) {
  using S = MmaShape<RB>;
  const int tid = threadIdx.x;
#pragma unroll
  for (int q = 0; q < S::ZQ; ++q) {
    const int c = tid + q * kUThreads;
    if (c < 2 * RB * kMDK / 8) {
      const int part = c % (kMDK / 8), r = (c / (kMDK / 8)) % RB, which = c / (RB * kMDK / 8);
      const T* src = (which == 0 ? hi : lo) + r * depth_pad + d0 + part * 8;
      __pipeline_memcpy_async(stage + which * S::kZ + r * kMLd + part * 8, src, 16);
    }
  }
  T* ws = stage + 2 * S::kZ;
#pragma unroll
  for (int q = 0; q < S::WQ; ++q) {
    const int c = tid + q * kUThreads;
    const int part = c % (kMDK / 8), row = c / (kMDK / 8);
    const int64_t v = v0 + row < vocab ? v0 + row : vocab - 1;
    const int64_t d = d0 + part * 8;
    // depth % 8 == 0: a 16-byte piece is all inside the depth or all past it (zero-filled, and
    // then read from the row's start, which is valid).
    const bool inside = d < depth;
    __pipeline_memcpy_async(ws + row * kMLd + part * 8, w + v * w_row_stride + (inside ? d : 0),
                            16, inside ? 0 : 16);
  }
}

// Block b takes table rows [b * per_block, min(vocab, (b + 1) * per_block)), per_block a multiple
// of kMmaTile. hi, lo: [RB, depth_pad] of T (split_rows_kernel); scale: [RB] float; w: [vocab,
// depth] with rows w_row_stride apart, 16-byte aligned, depth % 8 == 0. Writes what
// unembed_topk_partial_kernel writes (RunningTopk::finish). Dynamic shared memory:
// MmaShape<RB>::kSmem bytes.
template <typename T, int RB>
__global__ void __launch_bounds__(kUThreads, MmaShape<RB>::kMinBlocks) unembed_topk_partial_mma_kernel(
    const T* __restrict__ hi, const T* __restrict__ lo, const float* __restrict__ scale,
    int64_t rows, int64_t depth, int64_t depth_pad, const T* __restrict__ w, int64_t w_row_stride,
    int64_t vocab, int64_t per_block, int k, float* __restrict__ part_max,
    float* __restrict__ part_sum, uint32_t* __restrict__ cand_key,
    int32_t* __restrict__ cand_id) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there: unembed_mma_available checks the compute capability
#else
  using namespace nvcuda;
  using S = MmaShape<RB>;
  using MT = typename MmaElement<T>::type;
  extern __shared__ __align__(128) uint8_t mma_smem[];
  T* stages = reinterpret_cast<T*>(mma_smem);
  float* folded = reinterpret_cast<float*>(mma_smem + kMStages * S::kStageBytes);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, warp = tid / kWarp;
  const int wm = warp / S::WN, wn = warp % S::WN;
  const int64_t v_begin = blockIdx.x * per_block;
  const int64_t v_end = v_begin + per_block < vocab ? v_begin + per_block : vocab;
  const int64_t depth_stages = depth_pad / kMDK;
  const int64_t stages_total = (v_end - v_begin + kMmaTile - 1) / kMmaTile * depth_stages;
  const bool with_stats = part_max != nullptr;

  float row_scale[S::TR];
#pragma unroll
  for (int i = 0; i < S::TR; ++i) row_scale[i] = ty * S::TR + i < rows ? scale[ty * S::TR + i] : 1;
  RunningTopk<S::TR> top;
  top.init(k);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[S::FM][S::FN];
#pragma unroll
  for (int i = 0; i < S::FM; ++i)
#pragma unroll
    for (int j = 0; j < S::FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // Stage s covers tile s / depth_stages at depth (s % depth_stages) * kMDK, in buffer
  // s % kMStages. Every thread commits one batch per stage, empty past the end, so that
  // __pipeline_wait_prior counts stages.
  auto issue = [&](int64_t s) {
    if (s < stages_total) {
      issue_stage<T, RB>(stages + (s % kMStages) * S::kStage, w, w_row_stride, vocab, depth, hi,
                         lo, depth_pad, v_begin + (s / depth_stages) * kMmaTile,
                         (s % depth_stages) * kMDK);
    }
    __pipeline_commit();
  };
  for (int s = 0; s < kMStages - 1; ++s) issue(s);

  for (int64_t s = 0; s < stages_total; ++s) {
    __pipeline_wait_prior(kMStages - 2);  // this thread's copies of stage s have landed
    __syncthreads();  // everyone's have, and stage s - 1 is no longer read: refill its buffer
    issue(s + kMStages - 1);
    const T* stage = stages + (s % kMStages) * S::kStage;
    const MT* zh = reinterpret_cast<const MT*>(stage);
    const MT* zl = zh + S::kZ;
    const MT* ws = zh + 2 * S::kZ;
#pragma unroll
    for (int kk = 0; kk < kMDK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> b[S::FN];
#pragma unroll
      for (int j = 0; j < S::FN; ++j)
        wmma::load_matrix_sync(b[j], ws + ((wn * S::FN + j) * 16) * kMLd + kk, kMLd);
#pragma unroll
      for (int i = 0; i < S::FM; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> a_hi, a_lo;
        const int r0 = (wm * S::FM + i) * 16;
        wmma::load_matrix_sync(a_hi, zh + r0 * kMLd + kk, kMLd);
        wmma::load_matrix_sync(a_lo, zl + r0 * kMLd + kk, kMLd);
#pragma unroll
        for (int j = 0; j < S::FN; ++j) {
          wmma::mma_sync(acc[i][j], a_hi, b[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], a_lo, b[j], acc[i][j]);
        }
      }
    }
    if (s % depth_stages != depth_stages - 1) continue;

    // The tile is complete (block-uniform): its logits to shared memory, then the fold.
#pragma unroll
    for (int i = 0; i < S::FM; ++i) {
#pragma unroll
      for (int j = 0; j < S::FN; ++j) {
        float* dst = folded + ((wm * S::FM + i) * 16) * S::kFoldLd + (wn * S::FN + j) * 16;
        wmma::store_matrix_sync(dst, acc[i][j], S::kFoldLd, wmma::mem_row_major);
        wmma::fill_fragment(acc[i][j], 0.0f);
      }
    }
    __syncthreads();
    const int64_t v0 = v_begin + (s / depth_stages) * kMmaTile;
#pragma unroll
    for (int half = 0; half < kMmaTile / kUFoldCols; ++half) {
#pragma unroll
      for (int i = 0; i < S::TR; ++i) {
        const float* row = folded + (ty * S::TR + i) * S::kFoldLd + half * kUFoldCols;
        const float4 x0 = *reinterpret_cast<const float4*>(row + tile_column(tx, 0));
        const float4 x1 = *reinterpret_cast<const float4*>(row + tile_column(tx, 4));
        const float c = row_scale[i];
        const float x[8] = {x0.x * c, x0.y * c, x0.z * c, x0.w * c,
                            x1.x * c, x1.y * c, x1.z * c, x1.w * c};
        top.fold(i, x, v0 + half * kUFoldCols, v_end, ty * S::TR + i < rows, with_stats);
      }
    }
    // The next store into `folded` follows the next iteration's barrier.
  }
  __syncthreads();  // the final ranking reuses `folded`
  top.finish(rows, k, with_stats, *reinterpret_cast<FinalRanking*>(folded), part_max, part_sum,
             cand_key, cand_id);
#endif
}

template <typename T, int RB>
void launch_mma(const float* z, int64_t rows, int64_t depth, const T* w, int64_t w_row_stride,
                int64_t vocab, int k, int64_t chunks, int64_t per_block, float* part_max,
                float* part_sum, uint32_t* cand_key, int32_t* cand_id, void* workspace,
                cudaStream_t stream) {
  using S = MmaShape<RB>;
  const int64_t depth_pad = padded_depth(depth);
  T* hi = static_cast<T*>(workspace);
  T* lo = hi + RB * depth_pad;
  float* scale = reinterpret_cast<float*>(lo + RB * depth_pad);
  split_rows_kernel<T><<<RB, kSplitThreads, 0, stream>>>(z, rows, depth, RB, depth_pad, hi, lo,
                                                          scale);
  // Over 48 KB of dynamic shared memory needs the opt-in (per device; cheap to repeat). A failure
  // surfaces as the launch's error.
  cudaFuncSetAttribute(unembed_topk_partial_mma_kernel<T, RB>,
                       cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(S::kSmem));
  unembed_topk_partial_mma_kernel<T, RB>
      <<<static_cast<unsigned>(chunks), kUThreads, S::kSmem, stream>>>(
          hi, lo, scale, rows, depth, depth_pad, w, w_row_stride, vocab, per_block, k, part_max,
          part_sum, cand_key, cand_id);
}

}  // namespace

bool unembed_mma_available(DType dtype) {
  return dtype != DType::F32 && device_compute_major() >= 8;
}

int unembed_mma_blocks_per_sm(int64_t rows) {
  const int rb = rows_tile(rows);
  return rb == 16 ? MmaShape<16>::kMinBlocks
                  : rb == 32 ? MmaShape<32>::kMinBlocks : MmaShape<64>::kMinBlocks;
}

size_t unembed_mma_workspace(int64_t rows, int64_t depth) {
  const size_t rb = static_cast<size_t>(rows_tile(rows));
  return 2 * rb * static_cast<size_t>(padded_depth(depth)) * 2 + rb * sizeof(float);
}

void launch_unembed_topk_partial_mma(const float* z, int64_t rows, int64_t depth, const void* w,
                                     DType dtype, int64_t w_row_stride, int64_t vocab, int k,
                                     int64_t chunks, int64_t per_block, float* part_max,
                                     float* part_sum, uint32_t* cand_key, int32_t* cand_id,
                                     void* workspace, cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return;
  const int rb = rows_tile(rows);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* wt = static_cast<const T*>(w);
    if (rb == 16) {
      launch_mma<T, 16>(z, rows, depth, wt, w_row_stride, vocab, k, chunks, per_block, part_max,
                        part_sum, cand_key, cand_id, workspace, stream);
    } else if (rb == 32) {
      launch_mma<T, 32>(z, rows, depth, wt, w_row_stride, vocab, k, chunks, per_block, part_max,
                        part_sum, cand_key, cand_id, workspace, stream);
    } else {
      launch_mma<T, 64>(z, rows, depth, wt, w_row_stride, vocab, k, chunks, per_block, part_max,
                        part_sum, cand_key, cand_id, workspace, stream);
    }
  };
  if (dtype == DType::BF16) {
    run(bf16{});
  } else {
    run(f16{});
  }
}

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
