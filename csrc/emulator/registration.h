// Included first in every torch-facing file of the emulated build: the op schemas of csrc/ops.cpp
// are declared again in the namespace mtp_ext_emu, and the CUDA launchers of csrc/cuda register
// there for the CPU dispatch key, so that torch.ops.mtp_ext_emu.<op> on CPU tensors runs the CUDA
// kernels under the emulator while torch.ops.mtp_ext.<op> keeps the CPU kernels.
#pragma once
#include <torch/library.h>

#undef TORCH_LIBRARY
#define TORCH_LIBRARY(ns, m)                                                                  \
  static void TORCH_LIBRARY_init_mtp_ext_emu(torch::Library&);                                \
  static const torch::detail::TorchLibraryInit TORCH_LIBRARY_static_init_mtp_ext_emu(         \
      torch::Library::DEF, &TORCH_LIBRARY_init_mtp_ext_emu, "mtp_ext_emu", std::nullopt,      \
      __FILE__, __LINE__);                                                                    \
  void TORCH_LIBRARY_init_mtp_ext_emu(torch::Library& m)

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(mtp_ext_emu, CPU, m, C10_UID)
