#include "row_topk.h"

namespace mtp_ext {
namespace cuda {

void row_topk(const at::Tensor& x, int64_t rows, int64_t vocab, kc::RowLayout layout, float scale,
              int64_t k, kc::TopkOut mode, const at::Tensor& out_val, const at::Tensor& out_id,
              const at::Tensor& row_max) {
  if (rows == 0) return;
  TORCH_CHECK(vocab < (int64_t(1) << 31), "mtp_ext: vocabularies of 2^31 or more are not supported");
  const cudaStream_t s = stream();
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t chunks = kc::topk_chunks(vocab);
  const bool stats = mode == kc::TopkOut::Prob || mode == kc::TopkOut::LogProb;
  float* val = mode == kc::TopkOut::None ? nullptr : out_val.data_ptr<float>();
  if (k <= kc::kTopkMaxK && chunks * k <= kc::kTopkMaxMerge) {
    at::Tensor part_max = at::empty({rows, chunks}, f32);
    at::Tensor part_sum = at::empty({rows, chunks}, f32);
    at::Tensor cand_key = at::empty({rows, chunks, k}, x.options().dtype(at::kInt));
    at::Tensor cand_id = at::empty({rows, chunks, k}, x.options().dtype(at::kInt));
    kc::launch_topk_partial(x.const_data_ptr(), storage_type(x), rows, vocab, layout, scale,
                            static_cast<int>(k), part_max.data_ptr<float>(),
                            part_sum.data_ptr<float>(),
                            reinterpret_cast<uint32_t*>(cand_key.data_ptr<int32_t>()),
                            cand_id.data_ptr<int32_t>(), s);
    MTP_EXT_CHECK_LAUNCH();
    const bool need_stats = stats || row_max.defined();
    kc::launch_topk_merge(rows, chunks, static_cast<int>(k),
                          need_stats ? part_max.const_data_ptr<float>() : nullptr,
                          need_stats ? part_sum.const_data_ptr<float>() : nullptr,
                          reinterpret_cast<const uint32_t*>(cand_key.const_data_ptr<int32_t>()),
                          cand_id.const_data_ptr<int32_t>(), mode, scale, val,
                          out_id.data_ptr<int64_t>(),
                          data_or_null<float>(row_max), nullptr, s);
    MTP_EXT_CHECK_LAUNCH();
    return;
  }
  // Large k: the full ranking, then the first k.
  at::Tensor sorted_keys, sorted_ids;
  std::tie(sorted_keys, sorted_ids) = sorted_ranking(x, rows, vocab, layout);
  at::Tensor rmax = at::empty({rows}, f32), rsum = at::empty({rows}, f32);
  if (stats || row_max.defined()) {
    at::Tensor part_max = at::empty({rows, chunks}, f32);
    at::Tensor part_sum = at::empty({rows, chunks}, f32);
    kc::launch_topk_partial(x.const_data_ptr(), storage_type(x), rows, vocab, layout, scale, 0,
                            part_max.data_ptr<float>(), part_sum.data_ptr<float>(), nullptr,
                            nullptr, s);
    MTP_EXT_CHECK_LAUNCH();
    kc::launch_stats_merge(rows, chunks, part_max.const_data_ptr<float>(),
                           part_sum.const_data_ptr<float>(), scale, rmax.data_ptr<float>(),
                           rsum.data_ptr<float>(), s);
    MTP_EXT_CHECK_LAUNCH();
    if (row_max.defined()) row_max.copy_(rmax);
  }
  kc::launch_topk_from_sorted(rows, static_cast<int>(k), sorted_keys.const_data_ptr<int32_t>(),
                              sorted_keys.stride(0), sorted_ids.const_data_ptr<int64_t>(),
                              sorted_ids.stride(0), rmax.const_data_ptr<float>(),
                              rsum.const_data_ptr<float>(), mode, scale, val,
                              out_id.data_ptr<int64_t>(), s);
  MTP_EXT_CHECK_LAUNCH();
}

std::tuple<at::Tensor, at::Tensor> sorted_ranking(const at::Tensor& x, int64_t rows, int64_t vocab,
                                                  kc::RowLayout layout) {
  at::Tensor keys = at::empty({rows, vocab}, x.options().dtype(at::kInt));
  kc::launch_rank_keys(x.const_data_ptr(), storage_type(x), rows, vocab, layout,
                       keys.data_ptr<int32_t>(), stream());
  MTP_EXT_CHECK_LAUNCH();
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
  return {std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous()};
}

}  // namespace cuda
}  // namespace mtp_ext
