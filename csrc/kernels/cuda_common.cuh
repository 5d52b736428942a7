// Device helpers shared by the CUDA kernels: loads of the storage types as float, the
// order-preserving ranking keys, online softmax statistics, block reductions and scans, and the
// block-wide top-k selection (radix select; an argmax for k = 1) that every top-k kernel uses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "cuda_launch.h"

namespace mtp_ext {
namespace kernels {
namespace cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ float load_f(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_f(const f16* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ float load_f(const bf16* p) {
  return __uint_as_float(uint32_t(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}

// Eight consecutive elements as loaded from a 16-byte aligned address (float: two 16-byte loads),
// not yet converted: a thread can hold several loads in flight in few registers.
template <typename T>
struct Raw8 {
  uint4 v[sizeof(T) / 2];
};
template <typename T>
__device__ __forceinline__ Raw8<T> load_raw8(const T* p) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 2); ++i)
    r.v[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  return r;
}
__device__ __forceinline__ void unpack8(const Raw8<float>& r, float* out) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    out[4 * i] = __uint_as_float(r.v[i].x), out[4 * i + 1] = __uint_as_float(r.v[i].y);
    out[4 * i + 2] = __uint_as_float(r.v[i].z), out[4 * i + 3] = __uint_as_float(r.v[i].w);
  }
}
__device__ __forceinline__ void unpack8(const Raw8<f16>& r, float* out) {
  const uint32_t w[4] = {r.v[0].x, r.v[0].y, r.v[0].z, r.v[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
__device__ __forceinline__ void unpack8(const Raw8<bf16>& r, float* out) {
  const uint32_t w[4] = {r.v[0].x, r.v[0].y, r.v[0].z, r.v[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
// The same, converted to float.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out) {
  unpack8(load_raw8(p), out);
}

// Key whose unsigned order is the ranking of the values: NaN above every number (all NaN equal),
// -0 equal to +0, and key 0 below every real value (-inf has key 0x007fffff).
__device__ __forceinline__ uint32_t rank_key(float x) {
  if (x != x) return 0xffffffffu;
  uint32_t u = __float_as_uint(x);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
// int32 keys (for ATen's signed sort) with the same order.
__device__ __forceinline__ int32_t signed_key(uint32_t key) {
  return static_cast<int32_t>(key ^ 0x80000000u);
}
__device__ __forceinline__ uint32_t unsigned_key(int32_t key) {
  return static_cast<uint32_t>(key) ^ 0x80000000u;
}

// Online softmax statistics: sum of exp((x - max) * scale) over the values seen, max ignoring NaN.
// Mirrors kernels::SoftmaxStats: NaN makes the sum NaN, a +inf maximum makes it NaN (inf - inf),
// and while every value is -inf only NaN contributes.
struct Stats {
  float max;
  float sum;
};
__device__ __forceinline__ Stats stats_empty() {
  return Stats{-__int_as_float(0x7f800000), 0.0f};
}
__device__ __forceinline__ void stats_add(Stats& s, float x, float scale) {
  if (x > s.max) {
    const float rescale = s.sum == 0.0f ? 0.0f : s.sum * expf((s.max - x) * scale);
    s.sum = rescale + expf((x - x) * scale);
    s.max = x;
  } else if (s.max != -__int_as_float(0x7f800000) || x != x) {
    s.sum += expf((x - s.max) * scale);
  }
}
__device__ __forceinline__ Stats stats_merge(Stats a, Stats b, float scale) {
  const float m = fmaxf(a.max, b.max);  // the maxima are never NaN
  if (m == -__int_as_float(0x7f800000)) return Stats{m, a.sum + b.sum};
  const float sa = (a.max == m || a.sum == 0.0f) ? a.sum : a.sum * expf((a.max - m) * scale);
  const float sb = (b.max == m || b.sum == 0.0f) ? b.sum : b.sum * expf((b.max - m) * scale);
  return Stats{m, sa + sb};
}

__device__ __forceinline__ Stats warp_stats(Stats s, float scale) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stats other{__shfl_xor_sync(0xffffffffu, s.max, o), __shfl_xor_sync(0xffffffffu, s.sum, o)};
    s = stats_merge(s, other, scale);
  }
  return s;
}

// Block-wide merge of per-thread statistics; every thread gets the result. `scratch` holds
// 2 * (THREADS / 32) floats.
template <int THREADS>
__device__ __forceinline__ Stats block_stats(Stats s, float scale, float* scratch) {
  constexpr int kWarps = THREADS / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  s = warp_stats(s, scale);
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = s.max;
    scratch[kWarps + warp] = s.sum;
  }
  __syncthreads();
  Stats total = Stats{scratch[0], scratch[kWarps]};
  for (int w = 1; w < kWarps; ++w) total = stats_merge(total, Stats{scratch[w], scratch[kWarps + w]}, scale);
  return total;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block sum; every thread gets the result. scratch: THREADS / 32 values.
template <int THREADS, typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V total = scratch[0];
  for (int w = 1; w < THREADS / kWarp; ++w) total += scratch[w];
  return total;
}

// Block maximum of non-NaN values (-inf when none).
template <int THREADS>
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = scratch[0];
  for (int w = 1; w < THREADS / kWarp; ++w) total = fmaxf(total, scratch[w]);
  return total;
}

// Block minimum / maximum of int64 values.
template <int THREADS>
__device__ __forceinline__ int64_t block_min_i64(int64_t v, int64_t* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const long long other = __shfl_xor_sync(0xffffffffu, static_cast<long long>(v), o);
    v = other < v ? other : v;
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int64_t total = scratch[0];
  for (int w = 1; w < THREADS / kWarp; ++w) total = scratch[w] < total ? scratch[w] : total;
  return total;
}
template <int THREADS>
__device__ __forceinline__ int64_t block_max_i64(int64_t v, int64_t* scratch) {
  return -block_min_i64<THREADS>(-v, scratch);
}

// Exclusive prefix sum over the block in thread order; *total receives the block's sum.
// scratch: THREADS / 32 values.
template <int THREADS, typename V>
__device__ __forceinline__ V block_exclusive_scan(V v, V* scratch, V* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  V inclusive = v;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const V other = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += other;
  }
  __syncthreads();
  if (lane == kWarp - 1) scratch[warp] = inclusive;
  __syncthreads();
  V before = V(0), all = V(0);
  for (int w = 0; w < THREADS / kWarp; ++w) {
    if (w < warp) before += scratch[w];
    all += scratch[w];
  }
  *total = all;
  return before + inclusive - v;
}

// The best of n keys in shared memory (n >= 1; sel_key / sel_index hold at least THREADS / 32
// entries): one pass and a reduction, where block_topk with k = 1 would take the radix select.
// Emits it through emit(0, key, index); the highest key wins, equal keys go to the lowest
// id_of(index).
template <int THREADS, typename IdOf, typename Emit>
__device__ void block_argmax(const uint32_t* keys, int n, IdOf id_of, uint32_t* sel_key,
                             int32_t* sel_index, Emit emit) {
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  constexpr int kWarps = THREADS / kWarp;
  uint32_t best_key = 0;
  int32_t best = -1;
  int64_t best_id = 0;
  for (int i = tid; i < n; i += THREADS) {
    const uint32_t key = keys[i];
    const int64_t id = id_of(i);
    if (best < 0 || key > best_key || (key == best_key && id < best_id)) {
      best_key = key;
      best = i;
      best_id = id;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t other_key = __shfl_xor_sync(0xffffffffu, best_key, o);
    const int32_t other = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t other_id = __shfl_xor_sync(0xffffffffu, static_cast<long long>(best_id), o);
    if (other >= 0 && (best < 0 || other_key > best_key ||
                     (other_key == best_key && other_id < best_id))) {
      best_key = other_key;
      best = other;
      best_id = other_id;
    }
  }
  __syncthreads();
  if (lane == 0) {
    sel_key[warp] = best_key;
    sel_index[warp] = best;
  }
  __syncthreads();
  if (tid == 0) {
    uint32_t key = 0;
    int32_t index = -1;
    int64_t id = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (sel_index[w] < 0) continue;
      const int64_t wid = id_of(sel_index[w]);
      if (index < 0 || sel_key[w] > key || (sel_key[w] == key && wid < id)) {
        key = sel_key[w];
        index = sel_index[w];
        id = wid;
      }
    }
    emit(0, key, index);
  }
  __syncthreads();
}

// Shared memory of block_topk.
struct TopkShared {
  uint32_t hist[256];
  int32_t warp_count[32];
  uint32_t prefix;
  int32_t remaining;
  int32_t count_eq;
  int32_t count;
  int32_t eq_base;
};

// Selects the k best of n keys in shared memory (k <= n, k <= THREADS, sel_key / sel_index hold at
// least max(k, THREADS / 32) entries) by radix select on the
// keys: the best are all keys above the k-th key, then the keys equal to it in index order (the
// caller arranges that index order among equal keys is id order). Writes them, best first
// (key descending, then id ascending), to out_key[0..k) and out_id[0..k) through `emit(rank,
// key, index)`. id_of(index) gives the id used to order equal keys. k = 1 is block_argmax.
template <int THREADS, typename IdOf, typename Emit>
__device__ void block_topk(const uint32_t* keys, int n, int k, IdOf id_of, uint32_t* sel_key,
                           int32_t* sel_index, TopkShared& sh, Emit emit) {
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  constexpr int kWarps = THREADS / kWarp;
  if (k == 1) {
    block_argmax<THREADS>(keys, n, id_of, sel_key, sel_index, emit);  // no radix select
    return;
  }
  if (tid == 0) {
    sh.prefix = 0;
    sh.remaining = k;
    sh.count = 0;
  }
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += THREADS) sh.hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = sh.prefix;
    for (int base = 0; base < n; base += THREADS) {
      const int i = base + tid;
      const uint32_t key = i < n ? keys[i] : 0u;
      const bool active = i < n && (key & mask) == prefix;
      const uint32_t digit = (key >> shift) & 0xffu;
      // Lanes with the same digit add once (most keys of a chunk share their top digits).
      const uint32_t peers = __match_any_sync(0xffffffffu, active ? digit : 0x100u + lane);
      if (active && lane == __ffs(peers) - 1) atomicAdd(&sh.hist[digit], __popc(peers));
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l holds bins 255 - 8l .. 248 - 8l, scanned from the top.
      uint32_t h[8];
      uint32_t mine = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        h[j] = sh.hist[255 - (lane * 8 + j)];
        mine += h[j];
      }
      uint32_t inclusive = mine;
#pragma unroll
      for (int o = 1; o < kWarp; o <<= 1) {
        const uint32_t other = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += other;
      }
      uint32_t above = inclusive - mine;
      const uint32_t remaining = static_cast<uint32_t>(sh.remaining);
      __syncwarp();  // every lane has read sh.remaining before one of them rewrites it
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (above < remaining && remaining <= above + h[j]) {
          const uint32_t bin = 255 - (lane * 8 + j);
          sh.prefix = prefix | (bin << shift);
          sh.remaining = static_cast<int32_t>(remaining - above);
          sh.count_eq = static_cast<int32_t>(h[j]);
        }
        above += h[j];
      }
    }
    mask |= 0xffu << shift;
    __syncthreads();
  }
  const uint32_t kth = sh.prefix;
  const int need_eq = sh.remaining;
  const int count_gt = k - need_eq;
  const bool take_all_eq = sh.count_eq == need_eq;
  // Keys above the k-th, and the equal ones when all of them are taken: any order.
  for (int i = tid; i < n; i += THREADS) {
    const uint32_t key = keys[i];
    if (key > kth || (take_all_eq && key == kth)) {
      const int slot = atomicAdd(&sh.count, 1);
      sel_key[slot] = key;
      sel_index[slot] = i;
    }
  }
  if (!take_all_eq) {
    // The first need_eq keys equal to the k-th, in index order.
    if (tid == 0) sh.eq_base = 0;
    __syncthreads();
    for (int base = 0; base < n; base += THREADS) {
      const int i = base + tid;
      const bool eq = i < n && keys[i] == kth;
      const uint32_t ballot = __ballot_sync(0xffffffffu, eq);
      if (lane == 0) sh.warp_count[warp] = __popc(ballot);
      __syncthreads();
      int before = sh.eq_base, round = 0;
      for (int w = 0; w < kWarps; ++w) {
        if (w < warp) before += sh.warp_count[w];
        round += sh.warp_count[w];
      }
      const int rank = before + __popc(ballot & ((1u << lane) - 1u));
      if (eq && rank < need_eq) {
        sel_key[count_gt + rank] = kth;
        sel_index[count_gt + rank] = i;
      }
      __syncthreads();
      if (tid == 0) sh.eq_base += round;
      __syncthreads();
      if (sh.eq_base >= need_eq) break;
    }
  }
  __syncthreads();
  // Order the k selected: rank = number of selected candidates ranked above.
  for (int s = tid; s < k; s += THREADS) {
    const uint32_t key = sel_key[s];
    const int64_t id = id_of(sel_index[s]);
    int rank = 0;
    for (int j = 0; j < k; ++j) {
      const uint32_t other = sel_key[j];
      rank += other > key || (other == key && id_of(sel_index[j]) < id);
    }
    emit(rank, key, sel_index[s]);
  }
  __syncthreads();
}

// First element of row `row` of a [rows, V] view (see RowLayout).
__device__ __forceinline__ int64_t row_offset(const RowLayout& l, int64_t row) {
  return (row / l.inner) * l.outer_stride + (row % l.inner) * l.inner_stride;
}

// Calls f(i, x[i * stride]) (as float) for i in [0, n). The elements go in groups of eight
// consecutive ones, group g to thread g % THREADS, whatever the row's layout: read with 16-byte
// loads where the row is contiguous and 16-byte aligned, one at a time otherwise (a strided or
// unaligned row, and the last n % 8 elements). Each thread sees its elements in ascending order.
// A thread issues 64 bytes of loads (four groups of 16-bit values, two of float32) before it uses
// the first, so that enough loads are in flight to cover the memory's latency with few blocks per
// multiprocessor.
template <int THREADS, typename T, typename F>
__device__ __forceinline__ void block_for_each(const T* p, int n, int64_t stride, F&& f) {
  constexpr int kLoads = static_cast<int>(8 / sizeof(T));
  const bool vector = stride == 1 && (reinterpret_cast<uintptr_t>(p) % 16) == 0;
  const int n8 = vector ? n / 8 * 8 : 0;  // the elements read eight at a time
  for (int base = threadIdx.x * 8; base < n8; base += THREADS * 8 * kLoads) {
    Raw8<T> raw[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u)
      if (base + u * THREADS * 8 < n8) raw[u] = load_raw8(p + base + u * THREADS * 8);
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * THREADS * 8;
      if (i < n8) {
        float v[8];
        unpack8(raw[u], v);
#pragma unroll
        for (int j = 0; j < 8; ++j) f(i + j, v[j]);
      }
    }
  }
  // The rest one element at a time, each group of eight still to thread g % THREADS.
  const int g0 = n8 / 8;
  for (int g = g0 + (static_cast<int>(threadIdx.x) - g0 % THREADS + THREADS) % THREADS; g * 8 < n;
       g += THREADS) {
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (g * 8 + j < n) v[j] = load_f(p + static_cast<int64_t>(g * 8 + j) * stride);
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (g * 8 + j < n) f(g * 8 + j, v[j]);
  }
}

// One term of block_first_hit: its mass and whether it may be the hit.
struct ScanTerm {
  double mass;
  bool eligible;
};

// The smallest i in [0, n) with hit(term(i), before_i), where before_i is the sum of the masses of
// the terms before i (double, summed tile by tile: THREADS * PER consecutive terms per tile, PER
// per thread, a block scan between threads); n when there is none. term(i) is only called for
// i < n. Every thread of the block calls it and gets the result. dscratch / iscratch: THREADS / 32
// entries each.
template <int THREADS, int PER, typename Term, typename Hit>
__device__ int64_t block_first_hit(int64_t n, double* dscratch, int64_t* iscratch, Term&& term,
                                   Hit&& hit) {
  double carry = 0.0;
  for (int64_t tile = 0; tile < n; tile += int64_t(THREADS) * PER) {
    ScanTerm t[PER];
    double local = 0.0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int64_t i = tile + int64_t(threadIdx.x) * PER + j;
      t[j] = i < n ? term(i) : ScanTerm{0.0, false};
      local += t[j].mass;
    }
    double tile_total;
    double before = carry + block_exclusive_scan<THREADS>(local, dscratch, &tile_total);
    int64_t found = n;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int64_t i = tile + int64_t(threadIdx.x) * PER + j;
      if (found == n && i < n && hit(t[j], before)) found = i;
      before += t[j].mass;
    }
    found = block_min_i64<THREADS>(found, iscratch);
    if (found < n) return found;
    carry += tile_total;
  }
  return n;
}

// Calls f(T{}) with T = float, f16 or bf16 matching the storage type (host side).
template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32:
      f(float{});
      break;
    case DType::F16:
      f(f16{});
      break;
    case DType::BF16:
      f(bf16{});
      break;
  }
}

// The register tiles of a [RB, 128] float32 product staged in shared memory (rows_dot_table and
// the decode-size unembedding): with 16 x 16 threads, thread (tx, ty) holds rows ty * RB / 16 ..
// and the 8 columns tile_column(tx, j) of the tile. tile_fma adds one stage of DK depth elements:
// acc[i][j] += as[d][row i] * ws[d][column j] for d < DK.
__device__ __forceinline__ int tile_column(int tx, int j) {
  return j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4);
}

template <int RB, int DK, int WS>
__device__ __forceinline__ void tile_fma(const float (&as)[DK][RB], const float (&ws)[DK][WS],
                                         int tx, int ty, float (&acc)[RB / 16][8]) {
  constexpr int TR = RB / 16;
#pragma unroll 8
  for (int d = 0; d < DK; ++d) {
    float av[TR];
    if constexpr (TR % 4 == 0) {
#pragma unroll
      for (int i = 0; i < TR; i += 4) {
        const float4 q = *reinterpret_cast<const float4*>(&as[d][ty * TR + i]);
        av[i] = q.x;
        av[i + 1] = q.y;
        av[i + 2] = q.z;
        av[i + 3] = q.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < TR; ++i) av[i] = as[d][ty * TR + i];
    }
    const float4 w0 = *reinterpret_cast<const float4*>(&ws[d][tile_column(tx, 0)]);
    const float4 w1 = *reinterpret_cast<const float4*>(&ws[d][tile_column(tx, 4)]);
    const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
    for (int i = 0; i < TR; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of at most 65535 in y / z: rows beyond that are looped over by the kernels.
constexpr int64_t kMaxGridY = 65535;

// One block per row, at most 65535 * 16 of them: rows beyond that are looped over by the kernels.
inline unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(rows < 65535 * 16 ? rows : 65535 * 16);
}

// Lets Kernel take `bytes` of dynamic shared memory. Without the opt-in, static plus dynamic
// shared memory must fit in 48 KB (the kernel's own static share, queried once, counts too). The
// opt-in is per device and cheap to repeat; a failure surfaces as the launch's error.
template <auto Kernel>
void allow_dynamic_smem(size_t bytes) {
  static const size_t static_smem = [] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, Kernel) == cudaSuccess ? attr.sharedSizeBytes
                                                               : size_t{4096};
  }();
  if (bytes + static_smem > 48 * 1024)
    cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(bytes));
}

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
