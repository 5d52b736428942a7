// CUDA kernels of the dense pieces: a few float32 rows against a large table in its storage type
// (the heads' residual blocks, the unembedding, the small-batch linear layer), and the head
// features (residual SiLU block + RMSNorm) and final RMSNorm.
//
// rows_dot_table is a tiled float32 product out = a . w^T on the CUDA cores: a block computes a
// [RB, 128] tile of out from [RB, 32] slices of a and [128, 32] slices of w staged in shared
// memory, each thread a [RB / 16, 8] register tile. w is read from device memory once per RB rows
// of a, in its own dtype (16-byte loads where aligned), so for decode sizes the table stream is
// the whole cost until the product becomes arithmetic-bound (about 16 rows). Float16 and bfloat16
// tables on compute capability 8.0 and newer go to the tensor-core product of mma_kernels.cu.
#include "cuda_common.cuh"
#include "mma_launch.h"

namespace mtp_ext {
namespace kernels {
namespace cuda {
namespace {

constexpr int kDotThreads = 256;
constexpr int kVB = 128;  // table rows per block
constexpr int kDK = 32;   // depth per stage

template <typename T, int RB, bool VEC>
__global__ void __launch_bounds__(kDotThreads) rows_dot_table_kernel(
    const float* __restrict__ a, int64_t rows, int64_t depth, int64_t a_row_stride,
    int64_t a_group_stride, const T* __restrict__ w, int64_t table_rows, int64_t w_row_stride,
    int64_t w_group_stride, float* __restrict__ out, int64_t out_row_stride,
    int64_t out_group_stride) {
  constexpr int TR = RB / 16;
  __shared__ __align__(16) float as[kDK][RB];
  __shared__ __align__(16) float ws[kDK][kVB + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t v0 = blockIdx.x * int64_t(kVB);
  const int64_t r0 = blockIdx.y * int64_t(RB);
  const int64_t g = blockIdx.z;
  a += g * a_group_stride;
  w += g * w_group_stride;
  out += g * out_group_stride;

  float acc[TR][8];
#pragma unroll
  for (int i = 0; i < TR; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  for (int64_t d0 = 0; d0 < depth; d0 += kDK) {
    // Stage a[r0 .. r0 + RB, d0 .. d0 + 32) transposed.
#pragma unroll
    for (int e = tid; e < RB * kDK; e += kDotThreads) {
      const int r = e / kDK, d = e % kDK;
      const int64_t gr = r0 + r, gd = d0 + d;
      as[d][r] = (gr < rows && gd < depth) ? a[gr * a_row_stride + gd] : 0.0f;
    }
    // Stage w[v0 .. v0 + 128, d0 .. d0 + 32) transposed, as float.
    if (VEC) {
#pragma unroll
      for (int e = tid; e < kVB * kDK / 8; e += kDotThreads) {
        const int v = e / (kDK / 8), d = (e % (kDK / 8)) * 8;
        float vals[8];
        const int64_t gv = v0 + v, gd = d0 + d;
        if (gv < table_rows && gd < depth) {
          load8(w + gv * w_row_stride + gd, vals);  // depth % 8 == 0: all 8 in range
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) vals[j] = 0.0f;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) ws[d + j][v] = vals[j];
      }
    } else {
#pragma unroll 4
      for (int e = tid; e < kVB * kDK; e += kDotThreads) {
        const int v = e / kDK, d = e % kDK;
        const int64_t gv = v0 + v, gd = d0 + d;
        ws[d][v] = (gv < table_rows && gd < depth) ? load_f(w + gv * w_row_stride + gd) : 0.0f;
      }
    }
    __syncthreads();
    tile_fma<RB, kDK, kVB + 4>(as, ws, tx, ty, acc);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TR; ++i) {
    const int64_t r = r0 + ty * TR + i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t v = v0 + tile_column(tx, j);
      if (v < table_rows) out[r * out_row_stride + v] = acc[i][j];
    }
  }
}

constexpr int kRowThreads = 256;

__global__ void __launch_bounds__(kRowThreads) head_features_kernel(
    const float* __restrict__ x, const float* y, const float* __restrict__ bias,
    const float* __restrict__ norm_weight, float eps, int64_t heads, int64_t depth, float* z) {
  __shared__ float scratch[kRowThreads / kWarp];
  const int64_t row = blockIdx.x;  // n * heads + h
  const int64_t n = row / heads, h = row % heads;
  const float* xr = x + n * depth;
  const float* yr = y + row * depth;
  float* zr = z + row * depth;
  float sq = 0.0f;
  for (int64_t d = threadIdx.x; d < depth; d += kRowThreads) {
    float v = yr[d];
    if (bias != nullptr) v += bias[h * depth + d];
    const float out = xr[d] + v / (1.0f + expf(-v));
    zr[d] = out;
    sq += out * out;
  }
  if (norm_weight == nullptr) return;
  const float total = block_sum<kRowThreads>(sq, scratch);
  const float inv = rsqrtf(total / static_cast<float>(depth) + eps);
  for (int64_t d = threadIdx.x; d < depth; d += kRowThreads) zr[d] = zr[d] * inv * norm_weight[d];
}

__global__ void __launch_bounds__(kRowThreads) rms_norm_kernel(const float* x,
                                                               const float* __restrict__ norm_weight,
                                                               float eps, int64_t depth, float* z) {
  __shared__ float scratch[kRowThreads / kWarp];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * depth;
  float* zr = z + row * depth;
  float sq = 0.0f;
  for (int64_t d = threadIdx.x; d < depth; d += kRowThreads) sq += xr[d] * xr[d];
  const float total = block_sum<kRowThreads>(sq, scratch);
  const float inv = rsqrtf(total / static_cast<float>(depth) + eps);
  for (int64_t d = threadIdx.x; d < depth; d += kRowThreads) zr[d] = xr[d] * inv * norm_weight[d];
}

template <typename T, int RB>
void launch_dot(const float* a, int64_t rows, int64_t depth, int64_t a_row_stride,
                int64_t a_group_stride, const T* w, int64_t table_rows, int64_t w_row_stride,
                int64_t w_group_stride, float* out, int64_t out_row_stride,
                int64_t out_group_stride, int64_t groups, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(table_rows, kVB)),
                  static_cast<unsigned>(ceil_div(rows, RB)), static_cast<unsigned>(groups));
  const bool vec = depth % 8 == 0 && (w_row_stride * int64_t(sizeof(T))) % 16 == 0 &&
                   (w_group_stride * int64_t(sizeof(T))) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(w) % 16 == 0;
  if (vec) {
    rows_dot_table_kernel<T, RB, true><<<grid, kDotThreads, 0, stream>>>(
        a, rows, depth, a_row_stride, a_group_stride, w, table_rows, w_row_stride, w_group_stride,
        out, out_row_stride, out_group_stride);
  } else {
    rows_dot_table_kernel<T, RB, false><<<grid, kDotThreads, 0, stream>>>(
        a, rows, depth, a_row_stride, a_group_stride, w, table_rows, w_row_stride, w_group_stride,
        out, out_row_stride, out_group_stride);
  }
}

}  // namespace

size_t rows_dot_table_workspace(int64_t rows, int64_t depth, int64_t a_group_stride,
                                const void* w, DType dtype, int64_t table_rows,
                                int64_t w_row_stride, int64_t w_group_stride, int64_t groups) {
  if (rows == 0 || table_rows == 0 || groups == 0 ||
      !rows_dot_mma_fits(depth, a_group_stride, w, dtype, w_row_stride, w_group_stride))
    return 0;
  return rows_dot_mma_workspace(rows, depth, table_rows, groups);
}

void launch_rows_dot_table(const float* a, int64_t rows, int64_t depth, int64_t a_row_stride,
                           int64_t a_group_stride, const void* w, DType dtype, int64_t table_rows,
                           int64_t w_row_stride, int64_t w_group_stride, float* out,
                           int64_t out_row_stride, int64_t out_group_stride, int64_t groups,
                           void* workspace, cudaStream_t stream) {
  if (rows == 0 || table_rows == 0 || groups == 0) return;
  if (rows_dot_mma_fits(depth, a_group_stride, w, dtype, w_row_stride, w_group_stride)) {
    launch_rows_dot_mma(a, rows, depth, a_row_stride, w, dtype, table_rows, w_row_stride,
                        w_group_stride, out, out_row_stride, out_group_stride, groups, workspace,
                        stream);
    return;
  }
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const T* wt = static_cast<const T*>(w);
    if (rows <= 16) {
      launch_dot<T, 16>(a, rows, depth, a_row_stride, a_group_stride, wt, table_rows, w_row_stride,
                        w_group_stride, out, out_row_stride, out_group_stride, groups, stream);
    } else {
      launch_dot<T, 64>(a, rows, depth, a_row_stride, a_group_stride, wt, table_rows, w_row_stride,
                        w_group_stride, out, out_row_stride, out_group_stride, groups, stream);
    }
  };
  dispatch(dtype, go);
}

void launch_head_features(const float* x, const float* y, const float* bias,
                          const float* norm_weight, float eps, int64_t n, int64_t heads,
                          int64_t depth, float* z, cudaStream_t stream) {
  if (n * heads == 0) return;
  head_features_kernel<<<static_cast<unsigned>(n * heads), kRowThreads, 0, stream>>>(
      x, y, bias, norm_weight, eps, heads, depth, z);
}

void launch_rms_norm(const float* x, const float* norm_weight, float eps, int64_t rows,
                     int64_t depth, float* z, cudaStream_t stream) {
  if (rows == 0) return;
  rms_norm_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(x, norm_weight, eps,
                                                                           depth, z);
}

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
