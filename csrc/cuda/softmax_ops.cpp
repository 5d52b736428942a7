// CUDA launchers of softmax_topk, marginalize and topk_marginalize.
#include <torch/library.h>

#include "../checks.h"
#include "row_topk.h"

namespace mtp_ext {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> softmax_topk_cuda(const at::Tensor& logits, int64_t k,
                                                     double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor probs, ids;
  std::tie(probs, ids) = prepare_softmax_topk(logits, k, temperature);
  check_cuda_vocab(logits.size(-1), "mtp_ext.softmax_topk", "logits");
  const int64_t vocab = logits.size(-1), rows = logits.numel() / vocab;  // V >= k >= 1
  if (rows == 0) return {probs, ids};
  const at::Tensor x = logits.reshape({rows, vocab});
  row_topk(x, rows, vocab, rows_layout(x), static_cast<float>(1.0 / temperature), k,
           kc::TopkOut::Prob, probs, ids, at::Tensor());
  return {probs, ids};
}

// Per-(b, l) coefficients w / sum_v exp(x - max) and row maxima from [B * L, chunks] statistics.
std::pair<at::Tensor, at::Tensor> plan_from_stats(const at::Tensor& part_max,
                                                  const at::Tensor& part_sum,
                                                  const at::Tensor& weights, bool renormalize) {
  const int64_t b = weights.size(0), l = weights.size(1), chunks = part_max.size(1);
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  at::Tensor coef = at::empty({b, l}, part_max.options());
  at::Tensor row_max = at::empty({b, l}, part_max.options());
  kc::launch_marginal_plan(b, l, chunks, part_max.const_data_ptr<float>(),
                           part_sum.const_data_ptr<float>(), w.const_data_ptr<float>(), renormalize,
                           coef.data_ptr<float>(), row_max.data_ptr<float>(), stream());
  MTP_EXT_CHECK_LAUNCH();
  return {coef, row_max};
}

// The same from a statistics pass over the logits.
std::pair<at::Tensor, at::Tensor> plan_mixture(const at::Tensor& x, const at::Tensor& weights,
                                               bool renormalize) {
  const int64_t rows = x.size(0) * x.size(1), vocab = x.size(2);
  const int64_t chunks = kc::topk_chunks(vocab);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor part_max = at::empty({rows, chunks}, f32), part_sum = at::empty({rows, chunks}, f32);
  kc::launch_topk_partial(x.const_data_ptr(), storage_type(x), rows, vocab, batch_rows_layout(x),
                          1.0f, 0, part_max.data_ptr<float>(), part_sum.data_ptr<float>(), nullptr,
                          nullptr, stream());
  MTP_EXT_CHECK_LAUNCH();
  return plan_from_stats(part_max, part_sum, weights, renormalize);
}

// topk_marginalize's one-read path (cuda_launch.h): the statistics, the plan and the top m of
// the rows whose answer the one read proves, written into probs/ids. Returns the plan and done[B]
// (int32, 1 for the rows answered).
std::tuple<at::Tensor, at::Tensor, at::Tensor> answer_from_one_read(
    const at::Tensor& next_logits, const at::Tensor& weights, int64_t m, bool renormalize,
    int64_t chunk, at::Tensor& probs, at::Tensor& ids) {
  const int64_t b = next_logits.size(0), l = next_logits.size(1), vocab = next_logits.size(2);
  const int64_t chunks = kc::topk_chunks_of(vocab, chunk), cands = l * m;
  const auto f32 = next_logits.options().dtype(at::kFloat);
  const auto i32 = next_logits.options().dtype(at::kInt);
  at::Tensor part_max = at::empty({b * l, chunks}, f32), part_sum = at::empty({b * l, chunks}, f32);
  at::Tensor bound = at::empty({b, chunks, kc::kCertifyGroups, l}, i32);
  at::Tensor cand_id = at::empty({b, chunks, cands}, i32);
  at::Tensor cand_x = at::empty({b, chunks, cands, l}, next_logits.options());
  kc::launch_marginal_certify_partial(
      next_logits.const_data_ptr(), storage_type(next_logits), b, l, vocab,
      batch_rows_layout(next_logits), chunk, static_cast<int>(m), part_max.data_ptr<float>(),
      part_sum.data_ptr<float>(), reinterpret_cast<uint32_t*>(bound.data_ptr<int32_t>()),
      cand_id.data_ptr<int32_t>(), cand_x.data_ptr(), stream());
  MTP_EXT_CHECK_LAUNCH();
  const auto [coef, row_max] = plan_from_stats(part_max, part_sum, weights, renormalize);
  at::Tensor done = at::empty({b}, i32);
  kc::launch_marginal_certify(
      storage_type(next_logits), b, l, chunks, static_cast<int>(m), coef.const_data_ptr<float>(),
      row_max.const_data_ptr<float>(),
      reinterpret_cast<const uint32_t*>(bound.const_data_ptr<int32_t>()),
      cand_id.const_data_ptr<int32_t>(), cand_x.const_data_ptr(), probs.data_ptr<float>(),
      ids.data_ptr<int64_t>(), done.data_ptr<int32_t>(), stream());
  MTP_EXT_CHECK_LAUNCH();
  return {coef, row_max, done};
}

// marginalize's streamed path (cuda_launch.h): out[B, V] in one launch that reads the logits from
// device memory once, in chunks of `chunk` tokens (the workspace's counters zeroed by one fill).
void marginal_from_one_read(const at::Tensor& next_logits, const at::Tensor& weights,
                            bool renormalize, int64_t chunk, at::Tensor& out) {
  const int64_t b = next_logits.size(0), l = next_logits.size(1), vocab = next_logits.size(2);
  const auto f32 = next_logits.options().dtype(at::kFloat);
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  at::Tensor queue = at::zeros({2 + 2 * b}, next_logits.options().dtype(at::kInt));
  const int64_t parts = kc::marginal_stream_parts(vocab, chunk);
  at::Tensor part_max = at::empty({b * l, parts}, f32), part_sum = at::empty({b * l, parts}, f32);
  at::Tensor coef = at::empty({b, l}, f32), row_max = at::empty({b, l}, f32);
  kc::launch_marginalize_stream(
      next_logits.const_data_ptr(), storage_type(next_logits), b, l, vocab,
      batch_rows_layout(next_logits), chunk, w.const_data_ptr<float>(), renormalize,
      queue.data_ptr<int32_t>(), part_max.data_ptr<float>(), part_sum.data_ptr<float>(),
      coef.data_ptr<float>(), row_max.data_ptr<float>(), out.data_ptr<float>(), stream());
  MTP_EXT_CHECK_LAUNCH();
}

at::Tensor marginal(const at::Tensor& next_logits, const at::Tensor& weights, bool renormalize) {
  const int64_t b = next_logits.size(0), l = next_logits.size(1), vocab = next_logits.size(2);
  at::Tensor out = at::empty({b, vocab}, next_logits.options().dtype(at::kFloat));
  if (b == 0 || vocab == 0) return out;
  if (l == 0) return out.zero_();
  const kc::DType dtype = storage_type(next_logits);
  if (const int64_t chunk = kc::marginal_stream_chunk(b, l, vocab, dtype); chunk > 0) {
    marginal_from_one_read(next_logits, weights, renormalize, chunk, out);
    return out;
  }
  const auto [coef, row_max] = plan_mixture(next_logits, weights, renormalize);
  kc::launch_marginalize(next_logits.const_data_ptr(), dtype, b, l, vocab,
                         batch_rows_layout(next_logits), coef.const_data_ptr<float>(),
                         row_max.const_data_ptr<float>(), out.data_ptr<float>(), stream());
  MTP_EXT_CHECK_LAUNCH();
  return out;
}

at::Tensor marginalize_cuda(const at::Tensor& next_logits, const at::Tensor& weights,
                            bool renormalize) {
  const char* op = "mtp_ext.marginalize";
  check_marginalize(next_logits, weights);
  check_cuda_vocab(next_logits.size(2), op, "next_logits");
  const c10::cuda::CUDAGuard guard(next_logits.device());
  if (value_checks_enabled()) check_nonnegative(weights, op, "weights");
  return marginal(next_logits, weights, renormalize);
}

std::tuple<at::Tensor, at::Tensor> topk_marginalize_cuda(const at::Tensor& next_logits,
                                                         const at::Tensor& weights, int64_t m,
                                                         bool renormalize) {
  const char* op = "mtp_ext.topk_marginalize";
  check_topk_marginalize(next_logits, weights, m);
  check_cuda_vocab(next_logits.size(2), op, "next_logits");
  const c10::cuda::CUDAGuard guard(next_logits.device());
  if (value_checks_enabled()) check_nonnegative(weights, op, "weights");
  const int64_t b = next_logits.size(0), l = next_logits.size(1), vocab = next_logits.size(2);
  at::Tensor probs = at::empty({b, m}, next_logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({b, m}, next_logits.options().dtype(at::kLong));
  if (b == 0) return {probs, ids};
  if (l == 0) {
    // An empty mixture is all zeros: the top-m are the first m ids.
    probs.zero_();
    ids.copy_(at::arange(m, ids.options()).expand({b, m}));
    return {probs, ids};
  }
  const int64_t chunks = kc::topk_chunks(vocab);
  if (m <= kc::kTopkMaxK && chunks * m <= kc::kTopkMaxMerge) {
    // The marginal of each chunk is computed on the fly and never written. The one-read path
    // answers the rows it can; the second pass reads the rest again.
    const int64_t one_read_chunk = kc::marginal_certify_chunk(b, l, vocab, static_cast<int>(m));
    at::Tensor coef, row_max, done;
    if (one_read_chunk > 0) {
      std::tie(coef, row_max, done) = answer_from_one_read(next_logits, weights, m, renormalize,
                                                           one_read_chunk, probs, ids);
    } else {
      std::tie(coef, row_max) = plan_mixture(next_logits, weights, renormalize);
    }
    const auto i32 = next_logits.options().dtype(at::kInt);
    const int32_t* skip = const_data_or_null<int32_t>(done);
    at::Tensor cand_key = at::empty({b, chunks, m}, i32);
    at::Tensor cand_id = at::empty({b, chunks, m}, i32);
    kc::launch_marginal_topk_partial(
        next_logits.const_data_ptr(), storage_type(next_logits), b, l, vocab,
        batch_rows_layout(next_logits), coef.const_data_ptr<float>(),
        row_max.const_data_ptr<float>(), static_cast<int>(m), skip,
        reinterpret_cast<uint32_t*>(cand_key.data_ptr<int32_t>()), cand_id.data_ptr<int32_t>(),
        stream());
    MTP_EXT_CHECK_LAUNCH();
    kc::launch_topk_merge(b, chunks, static_cast<int>(m), nullptr, nullptr,
                          reinterpret_cast<const uint32_t*>(cand_key.const_data_ptr<int32_t>()),
                          cand_id.const_data_ptr<int32_t>(), kc::TopkOut::Raw, 1.0f,
                          probs.data_ptr<float>(), ids.data_ptr<int64_t>(), nullptr, skip,
                          stream());
    MTP_EXT_CHECK_LAUNCH();
    return {probs, ids};
  }
  // Large m: the marginal is written, then ranked by a sort.
  const at::Tensor full = marginal(next_logits, weights, renormalize);
  row_topk(full, b, vocab, rows_layout(full), 1.0f, m, kc::TopkOut::Raw, probs, ids, at::Tensor());
  return {probs, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CUDA, m) {
  m.impl("softmax_topk", &softmax_topk_cuda);
  m.impl("marginalize", &marginalize_cuda);
  m.impl("topk_marginalize", &topk_marginalize_cuda);
}

}  // namespace cuda
}  // namespace mtp_ext
