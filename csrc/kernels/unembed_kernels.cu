// The decode-size unembedding with a running top-k: logits = z[rows, D] . table[V, D]^T for at
// most 64 float32 rows, streamed once over the table (in its own dtype) with, per row, a running
// top-k and online softmax statistics. The [rows, V] logits are never written: each block writes
// the k best candidates and the softmax statistics of its slice of the vocabulary, in the layout of
// launch_topk_partial, and launch_topk_merge finishes (fused_mtp_heads, verify_tree_from_hidden).
//
// Block (256 threads = 16 x 16): a contiguous slice of the vocabulary, in tiles of 128 table rows.
// A tile's logits are the register tiles of rows_dot_table (dense_kernels.cu): stages of 32 depth
// elements of z ([RB, 32]) and of the table ([128, 32]) in shared memory as float, each thread a
// [RB / 16, 8] tile of logits; the next stage is loaded into registers (16-byte loads, raw bits)
// while the current one is multiplied. A half-warp (the 16 threads of one ty) then holds whole
// rows of the tile (16 lanes x 8 columns = 128), so the fold into the running state needs no
// shared memory: each lane keeps its own softmax statistics of the rows and 4 of the row's 64
// top-k slots; a value enters when it ranks above the row's worst slot (found by a half-warp
// reduction), one entrant at a time. Few values enter once the slots are full.
#include "cuda_common.cuh"

namespace mtp_ext {
namespace kernels {
namespace cuda {
namespace {

constexpr int kUThreads = 256;
constexpr int kUVB = 128;  // table rows per tile
constexpr int kUDK = 32;   // depth per stage
constexpr int kSlots = kTopkMaxK / 16;  // top-k slots per lane and row: 16 lanes hold 64

static_assert(kUThreads == 256, "the 16 x 16 thread layout is assumed");
static_assert(kSlots * 16 == kTopkMaxK, "16 lanes x kSlots slots hold the largest k");

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

// The ranking of candidates (key descending, then id ascending), as kernels::better.
__device__ __forceinline__ bool ranks_before(uint32_t key_a, int32_t id_a, uint32_t key_b,
                                             int32_t id_b) {
  return key_a > key_b || (key_a == key_b && id_a < id_b);
}

// A strict total order for finding the worst slot: the ranking reversed, then the slot position
// (only the padding slots, all equal, need it).
__device__ __forceinline__ bool worse(uint32_t key_a, int32_t id_a, int pos_a, uint32_t key_b,
                                      int32_t id_b, int pos_b) {
  return key_a < key_b || (key_a == key_b && (id_a > id_b || (id_a == id_b && pos_a < pos_b)));
}

// The worst of the 16 x kSlots slots of one row held by a half-warp; every lane of the half gets
// it. Must be called by all 32 lanes (the xor distances stay within each half).
__device__ __forceinline__ void half_worst(const uint32_t (&key)[kSlots],
                                           const int32_t (&id)[kSlots], int half_lane,
                                           uint32_t& worst_key, int32_t& worst_id, int& worst_pos) {
  uint32_t k = key[0];
  int32_t i = id[0];
  int p = half_lane * kSlots;
#pragma unroll
  for (int s = 1; s < kSlots; ++s) {
    if (worse(key[s], id[s], half_lane * kSlots + s, k, i, p)) {
      k = key[s];
      i = id[s];
      p = half_lane * kSlots + s;
    }
  }
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) {
    const uint32_t ok = __shfl_xor_sync(0xffffffffu, k, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    const int op = __shfl_xor_sync(0xffffffffu, p, o);
    if (worse(ok, oi, op, k, i, p)) {
      k = ok;
      i = oi;
      p = op;
    }
  }
  worst_key = k;
  worst_id = i;
  worst_pos = p;
}

template <typename T, int RB>
struct UnembedShared {
  __align__(16) float zs[kUDK][RB];
  __align__(16) float ws[kUDK][kUVB + 4];
  uint32_t fin_key[kUThreads / 16][kTopkMaxK];  // one row per half-warp, for the final ranking
  int32_t fin_id[kUThreads / 16][kTopkMaxK];
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
  const int lane = tid % kWarp, half_lane = lane % 16;
  const unsigned half_mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  const int64_t chunks = gridDim.x, chunk = blockIdx.x;
  const int64_t v_begin = chunk * per_block;
  const int64_t v_end = v_begin + per_block < vocab ? v_begin + per_block : vocab;
  const int64_t depth_stages = (depth + kUDK - 1) / kUDK;
  const int64_t stages = ((v_end - v_begin + kUVB - 1) / kUVB) * depth_stages;
  const bool with_stats = part_max != nullptr;

  // The running state of rows ty * TR + i: statistics of this lane's columns, kSlots top-k
  // slots (positions half_lane * kSlots + s; those >= k never rank below anything), the worst.
  Stats st[TR];
  uint32_t slot_key[TR][kSlots];
  int32_t slot_id[TR][kSlots];
  uint32_t worst_key[TR];
  int32_t worst_id[TR];
  int worst_pos[TR];
#pragma unroll
  for (int i = 0; i < TR; ++i) {
    st[i] = stats_empty();
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const bool used = half_lane * kSlots + s < k;
      slot_key[i][s] = used ? 0u : 0xffffffffu;
      slot_id[i][s] = used ? 0x7fffffff : -1;
    }
    half_worst(slot_key[i], slot_id[i], half_lane, worst_key[i], worst_id[i], worst_pos[i]);
  }

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
    // is block-uniform (s is), so every lane reaches the shuffles below.
#pragma unroll
    for (int i = 0; i < TR; ++i) {
      const bool row_ok = ty * TR + i < rows;
      uint32_t key[8];
      int32_t cid[8];
      uint32_t pending = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t v = v0 + tile_column(tx, j);
        const float x = acc[i][j];
        key[j] = rank_key(x);
        cid[j] = static_cast<int32_t>(v);
        if (row_ok && v < v_end) {
          if (with_stats) stats_add(st[i], x, 1.0f);
          if (ranks_before(key[j], cid[j], worst_key[i], worst_id[i])) pending |= 1u << j;
        }
        acc[i][j] = 0.0f;
      }
      // One entrant per half-warp per round, until no lane of the warp has one pending.
      while (__any_sync(0xffffffffu, pending != 0)) {
        const unsigned ballot = __ballot_sync(0xffffffffu, pending != 0) & half_mask;
        const int leader = ballot != 0 ? __ffs(ballot) - 1 : lane;
        const int first = pending != 0 ? __ffs(pending) - 1 : 0;
        uint32_t my_key = 0;
        int32_t my_id = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (j == first) {
            my_key = key[j];
            my_id = cid[j];
          }
        }
        const uint32_t c_key = __shfl_sync(0xffffffffu, my_key, leader);
        const int32_t c_id = __shfl_sync(0xffffffffu, my_id, leader);
        if (ballot != 0 && lane == leader) pending &= pending - 1;
        const bool take = ballot != 0 && ranks_before(c_key, c_id, worst_key[i], worst_id[i]) &&
                          half_lane == worst_pos[i] / kSlots;
        // Selects, not an indexed store, so the slots stay in registers.
#pragma unroll
        for (int s2 = 0; s2 < kSlots; ++s2) {
          const bool here = take && s2 == worst_pos[i] % kSlots;
          slot_key[i][s2] = here ? c_key : slot_key[i][s2];
          slot_id[i][s2] = here ? c_id : slot_id[i][s2];
        }
        half_worst(slot_key[i], slot_id[i], half_lane, worst_key[i], worst_id[i], worst_pos[i]);
        // Candidates that no longer rank above the worst slot cannot enter any more.
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (((pending >> j) & 1u) && !ranks_before(key[j], cid[j], worst_key[i], worst_id[i]))
            pending &= ~(1u << j);
        }
      }
    }
  }

  // The block's statistics and its k best of each row, ranked (best first).
  const int half = tid / 16;  // == ty
#pragma unroll
  for (int i = 0; i < TR; ++i) {
    const int64_t row = ty * TR + i;
    const bool row_ok = row < rows;
    if (with_stats) {
      Stats total = st[i];
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) {
        const Stats other{__shfl_xor_sync(0xffffffffu, total.max, o),
                          __shfl_xor_sync(0xffffffffu, total.sum, o)};
        total = stats_merge(total, other, 1.0f);
      }
      if (row_ok && half_lane == 0) {
        part_max[row * chunks + chunk] = total.max;
        part_sum[row * chunks + chunk] = total.sum;
      }
    }
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      sh.fin_key[half][half_lane * kSlots + s] = slot_key[i][s];
      sh.fin_id[half][half_lane * kSlots + s] = slot_id[i][s];
    }
    __syncwarp();
    if (row_ok) {
      const int64_t base = (row * chunks + chunk) * k;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int pos = half_lane * kSlots + s;
        if (pos >= k) continue;
        const uint32_t mk = slot_key[i][s];
        const int32_t mi = slot_id[i][s];
        int rank = 0;
        for (int q = 0; q < k; ++q) {
          const uint32_t qk = sh.fin_key[half][q];
          const int32_t qi = sh.fin_id[half][q];
          rank += ranks_before(qk, qi, mk, mi) || (qk == mk && qi == mi && q < pos);
        }
        cand_key[base + rank] = mk;
        cand_id[base + rank] = mi;
      }
    }
    __syncwarp();
  }
}

int device_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    cudaGetLastError();  // a failed query is not a launch error
    return 132;
  }
  return sms;
}

// Tiles of kUVB table rows per block for `chunks` blocks.
int64_t tiles_per_block(int64_t vocab, int64_t chunks) {
  return ceil_div(ceil_div(vocab, kUVB), chunks);
}

}  // namespace

bool unembed_topk_fits(int64_t rows, int64_t depth, const void* w, DType dtype,
                       int64_t w_row_stride, int64_t vocab, int k) {
  const int64_t item = dtype == DType::F32 ? 4 : 2;
  return rows >= 1 && rows <= kUnembedMaxRows && k >= 1 && k <= kTopkMaxK && k <= vocab &&
         vocab < (int64_t(1) << 31) - kUVB && depth >= 8 && depth % 8 == 0 &&
         (w_row_stride * item) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

int64_t unembed_topk_chunks(int64_t rows, int64_t vocab, int k) {
  const int64_t tiles = ceil_div(vocab, kUVB);
  // Resident blocks per SM: about 4 with 16-row tiles, 1 with 64-row ones (register-bound).
  const int64_t per_sm = rows <= 16 ? 4 : 2;
  int64_t chunks = static_cast<int64_t>(device_sms()) * per_sm;
  const int64_t merge_cap = kTopkMaxMerge / k;  // what launch_topk_merge accepts
  if (chunks > merge_cap) chunks = merge_cap;
  if (chunks > tiles) chunks = tiles;
  if (chunks < 1) chunks = 1;
  // Every block gets whole tiles and at least one.
  return ceil_div(tiles, tiles_per_block(vocab, chunks));
}

void launch_unembed_topk_partial(const float* z, int64_t rows, int64_t depth, const void* w,
                                 DType dtype, int64_t w_row_stride, int64_t vocab, int k,
                                 int64_t chunks, float* part_max, float* part_sum,
                                 uint32_t* cand_key, int32_t* cand_id, cudaStream_t stream) {
  if (rows == 0 || vocab == 0) return;
  const int64_t per_block = tiles_per_block(vocab, chunks) * kUVB;
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
