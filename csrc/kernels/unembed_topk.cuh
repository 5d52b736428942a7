// The running top-k and online softmax statistics of the decode-size unembedding kernels
// (unembed_kernels.cu on CUDA cores, mma_kernels.cu on tensor cores): a block of 256 threads = 16
// half-warps, half-warp ty keeping rows ty * TR .. ty * TR + TR - 1 of the block's rows. Logits
// arrive in tiles of 128 vocabulary entries; lane tx of a half-warp folds the 8 columns
// tile_column(tx, j) of each of its rows. Each lane keeps its own softmax statistics of the rows
// and kSlots of the row's kTopkMaxK top-k slots; a value enters when it ranks above the row's worst
// slot (found by a half-warp reduction), one entrant at a time. Few values enter once the slots
// are full. At the end each block writes, per row, its statistics and its k best candidates, in
// the layout of launch_topk_partial (launch_topk_merge finishes).
#pragma once

#include "cuda_common.cuh"

namespace mtp_ext {
namespace kernels {
namespace cuda {

constexpr int kUThreads = 256;
constexpr int kUFoldCols = 128;         // vocabulary entries per folded tile
constexpr int kSlots = kTopkMaxK / 16;  // top-k slots per lane and row: 16 lanes hold 64

static_assert(kUThreads == 256, "the 16 x 16 thread layout is assumed");
static_assert(kSlots * 16 == kTopkMaxK, "16 lanes x kSlots slots hold the largest k");

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

// Where the final ranking of one block's rows is staged: one row of kTopkMaxK per half-warp.
struct FinalRanking {
  uint32_t key[kUThreads / 16][kTopkMaxK];
  int32_t id[kUThreads / 16][kTopkMaxK];
};

// The running state of the TR rows of one half-warp, as seen by one of its lanes. Every member
// function must be called by all 256 threads of the block with block-uniform arguments apart
// from the lane's own data (they use full-warp shuffles).
template <int TR>
struct RunningTopk {
  Stats st[TR];
  uint32_t slot_key[TR][kSlots];  // positions half_lane * kSlots + s; those >= k never rank below
  int32_t slot_id[TR][kSlots];
  uint32_t worst_key[TR];
  int32_t worst_id[TR];
  int worst_pos[TR];

  __device__ __forceinline__ void init(int k) {
    const int half_lane = threadIdx.x % 16;
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
  }

  // Folds 8 logits of row i of this half-warp: x[j] at vocabulary entry v0 + tile_column(tx, j);
  // entries >= v_end, and rows that do not exist (row_ok false), are ignored.
  __device__ __forceinline__ void fold(int i, const float (&x)[8], int64_t v0, int64_t v_end,
                                       bool row_ok, bool with_stats) {
    const int tx = threadIdx.x % 16, lane = threadIdx.x % kWarp, half_lane = lane % 16;
    const unsigned half_mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    uint32_t key[8];
    int32_t cid[8];
    uint32_t pending = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t v = v0 + tile_column(tx, j);
      key[j] = rank_key(x[j]);
      cid[j] = static_cast<int32_t>(v);
      if (row_ok && v < v_end) {
        if (with_stats) stats_add(st[i], x[j], 1.0f);
        if (ranks_before(key[j], cid[j], worst_key[i], worst_id[i])) pending |= 1u << j;
      }
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

  // Writes, for every row r < rows of this half-warp and this block c (chunks = gridDim.x):
  // part_max/part_sum[r * chunks + c] (when with_stats) and the block's k best as keys and ids,
  // best first, padded with key 0 and id 0x7fffffff, at cand_key/cand_id[(r * chunks + c) * k ..].
  __device__ __forceinline__ void finish(int64_t rows, int k, bool with_stats, FinalRanking& fin,
                                         float* __restrict__ part_max,
                                         float* __restrict__ part_sum,
                                         uint32_t* __restrict__ cand_key,
                                         int32_t* __restrict__ cand_id) {
    const int ty = threadIdx.x / 16, half_lane = threadIdx.x % 16;
    const int64_t chunks = gridDim.x, chunk = blockIdx.x;
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
        fin.key[ty][half_lane * kSlots + s] = slot_key[i][s];
        fin.id[ty][half_lane * kSlots + s] = slot_id[i][s];
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
            const uint32_t qk = fin.key[ty][q];
            const int32_t qi = fin.id[ty][q];
            rank += ranks_before(qk, qi, mk, mi) || (qk == mk && qi == mi && q < pos);
          }
          cand_key[base + rank] = mk;
          cand_id[base + rank] = mi;
        }
      }
      __syncwarp();
    }
  }
};

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
