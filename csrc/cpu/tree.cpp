// CPU kernels of the tree helpers: the additive tree attention mask and the in-place key/value
// compaction of an accepted path.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../kernels/tree.h"
#include "cpu_utils.h"

namespace mtp_ext {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> tree_attention_mask_cpu(const at::Tensor& parents,
                                                           int64_t prefix_len,
                                                           c10::optional<at::ScalarType> dtype) {
  const char* op = "mtp_ext.tree_attention_mask";
  const at::ScalarType mask_dtype = check_tree_attention_mask(parents, prefix_len, dtype);
  const at::Tensor par = parents.contiguous();
  check_tree_values(par, op);
  const int64_t t = par.size(-1), rows = par.dim() == 2 ? par.size(0) : 1;
  at::Tensor mask = empty_tree_mask(par, prefix_len, at::kFloat);
  at::Tensor depth = at::empty(par.sizes(), par.options());
  const float hidden = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    kernels::build_tree_mask<float>(par.const_data_ptr<int64_t>() + r * t, t, prefix_len, 0.0f,
                                    hidden, mask.data_ptr<float>() + r * t * (prefix_len + t),
                                    depth.data_ptr<int64_t>() + r * t);
  }
  // -inf marks hidden entries; the contract asks for the dtype's most negative finite value.
  at::Tensor out =
      mask_dtype == at::kFloat ? mask : empty_tree_mask(par, prefix_len, mask_dtype).copy_(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask_dtype, "tree_attention_mask", [&] {
    out.masked_fill_(mask.isneginf(), at::Scalar(std::numeric_limits<scalar_t>::lowest()));
  });
  return {out, depth};
}

void compact_kv_cpu(const at::Tensor& cache, const at::Tensor& path,
                    const at::Tensor& num_accepted, int64_t prefix_len) {
  const char* op = "mtp_ext.compact_kv";
  check_compact_kv(cache, path, num_accepted, prefix_len);
  const int64_t b = cache.size(0), t = path.size(1);
  const at::Tensor p = path.contiguous(), n = num_accepted.contiguous();
  check_accepted_paths(p, n, op);
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const int64_t* np = n.const_data_ptr<int64_t>();
  const int64_t item = cache.element_size();
  char* base = static_cast<char*>(cache.data_ptr());
  at::parallel_for(0, b, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      kernels::compact_path(base + i * cache.stride(0) * item, cache.size(1),
                            cache.stride(1) * item, cache.stride(2) * item, cache.size(3) * item,
                            pp + i * t, np[i], prefix_len);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("tree_attention_mask", &tree_attention_mask_cpu);
  m.impl("compact_kv", &compact_kv_cpu);
}

}  // namespace cpu
}  // namespace mtp_ext
