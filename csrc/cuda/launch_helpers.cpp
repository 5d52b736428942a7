#include "launch_helpers.h"

#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <cstdlib>
#include <cstring>

namespace mtp_ext {
namespace cuda {

kc::DType storage_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kc::DType::F32;
    case at::kHalf:
      return kc::DType::F16;
    case at::kBFloat16:
      return kc::DType::BF16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "mtp_ext: unsupported floating dtype ", t.scalar_type());
  return kc::DType::F32;
}

kc::RowLayout rows_layout(const at::Tensor& x2d) {
  return kc::RowLayout{1, x2d.stride(0), 0, x2d.stride(1)};
}

kc::RowLayout batch_rows_layout(const at::Tensor& x3d) {
  return kc::RowLayout{std::max<int64_t>(x3d.size(1), 1), x3d.stride(0), x3d.stride(1),
                       x3d.stride(2)};
}

bool value_checks_enabled() {
  const char* flag = std::getenv("MTP_EXT_CUDA_VALUE_CHECKS");
  if (flag == nullptr || std::strcmp(flag, "1") != 0) return false;
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

void check_cuda_vocab(int64_t vocab, const char* op, const char* name) {
  TORCH_CHECK_VALUE(vocab < (int64_t(1) << 31), op, ": ", name,
                    " must have V < 2^31 on CUDA (the kernels count tokens in int32), got V = ",
                    vocab);
}

void check_cuda_rows(int64_t rows, const char* op, const char* what) {
  TORCH_CHECK_VALUE(rows < (int64_t(1) << 31), op, ": ", what,
                    " must be below 2^31 on CUDA (one block per row), got ", rows);
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

}  // namespace cuda
}  // namespace mtp_ext
