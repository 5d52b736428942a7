// Between the launch API (cuda_launch.h) and the tensor-core kernels of mma_kernels.cu: the
// launchers of unembed_kernels.cu and dense_kernels.cu hand float16 and bfloat16 tables on devices
// with bfloat16 tensor cores (compute capability 8.0 and newer) to these functions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_launch.h"

namespace mtp_ext {
namespace kernels {
namespace cuda {

// The current device's multiprocessor count, compute capability (major), shared memory per
// multiprocessor and L2 cache in bytes; 132, 0, 0 and 0 when the query fails (the failure is
// cleared: it is not a launch error).
int device_sms();
int device_compute_major();
int device_smem_per_sm();
int device_l2_bytes();

// Table rows per tile of the tensor-core kernels (each block takes whole tiles).
constexpr int kMmaTile = 256;

// Whether tensor cores serve a table of this dtype on the current device.
bool mma_available(DType dtype);

// ---- The unembedding with a running top-k ------------------------------------------------------
// Resident blocks per SM of the tensor-core kernel for this many rows.
int unembed_mma_blocks_per_sm(int64_t rows);

// Bytes of device workspace it needs (z split into two 16-bit parts, padded, and a scale per row).
size_t unembed_mma_workspace(int64_t rows, int64_t depth);

// Pass 1 on tensor cores: as launch_unembed_topk_partial, with blocks of per_block (a multiple of
// kMmaTile) table rows and a workspace of unembed_mma_workspace bytes, 16-byte aligned.
void launch_unembed_topk_partial_mma(const float* z, int64_t rows, int64_t depth, const void* w,
                                     DType dtype, int64_t w_row_stride, int64_t vocab, int k,
                                     int64_t chunks, int64_t per_block, float* part_max,
                                     float* part_sum, uint32_t* cand_key, int32_t* cand_id,
                                     void* workspace, cudaStream_t stream);

// ---- The dense product -------------------------------------------------------------------------
// Whether the tensor-core product serves these sizes: mma_available, groups that share the rows
// of a (a_group_stride 0: the heads' blocks, or one group), a depth that is a positive multiple of
// 8, 16-byte aligned table rows and groups.
bool rows_dot_mma_fits(int64_t depth, int64_t a_group_stride, const void* w, DType dtype,
                       int64_t w_row_stride, int64_t w_group_stride);

// Bytes of device workspace it needs (the split rows and, when the depth is split across blocks,
// their partial sums).
size_t rows_dot_mma_workspace(int64_t rows, int64_t depth, int64_t table_rows, int64_t groups);

// launch_rows_dot_table on tensor cores (where rows_dot_mma_fits), with a workspace of
// rows_dot_mma_workspace bytes, 16-byte aligned.
void launch_rows_dot_mma(const float* a, int64_t rows, int64_t depth, int64_t a_row_stride,
                         const void* w, DType dtype, int64_t table_rows, int64_t w_row_stride,
                         int64_t w_group_stride, float* out, int64_t out_row_stride,
                         int64_t out_group_stride, int64_t groups, void* workspace,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
