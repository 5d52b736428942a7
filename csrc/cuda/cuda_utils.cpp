#include "cuda_utils.h"

#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <cstdlib>
#include <cstring>

namespace mtp_ext {
namespace cuda {

kc::DType storage_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kc::DType::F32;
    case at::kHalf:
      return kc::DType::F16;
    case at::kBFloat16:
      return kc::DType::BF16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "mtp_ext: unsupported floating dtype ", t.scalar_type());
  return kc::DType::F32;
}

kc::RowLayout rows_layout(const at::Tensor& x2d) {
  return kc::RowLayout{1, x2d.stride(0), 0, x2d.stride(1)};
}

kc::RowLayout batch_rows_layout(const at::Tensor& x3d) {
  return kc::RowLayout{std::max<int64_t>(x3d.size(1), 1), x3d.stride(0), x3d.stride(1),
                       x3d.stride(2)};
}

bool value_checks_enabled() {
  const char* flag = std::getenv("MTP_EXT_CUDA_VALUE_CHECKS");
  if (flag == nullptr || std::strcmp(flag, "1") != 0) return false;
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

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

bool unembed_topk(const at::Tensor& z_in, const at::Tensor& table, int64_t k, kc::TopkOut mode,
                  const at::Tensor& out_val, const at::Tensor& out_id) {
  const int64_t rows = z_in.size(0), depth = z_in.size(1), vocab = table.size(0);
  if (table.stride(1) != 1 ||
      !kc::unembed_topk_fits(rows, depth, table.const_data_ptr(), storage_type(table),
                             table.stride(0), vocab, static_cast<int>(k)))
    return false;
  at::Tensor z = z_in.to(at::kFloat).contiguous();
  if (reinterpret_cast<uintptr_t>(z.const_data_ptr()) % 16 != 0) z = z.clone();  // a view
  const cudaStream_t s = stream();
  const int kk = static_cast<int>(k);
  const kc::DType dtype = storage_type(table);
  const int64_t chunks = kc::unembed_topk_chunks(rows, vocab, kk, dtype);
  const at::Tensor scratch = workspace(kc::unembed_topk_workspace(rows, depth, dtype), z);
  const bool stats = mode == kc::TopkOut::LogProb || mode == kc::TopkOut::Prob;
  const auto f32 = z.options().dtype(at::kFloat);
  at::Tensor part_max, part_sum;
  if (stats) {
    part_max = at::empty({rows, chunks}, f32);
    part_sum = at::empty({rows, chunks}, f32);
  }
  at::Tensor cand_key = at::empty({rows, chunks, k}, z.options().dtype(at::kInt));
  at::Tensor cand_id = at::empty({rows, chunks, k}, z.options().dtype(at::kInt));
  kc::launch_unembed_topk_partial(
      z.const_data_ptr<float>(), rows, depth, table.const_data_ptr(), dtype, table.stride(0), vocab,
      kk, chunks, stats ? part_max.data_ptr<float>() : nullptr,
      stats ? part_sum.data_ptr<float>() : nullptr,
      reinterpret_cast<uint32_t*>(cand_key.data_ptr<int32_t>()), cand_id.data_ptr<int32_t>(),
      data_or_null(scratch), s);
  MTP_EXT_CHECK_LAUNCH();
  kc::launch_topk_merge(rows, chunks, kk, stats ? part_max.const_data_ptr<float>() : nullptr,
                        stats ? part_sum.const_data_ptr<float>() : nullptr,
                        reinterpret_cast<const uint32_t*>(cand_key.const_data_ptr<int32_t>()),
                        cand_id.const_data_ptr<int32_t>(), mode, 1.0f,
                        mode == kc::TopkOut::None ? nullptr : out_val.data_ptr<float>(),
                        out_id.data_ptr<int64_t>(), nullptr, nullptr, s);
  MTP_EXT_CHECK_LAUNCH();
  return true;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor rows_dot(const at::Tensor& a, const at::Tensor& table) {
  const int64_t rows = a.size(0), depth = a.size(1), n = table.size(0);
  if (rows > 256) {
    // Many rows: the table is read once per 64 rows by the kernel; cuBLAS (float32) is better.
    return at::matmul(a.to(at::kFloat), table.to(at::kFloat).t());
  }
  const at::Tensor af = a.to(at::kFloat).contiguous();
  const at::Tensor w = table.stride(1) == 1 ? table : table.contiguous();
  at::Tensor out = at::empty({rows, n}, a.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return out;
  if (depth == 0) return out.zero_();
  const kc::DType dtype = storage_type(w);
  const at::Tensor scratch = workspace(
      kc::rows_dot_table_workspace(rows, depth, 0, w.const_data_ptr(), dtype, n, w.stride(0), 0, 1),
      af);
  kc::launch_rows_dot_table(af.const_data_ptr<float>(), rows, depth, depth, 0, w.const_data_ptr(),
                            dtype, n, w.stride(0), 0, out.data_ptr<float>(), n, 0, 1,
                            data_or_null(scratch), stream());
  MTP_EXT_CHECK_LAUNCH();
  return out;
}

}  // namespace cuda
}  // namespace mtp_ext
