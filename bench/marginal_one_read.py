"""How often the CUDA topk_marginalize answers a batch row from one read of its logits.

The CUDA kernel keeps a few candidates per path and a bound on every other token in its first
read, and answers the rows whose top m the bound proves; the rest take a second pass
(csrc/kernels/topk_kernels.cu). How many rows that is depends on the data, not on the device, so
this runs the CUDA code under the CPU emulator (tests/cuda_emulator.py) and counts:

* the benchmark's shapes and inputs (bench/cuda_ops.py: bfloat16 logits, N(0, 9), uniform
  weights), each batch whole: whether the second pass had any row left;
* the mixtures of the evaluation harness on SmolLM2-135M (``mtp_ext.evaluation.marginal``: t+2
  with k = 2, 4, 8 intermediate tokens and t+3 with k = 2, 4 per level, m = 5) on samples of the
  project's texts, each row alone: whether the second pass ran for it. Twice: as a row alone is
  cut on a 132-multiprocessor GPU (small chunks, to fill the card), and as rows of a large batch
  are (chunks of 8192 tokens, emulating a device of one multiprocessor): the bounds are per warp's
  share of a chunk, so smaller chunks bound tighter.

Every answer is also compared with the CPU kernel's ids. Writes marginal_one_read.md and .json.

    python bench/marginal_one_read.py --out bench/results
    python bench/marginal_one_read.py --small --no-model --out /tmp/x     # a quick dry run
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from cuda_emulator import load, topk_marginalize_second_pass_barriers
from cuda_ops import rand, randn

import mtp_ext  # noqa: F401  (the CPU kernels, for the comparison)

BENCH_SHAPES = [(16, 16, 128256, 8), (64, 4, 262144, 8), (1, 8, 128256, 8)]
SMALL_SHAPES = [(3, 4, 9000, 8), (2, 16, 5000, 5)]


class Emulated:
    """topk_marginalize on the emulator, and whether its second pass had any row to do."""

    def __init__(self) -> None:
        self.ops = load()

    def topk_marginalize(self, x, w, m) -> tuple[torch.Tensor, bool]:
        """Returns the ids ``[B, m]`` and whether no row needed the second pass."""
        (_, ids), second = topk_marginalize_second_pass_barriers(self.ops, x, w, m)
        return ids, second == 0


def bench_shapes(emu: Emulated, shapes) -> list[dict]:
    rows = []
    for b, l, v, m in shapes:
        x, w = randn(b, l, v, seed=2, scale=3.0), rand(b, l, seed=3)
        t = time.time()
        ids, all_one = emu.topk_marginalize(x, w, m)
        same = torch.equal(ids, torch.ops.mtp_ext.topk_marginalize(x, w, m, True)[1])
        rows.append(
            {
                "B": b,
                "L": l,
                "V": v,
                "m": m,
                "every_row_one_read": all_one,
                "ids_equal_cpu": same,
                "seconds": round(time.time() - t, 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


def model_mixtures(texts: list[str], samples: int, seq_len: int) -> list[tuple]:
    """(next_logits [L, V], weights [L], m) of every row the evaluation harness ranks."""
    from mtp_ext.data import assets
    from mtp_ext.evaluation import marginal
    from mtp_ext.evaluation.samples import build_samples
    from mtp_ext.evaluation.tally import Tally

    captured = []
    kernel = marginal.ops.topk_marginalize

    def capture(x, w, m, renormalize=True):
        captured.extend((x[r].clone(), w[r].clone(), m) for r in range(x.shape[0]))
        return kernel(x, w, m, renormalize)

    model, tokenizer = assets.load_model("smollm2-135m")
    marginal.ops.topk_marginalize = capture
    try:
        for name in texts:
            for sample in build_samples(tokenizer, name, count=samples, seq_len=seq_len):
                with torch.no_grad():
                    logits = model(sample.ids[None]).logits[0].float()
                marginal.score_marginal(Tally(), model, sample, logits, ks=(2, 4, 8), ks3=(2, 4))
    finally:
        marginal.ops.topk_marginalize = kernel
    return captured


SETTINGS = {"alone": "132", "large_batch": "1"}  # CUDA_EMU_SMS of each way of cutting rows


def model_rows(emu: Emulated, mixtures) -> list[dict]:
    from tqdm.auto import tqdm

    count = collections.Counter()
    saved = os.environ.get("CUDA_EMU_SMS")
    try:
        for setting, sms in SETTINGS.items():
            os.environ["CUDA_EMU_SMS"] = sms
            for x, w, m in tqdm(mixtures, desc=f"rows ({setting})", unit="row"):
                ids, one = emu.topk_marginalize(x[None], w[None], m)
                cpu = torch.ops.mtp_ext.topk_marginalize(x[None], w[None], m, True)[1]
                key = (x.shape[0], x.shape[1], m)
                count[key + ("rows",)] += setting == "alone"
                count[key + (setting,)] += one
                count[key + ("same",)] += torch.equal(ids, cpu)
    finally:
        if saved is None:
            os.environ.pop("CUDA_EMU_SMS", None)
        else:
            os.environ["CUDA_EMU_SMS"] = saved
    keys = sorted({k[:3] for k in count})
    return [
        {
            "L": L,
            "V": V,
            "m": m,
            "rows": count[(L, V, m, "rows")],
            "one_read": {s: count[(L, V, m, s)] for s in SETTINGS},
            "ids_equal_cpu": count[(L, V, m, "same")],
        }
        for L, V, m in keys
    ]


def markdown(args, shapes, model, command) -> str:
    out = [
        "# topk_marginalize on CUDA: rows answered from one read of the logits",
        "",
        (
            f"Command: `{command}` ({time.strftime('%Y-%m-%d')}; the CUDA code under the CPU "
            "emulator: the count depends on the data, not on the device; "
            f"{os.environ.get('CUDA_EMU_SMS', '132')} multiprocessors, which sets the chunk size)."
        ),
        "",
        "Benchmark shapes (bench/cuda_ops.py inputs), each batch whole:",
        "",
        "| B | L | V | m | every row from one read | ids equal to the CPU kernel |",
        "|---|---|---|---|---|---|",
    ]
    out += [
        f"| {r['B']} | {r['L']} | {r['V']} | {r['m']} | {'yes' if r['every_row_one_read'] else 'no'}"
        f" | {'yes' if r['ids_equal_cpu'] else 'no'} |"
        for r in shapes
    ]
    if model:
        total = {
            "L": "all",
            "V": "",
            "m": "",
            "rows": sum(r["rows"] for r in model),
            "one_read": {s: sum(r["one_read"][s] for r in model) for s in SETTINGS},
            "ids_equal_cpu": sum(r["ids_equal_cpu"] for r in model),
        }
        out += [
            "",
            (
                f"SmolLM2-135M mixtures of the evaluation harness ({args.samples} sample(s) of "
                f"{args.seq_len} tokens from each of {', '.join(args.texts)}), each row run alone, "
                "cut into chunks as a row alone on a 132-multiprocessor GPU and as the rows of a "
                "large batch (8192 tokens); ids compared in both runs:"
            ),
            "",
            (
                "| L (paths) | V | m | rows | from one read, alone | from one read, large batch "
                "| ids equal to the CPU kernel (of 2 x rows) |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for r in model + [total]:
            share = {
                s: f"{r['one_read'][s]} ({r['one_read'][s] / r['rows']:.1%})" for s in SETTINGS
            }
            out.append(
                f"| {r['L']} | {r['V']} | {r['m']} | {r['rows']} | {share['alone']} | "
                f"{share['large_batch']} | {r['ids_equal_cpu']} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--small", action="store_true", help="small shapes instead of the benchmark's")
    p.add_argument("--no-model", action="store_true", help="skip the SmolLM2 mixtures")
    p.add_argument("--texts", default="web,python,austen")
    p.add_argument("--samples", type=int, default=1, help="samples per text")
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args()
    args.texts = args.texts.split(",")
    emu = Emulated()
    shapes = bench_shapes(emu, SMALL_SHAPES if args.small else BENCH_SHAPES)
    model = (
        []
        if args.no_model
        else model_rows(emu, model_mixtures(args.texts, args.samples, args.seq_len))
    )
    command = "python bench/marginal_one_read.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "marginal_one_read.json").write_text(
        json.dumps({"command": command, "shapes": shapes, "model": model}, indent=1)
    )
    (out / "marginal_one_read.md").write_text(markdown(args, shapes, model, command))
    print((out / "marginal_one_read.md").read_text())
    bad = [r for r in shapes if not r["ids_equal_cpu"]] + [
        r for r in model if r["ids_equal_cpu"] != len(SETTINGS) * r["rows"]
    ]
    if bad:
        raise SystemExit(f"ids differ from the CPU kernel: {bad}")


if __name__ == "__main__":
    main()
