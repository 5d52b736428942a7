// The CPU emulator in place of c10's CUDA error checks: a launch the emulator rejected raises.
#pragma once
#include <c10/util/Exception.h>

#include "../../../cuda_emulator.h"

#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                   \
  do {                                                                                   \
    const cudaError_t emu_error = cudaGetLastError();                                    \
    TORCH_CHECK(emu_error == cudaSuccess, "CUDA error (emulated): ",                     \
                cudaGetErrorString(emu_error));                                          \
  } while (0)
