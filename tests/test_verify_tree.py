"""verify_tree: hand-built trees with known answers, the reference on random trees (greedy and
sampling with fixed uniforms), and a statistical test of the sampler against the target law."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, TREES, devices, gen, rand, randn, random_case, ref64

from mtp_ext import ops
from mtp_ext import reference as ref

V = 10


def logits_for_targets(targets, vocab=V, dtype=torch.float32, seed=0):
    """[B, T, V] logits whose argmax at node n is targets[b][n] (noise plus a clear winner)."""
    t = torch.tensor(targets, dtype=torch.long)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    x = randn(*t.shape, vocab, seed=seed)
    x.scatter_(-1, t.unsqueeze(-1), 10.0)
    return x.to(dtype)


def run(draft, parents, logits, device, **kw):
    draft = torch.tensor(draft, dtype=torch.long)
    if draft.dim() == 1:
        draft = draft.unsqueeze(0)
    parents = torch.tensor(parents, dtype=torch.long)
    out = ops.verify_tree(draft.to(device), parents.to(device), logits.to(device), **kw)
    expected = ref64(ref.verify_tree, draft, parents, logits, **kw)
    for got, exp, name in zip(out, expected, ["num_accepted", "tokens", "path"]):
        assert got.dtype == torch.int64 and got.device.type == torch.device(device).type
        assert torch.equal(got.cpu(), exp), f"{name}: {got.tolist()} != reference {exp.tolist()}"
    return [o.cpu().tolist() for o in out]


# ------------------------------------------------------------------------------------------------
# Known answers
# ------------------------------------------------------------------------------------------------

# (tree, draft tokens, greedy target per node, expected num_accepted, tokens, path)
KNOWN = [
    ("root_only", [7], [3], 0, [3], [0]),
    ("chain", [7, 1, 2, 3, 4], [1, 2, 9, 0, 0], 2, [1, 2, 9, -1, -1], [0, 1, 2, -1, -1]),
    ("chain", [7, 1, 2, 3, 4], [1, 2, 3, 4, 5], 4, [1, 2, 3, 4, 5], [0, 1, 2, 3, 4]),
    ("chain", [7, 1, 2, 3, 4], [0, 2, 3, 4, 5], 0, [0, -1, -1, -1, -1], [0, -1, -1, -1, -1]),
    # Star: two children hold the target; the lower-index one wins.
    ("star", [0, 3, 5, 5, 6], [5, 0, 8, 1, 2], 1, [5, 8, -1, -1, -1], [0, 2, -1, -1, -1]),
    ("star", [0, 3, 5, 5, 6], [4, 0, 8, 1, 2], 0, [4, -1, -1, -1, -1], [0, -1, -1, -1, -1]),
    # Medusa-like: 1,2 under 0; 3,4,5 under 1; 6,7 under 2; 8 under 3; 9 under 4.
    (
        "medusa",
        [0, 4, 6, 1, 2, 3, 1, 7, 5, 8],
        [6, 0, 7, 0, 0, 0, 0, 9, 0, 0],
        2,
        [6, 7, 9] + [-1] * 7,
        [0, 2, 7] + [-1] * 7,
    ),
    (
        "medusa",
        [0, 4, 6, 1, 2, 3, 1, 7, 5, 8],
        [4, 2, 0, 0, 8, 0, 0, 0, 0, 3],
        3,
        [4, 2, 8, 3] + [-1] * 6,
        [0, 1, 4, 9] + [-1] * 6,
    ),
    # Node 6 holds the draft 1 but is a child of 2, not of the accepted node 1: no match.
    (
        "medusa",
        [0, 4, 6, 2, 2, 3, 1, 7, 5, 8],
        [4, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        1,
        [4, 1] + [-1] * 8,
        [0, 1] + [-1] * 8,
    ),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KNOWN, ids=lambda c: c[0])
def test_known_answers_greedy(device, dtype, case):
    tree, draft, targets, num, tokens, path = case
    logits = logits_for_targets(targets, dtype=dtype)
    got = run(draft, TREES[tree], logits, device)
    assert got == [[num], [tokens], [path]]


@pytest.mark.parametrize("device", devices())
def test_padding_and_out_of_range_drafts_never_match(device):
    # -1 pads; V and a huge id are out of range. The target 3 is held only by node 2.
    parents = [-1, 0, 0, 0, 0, 2, 2]
    draft = [-1, -1, 3, V, 2**40, -1, 4]
    logits = logits_for_targets([3, 0, 4, 0, 0, 0, 0])
    assert run(draft, parents, logits, device) == [
        [2],
        [[3, 4, 0, -1, -1, -1, -1]],
        [[0, 2, 6, -1, -1, -1, -1]],
    ]
    # A tree made only of padding accepts nothing, whatever the targets.
    logits = logits_for_targets([0, 1, 2, 3, 4, 5, 6])
    assert run([-1] * 7, parents, logits, device)[0] == [0]


@pytest.mark.parametrize("device", devices())
def test_batched_parents_per_row(device):
    # The same draft tokens and logits, two different trees: chain for row 0, star for row 1.
    parents = [TREES["chain"], TREES["star"]]
    draft = [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    targets = [[1, 2, 3, 0, 0], [1, 2, 3, 0, 0]]
    got = run(draft, parents, logits_for_targets(targets), device)
    assert got == [
        [3, 1],
        [[1, 2, 3, 0, -1], [1, 2, -1, -1, -1]],
        [[0, 1, 2, 3, -1], [0, 1, -1, -1, -1]],
    ]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_greedy_ties_go_to_lower_id(device, dtype):
    logits = torch.tensor([[[0.0, 5.0, 5.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0] * 4]], dtype=dtype)
    # y0 = 1 (tie with 2): node 2 (draft 1) is accepted, not node 1 (draft 2); y2 = 0 (all tied).
    got = run([0, 2, 1], [-1, 0, 0], logits, device)
    assert got == [[1], [[1, 0, -1]], [[0, 2, -1]]]


# ------------------------------------------------------------------------------------------------
# Random trees against the reference
# ------------------------------------------------------------------------------------------------


def check_against_reference(draft, parents, logits, device, **kw):
    out = ops.verify_tree(draft.to(device), parents.to(device), logits.to(device), **kw)
    expected = ref64(ref.verify_tree, draft, parents, logits, **kw)
    return [o.cpu() for o in out], expected


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched_parents", [False, True])
@pytest.mark.parametrize("v", [1, 7, 1000])
def test_greedy_random(device, dtype, batched_parents, v):
    draft, parents, logits = random_case(16, 12, v, dtype, seed=v, batched_parents=batched_parents)
    out, expected = check_against_reference(draft, parents, logits, device)
    for got, exp in zip(out, expected):
        assert torch.equal(got, exp)
    assert int(expected[0].max()) >= 2  # the case exercises deep walks


@pytest.mark.parametrize("device", devices())
def test_greedy_large_vocab(device):
    draft, parents, logits = random_case(2, 4, 151936, torch.float32, seed=3, batched_parents=False)
    out, expected = check_against_reference(draft, parents, logits, device)
    for got, exp in zip(out, expected):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_greedy_many_ties(device, dtype):
    g = gen(4)
    logits = torch.randint(-2, 3, (32, 6, 40), generator=g).to(dtype)
    draft, parents, _ = random_case(
        32, 6, 40, dtype, seed=4, batched_parents=True, targets=ref.target_tokens(logits)
    )
    out, expected = check_against_reference(draft, parents, logits, device)
    for got, exp in zip(out, expected):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["v_strided", "sliced"])
def test_non_contiguous(device, layout):
    b, t, v = 8, 6, 300
    draft, parents, logits = random_case(b, t, v, torch.float32, seed=5, batched_parents=True)
    if layout == "v_strided":
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
        parents = parents.t().contiguous().t()
    else:
        big = torch.zeros(b + 1, t, 2 * v)
        big[1:, :, ::2] = logits
        logits = big[1:, :, ::2]
        big_draft = torch.zeros(b, 2 * t, dtype=torch.long)
        big_draft[:, 1::2] = draft
        draft = big_draft[:, 1::2]
    assert not logits.is_contiguous()
    out, expected = check_against_reference(draft, parents, logits, device)
    for got, exp in zip(out, expected):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    draft = torch.zeros(0, 5, dtype=torch.long, device=device)
    logits = torch.zeros(0, 5, 11, device=device)
    num, tokens, path = ops.verify_tree(draft, torch.tensor(TREES["chain"], device=device), logits)
    assert num.shape == (0,) and tokens.shape == (0, 5) and path.shape == (0, 5)
    num, tokens, path = ops.verify_tree(
        draft,
        torch.zeros(0, 5, dtype=torch.long, device=device),
        logits,
        1.0,
        0,
        1.0,
        torch.zeros(0, 5, device=device),
    )
    assert num.shape == (0,) and tokens.shape == (0, 5) and path.shape == (0, 5)


# ------------------------------------------------------------------------------------------------
# Sampling with fixed uniforms
# ------------------------------------------------------------------------------------------------

SAMPLING = [
    (1.0, 0, 1.0),
    (0.5, 0, 1.0),
    (1.7, 5, 1.0),
    (1.0, 0, 0.8),
    (0.8, 10, 0.6),
    (1.3, 3, 0.95),
]


def assert_equal_up_to_cdf_boundaries(out, expected, draft, parents, logits, uniforms, kw):
    """Exact equality, except rows whose result the reference also gives with uniforms moved by
    1e-5 (a uniform within rounding of a CDF boundary); at most 1 such row in 100."""
    differ = [
        r
        for r in range(draft.shape[0])
        if any(not torch.equal(o[r], e[r]) for o, e in zip(out, expected))
    ]
    assert len(differ) <= max(1, draft.shape[0] // 100), (
        f"{len(differ)} rows differ from the reference"
    )
    par = parents if parents.dim() == 1 else parents[differ]
    for delta in (1e-5, -1e-5):
        if not differ:
            break
        alt = ref64(
            ref.verify_tree,
            draft[differ],
            par,
            logits[differ],
            uniforms=(uniforms[differ] + delta).clamp(0, 1 - 1e-7),
            **kw,
        )
        same = [
            all(torch.equal(o[r], a[i]) for o, a in zip(out, alt)) for i, r in enumerate(differ)
        ]
        differ = [r for r, s in zip(differ, same) if not s]
        par = parents if parents.dim() == 1 else parents[differ]
    assert not differ, f"rows {differ} differ from the reference away from any CDF boundary"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature, top_k, top_p", SAMPLING)
def test_sampling_random(device, dtype, temperature, top_k, top_p):
    b, t, v = 64, 8, 50
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    uniforms = rand(b, t, seed=6)
    logits = randn(b, t, v, seed=7, scale=2.0).to(dtype)
    targets = ref.target_tokens(logits, uniforms=uniforms, **kw)
    draft, parents, logits = random_case(
        b, t, v, dtype, seed=7, batched_parents=True, targets=targets
    )
    out, expected = check_against_reference(
        draft, parents, logits, device, uniforms=uniforms.to(device), **kw
    )
    assert int(expected[0].max()) >= 2
    assert_equal_up_to_cdf_boundaries(out, expected, draft, parents, logits, uniforms, kw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("uniforms_dtype", DTYPES)
def test_sampling_uniform_dtypes(device, uniforms_dtype):
    b, t, v = 32, 5, 30
    uniforms = rand(b, t, seed=8).to(uniforms_dtype)
    kw = {"temperature": 0.9, "top_k": 0, "top_p": 0.9}
    draft, parents, logits = random_case(b, t, v, torch.float32, seed=8, batched_parents=False)
    out, expected = check_against_reference(
        draft, parents, logits, device, uniforms=uniforms.to(device), **kw
    )
    assert_equal_up_to_cdf_boundaries(out, expected, draft, parents, logits, uniforms, kw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (0, 1e-6), (1, 0.5)])
def test_sampling_with_a_single_kept_token_is_greedy(device, dtype, top_k, top_p):
    draft, parents, logits = random_case(16, 8, 64, dtype, seed=9, batched_parents=True)
    greedy = ops.verify_tree(draft.to(device), parents.to(device), logits.to(device))
    uniforms = rand(16, 8, seed=10, device=device)
    sampled = ops.verify_tree(
        draft.to(device), parents.to(device), logits.to(device), 0.7, top_k, top_p, uniforms
    )
    for g, s in zip(greedy, sampled):
        assert torch.equal(g, s)
    # The greedy walk itself is the reference's.
    for g, e in zip(greedy, ref.verify_tree(draft, parents, logits)):
        assert torch.equal(g.cpu(), e)


@pytest.mark.parametrize("device", devices())
def test_inverse_cdf_known_answers(device):
    # Four equally likely tokens: u in [j/4, (j+1)/4) picks id j (kept ids in ascending order).
    logits = torch.zeros(8, 1, 4)
    u = torch.tensor([[0.0], [0.1], [0.3], [0.49], [0.6], [0.74], [0.8], [0.999]])
    draft = torch.full((8, 1), -1, dtype=torch.long)
    par = torch.tensor([-1])
    _, tokens, _ = ops.verify_tree(
        draft.to(device), par.to(device), logits.to(device), 1.0, 0, 1.0, u.to(device)
    )
    assert tokens[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # top_k = 2 keeps ids 0 and 1 (ties toward the lower id), each with mass 1/2.
    _, tokens, _ = ops.verify_tree(
        draft.to(device), par.to(device), logits.to(device), 1.0, 2, 1.0, u.to(device)
    )
    assert tokens[:, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # top_p = 0.6 on [0.5, 0.3, 0.2] (ids 2, 0, 1): keeps ids 2 and 0 -> masses 0.375, 0.625 by id.
    p = torch.tensor([0.3, 0.2, 0.5])
    logits = p.log().expand(8, 1, 3).contiguous()
    _, tokens, _ = ops.verify_tree(
        draft.to(device), par.to(device), logits.to(device), 1.0, 0, 0.6, u.to(device)
    )
    assert tokens[:, 0].tolist() == [0, 0, 0, 2, 2, 2, 2, 2]


# ------------------------------------------------------------------------------------------------
# Statistics: the sampler draws from the target law
# ------------------------------------------------------------------------------------------------


def target_law(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / T) after top-k then top-p filtering, in float64, written independently."""
    x = logits.double()
    p = torch.softmax(x / temperature, -1)
    order = sorted(range(x.numel()), key=lambda i: (-x[i].item(), i))
    kept = order[:top_k] if top_k > 0 else order
    if top_p < 1.0:
        mass = sum(p[i].item() for i in kept)
        before, cut = 0.0, []
        for i in kept:
            if cut and not before < top_p:
                break
            cut.append(i)
            before += p[i].item() / mass
        kept = cut
    q = torch.zeros_like(p)
    q[kept] = p[kept]
    return q / q.sum()


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a.double() - b.double()).abs().sum())


TV_BOUND = 0.02


@pytest.mark.emulator_slow
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("tree", ["root_only", "star"])
@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.9)]
)
def test_sampling_frequencies_match_target_law(device, tree, temperature, top_k, top_p):
    n, v = 20000, 16
    row = randn(v, seed=13)  # spread out: every filter below removes > 0.05 of the mass
    parents = torch.tensor(TREES[tree])
    t = parents.numel()
    logits = row.expand(n, t, v).contiguous()
    draft = torch.arange(t).expand(n, t).contiguous()  # the first emitted token is y_0 either way
    uniforms = rand(n, t, seed=12)
    _, tokens, _ = ops.verify_tree(
        draft.to(device),
        parents.to(device),
        logits.to(device),
        temperature,
        top_k,
        top_p,
        uniforms.to(device),
    )
    empirical = torch.bincount(tokens[:, 0].cpu(), minlength=v).double() / n
    law = target_law(row, temperature, top_k, top_p)
    assert total_variation(empirical, law) < TV_BOUND
    assert float(empirical[law == 0].sum()) == 0.0, "a filtered-out token was emitted"

    # Negative controls: the bound rejects a distribution moved by 0.05 ...
    perturbed = law.clone()
    hi, lo = int(law.argmax()), int(torch.where(law > 0, law, 2.0).argmin())
    moved = min(0.05, float(law[hi]))
    perturbed[hi] -= moved
    perturbed[lo if lo != hi else (hi + 1) % v] += moved
    assert total_variation(empirical, perturbed) > TV_BOUND
    # ... and a wrong sampler (temperature off by 30 %, no filtering) on the same uniforms.
    wrong_law = torch.softmax(row.double() / (temperature * 1.3), -1)
    wrong = torch.searchsorted(
        torch.cumsum(wrong_law, 0), uniforms[:, 0].double(), right=True
    ).clamp(max=v - 1)
    wrong_empirical = torch.bincount(wrong, minlength=v).double() / n
    assert total_variation(wrong_empirical, law) > TV_BOUND


@pytest.mark.emulator_slow
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.6, 20, 1.0), (1.2, 0, 0.7), (0.9, 40, 0.85)]
)
def test_sampling_frequencies_fine_grained(device, temperature, top_k, top_p):
    # 400000 draws over 64 tokens: a bound of 0.01 that rejects a temperature off by only 5 %.
    n, v, bound = 400_000, 64, 0.01
    row = randn(v, seed=21, scale=1.5)
    uniforms = rand(n, 1, seed=22)
    _, tokens, _ = ops.verify_tree(
        torch.zeros(n, 1, dtype=torch.long, device=device),
        torch.tensor([-1], device=device),
        row.expand(n, 1, v).to(device),
        temperature,
        top_k,
        top_p,
        uniforms.to(device),
    )
    empirical = torch.bincount(tokens[:, 0].cpu(), minlength=v).double() / n
    assert total_variation(empirical, target_law(row, temperature, top_k, top_p)) < bound
    # Negative control: the law with a temperature 5 % higher is rejected.
    assert total_variation(empirical, target_law(row, temperature * 1.05, top_k, top_p)) > bound


# ------------------------------------------------------------------------------------------------
# Real vocabulary sizes
# ------------------------------------------------------------------------------------------------


def assert_samples_within(tokens, logits, uniforms, kw, delta=1e-5):
    """Each row samples once (T = 1 trees): its id must be one the reference draws with a uniform
    within ``delta`` of the given one. The inverse CDF over ascending ids is monotone in u, so that
    is: the reference's id at ``u - delta`` <= id <= the reference's id at ``u + delta``.

    At V ~ 150k single tokens hold ~1e-6 of the mass, so float32 rounding of the CDF alone moves a
    few % of the draws by a token or two: the count of differences is not bounded, their size is.
    """
    lo = ref64(ref.target_tokens, logits, uniforms=(uniforms - delta).clamp(min=0), **kw)[:, 0]
    hi = ref64(ref.target_tokens, logits, uniforms=(uniforms + delta).clamp(max=1 - 1e-7), **kw)[
        :, 0
    ]
    got = tokens[:, 0].cpu()
    bad = ((got < lo) | (got > hi)).nonzero()[:, 0].tolist()
    assert not bad, (
        f"{len(bad)} of {len(got)} draws are more than {delta} (in u) away from the reference's: "
        f"row {bad[0]}: u = {float(uniforms[bad[0], 0])}, kernel id {int(got[bad[0]])}, reference "
        f"ids for u -/+ {delta}: {int(lo[bad[0]])}, {int(hi[bad[0]])}"
    )


def sample_rows(logits, uniforms, device, kw):
    """One sample per row of logits[B, 1, V] through verify_tree with T = 1 trees."""
    b = logits.shape[0]
    draft = torch.full((b, 1), -1, dtype=torch.long, device=device)
    parents = torch.tensor([-1], device=device)
    _, tokens, _ = ops.verify_tree(
        draft, parents, logits.to(device), uniforms=uniforms.to(device), **kw
    )
    return tokens


@pytest.mark.parametrize("device", devices())
def test_sampling_large_vocab(device):
    b, v = 32, 151936
    kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    logits = randn(b, 1, v, seed=25, scale=2.0)
    uniforms = rand(b, 1, seed=26)
    assert_samples_within(sample_rows(logits, uniforms, device, kw), logits, uniforms, kw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("top_p", [1.0, 0.9999])
def test_sampling_long_tail_is_not_dropped(device, top_p):
    # One likely token and 150000 tail tokens of relative weight 5e-8 each: 0.75 % of the mass,
    # every tail token below half a float32 ulp of a CDF that is already near 1. Uniforms above the
    # first token's CDF must draw tail tokens (a float32 running sum of the CDF drops them all).
    v, b = 150_001, 64
    row = torch.full((v,), -16.8)
    row[0] = 0.0
    p0 = float(torch.softmax(row.double(), -1)[0])
    uniforms = torch.linspace(p0 + 1e-4, 1 - 1e-4, b).unsqueeze(1)
    logits = row.expand(b, 1, v)
    kw = {"temperature": 1.0, "top_k": 0, "top_p": top_p}
    tokens = sample_rows(logits, uniforms, device, kw)
    assert bool((tokens[:, 0] > 0).all()), (
        f"{int((tokens[:, 0] == 0).sum())} of {b} tail draws gave token 0"
    )
    assert_samples_within(tokens, logits, uniforms, kw)


@pytest.mark.slow
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature, top_k, top_p", SAMPLING)
def test_sampling_real_vocab_size_all_dtypes(device, dtype, temperature, top_k, top_p):
    b, v = 16, 151936
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    logits = randn(b, 1, v, seed=27, scale=2.0).to(dtype)
    uniforms = rand(b, 1, seed=28)
    assert_samples_within(sample_rows(logits, uniforms, device, kw), logits, uniforms, kw)


@pytest.mark.slow
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_real_vocab_size_all_dtypes(device, dtype):
    draft, parents, logits = random_case(4, 16, 151936, dtype, seed=29, batched_parents=True)
    out, expected = check_against_reference(draft, parents, logits, device)
    for got, exp in zip(out, expected):
        assert torch.equal(got, exp)
    assert int(expected[0].max()) >= 2
