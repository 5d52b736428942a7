// CPU kernel of softmax_topk: one blockwise pass per row computing the softmax normalizer and the
// running top-k together (rows split across threads when there are few of them).
#include <torch/library.h>

#include "../checks.h"
#include "cpu_utils.h"

namespace mtp_ext {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> softmax_topk_cpu(const at::Tensor& logits, int64_t k,
                                                    double temperature) {
  at::Tensor probs, ids;
  std::tie(probs, ids) = prepare_softmax_topk(logits, k, temperature);
  const int64_t vocab = logits.size(-1);
  const int64_t rows = vocab == 0 ? 0 : logits.numel() / vocab;
  if (rows == 0) return {probs, ids};

  const at::Tensor x = logits.reshape({rows, vocab});
  const float scale = static_cast<float>(1.0 / temperature);
  float* p_out = probs.data_ptr<float>();
  int64_t* id_out = ids.data_ptr<int64_t>();
  dispatch_floating(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* base = data_as<T>(x);
    const int64_t row_stride = x.stride(0), col_stride = x.stride(1);
    std::vector<SoftmaxStats> stats;
    std::vector<std::vector<Candidate>> tops;
    rows_stats_topk<T>(
        rows, vocab, col_stride, [&](int64_t r) { return base + r * row_stride; }, scale, k, stats,
        &tops);
    at::parallel_for(0, rows, 64, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const SoftmaxStats& st = stats[r];
        for (int64_t j = 0; j < k; ++j) {
          const Candidate& c = tops[r][j];
          p_out[r * k + j] = kernels::exp_nonpositive((c.value - st.max) * scale) / st.sum;
          id_out[r * k + j] = c.id;
        }
      }
    });
  });
  return {probs, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) { m.impl("softmax_topk", &softmax_topk_cpu); }

}  // namespace cpu
}  // namespace mtp_ext
