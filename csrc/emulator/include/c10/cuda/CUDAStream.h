// The CPU emulator in place of c10's CUDA stream: one stream, the default (see ../../../cuda_emulator.h).
#pragma once
#include "../../../cuda_emulator.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(signed char = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10
