// The CPU emulator in place of c10's CUDA device guard: one device, nothing to switch.
#pragma once
#include <c10/core/Device.h>

#include "CUDAStream.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
