"""Kernel vs reference vs torch.compile(reference) for every op on one device, with the bytes each
op must move and the achieved fraction of the measured device-to-device copy bandwidth.

For each op and shape: the output is checked against ``mtp_ext.reference`` on the same inputs
(integers exactly, values with a tolerance, near-ties allowed where the summation order may swap
them), then each implementation is timed: on CUDA the kernel as a CUDA-graph replay (it is
capturable; eager with CUDA events otherwise), the reference and the compiled reference eagerly
with CUDA events; the L2 cache is flushed before every timed call; the median is reported.
"bytes" is the least traffic the op needs (every input read once, every output written once), so
GB/s = bytes / kernel time is what the kernel achieves of that minimum.

    python bench/cuda_ops.py --out results/            # CUDA, model shapes
    python bench/cuda_ops.py --device cpu --small      # dry run of the script itself

Writes cuda_ops.json and cuda_ops.md into --out (default: $OUT, else the current directory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import assert_close, assert_equal, assert_topk_equivalent  # noqa: E402
from benchlib import ops  # noqa: E402
from benchlib import reference as ref  # noqa: E402

BF16 = torch.bfloat16


@dataclass
class Case:
    op: str
    shape: str
    args: tuple  # or a callable returning fresh args (in-place ops)
    kernel: Callable
    reference: Callable
    check: Callable  # check(kernel_out, reference_out)
    bytes: int
    fresh: bool = False  # call args() before every call (in-place ops)
    extra: dict = field(default_factory=dict)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=BF16, device="cpu", seed=0, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype=dtype, device=device)


def rand(*shape, device="cpu", seed=0):
    return torch.rand(*shape, generator=gen(seed)).to(device)


def check_topk_exact(out, exp):
    assert_equal(out[1], exp[1], "ids")
    assert_close(out[0], exp[0], "values", rtol=1e-4, atol=1e-6)


def check_ints(out, exp):
    for i, (a, e) in enumerate(zip(out, exp)):
        assert_equal(a.cpu(), e.cpu(), f"output {i}")


def medusa_parents(t: int) -> torch.Tensor:
    """A Medusa-like tree of t nodes: node i's parent is (i - 1) // 3 (a 3-ary tree)."""
    return torch.tensor([-1] + [(i - 1) // 3 for i in range(1, t)])


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def softmax_topk_cases(dev, small):
    shapes = [(4, 1000, 8), (2, 3000, 64)] if small else [
        (128, 262144, 8), (256, 128256, 8), (1, 128256, 8), (8, 151936, 64), (64, 262144, 1)]
    for b, v, k in shapes:
        x = randn(b, v, device=dev, seed=1, scale=4.0)
        yield Case("softmax_topk", f"B={b} V={v} k={k} bf16", (x, k), ops.softmax_topk,
                   ref.softmax_topk, check_topk_exact, nbytes(x) + b * k * 12)


def marginalize_cases(dev, small):
    shapes = [(2, 4, 1000, 8)] if small else [(16, 16, 128256, 8), (64, 4, 262144, 8), (1, 8, 128256, 8)]
    for b, l, v, m in shapes:
        x = randn(b, l, v, device=dev, seed=2, scale=3.0)
        w = rand(b, l, device=dev, seed=3)
        full = ref.marginalize(x, w)

        def check_marg(out, exp):
            assert_close(out, exp, "marginal", rtol=1e-4, atol=1e-6)

        def check_topk(out, exp, full=full):
            assert_topk_equivalent(out[0], out[1], exp[0], full, "topk_marginalize")

        shape = f"B={b} L={l} V={v} bf16"
        yield Case("marginalize", shape, (x, w), ops.marginalize, ref.marginalize, check_marg,
                   nbytes(x, w) + b * v * 4)
        yield Case("topk_marginalize", shape + f" m={m}", (x, w, m), ops.topk_marginalize,
                   ref.topk_marginalize, check_topk, nbytes(x, w) + b * m * 12)
        if (b, l, v, m) == shapes[0]:
            # Equal logits tie at every place: no row is answered from the one read, every row
            # takes the second pass (the worst case of the CUDA kernel).
            flat = torch.zeros_like(x)
            flat_full = ref.marginalize(flat, w)

            def check_flat(out, exp, full=flat_full):
                assert_topk_equivalent(out[0], out[1], exp[0], full, "topk_marginalize (flat)")

            yield Case("topk_marginalize", shape + f" m={m} flat: every row read twice",
                       (flat, w, m), ops.topk_marginalize, ref.topk_marginalize, check_flat,
                       nbytes(flat, w) + b * m * 12)


def heads_cases(dev, small):
    shapes = [(2, 4, 64, 1000)] if small else [(1, 4, 4096, 128256), (4, 4, 4096, 128256), (16, 4, 4096, 128256)]
    k = 8
    for n, h, d, v in shapes:
        hidden = randn(n, d, device=dev, seed=4)
        weight = randn(h, d, d, device=dev, seed=5, scale=d**-0.5)
        bias = randn(h, d, device=dev, seed=6, scale=0.1)
        lm_head = randn(v, d, device=dev, seed=7, scale=2 * d**-0.5)
        nw = (1 + randn(d, dtype=torch.float32, seed=8, scale=0.1)).to(dtype=BF16, device=dev)
        args = (hidden, weight, bias, lm_head, k, nw)
        z = ref.head_features(hidden, weight, bias, nw)
        full = torch.log_softmax(z @ lm_head.float().T, -1)

        def check(out, exp, full=full):
            assert_topk_equivalent(out[0], out[1], exp[0], full, "fused_mtp_heads", 1e-4, 1e-4)

        # The least traffic: the inputs once and the outputs. At N x H <= 64 rows the CUDA kernel
        # streams lm_head once and adds only its per-block partials (about N * H * blocks * (8 + 8k)
        # bytes written and read back, blocks ~ 2-4 per SM); it never writes the [N, H, V] logits.
        yield Case("fused_mtp_heads", f"N={n} H={h} D={d} V={v} k={k} bf16", args,
                   ops.fused_mtp_heads, ref.fused_mtp_heads, check,
                   nbytes(hidden, weight, bias, lm_head, nw) + n * h * k * 12,
                   extra={"lm_head_bytes": nbytes(lm_head), "rows": n * h})


def verify_cases(dev, small):
    shapes = [(2, 8, 1000)] if small else [(8, 64, 128256), (1, 16, 128256), (64, 4, 262144)]
    for b, t, v in shapes:
        logits = randn(b, t, v, device=dev, seed=9, scale=3.0)
        par = medusa_parents(t).to(dev)
        targets = ref.target_tokens(logits)
        draft = targets.gather(1, par.clamp(min=0).expand(b, t))
        draft[:, 0] = -1
        u = rand(b, t, device=dev, seed=10)
        base = nbytes(logits) + b * t * 8 * 4
        shape = f"B={b} T={t} V={v} bf16"
        yield Case("verify_tree", shape + " greedy", (draft, par, logits), ops.verify_tree,
                   ref.verify_tree, check_ints, base)
        for temp, top_k, top_p in ((0.7, 0, 1.0), (0.7, 20, 0.9), (0.7, 0, 0.9)):
            yield Case("verify_tree", shape + f" T={temp} top_k={top_k} top_p={top_p}",
                       (draft, par, logits, temp, top_k, top_p, u), ops.verify_tree,
                       ref.verify_tree, check_sampled, base + nbytes(u))


def check_sampled(out, exp):
    # Sampled tokens may differ where a uniform is within rounding of a CDF boundary (rare): only
    # the accepted counts are compared, and at most one row in 50 may differ.
    differ = int((out[0].cpu() != exp[0].cpu()).sum())
    assert differ <= max(1, out[0].numel() // 50), f"{differ} rows differ from the reference"


def from_hidden_cases(dev, small):
    shapes = [(1, 8, 64, 1000)] if small else [(1, 64, 4096, 128256), (4, 16, 4096, 128256)]
    for b, t, d, v in shapes:
        lm_head = randn(v, d, device=dev, seed=12, scale=d**-0.5)
        nw = (1 + randn(d, dtype=torch.float32, seed=13, scale=0.1)).to(dtype=BF16, device=dev)
        par = medusa_parents(t).to(dev)
        # Hidden states whose logits have a clear argmax at every node (best two more than 1e-3
        # apart), so that the exact comparison does not hinge on how a kernel rounds a near-tie
        # (tensor cores: about 2^-17 relative per term).
        for attempt in range(10):
            hidden = randn(b, t, d, device=dev, seed=11 + 100 * attempt)
            logits = ref.final_norm(hidden, nw) @ lm_head.float().T
            best = logits.topk(2, -1).values
            if float((best[..., 0] - best[..., 1]).min()) > 1e-3:
                break
        targets = ref.target_tokens(logits)
        draft = targets.gather(1, par.clamp(min=0).expand(b, t))
        yield Case("verify_tree_from_hidden", f"B={b} T={t} D={d} V={v} bf16",
                   (draft, par, hidden, lm_head, nw), ops.verify_tree_from_hidden,
                   ref.verify_tree_from_hidden, check_ints, nbytes(hidden, lm_head, nw) + b * t * 24)


def linear_cases(dev, small):
    shapes = [(4, 64, 300)] if small else [(16, 4096, 14336), (64, 4096, 14336), (1, 4096, 128256)]
    for m, k, n in shapes:
        x = randn(m, k, device=dev, seed=14)
        w = randn(n, k, device=dev, seed=15, scale=k**-0.5)

        def check(out, exp):
            assert_close(out, exp, "small_batch_linear", rtol=2**-7, atol=1e-3)

        yield Case("small_batch_linear", f"M={m} K={k} N={n} bf16", (x, w), ops.small_batch_linear,
                   ref.small_batch_linear, check, nbytes(x, w) + m * n * 2)


def tree_helper_cases(dev, small):
    b, t, prefix = (2, 16, 32) if small else (8, 64, 4096)
    par = torch.stack([medusa_parents(t)] * b).to(dev)
    yield Case("tree_attention_mask", f"B={b} T={t} prefix={prefix} f32", (par, prefix),
               ops.tree_attention_mask, ref.tree_attention_mask, check_masks,
               nbytes(par) + b * t * (prefix + t) * 4 + b * t * 8)
    heads, hd = (2, 16) if small else (8, 128)
    cache0 = randn(b, heads, prefix + t, hd, device=dev, seed=16)
    path = torch.full((b, t), -1, dtype=torch.long)
    accepted = 5 if t > 5 else t - 1
    path[:, : accepted + 1] = torch.tensor([0] + [3 * i for i in range(1, accepted + 1)])[: accepted + 1].clamp(max=t - 1)
    path = path.to(dev)
    num = torch.full((b,), accepted, dtype=torch.long, device=dev)
    moved = b * heads * accepted * hd * 2

    def fresh_args(cache0=cache0, path=path, num=num, prefix=prefix):
        return (cache0.clone(), path, num, prefix)

    def check_kv(out, exp):
        pass  # checked in run_case on the caches themselves

    yield Case("compact_kv", f"B={b} heads={heads} S={prefix + t} head_dim={hd} accepted={accepted} bf16",
               fresh_args, ops.compact_kv, ref.compact_kv, check_kv, 2 * moved, fresh=True)


def check_masks(out, exp):
    assert_close(out[0], exp[0], "mask", rtol=0, atol=0)
    assert_equal(out[1].cpu(), exp[1].cpu(), "depth")


ALL = [softmax_topk_cases, marginalize_cases, heads_cases, verify_cases, from_hidden_cases,
       linear_cases, tree_helper_cases]


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: str, reps: int, budget_s: float):
        self.device = device
        self.reps = reps
        self.budget_s = budget_s
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device == "cuda" else None

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def time(self, fn: Callable, get_args: Callable, graph: bool) -> tuple[float, str]:
        """Median seconds of fn(*get_args()) (args prepared outside the timed region)."""
        fn(*get_args())  # warm-up
        self.sync()
        if self.device != "cuda":
            times = []
            start_all = time.perf_counter()
            for _ in range(self.reps):
                args = get_args()
                t0 = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - t0)
                if time.perf_counter() - start_all > self.budget_s:
                    break
            return statistics.median(times), "wall clock"
        run = lambda args: fn(*args)  # noqa: E731
        method = "CUDA events"
        if graph:
            try:
                args = get_args()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fn(*args)
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn(*args)
                run = lambda _args: g.replay()  # noqa: E731
                method = "CUDA graph replay"
            except Exception as exc:  # noqa: BLE001  (not capturable: time it eagerly)
                method = f"CUDA events (graph capture failed: {type(exc).__name__})"
                self.sync()
        times = []
        start_all = time.perf_counter()
        for _ in range(self.reps):
            args = get_args()
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            if time.perf_counter() - start_all > self.budget_s:
                break
        return statistics.median(times), method

    def copy_bandwidth(self, size_bytes: int) -> float:
        """Bytes read + written per second by a large device-to-device (or host) copy_."""
        src = torch.empty(size_bytes, dtype=torch.uint8, device=self.device).fill_(1)
        dst = torch.empty_like(src)
        t, _ = self.time(lambda: dst.copy_(src), lambda: (), graph=False)
        return 2 * size_bytes / t


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def run_case(case: Case, timer: Timer, compile_ok: bool) -> dict:
    get_args = case.args if case.fresh else (lambda: case.args)
    row = dict(op=case.op, shape=case.shape, bytes=case.bytes, **case.extra)
    # Correctness on these inputs.
    if case.op == "compact_kv":
        a = get_args()
        case.kernel(*a)
        b = get_args()
        ref.compact_kv(*b)
        assert_equal(a[0].cpu(), b[0].cpu(), "compact_kv cache")
    else:
        case.check(case.kernel(*get_args()), case.reference(*get_args()))
    row["checked"] = True
    row["kernel_s"], row["kernel_timing"] = timer.time(case.kernel, get_args, graph=True)
    row["reference_s"], _ = timer.time(case.reference, get_args, graph=False)
    row["compiled_s"] = None
    if compile_ok:
        try:
            fn = torch.compile(case.reference, dynamic=False)
            t0 = time.perf_counter()
            fn(*get_args())
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            row["compiled_s"], _ = timer.time(fn, get_args, graph=False)
        except Exception as exc:  # noqa: BLE001  (report, do not stop)
            row["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def fmt_time(s):
    if s is None:
        return "n/a"
    return f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} us"


def cores_line(capability: list[int] | None) -> str:
    """Which cores multiply the bfloat16 heads and unembedding on this device."""
    if capability is None:
        return "No GPU: CPU kernels."
    cores = "tensor cores" if tuple(capability) >= (8, 0) else "CUDA cores"
    major, minor = capability
    return f"Compute capability {major}.{minor}: the bf16 heads and unembedding run on {cores}."


def write_md(path, meta, rows):
    lines = [
        f"# mtp_ext ops on {meta['device_name']}",
        "",
        f"Date: {meta['date']}. torch {meta['torch']}, CUDA {meta['cuda']}. Command: `{meta['command']}`.",
        f"Measured copy bandwidth (device-to-device copy_, bytes read + written): "
        f"{meta['copy_gbps']:.0f} GB/s.",
        cores_line(meta["capability"]),
        "",
        "Times are medians (kernel: " + meta["kernel_timing"] + "; reference and compiled: eager). "
        "bytes = the least traffic of the op (inputs read once, outputs written once); "
        "GB/s = bytes / kernel time; 'of copy' = GB/s / copy bandwidth.",
        "",
        "| op | shape | kernel | reference | compiled | bytes | GB/s | of copy | vs reference | vs compiled |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | FAILED: {r['error'][:120]} | | | | | | | |")
            continue
        gbps = r["bytes"] / r["kernel_s"] / 1e9
        vs_ref = r["reference_s"] / r["kernel_s"]
        vs_comp = f"{r['compiled_s'] / r['kernel_s']:.2f}x" if r.get("compiled_s") else "n/a"
        lines.append(
            f"| {r['op']} | {r['shape']} | {fmt_time(r['kernel_s'])} | {fmt_time(r['reference_s'])} | "
            f"{fmt_time(r.get('compiled_s'))} | {r['bytes'] / 1e6:.1f} MB | {gbps:.0f} | "
            f"{gbps * 1e9 / meta['copy_bps']:.0%} | {vs_ref:.2f}x | {vs_comp} |"
        )
    heads = [r for r in rows if r["op"] == "fused_mtp_heads" and "kernel_s" in r]
    if heads:
        lines += ["", "fused_mtp_heads against the time to read lm_head once at the copy bandwidth "
                  "(half of a copy's bytes per second):", ""]
        for r in heads:
            read = r["lm_head_bytes"] / (meta["copy_bps"] / 2)
            lines.append(f"- {r['shape']} (N x H = {r['rows']}): {r['kernel_s'] / read:.2f}x the read time")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny shapes (a dry run of the script)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for cuda_ops.json/.md")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) rows")
    p.add_argument("--compile-budget", type=float, default=150.0,
                   help="seconds of torch.compile in total; later compiled rows are skipped")
    p.add_argument("--compile-all", action="store_true",
                   help="a compiled row for every shape (default: the first shape of each op)")
    p.add_argument("--reps", type=int, default=30, help="timed calls per row (at most)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per timed row (at most)")
    p.add_argument("-k", dest="select", default="", help="only ops whose name contains this")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_ops.py: CUDA is not available (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    timer = Timer(args.device, args.reps, args.budget)
    copy_bps = timer.copy_bandwidth((64 << 20) if args.small else (2 << 30))
    meta = dict(
        device=args.device,
        device_name=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU",
        capability=list(torch.cuda.get_device_capability()) if args.device == "cuda" else None,
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        command="python bench/cuda_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        copy_bps=copy_bps,
        copy_gbps=copy_bps / 1e9,
        small=args.small,
        kernel_timing="CUDA graph replay, L2 flushed before each call" if args.device == "cuda" else "wall clock",
    )
    print(f"copy bandwidth: {copy_bps / 1e9:.0f} GB/s", flush=True)
    rows, failures = [], 0
    compile_spent = 0.0
    seen_ops: set[str] = set()
    for make in ALL:
        for case in make(args.device, args.small):
            if args.select and args.select not in case.op:
                continue
            # torch.compile costs seconds per shape: by default only the first shape of each op
            # (its largest) gets a compiled row, within the budget.
            first_of_op = case.op not in seen_ops
            seen_ops.add(case.op)
            compile_ok = (not args.no_compile and compile_spent < args.compile_budget
                          and (first_of_op or args.compile_all))
            t0 = time.perf_counter()
            try:
                row = run_case(case, timer, compile_ok)
            except Exception as exc:  # noqa: BLE001  (one failing case does not hide the others)
                failures += 1
                row = dict(op=case.op, shape=case.shape, bytes=case.bytes,
                           error=f"{type(exc).__name__}: {exc}")
            compile_spent += row.get("compile_s", 0.0) or 0.0
            rows.append(row)
            msg = row.get("error") or (
                f"kernel {fmt_time(row['kernel_s'])}, reference {fmt_time(row['reference_s'])}, "
                f"compiled {fmt_time(row.get('compiled_s'))}, "
                f"{row['bytes'] / row['kernel_s'] / 1e9:.0f} GB/s"
            )
            print(f"{case.op} [{case.shape}]: {msg} ({time.perf_counter() - t0:.1f} s)", flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    with open(os.path.join(args.out, "cuda_ops.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    write_md(os.path.join(args.out, "cuda_ops.md"), meta, rows)
    print(f"wrote {args.out}/cuda_ops.json and cuda_ops.md ({failures} failed)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
