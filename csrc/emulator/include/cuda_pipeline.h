// The CPU emulator in place of the CUDA toolkit header of this name: the pipeline primitives
// (asynchronous copies to shared memory), as cuda_emulator.h describes them.
#pragma once
#include "../cuda_emulator.h"

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global,
                                    size_t size_and_align, size_t zfill = 0) {
  cuda_emu::async_copy(dst_shared, src_global, size_and_align, zfill);
}
inline void __pipeline_commit() { cuda_emu::async_commit(); }
inline void __pipeline_wait_prior(size_t prior) { cuda_emu::async_wait_prior(prior); }
