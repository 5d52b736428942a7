// A CPU emulator of the part of CUDA that the kernels in csrc/kernels use, so that they run
// (slowly) on machines without a GPU and can be tested there against the CPU kernels and the
// references.
//
// The kernel sources are compiled as C++ after a small rewrite (see tests/cuda_emulator.py): the
// launch syntax `k<<<grid, block, smem, stream>>>(args)` becomes `::cuda_emu::launch(k, {grid,
// block, smem, stream})(args)` and `extern __shared__ T name[];` becomes a pointer to the launch's
// dynamic shared memory. Everything else compiles as written against this header.
//
// Execution model. A launch runs its blocks one after the other. Every thread of a block is a
// fiber (its own stack) and runs until it reaches a synchronization point: __syncthreads, a warp
// collective (__shfl*_sync, __ballot_sync, __any_sync, __match_any_sync, __syncwarp) or its end.
// Nothing runs in lockstep, so code that relies on implicit warp synchrony, or reads shared memory
// that another thread writes without a barrier between them, sees the other thread either not yet
// started or already past the point. The order in which the runnable threads get their turn is
// CUDA_EMU_SCHEDULE: "forward" (default), "reverse" or "random:<seed>"; running a test under
// several orders exposes such races. The emulator reports, as a C++ exception from the launch:
// deadlocks (a barrier some threads never reach, a collective waiting on an exited or diverged
// lane), collectives whose mask leaves out the calling lane or names a lane that does not exist,
// shuffles from lanes outside the mask, mismatched collectives. Launch configurations CUDA rejects
// (block size, grid limits, dynamic shared memory over 48 KB without the opt-in or over the
// device's maximum) set the last error and run nothing, as on a GPU. Static plus dynamic shared
// memory over what the launch allows is reported when a thread reaches the declaration. Blocks
// run one after the other: in grid order, reversed under "reverse", shuffled under "random:<seed>".
// Shared memory, dynamic and static, starts filled with 0xff bytes (NaN as float) at every block,
// so reads of it before a write show. Static `__shared__` variables become function statics
// (shared by the block's fibers), poisoned when the first thread of a block reaches them.
// Lanes are stricter than PTX requires: a collective whose mask names an exited lane is a fault.
// Atomics need no locking: fibers switch only at synchronization points. Threads that have exited
// count as arrived at __syncthreads, as on current GPUs. __ldg checks its address's alignment.
//
// The device: CUDA_EMU_SMS streaming multiprocessors (default 132, an H200), 227 KB of opt-in
// shared memory per block, CUDA_EMU_SMEM_PER_SM bytes of shared memory per multiprocessor (default
// 233472, an H100 / H200; an A100 has 167936), which only the kernels' grid sizing reads, and
// CUDA_EMU_L2_BYTES of L2 cache (default 52428800, an H100 SXM's), which only sizing reads.
// Blocks run one after another, so a block that spin-waits (__nanosleep) on another faults.
// Launches run synchronously, one at a time (the emulator's state is global: call it from one
// host thread at a time); streams are ignored.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>

#include "common.h"  // csrc/kernels: the bit casts and half conversions of the CPU kernels

// ---- Qualifiers ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)  // checked at run time: the rewrite adds check_launch_bounds

// ---- Vector types -------------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
  float x, y;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
  unsigned x, y;
};
struct __attribute__((aligned(16))) int4 {
  int x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

// ---- Half precision (cuda_fp16.h / cuda_bf16.h): storage and conversion to float only -----------
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) {
  return mtp_ext::kernels::to_float(mtp_ext::kernels::f16{h.bits});
}
inline float __bfloat162float(__nv_bfloat16 h) {
  return mtp_ext::kernels::to_float(mtp_ext::kernels::bf16{h.bits});
}

// ---- Bit casts and integer intrinsics -----------------------------------------------------------
inline float __int_as_float(int v) { return mtp_ext::kernels::bits_to_float(uint32_t(v)); }
inline float __uint_as_float(unsigned v) { return mtp_ext::kernels::bits_to_float(v); }
inline int __float_as_int(float f) { return int(mtp_ext::kernels::float_to_bits(f)); }
inline unsigned __float_as_uint(float f) { return mtp_ext::kernels::float_to_bits(f); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
namespace cuda_emu {
// Faults the running thread: a load from an address not aligned to its type (a GPU traps).
[[noreturn]] void misaligned_load(const void* p, size_t alignment);
}  // namespace cuda_emu
template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) cuda_emu::misaligned_load(p, alignof(T));
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return __ldg(p);
}
// Blocks run one after another and memory is coherent, so a fence has nothing to order.
inline void __threadfence() {}
namespace cuda_emu {
// A thread that backs off in a spin-wait: no other block can run until this one ends, so the
// wait would never end. On a GPU it could hang too (the awaited work was not started before).
[[noreturn]] void spin_wait();
}  // namespace cuda_emu
inline void __nanosleep(unsigned) { cuda_emu::spin_wait(); }

// ---- Math beyond <cmath> ------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
// Device code calls the classification functions unqualified (CUDA declares them globally).
using std::isfinite;
using std::isinf;
using std::isnan;
// CUDA's min / max: integers compare, floating point ignores NaN (fminf / fmaxf).
template <typename T>
inline T min(T a, T b) {
  if constexpr (std::is_floating_point_v<T>) return std::fmin(a, b);
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  if constexpr (std::is_floating_point_v<T>) return std::fmax(a, b);
  return a < b ? b : a;
}

// ---- Runtime API (cuda_runtime_api.h) -----------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int maxDynamicSharedSizeBytes;
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace cuda_emu {

// Per-function opt-in of dynamic shared memory (cudaFuncSetAttribute), keyed by the kernel.
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
int max_dynamic_smem(const void* kernel);
// Static shared memory: the size a kernel declares (registered by the rewritten source for kernels
// that are not templates, so cudaFuncGetAttributes reports it), and each static `__shared__`
// variable as a thread reaches its declaration (poisoned at its first use in each block; the
// block's total plus the dynamic size is checked against what the launch allows).
bool declare_static_shared(const void* kernel, size_t bytes);
size_t static_shared(const void* kernel);
void note_shared(void* variable, size_t bytes);
// Called at the top of a kernel declared with __launch_bounds__(max_threads): faults a launch
// whose blocks have more threads (a GPU refuses it).
void check_launch_bounds(int max_threads);
cudaError_t set_last_error(cudaError_t e);
cudaError_t get_last_error(bool clear);
int device_attribute(cudaDeviceAttr attr);
const char* error_string(cudaError_t e);

}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() { return cuda_emu::get_last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::get_last_error(false); }
inline const char* cudaGetErrorString(cudaError_t e) { return cuda_emu::error_string(e); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cuda_emu::set_last_error(cudaErrorInvalidValue);
  *value = cuda_emu::device_attribute(attr);
  return cudaSuccess;
}
// sharedSizeBytes: the static shared memory the kernel declares (0 for template kernels).
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* kernel) {
  const void* k = reinterpret_cast<const void*>(kernel);
  *attr = cudaFuncAttributes{cuda_emu::static_shared(k), 0, 0, 1024, 0,
                             cuda_emu::max_dynamic_smem(k)};
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
    return cuda_emu::set_last_error(cudaErrorInvalidValue);
  return cuda_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

// ---- Execution ----------------------------------------------------------------------------------
namespace cuda_emu {

// The position of the running fiber.
struct Position {
  uint3 thread;
  uint3 block;
  dim3 block_dim;
  dim3 grid_dim;
};
// The running fiber's position (null outside a launch); read by threadIdx and friends.
extern Position* g_position;
void* dynamic_shared_memory();

// Synchronization points (see the header comment).
void sync_threads();
enum class Collective : int {
  SyncWarp,
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
  MatchAny,
};
// Enters a warp collective with this lane's 64-bit payload; returns this lane's 64-bit result.
uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int param, int width);

// For the warp-wide matrix operations (mma.h): a collective of the whole warp that faults unless
// every lane passes the same value (`what` names the operation and the argument in the report),
// and a scratch buffer of the calling thread's warp (valid until the block ends).
void warp_uniform(uint64_t value, const char* what);
void* warp_scratch(size_t bytes);
[[noreturn]] void fault(const std::string& what);

// Asynchronous copies to shared memory (cuda_pipeline.h). A copy is queued in the calling thread's
// open batch, reading its source at once; a commit closes the batch; wait_prior(n) writes the
// destinations of all committed batches but the n most recent. So shared memory read before the
// wait that covers it shows the old (poisoned) bytes, as it may on a GPU. A copy whose size is not
// 4, 8 or 16 bytes, whose addresses are not aligned to it, or whose destination is not in the
// block's shared memory is a fault.
void async_copy(void* dst, const void* src, size_t size, size_t zfill);
void async_commit();
void async_wait_prior(size_t prior);

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr)
      : grid(g), block(b), smem(s), stream(st) {}
};

// Runs body on every thread of every block of the launch; throws std::runtime_error on a fault.
// A configuration CUDA would reject sets the last error (as a failed launch does) and runs nothing.
void run_grid(const void* kernel, const LaunchConfig& config, const std::function<void()>& body);

// `kernel<<<config>>>(args...)` as `launch(kernel, config)(args...)`.
template <typename... P>
auto launch(void (*kernel)(P...), LaunchConfig config) {
  return [kernel, config](auto&&... args) {
    // Arguments are converted to the parameter types once, as a launch copies them.
    std::tuple<std::decay_t<P>...> params(static_cast<P>(args)...);
    run_grid(reinterpret_cast<const void*>(kernel), config,
             [&] { std::apply(kernel, params); });
  };
}

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_memory());
}

template <typename T>
uint64_t to_payload(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                "shuffle of a type over 8 bytes");
  uint64_t p = 0;
  std::memcpy(&p, &v, sizeof(T));
  return p;
}
template <typename T>
T from_payload(uint64_t p) {
  T v;
  std::memcpy(&v, &p, sizeof(T));
  return v;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::g_position->thread)
#define blockIdx (::cuda_emu::g_position->block)
#define blockDim (::cuda_emu::g_position->block_dim)
#define gridDim (::cuda_emu::g_position->grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { cuda_emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::warp_collective(cuda_emu::Collective::SyncWarp, mask, 0, 0, 32);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return cuda_emu::from_payload<T>(cuda_emu::warp_collective(
      cuda_emu::Collective::ShflIdx, mask, cuda_emu::to_payload(v), src, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return cuda_emu::from_payload<T>(cuda_emu::warp_collective(
      cuda_emu::Collective::ShflUp, mask, cuda_emu::to_payload(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return cuda_emu::from_payload<T>(cuda_emu::warp_collective(
      cuda_emu::Collective::ShflDown, mask, cuda_emu::to_payload(v), static_cast<int>(delta),
      width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return cuda_emu::from_payload<T>(cuda_emu::warp_collective(
      cuda_emu::Collective::ShflXor, mask, cuda_emu::to_payload(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(
      cuda_emu::warp_collective(cuda_emu::Collective::Ballot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(
      cuda_emu::warp_collective(cuda_emu::Collective::Any, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(
      cuda_emu::warp_collective(cuda_emu::Collective::All, mask, pred != 0, 0, 32));
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
  return static_cast<unsigned>(cuda_emu::warp_collective(
      cuda_emu::Collective::MatchAny, mask, cuda_emu::to_payload(v), 0, 32));
}

// No other fiber runs between two synchronization points, so plain read-modify-writes are atomic.
// The value converts to the address's type, as with CUDA's overloads.
template <typename T>
using AtomicValue = typename std::common_type<T>::type;
template <typename T>
T atomicAdd(T* address, AtomicValue<T> v) {
  const T old = *address;
  *address = old + v;
  return old;
}
template <typename T>
T atomicMax(T* address, AtomicValue<T> v) {
  const T old = *address;
  *address = old < v ? v : old;
  return old;
}
template <typename T>
T atomicMin(T* address, AtomicValue<T> v) {
  const T old = *address;
  *address = v < old ? v : old;
  return old;
}
template <typename T>
T atomicExch(T* address, AtomicValue<T> v) {
  const T old = *address;
  *address = v;
  return old;
}
template <typename T>
T atomicCAS(T* address, AtomicValue<T> compare, AtomicValue<T> v) {
  const T old = *address;
  if (old == compare) *address = v;
  return old;
}
