// What every CUDA launcher uses around a launch: the current stream, the launch check, the
// mapping of tensors to the kernels' arguments (storage types, row layouts, data of optional
// tensors, workspaces) and the switch for value checks that read device data.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cuda_launch.h"

namespace mtp_ext {
namespace cuda {

namespace kc = kernels::cuda;

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Checks the last launch (never synchronizes).
#define MTP_EXT_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

kc::DType storage_type(const at::Tensor& t);

// Layout of a [rows, V] view: 2-D tensors, or [B, L, V] tensors as B * L rows.
kc::RowLayout rows_layout(const at::Tensor& x2d);
kc::RowLayout batch_rows_layout(const at::Tensor& x3d);

// Value checks that must read device data (tree validity, non-negative weights, compact_kv's
// index ranges, non-negative vocab_ids) synchronize with the device, so the CUDA launchers skip
// them unless MTP_EXT_CUDA_VALUE_CHECKS=1; never while the stream is being captured into a CUDA
// graph. Every other check (shapes, dtypes, devices, sizes, scalar arguments) is always made.
bool value_checks_enabled();

// The cheap checks of limits of the CUDA kernels, always made (ValueError naming the argument):
// a vocabulary (the `name` tensor's V) below 2^31, since the kernels count a row's tokens in
// int32; at most 2^31 - 1 rows (`what`) for the kernels that take one block per row.
void check_cuda_vocab(int64_t vocab, const char* op, const char* name);
void check_cuda_rows(int64_t rows, const char* op, const char* what);

// A device buffer of `bytes` bytes on `like`'s device for a kernel's workspace (undefined for 0).
at::Tensor workspace(size_t bytes, const at::Tensor& like);

// The data of an optional tensor (an input, an output or a workspace), null where undefined.
inline void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}
template <typename T>
const T* const_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace cuda
}  // namespace mtp_ext
