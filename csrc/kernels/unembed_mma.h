// Between the two decode-size unembedding kernels: the launch API (cuda_launch.h) is implemented in
// unembed_kernels.cu, which hands 16-bit tables on devices with bfloat16 tensor cores to the
// tensor-core kernel of unembed_mma_kernels.cu through these functions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_launch.h"

namespace mtp_ext {
namespace kernels {
namespace cuda {

// The current device's multiprocessor count and compute capability (major); 132 and 0 when the
// query fails (the failure is cleared: it is not a launch error).
int device_sms();
int device_compute_major();

// Table rows per tile of the tensor-core kernel (each block takes whole tiles).
constexpr int kMmaTile = 256;

// Whether the tensor-core kernel serves a table of this dtype on the current device.
bool unembed_mma_available(DType dtype);

// Resident blocks per SM of the tensor-core kernel for this many rows.
int unembed_mma_blocks_per_sm(int64_t rows);

// Bytes of device workspace the tensor-core kernel needs (z split into two 16-bit parts, padded,
// and a scale per row).
size_t unembed_mma_workspace(int64_t rows, int64_t depth);

// Pass 1 on tensor cores: as launch_unembed_topk_partial, with blocks of per_block (a multiple of
// kMmaTile) table rows and a workspace of unembed_mma_workspace bytes, 16-byte aligned.
void launch_unembed_topk_partial_mma(const float* z, int64_t rows, int64_t depth, const void* w,
                                     DType dtype, int64_t w_row_stride, int64_t vocab, int k,
                                     int64_t chunks, int64_t per_block, float* part_max,
                                     float* part_sum, uint32_t* cand_key, int32_t* cand_id,
                                     void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
