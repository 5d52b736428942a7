// The CPU emulator in place of the CUDA toolkit header of this name: the warp matrix functions
// (nvcuda::wmma) for 16 x 16 x 16 tiles of float16 or bfloat16 with float32 accumulators.
//
// A fragment holds the whole tile in every lane (row-major [rows][cols]); kernels must not depend
// on which elements a lane holds on a GPU (that layout is unspecified there anyway). What a GPU
// requires is checked: every lane of the warp calls load, store and mma (a collective: a lane that
// diverged or exited is reported as a deadlock), with the same pointer and leading dimension; the
// pointer is 32-byte aligned and the leading dimension a multiple of 16 bytes. A store writes the
// tile one slice per lane (lane l the elements l, l + 32, ...), so a lane that reads elements
// another lane stored, without a __syncwarp or barrier between, may see the old bytes. mma_sync
// computes each output once per warp (a share per lane, through the warp's scratch buffer) in
// float32, adding the products over k in order to the accumulator.
#pragma once
#include <type_traits>

#include "../cuda_emulator.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16 x 16 x 16 shape only");

 public:
  using element_type = T;
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

namespace detail {

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The checks every lane makes on entering a load or store (a warp collective).
template <typename T>
void check_access(const T* p, unsigned ldm, const char* op) {
  cuda_emu::warp_uniform(reinterpret_cast<uintptr_t>(p), op);
  cuda_emu::warp_uniform(ldm, op);
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    cuda_emu::fault(std::string(op) + ": the pointer is not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    cuda_emu::fault(std::string(op) + ": the leading dimension is not a multiple of 16 bytes");
}

// Element (r, c) of a tile in memory with leading dimension ldm.
template <typename T>
T& at(T* p, unsigned ldm, int r, int c, bool row_major) {
  return row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
}

// The calling thread's lane in its warp.
inline int lane() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) %
         32;
}

template <typename Layout>
constexpr bool is_row_major() {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "matrix_a and matrix_b fragments need a layout");
  return std::is_same_v<Layout, row_major>;
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout, typename E>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const E& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(v);
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  detail::check_access(p, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool rm = detail::is_row_major<Layout>();
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = detail::at(p, ldm, r, c, rm);
}

// The accumulator: the layout is an argument.
template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                      layout_t layout) {
  detail::check_access(p, ldm, "load_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = detail::at(p, ldm, r, c, layout == mem_row_major);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  detail::check_access(p, ldm, "store_matrix_sync");
  for (int e = detail::lane(); e < M * N; e += 32)
    detail::at(p, ldm, e / N, e % N, layout == mem_row_major) = f.x[e];
}

// d = a . b + c (d may be c).
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  cuda_emu::warp_uniform(0, "mma_sync");  // every lane is here
  float* out = static_cast<float*>(cuda_emu::warp_scratch(sizeof(float) * M * N));
  for (int e = detail::lane(); e < M * N; e += 32) {
    const int r = e / N, col = e % N;
    float s = c.x[e];
    for (int k = 0; k < K; ++k)
      s = std::fma(detail::to_float(a.x[r * K + k]), detail::to_float(b.x[k * N + col]), s);
    out[e] = s;
  }
  cuda_emu::warp_uniform(1, "mma_sync");  // every share is written
  for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
