"""tree_attention_mask and compact_kv against the references and known answers."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, TREES, devices, gen, randn, random_case, random_parents

from mtp_ext import ops
from mtp_ext import reference as ref

# ------------------------------------------------------------------------------------------------
# tree_attention_mask
# ------------------------------------------------------------------------------------------------

MASK_TREES = {
    **{k: torch.tensor(v) for k, v in TREES.items()},
    "random": random_parents(17, seed=1),
}


def check_mask(parents, prefix_len, dtype, device):
    mask, depth = ops.tree_attention_mask(parents.to(device), prefix_len, dtype)
    ref_mask, ref_depth = ref.tree_attention_mask(parents, prefix_len, dtype)
    assert mask.dtype == dtype and depth.dtype == torch.int64
    assert mask.device.type == depth.device.type == torch.device(device).type
    assert torch.equal(mask.cpu(), ref_mask), "mask differs from the reference"
    assert torch.equal(depth.cpu(), ref_depth), "depths differ from the reference"
    return mask.cpu(), depth.cpu()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("tree", list(MASK_TREES))
@pytest.mark.parametrize("prefix_len", [0, 5])
def test_mask_matches_reference(device, dtype, tree, prefix_len):
    mask, _ = check_mask(MASK_TREES[tree], prefix_len, dtype, device)
    if tree != "root_only":  # hidden entries hold the dtype's most negative finite value
        assert mask.min() == torch.finfo(dtype).min
    assert set(mask.unique().tolist()) <= {0.0, torch.finfo(dtype).min}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix_len", [0, 3])
def test_mask_batched_parents(device, dtype, prefix_len):
    parents = torch.stack(
        [random_parents(9, seed=s) for s in range(4)] + [torch.tensor(TREES["medusa"][:9])]
    )
    mask, depth = check_mask(parents, prefix_len, dtype, device)
    assert mask.shape == (5, 9, prefix_len + 9) and depth.shape == (5, 9)


@pytest.mark.parametrize("device", devices())
def test_mask_known_answer(device):
    # Medusa-like tree, 2 cached tokens: node 4 (parent 1, grandparent 0) sees the prefix, 0, 1, 4.
    parents = torch.tensor(TREES["medusa"])
    mask, depth = check_mask(parents, 2, torch.float32, device)
    visible = (mask == 0).int()
    assert visible[4].tolist() == [1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]
    assert visible[9].tolist() == [1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1]
    assert depth.tolist() == [0, 1, 1, 2, 2, 2, 2, 2, 3, 3]
    # A chain is causal attention.
    mask, depth = check_mask(torch.tensor(TREES["chain"]), 0, torch.float32, device)
    assert torch.equal(mask == 0, torch.ones(5, 5, dtype=torch.bool).tril())
    assert depth.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("device", devices())
def test_mask_default_dtype_is_float32(device):
    mask, _ = torch.ops.mtp_ext.tree_attention_mask(torch.tensor(TREES["star"], device=device), 2)
    assert mask.dtype == torch.float32 and mask.shape == (5, 7)


@pytest.mark.parametrize("device", devices())
def test_mask_empty_batch(device):
    mask, depth = ops.tree_attention_mask(torch.zeros(0, 4, dtype=torch.long, device=device), 3)
    assert mask.shape == (0, 4, 7) and depth.shape == (0, 4)


@pytest.mark.parametrize("device", devices())
def test_mask_non_contiguous_parents(device):
    parents = torch.stack([random_parents(8, seed=s) for s in range(3)]).t().contiguous().t()
    assert not parents.is_contiguous()
    check_mask(parents, 4, torch.bfloat16, device)


# ------------------------------------------------------------------------------------------------
# compact_kv
# ------------------------------------------------------------------------------------------------


def random_paths(b, t, seed):
    """Accepted paths as verify_tree returns them: increasing node indices from 0, then -1."""
    g = gen(seed)
    path = torch.full((b, t), -1, dtype=torch.long)
    num = torch.randint(0, t, (b,), generator=g)
    num[0] = 0  # always one row that accepted nothing
    for r in range(b):
        nodes = torch.randperm(t - 1, generator=g)[: int(num[r])].sort().values + 1
        path[r, 0] = 0
        path[r, 1 : 1 + len(nodes)] = nodes
    return path, num


def make_cache(shape, dtype, seed):
    if dtype.is_floating_point:
        return randn(*shape, seed=seed).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen(seed)).to(dtype)


def check_compact(cache, path, num, prefix_len, device):
    expected = ref.compact_kv(cache.clone(), path, num, prefix_len)
    dev_cache = cache.to(device)
    out = ops.compact_kv(dev_cache, path.to(device), num.to(device), prefix_len)
    assert out is dev_cache  # in place, and the wrapper returns the cache
    assert torch.equal(dev_cache.cpu(), expected)
    return dev_cache.cpu()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES + [torch.int32, torch.int64])
@pytest.mark.parametrize("prefix_len", [0, 6])
def test_compact_matches_reference(device, dtype, prefix_len):
    b, heads, t, d = 6, 3, 9, 16
    path, num = random_paths(b, t, seed=2)
    cache = make_cache((b, heads, prefix_len + t + 4, d), dtype, seed=3)
    before = cache.clone()
    after = check_compact(cache, path, num, prefix_len, device)
    assert not torch.equal(after, before)  # some row moved something
    assert int(num.max()) >= 2


@pytest.mark.parametrize("device", devices())
def test_compact_known_answer(device):
    # One head, head_dim 1, entry s holds s. Path 0 -> 2 -> 5 after 3 cached tokens.
    cache = torch.arange(12, dtype=torch.float32).reshape(1, 1, 12, 1).repeat(2, 1, 1, 1)
    path = torch.tensor([[0, 2, 5, -1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1, -1]])
    num = torch.tensor([2, 0])
    after = check_compact(cache, path, num, 3, device)
    assert after[0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 8, 6, 7, 8, 9, 10, 11]
    assert after[1, 0, :, 0].tolist() == list(range(12))  # nothing accepted: nothing moves


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_compact_non_contiguous_cache(device, dtype):
    # A [B, S, heads, D] buffer viewed as [B, heads, S, D]; then a slice of a larger cache.
    b, heads, t, d, prefix = 4, 2, 7, 8, 3
    path, num = random_paths(b, t, seed=4)
    base = make_cache((b, prefix + t + 2, heads, d), dtype, seed=5)
    cache = base.permute(0, 2, 1, 3)
    assert not cache.is_contiguous()
    expected = ref.compact_kv(cache.clone(), path, num, prefix)
    dev_base = base.to(device)
    ops.compact_kv(dev_base.permute(0, 2, 1, 3), path.to(device), num.to(device), prefix)
    assert torch.equal(dev_base.permute(0, 2, 1, 3).cpu(), expected)  # written through the view
    big = make_cache((b + 1, heads + 1, prefix + t + 2, d), dtype, seed=6)
    expected = ref.compact_kv(big[1:, 1:].clone(), path, num, prefix)
    dev_big = big.to(device)
    ops.compact_kv(dev_big[1:, 1:], path.to(device), num.to(device), prefix)
    assert torch.equal(dev_big[1:, 1:].cpu(), expected)
    assert torch.equal(dev_big[0].cpu(), big[0]) and torch.equal(dev_big[:, 0].cpu(), big[:, 0])


@pytest.mark.parametrize("device", devices())
def test_compact_all_rows_accept_nothing(device):
    cache = make_cache((3, 2, 10, 4), torch.float32, seed=7)
    path = torch.full((3, 5), -1, dtype=torch.long)
    path[:, 0] = 0
    after = check_compact(cache.clone(), path, torch.zeros(3, dtype=torch.long), 2, device)
    assert torch.equal(after, cache)


@pytest.mark.parametrize("device", devices())
def test_compact_after_verify_tree(device):
    # The decoding step as a whole: verify a tree, then compact the cache along the accepted path.
    b, t, v, prefix = 8, 10, 50, 4
    draft, parents, logits = random_case(b, t, v, torch.float32, seed=8, batched_parents=True)
    num, _, path = ops.verify_tree(draft, parents, logits)
    cache = make_cache((b, 2, prefix + t, 8), torch.bfloat16, seed=9)
    check_compact(cache, path, num, prefix, device)


@pytest.mark.parametrize("device", devices())
def test_compact_empty_batch(device):
    cache = torch.zeros(0, 2, 10, 4, device=device)
    path = torch.zeros(0, 5, dtype=torch.long, device=device)
    num = torch.zeros(0, dtype=torch.long, device=device)
    assert ops.compact_kv(cache, path, num, 3) is cache
    assert cache.shape == (0, 2, 10, 4)
