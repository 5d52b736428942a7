#include "unembed.h"

#include "row_topk.h"

namespace mtp_ext {
namespace cuda {
namespace {

// The streaming kernels of unembed_kernels.cu; false, doing nothing, where they do not serve the
// sizes.
bool streamed_unembed_topk(const at::Tensor& z_in, const at::Tensor& table, int64_t k,
                           kc::TopkOut mode, const at::Tensor& out_val,
                           const at::Tensor& out_id) {
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

}  // namespace

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

void unembed_topk(const at::Tensor& z, const at::Tensor& table, int64_t k, kc::TopkOut mode,
                  const at::Tensor& out_val, const at::Tensor& out_id) {
  const int64_t rows = z.size(0);
  if (rows == 0 || streamed_unembed_topk(z, table, k, mode, out_val, out_id)) return;
  const at::Tensor logits = rows_dot(z, table);  // [rows, V] float32
  row_topk(logits, rows, table.size(0), rows_layout(logits), 1.0f, k, mode, out_val, out_id,
           at::Tensor());
}

at::Tensor final_norm_rows(const at::Tensor& x, int64_t rows,
                           const c10::optional<at::Tensor>& norm_weight, double eps) {
  const int64_t depth = x.size(-1);
  at::Tensor z = x.reshape({rows, depth}).to(at::kFloat).contiguous();
  if (!norm_weight.has_value() || rows == 0) return z;
  if (z.data_ptr() == x.data_ptr()) z = z.clone();  // never normalize the input in place
  const at::Tensor nw = norm_weight->to(at::kFloat).contiguous();
  kc::launch_rms_norm(z.const_data_ptr<float>(), nw.const_data_ptr<float>(),
                      static_cast<float>(eps), rows, depth, z.data_ptr<float>(), stream());
  MTP_EXT_CHECK_LAUNCH();
  return z;
}

}  // namespace cuda
}  // namespace mtp_ext
