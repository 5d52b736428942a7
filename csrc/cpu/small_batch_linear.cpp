// CPU kernel of small_batch_linear: y[M, N] = x[M, K] . weight[N, K]^T + bias for a few rows. Each
// thread streams its slice of the weight once, and every weight vector it loads serves a tile of up
// to four rows of x from registers, so M rows cost about what one row costs while the weight stream
// dominates (BLAS paths for 2+ rows re-pack or re-read the weights).
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/dot_tile.h"
#include "cpu_utils.h"
#include "table_stream.h"

namespace mtp_ext {
namespace cpu {
namespace {

at::Tensor small_batch_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias) {
  check_small_batch_linear(x, weight, bias);
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const bool direct = x.scalar_type() == at::kFloat;
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return out.to(x.scalar_type());
  if (k == 0) return (bias.has_value() ? bias->to(at::kFloat).expand({m, n}).clone() : out.zero_())
      .to(x.scalar_type());

  const at::Tensor w = weight.contiguous();
  at::Tensor bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  const float* b = bias.has_value() ? bf.const_data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  auto add_bias = [&](int64_t v, int64_t nb) {
    if (b == nullptr) return;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < nb; ++j) y[r * n + v + j] += b[v + j];
  };
#if MTP_EXT_HAS_BF16_DOT
  if (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16) {
    // Both operands already bfloat16: pair dot products straight from the stored bits.
    const at::Tensor xb = x.contiguous();
    const auto* a = data_as<kernels::bf16>(xb);
    const auto* wt = data_as<kernels::bf16>(w);
    for_each_table_block(n, [&](int64_t, int64_t v, int64_t nb) {
      kernels::dot_rows_bf16(a, k, m, wt + v * k, k, nb, k, y + v, n);
      add_bias(v, nb);
    });
    return out.to(x.scalar_type());
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* a = xf.const_data_ptr<float>();
  dispatch_floating(weight.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    stream_table(data_as<T>(w), n, k, [&](int64_t, const float* block, int64_t v, int64_t nb) {
      kernels::dot_rows(a, k, m, block, k, nb, k, y + v, n);
      add_bias(v, nb);
    });
  });
  return direct ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) { m.impl("small_batch_linear", &small_batch_linear_cpu); }

}  // namespace cpu
}  // namespace mtp_ext
