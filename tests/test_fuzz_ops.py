"""Fuzz test of every op in :mod:`mtp_ext.ops`: seeded random calls, run in a subprocess.

Each case calls one op with random shapes (empty and size-1 dims included), strides
(permuted, stepped and broadcast views), dtypes (float32, float16, bfloat16, and wrong ones),
devices (the CPU, all-meta, or one meta tensor among CPU tensors), values (inf, -inf and NaN
inside the tensors) and scalars (huge, negative, NaN), valid or with one thing made invalid. Every
call must either

* return what :mod:`mtp_ext.reference` returns for the same inputs, within the tolerances of
  ``tests/helpers.py`` (a near tie may break either way), or
* raise ValueError, TypeError, RuntimeError or IndexError with a message naming one of the op's
  arguments; a valid input must not raise.

Every tensor input lies inside a larger buffer with sentinel bytes before, after and between its
elements: no byte of the buffer may change (except the elements of ``compact_kv``'s cache, which
it rewrites in place and which must then equal the reference's).

The cases run in a child process, so a crash fails the test instead of ending the run; a failure
prints the seed and the case (run ``python tests/test_fuzz_ops.py --seed S --case I`` to replay
one). ``--backend cuda-emulator`` runs the CUDA launchers and kernels under the CPU emulator
instead of the CPU kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import inspect
import os
import random
import re
import subprocess
import sys
import time
import traceback

import pytest
import torch
from helpers import TOL, assert_equal_up_to_near_ties, linear_tol, ref64

from mtp_ext import ops, reference

SEED = 1234
CASES = 3000
EMULATED_CASES = 1000
HERE = os.path.dirname(os.path.abspath(__file__))


def run_child(*args: str, value_checks: bool = True, timeout: float = 300.0):
    env = dict(os.environ, MTP_EXT_CUDA_VALUE_CHECKS="1" if value_checks else "0")
    return subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        cwd=os.path.dirname(HERE),
    )


def check_child(result: subprocess.CompletedProcess, what: str) -> None:
    out = (result.stdout + result.stderr)[-8000:]
    if result.returncode < 0:
        pytest.fail(f"{what}: the child process died of signal {-result.returncode}\n{out}")
    assert result.returncode == 0, f"{what} failed:\n{out}"


@pytest.fixture(scope="module")
def emulator_built():
    """Builds the emulated CUDA kernels here, without the child's time limit (a first build takes
    minutes); the child then only loads them."""
    from cuda_emulator import load

    load()


def test_fuzz_ops_cpu():
    """CASES seeded cases on the CPU kernels (a few seconds)."""
    check_child(run_child("--seed", str(SEED), "--cases", str(CASES)), "fuzz (CPU kernels)")


@pytest.mark.parametrize("value_checks", [True, False], ids=["value_checks", "no_value_checks"])
def test_fuzz_ops_cuda_emulator(emulator_built, value_checks):
    """EMULATED_CASES seeded cases on the CUDA launchers and kernels under the CPU emulator, with
    and without MTP_EXT_CUDA_VALUE_CHECKS. Without it the launchers skip the checks that read
    device data (parents, paths, weights, uniforms): a case that breaks only such a rule need not
    raise nor match the reference, but must still write nothing outside its outputs and return
    indices in range."""
    seed = SEED + (1 if value_checks else 2)
    args = ["--seed", str(seed), "--cases", str(EMULATED_CASES), "--backend", "cuda-emulator"]
    check_child(
        run_child(*args, value_checks=value_checks),
        f"fuzz (CUDA kernels under the emulator, value checks {'on' if value_checks else 'off'})",
    )


# ================================================================================================
# The child process
# ================================================================================================

OPS = {name: getattr(ops, name) for name in ops.__all__}
REF = reference
MIN_T, MAX_T = reference.MIN_TEMPERATURE, reference.MAX_TEMPERATURE
BACKEND = "cpu"  # or "cuda-emulator"; set by main
VALUE_CHECKS = True  # whether the CUDA launchers check values (MTP_EXT_CUDA_VALUE_CHECKS=1)
INF, NAN = float("inf"), float("nan")
PAD = 5  # sentinel elements before and after each tensor
SENTINEL = 0xA5  # every byte of a buffer outside its tensor
SIZES = [0, 1, 1, 2, 3, 5]  # batch-like dims: empty and size-1 often


@dataclasses.dataclass
class Tensor:
    """A tensor input to be placed: its values (on the CPU, final dtype), layout and device."""

    values: object
    layout: str = "contiguous"  # contiguous, permuted, stepped, broadcast
    device: str = "cpu"
    broadcast_dims: tuple | None = None  # the dims a broadcast view may repeat (None: any)
    last_dense: bool = False  # keep the last dim innermost with stride 1


@dataclasses.dataclass
class Case:
    op: str
    args: list  # Tensor, None or scalars, in the op's argument order
    valid: bool = True  # follows the contract: must not raise
    note: str = ""  # what was made invalid or special
    in_place: int | None = None  # the argument the op writes (compact_kv's cache)


def describe(case: Case) -> str:
    names = list(inspect.signature(OPS[case.op]).parameters)
    parts = []
    for name, a in zip(names, case.args):
        if isinstance(a, Tensor):
            v = a.values
            parts.append(
                f"{name}=Tensor({list(v.shape)}, {str(v.dtype).removeprefix('torch.')}, "
                f"{a.layout}, {a.device})"
            )
        else:
            parts.append(f"{name}={a!r}")
    return f"{case.op}({', '.join(parts)}){' [' + case.note + ']' if case.note else ''}"


# ------------------------------------------------------------------------------------------------
# Placing tensors inside sentinel buffers
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Placed:
    view: object
    buffer: object = None  # None on meta
    before: object = None
    covered: object = None  # bool mask over the buffer: the view's elements


def place(t: Tensor, r: random.Random) -> Placed:
    values = t.values
    if t.device == "meta":
        return Placed(values.to("meta"))
    shape, n = list(values.shape), values.dim()
    order = list(range(n))
    steps = [1] * n
    zero = set()
    if t.layout == "permuted":
        r.shuffle(order)
    if t.layout in ("stepped", "permuted"):
        steps = [r.choice([1, 2, 3]) for _ in range(n)]
    if t.last_dense and n:
        order = [d for d in order if d != n - 1] + [n - 1]
        steps[n - 1] = 1
    if t.layout == "broadcast":
        allowed = range(n) if t.broadcast_dims is None else t.broadcast_dims
        dims = [d for d in allowed if d < n and shape[d] > 1]
        if dims:
            d = r.choice(dims)
            values = values.narrow(d, 0, 1).expand(shape)
            zero.add(d)
    strides, acc = [0] * n, 1
    for d in reversed(order):
        strides[d] = 0 if d in zero else acc * steps[d]
        if d not in zero:
            acc *= steps[d] * max(shape[d], 1)
    extent = 0 if 0 in shape else 1 + sum((s - 1) * st for s, st in zip(shape, strides))
    buffer = torch.empty(2 * PAD + extent, dtype=values.dtype)
    buffer.view(torch.uint8).fill_(1 if values.dtype == torch.bool else SENTINEL)
    if extent:  # written through a view without the broadcast dims (copy_ refuses overlap)
        one = [1 if d in zero else s for d, s in enumerate(shape)]
        buffer.as_strided(one, strides, PAD).copy_(values.as_strided(one, values.stride()))
    view = buffer.as_strided(shape, strides, PAD)
    covered = torch.zeros(buffer.numel(), dtype=torch.bool)
    if extent:
        covered[torch.arange(buffer.numel()).as_strided(shape, strides, PAD).flatten()] = True
    return Placed(view, buffer, buffer.clone(), covered)


def same_bytes(a, b) -> bool:
    if a.numel() == 0:
        return True
    return torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def bytes_changed(p: Placed, mask) -> bool:
    a, b = p.buffer.view(torch.uint8), p.before.view(torch.uint8)
    width = p.buffer.element_size()
    m = mask.repeat_interleave(width)
    return not torch.equal(a[m], b[m])


# ------------------------------------------------------------------------------------------------
# Random inputs
# ------------------------------------------------------------------------------------------------


class Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)

    def floats(self, shape, dtype, scale=1.0, special=None):
        """Normal values; ``special`` (default: sometimes) puts inf, -inf and NaN in."""
        x = torch.randn(*shape, generator=self.g) * scale
        if special is None:
            special = self.r.random() < 0.3
        if special and x.numel():
            flat = x.view(-1)
            for _ in range(self.r.randint(1, 3)):
                kind = self.r.choice(["inf", "-inf", "nan", "row_inf", "row_-inf", "row_nan"])
                value = {"inf": INF, "-inf": -INF, "nan": NAN}[kind.removeprefix("row_")]
                if kind.startswith("row_") and x.dim() >= 1 and x.shape[-1] > 0:
                    rows = x.view(-1, x.shape[-1])
                    rows[self.r.randrange(rows.shape[0])] = value
                else:
                    flat[self.r.randrange(flat.numel())] = value
        return x.to(dtype)

    def dtype(self):
        return self.r.choice([torch.float32, torch.float16, torch.bfloat16])

    def layout(self):
        return self.r.choice(["contiguous"] * 3 + ["permuted", "stepped", "broadcast"])

    def tensor(self, values, **kw):
        """A Tensor with a random layout; index tensors are broadcast only along ``broadcast_dims``
        (a broadcast repeats values, which could break a tree or a path)."""
        dims = kw.get("broadcast_dims", () if values.dtype == torch.long else None)
        return Tensor(
            values,
            kw.get("layout", self.layout()),
            broadcast_dims=dims,
            last_dense=kw.get("last_dense", False),
        )

    def parents(self, t):
        return torch.tensor([-1] + [self.r.randrange(i) for i in range(1, t)], dtype=torch.long)

    def tree(self, b, t):
        """parents [T] or [B, T] (valid)."""
        if self.r.random() < 0.5:
            return self.parents(t)
        rows = [self.parents(t) for _ in range(b)]
        return torch.stack(rows) if rows else torch.empty(0, t, dtype=torch.long)

    def parents_tensor(self, parents):
        """parents as a Tensor: a broadcast of [B, T] parents repeats one valid row."""
        return self.tensor(parents, broadcast_dims=(0,) if parents.dim() == 2 else ())


def gen_softmax_topk(G: Gen) -> Case:
    r = G.r
    lead = [r.choice(SIZES) for _ in range(r.randint(0, 2))]
    v = r.choice([1, 2, 3, 7, 16, 33, 65])
    k = r.randint(1, v)
    temperature = r.choice([1.0, 1.0, 0.7, 2.5, MIN_T, 1e-20, 1e20, MAX_T])
    logits = G.tensor(G.floats(lead + [v], G.dtype(), scale=3.0))
    return Case("softmax_topk", [logits, k, temperature])


def gen_marginalize(G: Gen, op="marginalize") -> Case:
    r = G.r
    b, l_, v = r.choice(SIZES), r.choice(SIZES), r.choice([1, 2, 5, 17, 40])
    weights = torch.rand(b, l_, generator=G.g)
    if b and l_ and r.random() < 0.3:
        weights[r.randrange(b)] = 0.0  # an all-zero row
    args = [
        G.tensor(G.floats([b, l_, v], G.dtype(), scale=3.0)),
        G.tensor(weights.to(r.choice([G.dtype(), torch.float32]))),
    ]
    if op == "topk_marginalize":
        args.append(r.randint(1, v))
    args.append(r.random() < 0.7)
    return Case(op, args)


def gen_topk_marginalize(G: Gen) -> Case:
    return gen_marginalize(G, "topk_marginalize")


def gen_fused_mtp_heads(G: Gen) -> Case:
    r = G.r
    n, h, d, v = (
        r.choice(SIZES),
        r.choice([0, 1, 2, 3]),
        r.choice([1, 4, 8, 16]),
        r.choice([1, 3, 20, 40]),
    )
    dtype = G.dtype()
    with_weight = r.random() < 0.7
    weight = (
        G.tensor(G.floats([h, d, d], dtype, scale=d**-0.5, special=False)) if with_weight else None
    )
    bias = (
        G.tensor(G.floats([h, d], dtype, scale=0.1, special=False))
        if with_weight and r.random() < 0.7
        else None
    )
    norm = (
        G.tensor((1 + 0.1 * torch.randn(d, generator=G.g)).to(dtype)) if r.random() < 0.6 else None
    )
    vocab_ids = None
    if r.random() < 0.4:
        vocab_ids = G.tensor(torch.randperm(2 * v, generator=G.g)[:v])
    return Case(
        "fused_mtp_heads",
        [
            G.tensor(G.floats([n, d], dtype)),
            weight,
            bias,
            G.tensor(G.floats([v, d], dtype, scale=0.5)),
            r.randint(1, v),
            norm,
            r.choice([1e-6, 1e-5, 0.0]),
            vocab_ids,
        ],
    )


def gen_verify_tree(G: Gen) -> Case:
    r = G.r
    b, t, v = r.choice(SIZES), r.randint(1, 6), r.choice([1, 2, 5, 20, 70])
    logits = G.floats([b, t, v], G.dtype(), scale=2.0)
    parents = G.tree(b, t)
    draft = torch.randint(-1, v + 1, (b, t), generator=G.g)
    if b and r.random() < 0.7:  # drafts that follow the greedy targets, so walks go deep
        par = parents.expand(b, t) if parents.dim() == 1 else parents
        greedy = logits.float().argmax(-1)
        draft = torch.where(
            torch.rand(b, t, generator=G.g) < 0.7, greedy.gather(1, par.clamp(min=0)), draft
        )
    sampling = r.random() < 0.6
    temperature = r.choice([1.0, 0.6, 1.7, MIN_T, 1e6]) if sampling else 0.0
    top_k = r.choice([0, 0, 1, 3, v, v + 5, 2**62]) if sampling else r.choice([0, 4])
    top_p = r.choice([1.0, 1.0, 0.9, 0.5, 1e-6]) if sampling else 1.0
    uniforms = None
    if sampling or r.random() < 0.2:
        uniforms = G.tensor(
            torch.rand(b, t, generator=G.g).clamp(max=0.99).to(r.choice([torch.float32, G.dtype()]))
        )
    return Case(
        "verify_tree",
        [
            G.tensor(draft),
            G.parents_tensor(parents),
            G.tensor(logits),
            temperature,
            top_k,
            top_p,
            uniforms,
        ],
    )


def gen_tree_attention_mask(G: Gen) -> Case:
    r = G.r
    b, t = r.choice([1, 2, 3]), r.randint(1, 6)
    dtype = r.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64])
    return Case(
        "tree_attention_mask", [G.parents_tensor(G.tree(b, t)), r.choice([0, 1, 3, 8]), dtype]
    )


def gen_compact_kv(G: Gen) -> Case:
    r = G.r
    b, heads, t, hd = (
        r.choice(SIZES),
        r.choice([0, 1, 2, 3]),
        r.randint(1, 6),
        r.choice([0, 1, 2, 5]),
    )
    prefix = r.choice([0, 1, 4])
    s = prefix + t + r.choice([0, 0, 1, 3])
    dtype = r.choice([G.dtype(), torch.float64, torch.int64, torch.uint8])
    cache = (torch.randn(b, heads, s, hd, generator=G.g) * 50).to(dtype)
    path = torch.full((b, t), -1, dtype=torch.long)
    num = torch.zeros(b, dtype=torch.long)
    for i in range(b):
        num[i] = r.randrange(t)
        nodes = sorted(r.sample(range(1, t), int(num[i])))
        path[i, : num[i] + 1] = torch.tensor([0] + nodes)
    # The cache's head_dim must be contiguous (the contract); a broadcast cache would alias.
    layout = r.choice(["contiguous", "contiguous", "permuted", "stepped"])
    return Case(
        "compact_kv",
        [Tensor(cache, layout, last_dense=True), G.tensor(path), G.tensor(num), prefix],
        in_place=0,
    )


def gen_verify_tree_from_hidden(G: Gen) -> Case:
    r = G.r
    b, t, d, v = r.choice(SIZES), r.randint(1, 5), r.choice([1, 4, 8, 16]), r.choice([1, 3, 20, 40])
    dtype = G.dtype()
    hidden = G.floats([b, t, d], dtype)
    lm_head = G.floats([v, d], dtype, scale=0.5, special=r.random() < 0.1)
    draft = torch.randint(-1, v + 1, (b, t), generator=G.g)
    norm = (
        G.tensor((1 + 0.1 * torch.randn(d, generator=G.g)).to(dtype)) if r.random() < 0.6 else None
    )
    return Case(
        "verify_tree_from_hidden",
        [
            G.tensor(draft),
            G.parents_tensor(G.tree(b, t)),
            G.tensor(hidden),
            G.tensor(lm_head),
            norm,
            r.choice([1e-6, 1e-5, 0.0]),
        ],
    )


def gen_small_batch_linear(G: Gen) -> Case:
    r = G.r
    m, k, n = r.choice(SIZES + [17, 65]), r.choice([0, 1, 3, 8, 20]), r.choice([0, 1, 4, 9])
    bias = G.tensor(G.floats([n], G.dtype(), special=False)) if r.random() < 0.6 else None
    return Case(
        "small_batch_linear",
        [
            G.tensor(G.floats([m, k], G.dtype())),
            G.tensor(G.floats([n, k], G.dtype(), scale=k**-0.5 if k else 1.0)),
            bias,
        ],
    )


GENERATORS = {
    "softmax_topk": gen_softmax_topk,
    "marginalize": gen_marginalize,
    "topk_marginalize": gen_topk_marginalize,
    "fused_mtp_heads": gen_fused_mtp_heads,
    "verify_tree": gen_verify_tree,
    "tree_attention_mask": gen_tree_attention_mask,
    "compact_kv": gen_compact_kv,
    "verify_tree_from_hidden": gen_verify_tree_from_hidden,
    "small_batch_linear": gen_small_batch_linear,
}

# ------------------------------------------------------------------------------------------------
# Making a case invalid
# ------------------------------------------------------------------------------------------------

# Scalar arguments and values outside their contracts.
BAD_SCALARS = {
    "softmax_topk": {
        1: [0, -1, -(2**63), 2**63 - 1, "V+1"],
        2: [0.0, -1.0, NAN, INF, 1e-39, 1e39, 1e300],
    },
    "topk_marginalize": {2: [0, -5, 2**63 - 1, "V+1"]},
    "fused_mtp_heads": {4: [0, -1, 2**63 - 1, "V+1"], 6: [-1e-6, NAN, -INF]},
    "verify_tree": {
        3: [-1.0, NAN, INF, 1e-39, 1e300],
        4: [-1, -(2**63)],
        5: [0.0, -0.5, 1.5, NAN, INF],
    },
    "tree_attention_mask": {1: [-1, -(2**63), 2**62, 2**63 - 1]},
    "compact_kv": {3: [-1, 2**63 - 1, 2**62, "S"]},
    "verify_tree_from_hidden": {5: [-1e-6, NAN]},
}


def mutate(G: Gen, case: Case) -> None:
    """Makes ``case`` break its contract in one way (or puts a meta tensor in)."""
    r = G.r
    tensors = [i for i, a in enumerate(case.args) if isinstance(a, Tensor)]
    kinds = ["dtype", "rank", "meta"] + (["scalar"] * 2 if case.op in BAD_SCALARS else [])
    kinds += {
        "verify_tree": ["uniforms", "parents", "no_uniforms"],
        "compact_kv": ["path"],
        "tree_attention_mask": ["parents"],
        "verify_tree_from_hidden": ["parents"],
        "marginalize": ["weights"],
        "topk_marginalize": ["weights"],
        "fused_mtp_heads": ["vocab_ids"],
    }.get(case.op, [])
    kind = r.choice(kinds)
    case.valid = False
    args = case.args
    if kind == "dtype":
        i = r.choice(tensors)
        old = args[i].values
        if case.op == "compact_kv" and i == 0:
            kind = "rank"  # any dtype is a valid cache
        elif old.dtype == torch.long:
            args[i].values = old.to(r.choice([torch.int32, torch.float32, torch.uint8]))
        else:
            wrong = r.choice([torch.float64, torch.int64, torch.int32, torch.bool, torch.complex64])
            args[i].values = old.to(wrong) if wrong != torch.bool else old > 0
        if kind == "dtype":
            case.note = f"arg {i} made {args[i].values.dtype}"
            return
    if kind == "rank":
        i = r.choice(tensors)
        old = args[i].values
        if r.random() < 0.5 or old.dim() == 0:
            args[i].values = old.unsqueeze(r.randint(0, old.dim()))
        else:
            args[i].values = (
                old.select(r.randrange(old.dim()), 0) if 0 not in old.shape else old.sum(0)
            )
        args[i].layout = "contiguous" if args[i].layout == "broadcast" else args[i].layout
        case.note = f"arg {i} reshaped to {list(args[i].values.shape)}"
        # A change of rank that leaves a valid call (parents [T] -> [1, T] with B = 1, leading dims
        # of softmax_topk's logits) is compared with the reference like any other.
        return
    if kind == "meta":
        if len(tensors) == 1 or r.random() < 0.3:
            for i in tensors:
                args[i].device = "meta"
            case.valid = True  # all on meta: the fake runs
            case.note = "all tensors on meta"
        else:
            i = r.choice(tensors)
            args[i].device = "meta"
            case.note = f"arg {i} on meta"
        return
    if kind == "scalar":
        i, options = r.choice(list(BAD_SCALARS[case.op].items()))
        value = r.choice(options)
        if value == "V+1":
            value = args[0].values.shape[-1] + 1
        if value == "S":
            value = args[0].values.shape[2] - args[1].values.shape[1] + 1
        if case.op == "verify_tree" and i in (4, 5) and args[3] == 0.0:
            args[3] = 1.0  # top_k / top_p are read when sampling
            if args[6] is None:
                args[6] = G.tensor(torch.rand(*args[0].values.shape, generator=G.g))
        args[i] = value
        case.note = f"arg {i} = {value!r}"
        return
    if kind == "uniforms":
        b, t = args[0].values.shape
        if b == 0:
            return mutate(G, case)
        u = torch.rand(b, t, generator=G.g)
        u[r.randrange(b), r.randrange(t)] = r.choice([1.0, 2.0, -0.5, NAN, INF, -INF])
        args[3] = args[3] or 1.0
        args[6] = Tensor(u.to(r.choice([torch.float32, torch.float16, torch.bfloat16])), G.layout())
        case.note = "a uniform outside [0, 1)"
        return
    if kind == "no_uniforms":
        args[3], args[6] = 0.8, None
        case.note = "sampling without uniforms"
        return
    if kind == "parents":
        p = args[1].values if case.op != "tree_attention_mask" else args[0].values
        if p.shape[-1] < 2:
            p[..., 0] = 0
        else:
            flat = p.view(-1, p.shape[-1])
            if flat.shape[0] == 0:
                return mutate(G, case)
            j = r.randrange(1, p.shape[-1])
            flat[r.randrange(flat.shape[0]), j] = r.choice([j, j + 1, -1, -5, 2**62])
        case.note = "an invalid parent"
        return
    if kind == "path":
        path, num = args[1].values, args[2].values
        if num.numel() == 0:
            return mutate(G, case)
        i = r.randrange(num.numel())
        t = path.shape[1]
        if r.random() < 0.5:
            num[i] = r.choice([-1, t, 2**62, -(2**63)])
        else:
            path[i, r.randint(0, int(num[i]))] = r.choice([-1, t, 2**62, -(2**63)])
        case.note = "path or num_accepted out of range"
        return
    if kind == "weights":
        w = args[1].values
        if w.numel() == 0:
            return mutate(G, case)
        w.view(-1)[r.randrange(w.numel())] = r.choice([-0.5, NAN, -INF])
        case.note = "a negative or NaN weight"
        return
    if kind == "vocab_ids":
        if args[7] is None:
            return mutate(G, case)
        ids = args[7].values
        ids[r.randrange(ids.numel())] = r.choice([-1, -(2**63)])
        case.note = "a negative vocab id"
        return
    raise AssertionError(kind)


def make_case(seed: int, index: int, ops_order: list[str]) -> Case:
    G = Gen(seed * 1_000_003 + index)
    case = GENERATORS[ops_order[index % len(ops_order)]](G)
    if G.r.random() < 0.45:
        mutate(G, case)
    return case


# ------------------------------------------------------------------------------------------------
# Running a case and judging the outcome
# ------------------------------------------------------------------------------------------------

ALLOWED_ERRORS = (ValueError, TypeError, RuntimeError, IndexError)


class Finding(Exception):
    pass


def names_an_argument(op: str, message: str) -> bool:
    return any(re.search(rf"\b{name}\b", message) for name in inspect.signature(OPS[op]).parameters)


def call(fn, args):
    return fn(*args)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def run_case(case: Case, r: random.Random, fn):
    placed = [place(a, r) if isinstance(a, Tensor) else a for a in case.args]
    args = [p.view if isinstance(p, Placed) else p for p in placed]
    try:
        out = call(fn, args)
        error = None
    except ALLOWED_ERRORS as e:
        out, error = None, e
    except Exception as e:
        raise Finding(f"raised {type(e).__name__} (not an allowed type): {e}") from e
    for i, p in enumerate(placed):
        if not isinstance(p, Placed) or p.buffer is None:
            continue
        if bytes_changed(p, ~p.covered):
            raise Finding(f"wrote outside argument {i} (sentinel bytes changed)")
        if i != case.in_place and bytes_changed(p, p.covered):
            raise Finding(f"changed input argument {i}")
    if error is not None:
        message = str(error).split("\n")[0]
        if not names_an_argument(case.op, message):
            raise Finding(f"{type(error).__name__} without naming an argument: {message}")
        if case.valid:
            raise Finding(f"rejected a valid input: {type(error).__name__}: {message}")
        return "raised"
    if any(isinstance(a, Tensor) and a.device == "meta" for a in case.args):
        check_meta(case, placed, out, fn)
        return "meta"
    if not VALUE_CHECKS and breaks_a_value_rule(case, fn):
        if case.op in ("verify_tree", "verify_tree_from_hidden"):
            check_walk_ranges(case, args, as_tuple(out))
        return "unchecked"
    check_against_reference(case, placed, args, out)
    return "matched"


def breaks_a_value_rule(case: Case, fn) -> bool:
    """Whether the call raises once the CUDA launchers' value checks are on (they are off in this
    run): the case breaks a rule on values (a tree, a path, weights, uniforms) that the launchers
    check only on request."""
    args = [a.values.clone() if isinstance(a, Tensor) else a for a in case.args]
    os.environ["MTP_EXT_CUDA_VALUE_CHECKS"] = "1"
    try:
        call(fn, args)
        return False
    except ALLOWED_ERRORS:
        return True
    finally:
        os.environ["MTP_EXT_CUDA_VALUE_CHECKS"] = "0"


def check_walk_ranges(case: Case, args, out):
    """Outputs of a walk over an invalid tree or with uniforms outside [0, 1), unchecked on CUDA:
    still in range (num_accepted in [0, T), tokens in [-1, V), path in [-1, T))."""
    num, tokens, path = out
    t = args[0].shape[1]
    v = args[2].shape[-1] if case.op == "verify_tree" else args[3].shape[0]
    if num.numel() and not ((num >= 0) & (num < t)).all():
        raise Finding(f"num_accepted out of [0, {t}): {num.tolist()}")
    if tokens.numel() and not ((tokens >= -1) & (tokens < v)).all():
        raise Finding(f"tokens out of [-1, {v}): {tokens.tolist()}")
    if path.numel() and not ((path >= -1) & (path < t)).all():
        raise Finding(f"path out of [-1, {t}): {path.tolist()}")


def check_meta(case: Case, placed, out, fn):
    """All-meta inputs: the fake's outputs have the CPU kernel's shapes and dtypes (when the CPU
    kernel accepts the same inputs); a meta tensor among CPU tensors must have raised."""
    devices = {a.device for a in case.args if isinstance(a, Tensor)}
    if devices != {"meta"}:
        raise Finding("accepted a meta tensor among CPU tensors")
    cpu_args = [a.values if isinstance(a, Tensor) else a for a in case.args]
    try:
        expected = as_tuple(call(fn, cpu_args))
    except ALLOWED_ERRORS:
        return
    if case.op == "compact_kv":
        return
    for o, e in zip(as_tuple(out), expected):
        if o.device.type != "meta" or o.shape != e.shape or o.dtype != e.dtype:
            raise Finding(
                f"meta output {o.shape} {o.dtype} on {o.device} vs CPU {e.shape} {e.dtype}"
            )


def check_against_reference(case: Case, placed, args, out):
    ref_fn = getattr(REF, case.op)
    if case.op == "compact_kv":
        cache = placed[0].before.as_strided(args[0].shape, args[0].stride(), PAD).clone()
        try:
            ref_fn(cache, *args[1:])
        except Exception as e:
            raise Finding(
                f"the kernel accepted what the reference rejects: {type(e).__name__}: {e}"
            ) from e
        if not same_bytes(args[0], cache):
            raise Finding("the cache differs from the reference's")
        return
    try:
        exact = case.op == "tree_attention_mask"
        expected = as_tuple(ref_fn(*args) if exact else ref64(ref_fn, *args))
    except Exception as e:
        raise Finding(
            f"the kernel accepted what the reference rejects: {type(e).__name__}: {e}"
        ) from e
    out = as_tuple(out)
    if len(out) != len(expected):
        raise Finding(f"{len(out)} outputs, the reference has {len(expected)}")
    for i, (o, e) in enumerate(zip(out, expected)):
        if o.shape != e.shape or o.device != e.device:
            raise Finding(
                f"output {i}: {list(o.shape)} on {o.device}, "
                f"reference {list(e.shape)} on {e.device}"
            )
        want = args[0].dtype if case.op == "small_batch_linear" else e.dtype
        if o.dtype != want:
            raise Finding(f"output {i}: dtype {o.dtype}, expected {want}")
    compare = COMPARE.get(case.op, compare_exact)
    compare(case, args, out, expected)


def close(a, b, tol) -> bool:
    rtol, atol = tol
    return bool(torch.isclose(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True).all())


def compare_exact(case, args, out, expected):
    for i, (o, e) in enumerate(zip(out, expected)):
        if o.is_floating_point():
            if not torch.equal(o.to(e.dtype).nan_to_num(7.0), e.nan_to_num(7.0)) or not torch.equal(
                o.isnan(), e.isnan()
            ):
                raise Finding(f"output {i} differs from the reference")
        elif not torch.equal(o, e):
            raise Finding(f"output {i} differs from the reference: {o.tolist()} vs {e.tolist()}")


def topk_equivalent(values, ids, ref_values, ref_ids, score_of, tol, what):
    """Values within tol (NaN equal); ids equal except near ties: the reference score of the
    kernel's id within tol of the reference value at that rank."""
    if not close(values, ref_values, tol):
        raise Finding(f"{what}: values differ from the reference beyond {tol}")
    differ = (ids != ref_ids).nonzero().tolist()
    for index in differ:
        index = tuple(index)
        got = score_of(index, int(ids[index]))
        if got is None or not close(torch.tensor(got), ref_values[index].cpu(), tol):
            raise Finding(
                f"{what}: id {int(ids[index])} at {list(index)} where the reference has "
                f"{int(ref_ids[index])} (scores {got} vs {float(ref_values[index])})"
            )


def compare_softmax_topk(case, args, out, expected):
    if not close(out[0], expected[0], TOL[args[0].dtype].prob):
        raise Finding("probabilities differ from the reference")
    if not (out[1] == expected[1]).all():
        raise Finding(f"ids differ from the reference: {out[1].tolist()} vs {expected[1].tolist()}")


def compare_marginalize(case, args, out, expected):
    if not close(out[0], expected[0], TOL[args[0].dtype].prob):
        raise Finding("the marginal differs from the reference")


def compare_topk_marginalize(case, args, out, expected):
    full = ref64(REF.marginalize, args[0], args[1], args[3])

    def score(index, token):
        return float(full[index[0], token]) if 0 <= token < full.shape[1] else None

    topk_equivalent(
        out[0], out[1], expected[0], expected[1], score, TOL[args[0].dtype].prob, "topk_marginalize"
    )


def compare_fused_mtp_heads(case, args, out, expected):
    hidden, weight, bias, lm_head, _, norm, eps, vocab_ids = args
    z = ref64(REF.head_features, hidden, weight, bias, norm, eps)
    scores = torch.log_softmax(z.double() @ lm_head.double().T, -1)  # [N, H, V]
    row_of = None if vocab_ids is None else {int(t): j for j, t in enumerate(vocab_ids.tolist())}

    def score(index, token):
        j = token if row_of is None else row_of.get(token)
        if j is None or not 0 <= j < scores.shape[-1]:
            return None
        return float(scores[index[0], index[1], j])

    topk_equivalent(
        out[0],
        out[1],
        expected[0],
        expected[1],
        score,
        TOL[hidden.dtype].logprob,
        "fused_mtp_heads",
    )


def compare_verify_tree(case, args, out, expected):
    draft, parents, logits, temperature, top_k, top_p, uniforms = args
    differ = [
        b
        for b in range(draft.shape[0])
        if any(not torch.equal(o[b], e[b]) for o, e in zip(out, expected))
    ]
    if not differ:
        return
    if temperature == 0:
        raise Finding(f"greedy rows {differ} differ from the reference")
    # Sampling: a row may differ only where its uniform lies on a CDF boundary, or the mass ranked
    # above a token on the top-p boundary, within rounding.
    for b in differ:
        par = parents if parents.dim() == 1 else parents[b : b + 1]
        ok = False
        for du in (0.0, -1e-5, 1e-5):
            for dp in (0.0, -1e-6, 1e-6) if top_p < 1 else (0.0,):
                u = (uniforms[b : b + 1].double() + du).clamp(0, 1 - 2**-24)
                alt = ref64(
                    REF.verify_tree,
                    draft[b : b + 1],
                    par,
                    logits[b : b + 1],
                    temperature,
                    top_k,
                    min(top_p + dp, 1.0),
                    u,
                )
                ok = ok or all(torch.equal(o[b : b + 1], a) for o, a in zip(out, alt))
        if not ok:
            raise Finding(
                f"sampled row {b} differs from the reference away from a CDF boundary: "
                f"{[o[b].tolist() for o in out]} vs {[e[b].tolist() for e in expected]}"
            )


def compare_verify_tree_from_hidden(case, args, out, expected):
    draft, parents, hidden, lm_head, norm, eps = args
    # Rows of equal logits (a broadcast lm_head) tie within the rounding of the reference's matmul,
    # and a NaN row may rank its NaN anywhere: any target within the tolerance of the best is valid.
    logits = ref64(REF.final_norm, hidden, norm, eps).double() @ lm_head.double().T
    try:
        assert_equal_up_to_near_ties(
            out, expected, draft, parents, logits, 1e-4, max_rows=draft.shape[0]
        )
    except AssertionError as e:
        raise Finding(f"verify_tree_from_hidden: {e}") from e


def compare_small_batch_linear(case, args, out, expected):
    x, weight, _ = args
    device = "cuda" if BACKEND == "cuda-emulator" else "cpu"
    if not close(out[0], expected[0], linear_tol(x.dtype, weight.dtype, device)):
        raise Finding("the product differs from the reference")


COMPARE = {
    "softmax_topk": compare_softmax_topk,
    "marginalize": compare_marginalize,
    "topk_marginalize": compare_topk_marginalize,
    "fused_mtp_heads": compare_fused_mtp_heads,
    "verify_tree": compare_verify_tree,
    "verify_tree_from_hidden": compare_verify_tree_from_hidden,
    "small_batch_linear": compare_small_batch_linear,
}


def split_product_meets_inf(case: Case) -> bool:
    """On CUDA (compute capability 8.0 on), a product with a float16 or bfloat16 weight runs on
    tensor cores with its float32 operand split into two 16-bit parts, hi + lo: an infinite weight
    times a lo part of 0 (or of the other sign), or an infinite operand (lo = inf - inf), gives NaN
    where the float32 product is +-inf."""
    if BACKEND != "cuda-emulator" or case.op not in SPLIT_OPS:
        return False
    tensors = [a.values for a in case.args if isinstance(a, Tensor)]
    weights = [case.args[i].values for i in SPLIT_OPS[case.op] if isinstance(case.args[i], Tensor)]
    sixteen = any(w.dtype in (torch.float16, torch.bfloat16) for w in weights)
    return sixteen and any(t.is_floating_point() and bool(t.isinf().any()) for t in tensors)


SPLIT_OPS = {"small_batch_linear": (1,), "fused_mtp_heads": (1, 3), "verify_tree_from_hidden": (3,)}

# Problems the fuzz test finds that are known and not yet fixed: (whether a case meets it, the
# reason). A failing case that meets one is reported, but does not fail the run.
KNOWN_ISSUES = [
    (
        split_product_meets_inf,
        "infinite values in a product run on tensor cores give NaN, not +-inf",
    ),
]


def known_issue(case: Case) -> str | None:
    for meets, reason in KNOWN_ISSUES:
        if meets(case):
            return reason
    return None


def main(argv=None) -> int:
    global BACKEND, VALUE_CHECKS
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--cases", type=int, default=CASES)
    parser.add_argument("--case", type=int, default=None, help="replay one case")
    parser.add_argument("--backend", choices=["cpu", "cuda-emulator"], default="cpu")
    opts = parser.parse_args(argv)

    faulthandler.enable()
    torch.set_num_threads(1)
    BACKEND = opts.backend
    VALUE_CHECKS = opts.backend == "cpu" or os.environ.get("MTP_EXT_CUDA_VALUE_CHECKS") == "1"
    if opts.backend == "cuda-emulator":
        from cuda_emulator import route_cpu_ops_to_emulator

        routes = route_cpu_ops_to_emulator()  # noqa: F841 (kept alive for the run)
    missing = set(OPS) - set(GENERATORS)
    assert not missing, f"no generator for {missing}"
    order = sorted(GENERATORS)
    indices = [opts.case] if opts.case is not None else range(opts.cases)
    start, failures, known, outcomes = time.time(), [], [], {}
    for index in indices:
        case = make_case(opts.seed, index, order)
        label = f"seed {opts.seed} case {index}: {describe(case)}"
        print(label, flush=True)
        try:
            outcome = run_case(case, random.Random(index), OPS[case.op])
            key = (case.op, outcome)
            outcomes[key] = outcomes.get(key, 0) + 1
        except Finding as e:
            reason = known_issue(case)
            (known if reason else failures).append(
                f"{label}\n    {e}" + (f" (known: {reason})" if reason else "")
            )
        except Exception:  # noqa: BLE001 (a bug of the test harness itself)
            failures.append(f"{label}\n    harness error:\n{traceback.format_exc()}")
    elapsed = time.time() - start
    checks = "" if VALUE_CHECKS else " without value checks"
    print(
        f"\n{len(indices)} cases in {elapsed:.1f} s on {opts.backend}{checks}: "
        f"{len(failures)} failed, {len(known)} known issues"
    )
    for op in order:
        counts = {o: n for (name, o), n in outcomes.items() if name == op}
        print(f"  {op}: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
    for line in known:
        print("KNOWN " + line)
    for line in failures:
        print("FAILED " + line)
    if failures:
        env = "" if VALUE_CHECKS else "MTP_EXT_CUDA_VALUE_CHECKS=0 "
        print(
            f"replay one: {env}python tests/test_fuzz_ops.py --seed {opts.seed} --case I "
            f"--backend {opts.backend}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
