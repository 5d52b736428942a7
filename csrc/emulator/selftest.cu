// Kernels that check the CPU emulator itself: what it must compute, and the faults it must report.
// Built only into the emulated library (tests/cuda_emulator.py); tests/test_cuda_emulator.py calls
// cuda_emu_selftest through ctypes.
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

namespace {

// Warp sums by butterfly shuffles, a block sum through shared memory, a ballot and a match.
__global__ void reductions_kernel(const int* in, int* out) {
  __shared__ int partial[32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int v = in[tid];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (tid == 0) {
    int total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) total += partial[w];
    out[0] = total;
  }
  const unsigned odd = __ballot_sync(0xffffffffu, in[tid] % 2 != 0);
  if (lane == 0) out[1 + warp] = static_cast<int>(odd);
  const unsigned same = __match_any_sync(0xffffffffu, in[tid] % 3);
  out[64 + tid] = static_cast<int>(same);
  out[192 + tid] = __shfl_up_sync(0xffffffffu, in[tid], 3);
}

// Lanes 0..15 wait at the block barrier while lanes 16..31 wait for them in a shuffle.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  }
}

// Half the warp exits, the other half shuffles over the full mask.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

// A shuffle whose mask leaves out the calling lane.
__global__ void mask_kernel(int* out) { out[threadIdx.x] = __shfl_sync(0x1u, 7, 0); }

// A shuffle reading a lane outside the mask.
__global__ void outside_mask_kernel(int* out) {
  if (threadIdx.x < 2) out[threadIdx.x] = __shfl_sync(0x3u, 7, 5);
}

// Thread 0 writes a shared value without a barrier before the others read it: what they see
// depends on the order of the threads' turns.
__global__ void race_kernel(int* out) {
  __shared__ int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x == 0) flag = 1;
  out[threadIdx.x] = flag;
}

// Reads its dynamic shared memory before writing it.
__global__ void dynamic_kernel(unsigned* out) {
  extern __shared__ unsigned dyn[];
  out[threadIdx.x] = dyn[threadIdx.x];
}

// A 16-byte load from an address 4 bytes past a 16-byte boundary.
__global__ void misaligned_kernel(const int* in, int* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + 1));
  out[threadIdx.x] = static_cast<int>(v.x);
}

// 2 KB of static shared memory beside the dynamic part.
__global__ void static_and_dynamic_kernel(int* out) {
  __shared__ int table[512];
  extern __shared__ int dyn_ints[];
  if (threadIdx.x == 0) {
    table[0] = 1;
    dyn_ints[0] = 2;
    out[0] = table[0] + dyn_ints[0];
  }
}

// Reads static shared memory before any thread of the block writes it, then writes it: the
// second block must not see what the first one wrote.
__global__ void stale_static_kernel(int* out) {
  __shared__ int kept;
  if (threadIdx.x == 0) {
    out[blockIdx.x] = kept;
    kept = 42;
  }
}

// Declared for at most 64 threads per block.
__global__ void __launch_bounds__(64) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

// Records the order in which the blocks run.
__global__ void block_order_kernel(int* out) {
  if (threadIdx.x == 0) out[1 + blockIdx.x] = atomicAdd(&out[0], 1);
}

// One warp: out[16, 16] (float, row-major) = a[16, 16] . b[16, 16] + 1 with a row-major and b
// column-major (bfloat16 bits in `ab`: a's 256, then b's); `lanes` of the warp take part.
__global__ void wmma_kernel(const unsigned short* ab, float* out, int lanes, int offset) {
  using namespace nvcuda;
  if (static_cast<int>(threadIdx.x) >= lanes) return;
  const auto* a = reinterpret_cast<const __nv_bfloat16*>(ab);
  const auto* b = reinterpret_cast<const __nv_bfloat16*>(ab + 256);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.0f);
  wmma::load_matrix_sync(fa, a + offset, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

// Each of 32 threads copies 16 bytes (4 ints) of `in` to shared memory asynchronously, the last
// 8 bytes zero-filled for odd threads, then reads back the 4 ints of thread 31 - t into out:
// after waiting and a barrier when `wait`, else right away.
__global__ void async_copy_kernel(const int* in, int* out, int wait) {
  __shared__ __align__(16) int staged[128];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(staged + 4 * t, in + 4 * t, 16, t % 2 == 1 ? 8 : 0);
  __pipeline_commit();
  if (wait) {
    __pipeline_wait_prior(0);
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i) out[4 * t + i] = staged[4 * (31 - t) + i];
}

// An asynchronous copy whose destination is global memory (out), not shared memory.
__global__ void async_copy_to_global_kernel(const int* in, int* out) {
  const int t = threadIdx.x;
  __pipeline_memcpy_async(out + 4 * t, in + 4 * t, 16, 0);
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

// Block 0 waits for a flag that block 1 sets: blocks run one after another here, so the wait is
// reported (on a GPU it hangs unless block 1 is resident).
__global__ void spin_wait_kernel(int* flag) {
  if (blockIdx.x == 0 && threadIdx.x == 0)
    while (*reinterpret_cast<volatile int*>(flag) == 0) __nanosleep(100);
  if (blockIdx.x == 1 && threadIdx.x == 0) atomicExch(flag, 1);
}

// ints[i] (float32 bits) -> the float16 bits of mtp_ext::kernels::to_f16, for 512 values.
__global__ void to_f16_kernel(int* ints) {
  for (int i = threadIdx.x; i < 512; i += blockDim.x)
    ints[i] = mtp_ext::kernels::to_f16(__int_as_float(ints[i])).bits;
}

std::string run(const char* name, int* ints) {
  cudaGetLastError();
  if (std::strcmp(name, "reductions") == 0) {
    reductions_kernel<<<1, 128>>>(ints, ints + 128);
  } else if (std::strcmp(name, "deadlock") == 0) {
    deadlock_kernel<<<1, 32>>>(ints);
  } else if (std::strcmp(name, "exited_lane") == 0) {
    exited_lane_kernel<<<1, 32>>>(ints);
  } else if (std::strcmp(name, "mask") == 0) {
    mask_kernel<<<1, 2>>>(ints);
  } else if (std::strcmp(name, "outside_mask") == 0) {
    outside_mask_kernel<<<1, 32>>>(ints);
  } else if (std::strcmp(name, "race") == 0) {
    race_kernel<<<1, 64>>>(ints);
  } else if (std::strcmp(name, "dynamic") == 0) {
    dynamic_kernel<<<1, 32, 32 * sizeof(unsigned)>>>(reinterpret_cast<unsigned*>(ints));
  } else if (std::strcmp(name, "smem_over_48k") == 0) {
    dynamic_kernel<<<1, 32, 64 * 1024>>>(reinterpret_cast<unsigned*>(ints));
  } else if (std::strcmp(name, "smem_opt_in") == 0) {
    cudaFuncSetAttribute(dynamic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    dynamic_kernel<<<1, 32, 64 * 1024>>>(reinterpret_cast<unsigned*>(ints));
  } else if (std::strcmp(name, "misaligned") == 0) {
    misaligned_kernel<<<1, 32>>>(ints, ints + 256);
  } else if (std::strcmp(name, "static_plus_dynamic_over_48k") == 0) {
    static_and_dynamic_kernel<<<1, 32, 47 * 1024>>>(ints);
  } else if (std::strcmp(name, "static_plus_dynamic_opt_in") == 0) {
    cudaFuncAttributes attr{};
    cudaFuncGetAttributes(&attr, static_and_dynamic_kernel);
    ints[1] = static_cast<int>(attr.sharedSizeBytes);
    cudaFuncSetAttribute(static_and_dynamic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         47 * 1024);
    static_and_dynamic_kernel<<<1, 32, 47 * 1024>>>(ints);
  } else if (std::strcmp(name, "stale_static") == 0) {
    stale_static_kernel<<<2, 32>>>(ints);
  } else if (std::strcmp(name, "block_order") == 0) {
    block_order_kernel<<<4, 32>>>(ints);
  } else if (std::strcmp(name, "within_launch_bounds") == 0) {
    bounded_kernel<<<1, 64>>>(ints);
  } else if (std::strcmp(name, "over_launch_bounds") == 0) {
    bounded_kernel<<<1, 128>>>(ints);
  } else if (std::strcmp(name, "wmma") == 0) {
    wmma_kernel<<<1, 32>>>(reinterpret_cast<unsigned short*>(ints),
                           reinterpret_cast<float*>(ints + 256), 32, 0);
  } else if (std::strcmp(name, "wmma_half_warp") == 0) {
    wmma_kernel<<<1, 32>>>(reinterpret_cast<unsigned short*>(ints),
                           reinterpret_cast<float*>(ints + 256), 16, 0);
  } else if (std::strcmp(name, "wmma_misaligned") == 0) {
    wmma_kernel<<<1, 32>>>(reinterpret_cast<unsigned short*>(ints),
                           reinterpret_cast<float*>(ints + 256), 32, 8);
  } else if (std::strcmp(name, "async_copy") == 0) {
    async_copy_kernel<<<1, 32>>>(ints, ints + 128, 1);
  } else if (std::strcmp(name, "async_copy_without_wait") == 0) {
    async_copy_kernel<<<1, 32>>>(ints, ints + 128, 0);
  } else if (std::strcmp(name, "async_copy_misaligned") == 0) {
    async_copy_kernel<<<1, 32>>>(ints + 1, ints + 128, 1);
  } else if (std::strcmp(name, "async_copy_to_global") == 0) {
    async_copy_to_global_kernel<<<1, 32>>>(ints, ints + 128);
  } else if (std::strcmp(name, "spin_wait") == 0) {
    ints[0] = 0;
    spin_wait_kernel<<<2, 32>>>(ints);
  } else if (std::strcmp(name, "to_f16") == 0) {
    to_f16_kernel<<<1, 64>>>(ints);
  } else if (std::strcmp(name, "block_too_large") == 0) {
    race_kernel<<<1, 2048>>>(ints);
  } else {
    return "unknown case";
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string("launch: ") + cudaGetErrorString(e);
}

}  // namespace

// Runs the case `name` on ints (at least 512 ints, in and out); writes "" or what went wrong (a
// launch error, or the emulator's fault) into message. Returns 0 when nothing went wrong.
extern "C" int cuda_emu_selftest(const char* name, int* ints, char* message, int message_len) {
  std::string what;
  try {
    what = run(name, ints);
  } catch (const std::exception& e) {
    what = e.what();
  }
  std::snprintf(message, static_cast<size_t>(message_len), "%s", what.c_str());
  return what.empty() ? 0 : 1;
}
