// Tensor-core kernels for float16 and bfloat16 tables on devices of compute capability 8.0 and
// newer, at decode sizes (a few float32 rows against a large table):
// - the unembedding with a running top-k: logits = z[rows, D] . table[V, D]^T for at most 64 rows,
//   the table streamed once, the logits never written (launch_unembed_topk_partial);
// - the dense product out = a . w^T for groups of rows and tables (launch_rows_dot_table: the
//   heads' residual blocks, the small-batch linear layer, the unembedding past 64 rows).
// On CUDA cores these do 2 * rows float32 operations per table element, which beyond about 16 rows
// takes longer than reading the table on an H100 / H200; here the products run on tensor cores.
//
// Precision. Tensor cores multiply 16-bit operands, so each float32 row of a (or z) is split into
// two parts of the table's type, a = scale * (hi + lo), scale a power of two per row that brings
// the row's largest magnitude just below 1 (float16 then neither overflows nor loses small elements
// to its range), and a . w = scale * (hi . w + lo . w), accumulated in float32. hi + lo keeps 16
// (bfloat16) or 22 (float16) significant bits of each element, against float32's 24, so products
// agree with the float32 ones of the CUDA-core and CPU kernels to about 2^-17 relative per term
// (hi alone would be 2^-9). split_rows_kernel writes the two parts, zero-padded, and the scales
// into a workspace.
//
// Streaming (stream_tiles). A block of 256 threads = 8 warps multiplies [RB, 32] stages of hi and
// lo (RB = 16, 32 or 64 rows) with [256, 32] stages of the table, copied to shared memory with
// cp.async kStages - 1 stages ahead of the one being multiplied, so each block keeps 40-60 KB of
// loads in flight. Warp (wm, wn) of a WM x WN grid owns an [RB / WM, 256 / WN] part of a tile of
// 256 table rows as FM x FN 16 x 16 wmma accumulators. When a tile's depth range is complete the
// accumulators go to shared memory, where the kernel's epilogue reads them: the unembedding folds
// them, 128 columns at a time, into the running top-k and softmax statistics of unembed_topk.cuh;
// the dense product writes them out. A dense product with too few tiles to fill the device splits
// the depth across blocks and sums the parts in a second kernel, in a fixed order.
#include <cuda_pipeline.h>
#include <mma.h>

#include <type_traits>

#include "mma_launch.h"
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
constexpr int kSumThreads = 256;
constexpr int64_t kMinSplitStages = 8;  // a depth split covers at least 8 stages (256 elements)

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

// The shapes of the tensor-core kernels for RB (16, 32 or 64) rows.
template <int RB>
struct MmaShape {
  static constexpr int WM = RB >= 32 ? RB / 32 : 1;  // warps along the rows
  static constexpr int WN = 8 / WM;                  // and along the tile's 256 columns
  static constexpr int FM = RB / WM / 16;            // 16 x 16 accumulators per warp
  static constexpr int FN = kMmaTile / WN / 16;
  static constexpr int TR = RB / 16;  // rows per half-warp in the unembedding's fold
  static constexpr int kZ = RB * kMLd;  // elements of hi (then lo) in a stage
  static constexpr int kStage = 2 * kZ + kMmaTile * kMLd;  // hi, lo, then the table's rows
  static constexpr int kFoldLd = kMmaTile + 4;  // row pitch of a finished tile, in floats
  static constexpr size_t kStageBytes = size_t(kStage) * 2;
  static constexpr size_t kFoldBytes = size_t(RB) * kFoldLd * sizeof(float) > sizeof(FinalRanking)
                                           ? size_t(RB) * kFoldLd * sizeof(float)
                                           : sizeof(FinalRanking);
  static constexpr size_t kSmem = kMStages * kStageBytes + kFoldBytes;
  // Blocks per SM that shared memory allows on sm_90 (85 KB for 16 rows, 108 KB for 32, 155 KB
  // for 64, of 228 KB per SM), which registers must allow too. Devices with less shared memory
  // fit fewer (an A100's 164 KB: one of any): blocks_per_sm.
  static constexpr int kMinBlocks = RB <= 32 ? 2 : 1;
  // Per stage and thread: 16-byte copies of the table and of hi and lo.
  static constexpr int WQ = kMmaTile * kMDK / 8 / kUThreads;
  static constexpr int ZQ = (2 * RB * kMDK / 8 + kUThreads - 1) / kUThreads;
  static_assert(WM * WN == 8 && FM >= 1 && FN >= 1, "eight warps cover the tile");
  static_assert(kStageBytes % 128 == 0, "every stage starts 128-byte aligned");
};

int rows_tile(int64_t rows) { return rows <= 16 ? 16 : rows <= 32 ? 32 : 64; }

// f(std::integral_constant<int, RB>{}) for the rows tile rb (16, 32 or 64).
template <typename F>
auto with_rows_tile(int rb, F&& f) {
  if (rb == 16) return f(std::integral_constant<int, 16>{});
  if (rb == 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 64>{});
}

// Resident blocks per SM of the tensor-core kernels for the rows tile rb on the current device:
// as many as the registers allow (kMinBlocks) and its shared memory holds, each block with the
// 1 KB the system reserves.
int blocks_per_sm(int rb) {
  return with_rows_tile(rb, [](auto tile) {
    using Shape = MmaShape<decltype(tile)::value>;
    const int per_sm = device_smem_per_sm();
    if (per_sm <= 0) return Shape::kMinBlocks;
    const int fit = static_cast<int>(per_sm / (Shape::kSmem + 1024));
    return fit < 1 ? 1 : fit < Shape::kMinBlocks ? fit : Shape::kMinBlocks;
  });
}
int64_t padded_depth(int64_t depth) { return ceil_div(depth, kMDK) * kMDK; }
size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Where split_rows_kernel's output lies in a workspace: hi [rows_pad, depth_pad] at 0, lo at
// part_bytes, the scales [rows_pad] at scale_offset; `bytes` in all (16-byte aligned pieces).
struct SplitLayout {
  int rb;
  int64_t rows_pad, depth_pad;
  size_t part_bytes, scale_offset, bytes;
};

SplitLayout split_layout(int64_t rows, int64_t depth) {
  SplitLayout l{};
  l.rb = rows_tile(rows);
  l.rows_pad = ceil_div(rows, l.rb) * l.rb;
  l.depth_pad = padded_depth(depth);
  l.part_bytes = align16(size_t(l.rows_pad * l.depth_pad) * 2);
  l.scale_offset = 2 * l.part_bytes;
  l.bytes = l.scale_offset + align16(size_t(l.rows_pad) * sizeof(float));
  return l;
}

// The split rows in the workspace, per split_layout.
template <typename T>
struct SplitRows {
  T* hi;
  T* lo;
  float* scale;
  SplitRows(const SplitLayout& l, void* workspace)
      : hi(static_cast<T*>(workspace)),
        lo(reinterpret_cast<T*>(static_cast<uint8_t*>(workspace) + l.part_bytes)),
        scale(reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + l.scale_offset)) {}
};

// Row r of a (block r), rows a_row_stride apart: scale[r] = 2^e with |a[r, d]| < 2^e for every d
// (1 for a row of zeros, NaN or infinities), hi = a / 2^e rounded to T, lo = (a / 2^e - hi)
// rounded to T (0 where hi is not finite); zeros past rows and depth. hi, lo: [rows_pad,
// depth_pad]; scale: [rows_pad].
template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
    split_rows_kernel(const float* __restrict__ a, int64_t rows, int64_t depth,
                      int64_t a_row_stride, int64_t depth_pad, T* __restrict__ hi,
                      T* __restrict__ lo,
                      float* __restrict__ scale) {
  __shared__ float warp_max[kSplitThreads / kWarp];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const float* src = a + r * a_row_stride;
  const int64_t out = r * depth_pad;
  float m = 0.0f;
  if (r < rows)
    for (int64_t d = tid; d < depth; d += kSplitThreads) m = fmaxf(m, fabsf(src[d]));
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
    const float x = r < rows && d < depth ? src[d] * down : 0.0f;
    const T h = round_to(T{}, x);
    const float hf = to_float(h);
    const bool finite = fabsf(hf) <= 3.402823466e38f;
    hi[out + d] = h;
    lo[out + d] = round_to(T{}, finite ? x - hf : 0.0f);
  }
  if (tid == 0) scale[r] = __uint_as_float(static_cast<uint32_t>(127 + e) << 23);
}

// One stage: table rows [v0, v0 + 256) (clamped to the table; epilogues ignore rows past their
// range) and depth [d0, d0 + 32) (zero-filled past depth), and the same depth of hi and lo.
template <typename T, int RB>
__device__ __forceinline__ void issue_stage(T* stage, const T* __restrict__ w, int64_t w_row_stride,
                                            int64_t w_rows, int64_t depth, const T* __restrict__ hi,
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
    const int64_t v = v0 + row < w_rows ? v0 + row : w_rows - 1;
    const int64_t d = d0 + part * 8;
    // depth % 8 == 0: a 16-byte piece is all inside the depth or all past it (zero-filled, and
    // then read from the row's start, which is valid).
    const bool inside = d < depth;
    __pipeline_memcpy_async(ws + row * kMLd + part * 8, w + v * w_row_stride + (inside ? d : 0),
                            16, inside ? 0 : 16);
  }
}

// The products of one block: tiles t < tiles of 256 table rows from v_begin, each over depth
// stages [d_first, d_first + d_stages) of kMDK. hi, lo: the block's RB rows ([RB, depth_pad] each,
// rows depth_pad apart); w: [w_rows, depth], rows w_row_stride apart, 16-byte aligned, depth % 8 ==
// 0. After each tile, once every warp has stored its accumulators, calls
// on_tile(v0, folded): folded[r * kFoldLd + c] = hi[r] . w[v0 + c] + lo[r] . w[v0 + c] over the
// depth range (unscaled), for r < RB and c < 256. smem: MmaShape<RB>::kSmem bytes, 128-byte
// aligned. Every thread of the block must call it; on_tile runs on every thread.
template <typename T, int RB, typename OnTile>
__device__ __forceinline__ void stream_tiles(const T* __restrict__ hi, const T* __restrict__ lo,
                                             int64_t depth_pad, const T* __restrict__ w,
                                             int64_t w_row_stride, int64_t w_rows, int64_t depth,
                                             int64_t v_begin, int64_t tiles, int64_t d_first,
                                             int64_t d_stages, uint8_t* smem, OnTile&& on_tile) {
  using namespace nvcuda;
  using S = MmaShape<RB>;
  using MT = typename MmaElement<T>::type;
  T* stages = reinterpret_cast<T*>(smem);
  float* folded = reinterpret_cast<float*>(smem + kMStages * S::kStageBytes);
  const int warp = threadIdx.x / kWarp, wm = warp / S::WN, wn = warp % S::WN;
  const int64_t total = tiles * d_stages;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[S::FM][S::FN];
#pragma unroll
  for (int i = 0; i < S::FM; ++i)
#pragma unroll
    for (int j = 0; j < S::FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // Stage s covers tile s / d_stages at depth stage d_first + s % d_stages, in buffer
  // s % kMStages. Every thread commits one batch per stage, empty past the end, so that
  // __pipeline_wait_prior counts stages.
  auto issue = [&](int64_t s) {
    if (s < total) {
      issue_stage<T, RB>(stages + (s % kMStages) * S::kStage, w, w_row_stride, w_rows, depth, hi,
                         lo, depth_pad, v_begin + (s / d_stages) * kMmaTile,
                         (d_first + s % d_stages) * kMDK);
    }
    __pipeline_commit();
  };
  for (int s = 0; s < kMStages - 1; ++s) issue(s);

  for (int64_t s = 0; s < total; ++s) {
    __pipeline_wait_prior(kMStages - 2);  // this thread's copies of stage s have landed
    __syncthreads();  // everyone's have, and stage s - 1 is no longer read: refill its buffer
    issue(s + kMStages - 1);
    const MT* zh = reinterpret_cast<const MT*>(stages + (s % kMStages) * S::kStage);
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
    if (s % d_stages != d_stages - 1) continue;

    // The tile is complete (block-uniform): its products to shared memory, then the epilogue.
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
    on_tile(v_begin + (s / d_stages) * kMmaTile, static_cast<const float*>(folded));
    // The next store into `folded` follows the next iteration's barrier.
  }
}

// Block b takes table rows [b * per_block, min(vocab, (b + 1) * per_block)), per_block a multiple
// of kMmaTile. hi, lo: [RB, depth_pad] of T; scale: [RB] float (split_rows_kernel); w: [vocab,
// depth] with rows w_row_stride apart, 16-byte aligned, depth % 8 == 0. Writes what
// unembed_topk_partial_kernel writes (RunningTopk::finish). Dynamic shared memory:
// MmaShape<RB>::kSmem bytes.
template <typename T, int RB>
__global__ void __launch_bounds__(kUThreads, MmaShape<RB>::kMinBlocks)
    unembed_topk_partial_mma_kernel(const T* __restrict__ hi, const T* __restrict__ lo,
                                    const float* __restrict__ scale, int64_t rows, int64_t depth,
                                    int64_t depth_pad, const T* __restrict__ w,
                                    int64_t w_row_stride, int64_t vocab, int64_t per_block, int k,
                                    float* __restrict__ part_max, float* __restrict__ part_sum,
                                    uint32_t* __restrict__ cand_key,
                                    int32_t* __restrict__ cand_id) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there: mma_available checks the compute capability
#else
  using S = MmaShape<RB>;
  extern __shared__ __align__(128) uint8_t mma_smem[];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t v_begin = blockIdx.x * per_block;
  const int64_t v_end = v_begin + per_block < vocab ? v_begin + per_block : vocab;
  const bool with_stats = part_max != nullptr;
  float row_scale[S::TR];
#pragma unroll
  for (int i = 0; i < S::TR; ++i) row_scale[i] = ty * S::TR + i < rows ? scale[ty * S::TR + i] : 1;
  RunningTopk<S::TR> top;
  top.init(k);
  stream_tiles<T, RB>(
      hi, lo, depth_pad, w, w_row_stride, vocab, depth, v_begin,
      (v_end - v_begin + kMmaTile - 1) / kMmaTile, 0, depth_pad / kMDK, mma_smem,
      [&](int64_t v0, const float* folded) {
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
      });
  __syncthreads();  // the final ranking reuses the tile buffer
  top.finish(rows, k, with_stats,
             *reinterpret_cast<FinalRanking*>(mma_smem + kMStages * S::kStageBytes), part_max,
             part_sum, cand_key, cand_id);
#endif
}

// Block (x, y, g): table rows [256 x, 256 x + 256) of group g, rows [RB rt, RB rt + RB) with
// rt = y % row_tiles, depth stages [split * per_split, ..) with split = y / row_tiles. hi, lo:
// [rows_pad, depth_pad] and scale [rows_pad], shared by the groups; w: [groups, table_rows,
// depth], 16-byte aligned rows. Writes scale * (hi . w + lo . w)
// over its depth range to out[g * out_group_stride + r * out_row_stride + v] when gridDim.y ==
// row_tiles (one split), else to partial[((split * groups + g) * rows + r) * table_rows + v].
template <typename T, int RB>
__global__ void __launch_bounds__(kUThreads, MmaShape<RB>::kMinBlocks)
    rows_dot_mma_kernel(const T* __restrict__ hi, const T* __restrict__ lo,
                        const float* __restrict__ scale, int64_t rows,
                        int64_t rows_pad, int64_t depth, int64_t depth_pad,
                        const T* __restrict__ w, int64_t table_rows, int64_t w_row_stride,
                        int64_t w_group_stride, int64_t per_split, float* __restrict__ out,
                        int64_t out_row_stride, int64_t out_group_stride,
                        float* __restrict__ partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using S = MmaShape<RB>;
  extern __shared__ __align__(128) uint8_t mma_smem[];
  const int64_t g = blockIdx.z, groups = gridDim.z, row_tiles = rows_pad / RB;
  const int64_t rt = blockIdx.y % row_tiles, split = blockIdx.y / row_tiles;
  const bool direct = gridDim.y == row_tiles;
  const int64_t r0 = rt * RB, first = split * per_split;
  const int64_t left = depth_pad / kMDK - first;
  const int64_t stages = left < per_split ? left : per_split;
  const float* row_scale = scale + r0;
  stream_tiles<T, RB>(
      hi + r0 * depth_pad, lo + r0 * depth_pad, depth_pad, w + g * w_group_stride, w_row_stride,
      table_rows, depth, blockIdx.x * int64_t(kMmaTile), 1, first, stages, mma_smem,
      [&](int64_t v0, const float* folded) {
        for (int e = threadIdx.x; e < RB * kMmaTile; e += kUThreads) {
          const int r = e / kMmaTile, c = e % kMmaTile;
          const int64_t row = r0 + r, v = v0 + c;
          if (row >= rows || v >= table_rows) continue;
          const float x = folded[r * S::kFoldLd + c] * row_scale[r];
          if (direct) {
            out[g * out_group_stride + row * out_row_stride + v] = x;
          } else {
            partial[((split * groups + g) * rows + row) * table_rows + v] = x;
          }
        }
      });
#endif
}

// out[g, r, v] = sum over s < splits of partial[s, g, r, v], in order of s.
__global__ void __launch_bounds__(kSumThreads)
    sum_splits_kernel(const float* __restrict__ partial, int64_t splits, int64_t groups,
                      int64_t rows, int64_t cols, float* __restrict__ out, int64_t out_row_stride,
                      int64_t out_group_stride) {
  const int64_t n = groups * rows * cols;
  for (int64_t i = blockIdx.x * int64_t(kSumThreads) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kSumThreads) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * n + i];
    const int64_t c = i % cols, r = (i / cols) % rows, g = i / (cols * rows);
    out[g * out_group_stride + r * out_row_stride + c] = sum;
  }
}

template <typename T, int RB>
void launch_unembed(const float* z, int64_t rows, int64_t depth, const T* w, int64_t w_row_stride,
                    int64_t vocab, int k, int64_t chunks, int64_t per_block, float* part_max,
                    float* part_sum, uint32_t* cand_key, int32_t* cand_id, void* workspace,
                    cudaStream_t stream) {
  using S = MmaShape<RB>;
  const SplitLayout l = split_layout(rows, depth);  // rows <= 64: rows_pad == RB
  const SplitRows<T> z2(l, workspace);
  split_rows_kernel<T><<<RB, kSplitThreads, 0, stream>>>(z, rows, depth, depth, l.depth_pad, z2.hi,
                                                         z2.lo, z2.scale);
  allow_dynamic_smem<unembed_topk_partial_mma_kernel<T, RB>>(S::kSmem);
  unembed_topk_partial_mma_kernel<T, RB>
      <<<static_cast<unsigned>(chunks), kUThreads, S::kSmem, stream>>>(
          z2.hi, z2.lo, z2.scale, rows, depth, l.depth_pad, w, w_row_stride, vocab, per_block, k,
          part_max, part_sum, cand_key, cand_id);
}

// How a dense product is cut: rows in tiles of rb, the table in tiles of 256 rows, the depth in
// splits of per_split stages when the tiles alone are too few for the device; and the workspace
// (the split rows, then the splits' partial sums).
struct DotPlan {
  SplitLayout rows;
  int64_t row_tiles, col_tiles, splits, per_split;
  size_t workspace;
};

DotPlan plan_dot(int64_t rows, int64_t depth, int64_t table_rows, int64_t groups) {
  DotPlan p{};
  p.rows = split_layout(rows, depth);
  p.row_tiles = p.rows.rows_pad / p.rows.rb;
  p.col_tiles = ceil_div(table_rows, kMmaTile);
  const int64_t blocks = p.col_tiles * p.row_tiles * groups;
  const int64_t target = static_cast<int64_t>(device_sms()) * blocks_per_sm(p.rows.rb);
  const int64_t stages = p.rows.depth_pad / kMDK;
  int64_t splits = blocks >= target ? 1 : ceil_div(target, blocks);
  const int64_t max_splits = stages / kMinSplitStages > 1 ? stages / kMinSplitStages : 1;
  if (splits > max_splits) splits = max_splits;
  p.per_split = ceil_div(stages, splits);
  p.splits = ceil_div(stages, p.per_split);  // no empty split
  p.workspace = p.rows.bytes +
                (p.splits > 1 ? size_t(p.splits * groups * rows * table_rows) * sizeof(float) : 0);
  return p;
}

template <typename T, int RB>
void launch_dot(const DotPlan& p, const float* a, int64_t rows, int64_t depth,
                int64_t a_row_stride, const T* w, int64_t table_rows,
                int64_t w_row_stride, int64_t w_group_stride, float* out, int64_t out_row_stride,
                int64_t out_group_stride, int64_t groups, void* workspace, cudaStream_t stream) {
  using S = MmaShape<RB>;
  const SplitRows<T> a2(p.rows, workspace);
  float* partial = p.splits > 1
                       ? reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + p.rows.bytes)
                       : nullptr;
  split_rows_kernel<T><<<static_cast<unsigned>(p.rows.rows_pad), kSplitThreads, 0, stream>>>(
      a, rows, depth, a_row_stride, p.rows.depth_pad, a2.hi, a2.lo, a2.scale);
  allow_dynamic_smem<rows_dot_mma_kernel<T, RB>>(S::kSmem);
  const dim3 grid(static_cast<unsigned>(p.col_tiles),
                  static_cast<unsigned>(p.row_tiles * p.splits), static_cast<unsigned>(groups));
  rows_dot_mma_kernel<T, RB><<<grid, kUThreads, S::kSmem, stream>>>(
      a2.hi, a2.lo, a2.scale, rows, p.rows.rows_pad, depth, p.rows.depth_pad, w, table_rows,
      w_row_stride, w_group_stride, p.per_split, out, out_row_stride, out_group_stride, partial);
  if (partial != nullptr) {
    const int64_t n = groups * rows * table_rows;
    const int64_t blocks = ceil_div(n, kSumThreads) < 65535 ? ceil_div(n, kSumThreads) : 65535;
    sum_splits_kernel<<<static_cast<unsigned>(blocks), kSumThreads, 0, stream>>>(
        partial, p.splits, groups, rows, table_rows, out, out_row_stride, out_group_stride);
  }
}

template <typename F>
void dispatch16(DType dtype, F&& f) {
  if (dtype == DType::BF16) {
    f(bf16{});
  } else {
    f(f16{});
  }
}

}  // namespace

bool mma_available(DType dtype) { return dtype != DType::F32 && device_compute_major() >= 8; }

int unembed_mma_blocks_per_sm(int64_t rows) { return blocks_per_sm(rows_tile(rows)); }

size_t unembed_mma_workspace(int64_t rows, int64_t depth) {
  return split_layout(rows, depth).bytes;
}

void launch_unembed_topk_partial_mma(const float* z, int64_t rows, int64_t depth, const void* w,
                                     DType dtype, int64_t w_row_stride, int64_t vocab, int k,
                                     int64_t chunks, int64_t per_block, float* part_max,
                                     float* part_sum, uint32_t* cand_key, int32_t* cand_id,
                                     void* workspace, cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return;
  dispatch16(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_rows_tile(rows_tile(rows), [&](auto tile) {
      launch_unembed<T, decltype(tile)::value>(z, rows, depth, static_cast<const T*>(w),
                                               w_row_stride, vocab, k, chunks, per_block, part_max,
                                               part_sum, cand_key, cand_id, workspace, stream);
    });
  });
}

bool rows_dot_mma_fits(int64_t depth, int64_t a_group_stride, const void* w, DType dtype,
                       int64_t w_row_stride, int64_t w_group_stride) {
  return a_group_stride == 0 && mma_available(dtype) && depth > 0 && depth % 8 == 0 &&
         (w_row_stride * 2) % 16 == 0 && (w_group_stride * 2) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

size_t rows_dot_mma_workspace(int64_t rows, int64_t depth, int64_t table_rows, int64_t groups) {
  return plan_dot(rows, depth, table_rows, groups).workspace;
}

void launch_rows_dot_mma(const float* a, int64_t rows, int64_t depth, int64_t a_row_stride,
                         const void* w, DType dtype, int64_t table_rows, int64_t w_row_stride,
                         int64_t w_group_stride, float* out, int64_t out_row_stride,
                         int64_t out_group_stride, int64_t groups, void* workspace,
                         cudaStream_t stream) {
  const DotPlan p = plan_dot(rows, depth, table_rows, groups);
  dispatch16(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_rows_tile(p.rows.rb, [&](auto tile) {
      launch_dot<T, decltype(tile)::value>(p, a, rows, depth, a_row_stride,
                                           static_cast<const T*>(w), table_rows, w_row_stride,
                                           w_group_stride, out, out_row_stride, out_group_stride,
                                           groups, workspace, stream);
    });
  });
}

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
