// Host entry points of the CUDA kernels: plain functions over raw device pointers, sizes, strides and
// a stream, with no torch types, so nvcc compiles the kernels on their own and the launchers in
// csrc/cuda only check, allocate and call these. Every function enqueues work on `stream` and
// returns without synchronizing; launch errors are left for the caller to check
// (cudaGetLastError). Sizes and strides are in elements and int64; vocabularies must be < 2^31.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mtp_ext {
namespace kernels {
namespace cuda {

// Storage type of a floating tensor (float32, IEEE float16, bfloat16).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Rows of a [rows, V] view of a tensor: row r starts at (r / inner) * outer_stride +
// (r % inner) * inner_stride, and its elements are v_stride apart. Covers [B, L, V] (inner = L)
// and [rows, V] (inner = 1) layouts with any strides.
struct RowLayout {
  int64_t inner;
  int64_t outer_stride;
  int64_t inner_stride;
  int64_t v_stride;
};

// ---- Row top-k with softmax statistics (topk_kernels.cu) -------------------------------------
// The vocabulary of each row is cut into chunks of kTopkChunk elements. Pass 1 (one block per
// chunk) reads its chunk once, keeps it in shared memory, computes the chunk's softmax statistics
// and selects its k best candidates; pass 2 (one block per row) merges the chunks.
constexpr int kTopkChunk = 8192;
constexpr int kTopkMaxK = 64;        // the partial/merge path serves 1 <= k <= kTopkMaxK
constexpr int kTopkMaxMerge = 8192;  // and rows with chunks * k <= kTopkMaxMerge

inline int64_t topk_chunks_of(int64_t vocab, int64_t chunk) { return (vocab + chunk - 1) / chunk; }
inline int64_t topk_chunks(int64_t vocab) { return topk_chunks_of(vocab, kTopkChunk); }

// What the merge writes as values.
enum class TopkOut : int {
  Prob = 0,     // exp((v - max) * scale) / sum: softmax probabilities
  LogProb = 1,  // v - (max * scale + log(sum)): log-softmax (scale 1)
  Raw = 2,      // the value itself (marginal probabilities)
  None = 3,     // ids only
};

// Pass 1 over logits. part_max/part_sum: [rows, chunks] softmax statistics of each chunk
// (sum of exp((x - chunk max) * scale), NaN if any x is NaN); cand_key/cand_id: [rows, chunks, k]
// the chunk's best k as order-preserving keys and ids, best first, padded with key 0. k = 0 skips
// the selection (statistics only).
void launch_topk_partial(const void* x, DType dtype, int64_t rows, int64_t vocab, RowLayout layout,
                         float scale, int k, float* part_max, float* part_sum, uint32_t* cand_key,
                         int32_t* cand_id, cudaStream_t stream);

// Pass 2: merges [rows, chunks, k] candidates (and, unless part_max is null, the statistics) into
// out_val[rows, k] (as `mode` says; may be null for None) and out_id[rows, k] (int64), best first.
// row_max (optional, [rows]) receives each row's maximum ignoring NaN.
// Rows with skip[row] != 0 (skip may be null) are left as they are.
void launch_topk_merge(int64_t rows, int64_t chunks, int k, const float* part_max,
                       const float* part_sum, const uint32_t* cand_key, const int32_t* cand_id,
                       TopkOut mode, float scale, float* out_val, int64_t* out_id, float* row_max,
                       const int32_t* skip, cudaStream_t stream);

// Merges [rows, chunks] statistics into row_max[rows] and row_sum[rows] (scale as in pass 1).
void launch_stats_merge(int64_t rows, int64_t chunks, const float* part_max, const float* part_sum,
                        float scale, float* row_max, float* row_sum, cudaStream_t stream);

// keys[rows, V] (int32) whose descending order is the ranking of the logits (NaN first, -0 == +0);
// a stable descending sort of them gives ties toward the lower id. For the large-k fallback.
void launch_rank_keys(const void* x, DType dtype, int64_t rows, int64_t vocab, RowLayout layout,
                      int32_t* keys, cudaStream_t stream);

// From sorted keys [rows, V] (row stride key_stride) and their ids: out_val[rows, k] as `mode`
// says with the row statistics row_max/row_sum, out_id[rows, k] the ids. For the large-k fallback.
void launch_topk_from_sorted(int64_t rows, int k, const int32_t* sorted_keys, int64_t key_stride,
                             const int64_t* sorted_ids, int64_t id_stride, const float* row_max,
                             const float* row_sum, TopkOut mode, float scale, float* out_val,
                             int64_t* out_id, cudaStream_t stream);

// ---- Marginalization (topk_kernels.cu) ---------------------------------------------------------
// From the [B * L, chunks] statistics (scale 1) and weights[B, L] (float32, contiguous): coef[B, L]
// = w / sum_v exp(x - max) (w renormalized per row when asked) and row_max[B, L].
void launch_marginal_plan(int64_t batch, int64_t paths, int64_t chunks, const float* part_max,
                          const float* part_sum, const float* weights, bool renormalize,
                          float* coef, float* row_max, cudaStream_t stream);

// out[B, V] (float32, contiguous) = sum_l coef[b, l] * exp(x[b, l] - row_max[b, l]).
void launch_marginalize(const void* x, DType dtype, int64_t batch, int64_t paths, int64_t vocab,
                        RowLayout layout, const float* coef, const float* row_max, float* out,
                        cudaStream_t stream);

// marginalize from one read of device memory, in one launch (topk_kernels.cu, the streamed
// path): the chunk of tokens it would use for these sizes, 0 when it does not apply (the chunks
// read between a chunk's two uses would not fit half the device's L2); then the sizes of its
// workspace, and the launch. queue: 2 + 2 * B int32, zeroed before each launch (the launch uses
// them up); part_max / part_sum: [B * L, marginal_stream_parts(V, chunk)] float32; coef / row_max
// [B, L] float32 (the plan, as launch_marginal_plan writes it); weights [B, L] float32,
// contiguous; out as launch_marginalize's.
int64_t marginal_stream_chunk(int64_t batch, int64_t paths, int64_t vocab, DType dtype);
int64_t marginal_stream_parts(int64_t vocab, int64_t chunk);
void launch_marginalize_stream(const void* x, DType dtype, int64_t batch, int64_t paths,
                               int64_t vocab, RowLayout layout, int64_t chunk,
                               const float* weights, bool renormalize, int32_t* queue,
                               float* part_max, float* part_sum, float* coef, float* row_max,
                               float* out, cudaStream_t stream);

// Second pass of topk_marginalize: the marginal of each chunk computed on the fly (never written),
// its best m candidates into cand_key/cand_id [B, chunks, m]. Merge with TopkOut::Raw. Batch rows
// with skip[b] != 0 (skip may be null) are left alone.
void launch_marginal_topk_partial(const void* x, DType dtype, int64_t batch, int64_t paths,
                                  int64_t vocab, RowLayout layout, const float* coef,
                                  const float* row_max, int m, const int32_t* skip,
                                  uint32_t* cand_key, int32_t* cand_id, cudaStream_t stream);

// topk_marginalize from one read of the logits, for rows whose answer that read proves (see
// topk_kernels.cu). The launcher runs, in order:
//   1. launch_marginal_certify_partial: per chunk of `chunk` tokens, the statistics of every path
//      (part_max/part_sum [B * L, chunks], as launch_topk_partial with scale 1), a bound per
//      group of the chunk and path (bound [B, chunks, kCertifyGroups, L], ranking keys) and L * m
//      candidates (cand_id [B, chunks, L * m], -1 for none; cand_x [B, chunks, L * m, L], their
//      logits in the logits' dtype);
//   2. launch_marginal_plan over those statistics;
//   3. launch_marginal_certify: out_val/out_id [B, m] and done[B] (int32, 1 where written);
//   4. the second pass (launch_marginal_topk_partial and launch_topk_merge) with skip = done.
constexpr int kCertifyMaxPaths = 16;  // the certified path serves L <= 16
constexpr int kCertifyMaxM = 16;      // and m <= 16
constexpr int kCertifyMinChunk = 1024;
constexpr int kCertifyGroups = 8;  // bound groups per chunk (one per warp of pass 1)

// The chunk length for the certified path, 0 where it does not serve these sizes (then the
// launcher takes the two passes directly).
int64_t marginal_certify_chunk(int64_t batch, int64_t paths, int64_t vocab, int m);
void launch_marginal_certify_partial(const void* x, DType dtype, int64_t batch, int64_t paths,
                                     int64_t vocab, RowLayout layout, int64_t chunk, int m,
                                     float* part_max, float* part_sum, uint32_t* bound,
                                     int32_t* cand_id, void* cand_x, cudaStream_t stream);
void launch_marginal_certify(DType dtype, int64_t batch, int64_t paths, int64_t chunks, int m,
                             const float* coef, const float* row_max, const uint32_t* bound,
                             const int32_t* cand_id, const void* cand_x, float* out_val,
                             int64_t* out_id, int32_t* done, cudaStream_t stream);

// ---- Decode-size unembedding with a running top-k (unembed_kernels.cu) --------------------------
// logits[r, v] = z[r] . table[v] for at most kUnembedMaxRows float32 rows, streamed once over the
// table with a running top-k and softmax statistics per row; the logits are never written. Pass 1
// writes, per row and block of the vocabulary, exactly what launch_topk_partial writes (part_max /
// part_sum [rows, chunks], cand_key / cand_id [rows, chunks, k]; part_max null: no statistics);
// launch_topk_merge (scale 1) finishes. About the table's bytes once plus rows * chunks * (8 + 8k)
// written and read back. Float16 and bfloat16 tables on devices of compute capability 8.0 and
// newer are multiplied on tensor cores (z split into two 16-bit parts, mma_kernels.cu);
// float32 tables, and older devices, on CUDA cores in float32.
constexpr int64_t kUnembedMaxRows = 64;

// Whether the streaming path serves these sizes: 1 <= rows <= kUnembedMaxRows, 1 <= k <=
// kTopkMaxK, k <= vocab < 2^31 - 256, depth a multiple of 8 and 16-byte aligned table rows (w and
// w_row_stride); z itself must be 16-byte aligned (the caller's part).
bool unembed_topk_fits(int64_t rows, int64_t depth, const void* w, DType dtype,
                       int64_t w_row_stride, int64_t vocab, int k);

// Bytes of device workspace pass 1 needs for these sizes on the current device (0 for none).
size_t unembed_topk_workspace(int64_t rows, int64_t depth, DType dtype);

// The number of vocabulary blocks (chunks) of pass 1: a few per SM of the current device, at most
// kTopkMaxMerge / k (what the merge accepts), each a whole number of tiles.
int64_t unembed_topk_chunks(int64_t rows, int64_t vocab, int k, DType dtype);

// Pass 1. z: [rows, depth] float32 contiguous, 16-byte aligned; w: [vocab, depth] of `dtype`, rows
// w_row_stride apart (elements contiguous); chunks from unembed_topk_chunks; workspace: at least
// unembed_topk_workspace bytes, 16-byte aligned (may be null when that is 0).
void launch_unembed_topk_partial(const float* z, int64_t rows, int64_t depth, const void* w,
                                 DType dtype, int64_t w_row_stride, int64_t vocab, int k,
                                 int64_t chunks, float* part_max, float* part_sum,
                                 uint32_t* cand_key, int32_t* cand_id, void* workspace,
                                 cudaStream_t stream);

// ---- Dense pieces (dense_kernels.cu) -----------------------------------------------------------
// out[g][r, v] = sum_d a[g][r, d] * w[g][v, d] in float32 for g < groups: a float32 with rows
// a_row_stride apart (elements of a row contiguous; a_group_stride 0: the groups share a), w of
// `dtype` with rows w_row_stride apart (elements contiguous), out float32 with rows
// out_row_stride apart. Each w row is read once per 64 rows of a: the decode-size product of the
// heads' blocks, the unembedding and the small-batch linear layer. Float16 and bfloat16 tables
// (16-byte aligned rows, depth % 8 == 0, groups sharing a) on compute capability 8.0 and newer are
// multiplied on tensor cores (mma_kernels.cu: a split into two 16-bit parts, about 2^-17 relative
// error per term); the rest on CUDA cores in float32.
//
// Bytes of device workspace launch_rows_dot_table needs for these sizes (0 for none).
size_t rows_dot_table_workspace(int64_t rows, int64_t depth, int64_t a_group_stride,
                                const void* w, DType dtype, int64_t table_rows,
                                int64_t w_row_stride, int64_t w_group_stride, int64_t groups);
// workspace: at least rows_dot_table_workspace bytes, 16-byte aligned (null when that is 0).
void launch_rows_dot_table(const float* a, int64_t rows, int64_t depth, int64_t a_row_stride,
                           int64_t a_group_stride, const void* w, DType dtype, int64_t table_rows,
                           int64_t w_row_stride, int64_t w_group_stride, float* out,
                           int64_t out_row_stride, int64_t out_group_stride, int64_t groups,
                           void* workspace, cudaStream_t stream);

// z[n, h, :] = x[n] + SiLU(y[n, h] + bias[h]) then, when norm_weight is given,
// z * rsqrt(mean(z^2) + eps) * norm_weight. x: [N, D] float32 contiguous; y, z: [N, H, D] float32
// contiguous (z may alias y); bias: [H, D] float32 contiguous or null; norm_weight: [D] float32 or
// null.
void launch_head_features(const float* x, const float* y, const float* bias,
                          const float* norm_weight, float eps, int64_t n, int64_t heads,
                          int64_t depth, float* z, cudaStream_t stream);

// z[r, :] = x[r] * rsqrt(mean(x[r]^2) + eps) * norm_weight (float32 contiguous rows, in place allowed).
void launch_rms_norm(const float* x, const float* norm_weight, float eps, int64_t rows,
                     int64_t depth, float* z, cudaStream_t stream);

// ---- Trees (tree_kernels.cu) -------------------------------------------------------------------
// The verification walk of each row (draft [B, T], parents [T] or [B, T] with row stride 0 or T,
// targets [B, T], all int64 contiguous) into num_accepted[B], tokens[B, T], path[B, T].
void launch_walk_tree(const int64_t* draft, const int64_t* parents, int64_t parents_row_stride,
                      const int64_t* targets, int64_t batch, int64_t nodes, int64_t* num_accepted,
                      int64_t* tokens, int64_t* path, cudaStream_t stream);

// Inverse-CDF sampling over the whole row or over the kept set {key > keep_key, or key == keep_key
// and id <= keep_id} (keep_key/keep_id null: every token kept), with uniforms u[rows] (float32):
// target[r] = the first kept id in ascending order whose cumulative mass (double) exceeds
// u * total, else the last kept id. Probabilities are exp((x - max) * scale) in float32.
void launch_sample_scan(const void* x, DType dtype, int64_t rows, int64_t vocab, RowLayout layout,
                        float scale, const int32_t* keep_key, const int64_t* keep_id,
                        const float* u, int64_t* target, cudaStream_t stream);

// The top-p cut over a full ranking: sorted_keys/sorted_ids [rows, V] (descending, stable) give
// keep_key/keep_id [rows] of the last kept token after top-k (limit) and top-p.
void launch_nucleus_from_sorted(int64_t rows, int64_t vocab, const int32_t* sorted_keys,
                                const int64_t* sorted_ids, float scale, int64_t limit, float top_p,
                                int32_t* keep_key, int64_t* keep_id, cudaStream_t stream);

// Sampling among the k best candidates of each row (values[rows, k] float32 logits and ids
// [rows, k], best first; row_max[rows]): top-p over them, then inverse CDF with u[rows].
void launch_sample_candidates(int64_t rows, int k, const float* values, const int64_t* ids,
                              const float* row_max, float scale, float top_p, const float* u,
                              int64_t* target, cudaStream_t stream);

// mask[r, i, prefix + j] for parents [rows, T] (row stride 0 or T, int64 contiguous): 0 where
// node i sees node j (itself and its ancestors) and the prefix, `hidden_bits` elsewhere, in an
// element of elem_bytes (2, 4 or 8) bytes; depth[r, i] the node depths.
void launch_tree_mask(const int64_t* parents, int64_t parents_row_stride, int64_t rows,
                      int64_t nodes, int64_t prefix_len, int elem_bytes, uint64_t hidden_bits,
                      void* mask, int64_t* depth, cudaStream_t stream);

// In place: for each batch row b, head h and j <= num_accepted[b]: entry prefix_len + path[b, j]
// moves to prefix_len + j. base is the cache's first byte; strides in bytes; entries are
// entry_bytes long (head_dim contiguous). Out-of-range values are skipped, never accessed.
void launch_compact_kv(char* base, int64_t batch, int64_t heads, int64_t batch_stride,
                       int64_t head_stride, int64_t seq_stride, int64_t entry_bytes,
                       const int64_t* path, int64_t path_row_stride, int64_t nodes,
                       const int64_t* num_accepted, int64_t prefix_len, cudaStream_t stream);

}  // namespace cuda
}  // namespace kernels
}  // namespace mtp_ext
