// The host kernels as a compiled library: explicit instantiations of the templates for the three
// storage types, so every header is compiled (and warned about) on its own, without torch.
#include "common.h"
#include "dot_tile.h"
#include "sampling.h"
#include "softmax_math.h"
#include "topk.h"
#include "tree.h"

namespace mtp_ext {
namespace kernels {

template void load_block<float>(const float*, int64_t, int64_t, float*);
template void load_block<f16>(const f16*, int64_t, int64_t, float*);
template void load_block<bf16>(const bf16*, int64_t, int64_t, float*);
template void build_tree_mask<float>(const int64_t*, int64_t, int64_t, float, float, float*,
                                     int64_t*);

}  // namespace kernels
}  // namespace mtp_ext
