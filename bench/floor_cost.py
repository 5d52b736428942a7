"""The cost of the floor: ``mtp_ext.generate`` when its controller finds that no tree pays, against
``model.generate``, per token, with the same linear kernels.

The controller is given a cost model in which drafting never pays, so every step is plain apart
from the re-checks of the heads: the first step of the first call (later calls start from what it
learned, ``mtp_ext.controller.Prior``), then re-checks spaced so that they cost at most 1.5% by
the cost model (with this cost model, none). ``--fresh`` forgets the prior before every call, so
each call's first step drafts (the floor of a first call). With
``MTP_EXT_LINEAR_KERNEL=torch`` (the default here) both decoders run torch's kernels, so the ratio
measures what the loop adds: the plain step, the controller's bookkeeping and the re-checks.

    MTP_EXT_LINEAR_KERNEL=torch python bench/floor_cost.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("MTP_EXT_LINEAR_KERNEL", "torch")

import torch  # noqa: E402

import mtp_ext  # noqa: E402
from mtp_ext import controlled_steps  # noqa: E402
from mtp_ext.cli.compare import encode_prompt  # noqa: E402
from mtp_ext.cli.demo import PROMPTS  # noqa: E402
from mtp_ext.data.assets import load_model  # noqa: E402
from mtp_ext.machine import describe_cpu  # noqa: E402


class NeverPays:
    """Step costs under which no tree or lookup branch pays."""

    plain_ms, draft_ms = 1.0, 1e6

    def step_ms(self, tree: int, lookup: int) -> float:
        return 1.0 if tree <= 1 and lookup <= 0 else 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true",
                   help="forget what earlier calls learned before each call (first-call floor)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    controlled_steps.step_costs = lambda *a, **k: NeverPays()
    model, tok = load_model("smollm2-135m", getattr(torch, args.dtype))
    heads = mtp_ext.load_heads("smollm2-135m", model)
    print(f"SmolLM2-135M {args.dtype}, {describe_cpu()}, MTP_EXT_LINEAR_KERNEL="
          f"{os.environ['MTP_EXT_LINEAR_KERNEL']}, greedy, {args.new_tokens} new tokens (at most), "
          f"{args.rounds} interleaved rounds, medians of per-round ratios of time per token"
          + (", every call from a fresh controller" if args.fresh else ", calls after the first "
             "start from what it learned"))
    print("| prompt | new tokens | plain steps | re-checks | mtp_ext / model.generate, time per token | identical |")
    print("|---|---|---|---|---|---|")
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        for kind, text, chat in PROMPTS:
            ids = encode_prompt(tok, text, chat=chat)
            model.generate(ids, **kw)
            mtp_ext.generate(model, ids, heads, **kw)
            ratios, same = [], True
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                ref = model.generate(ids, **kw)
                if args.fresh:
                    controlled_steps.forget_priors()
                t1 = time.perf_counter()
                out = mtp_ext.generate(model, ids, heads, return_dict_in_generate=True, **kw)
                t2 = time.perf_counter()
                n_ref, n_out = ref.shape[1] - ids.shape[1], int(out.new_tokens.sum())
                ratios.append(((t2 - t1) / n_out) / ((t1 - t0) / n_ref))
                same &= torch.equal(out.sequences, ref)
            plain = sum(p == (1, 0) for p in out.plans)
            print(f"| {kind} | {n_out} | {plain} | {len(out.plans) - plain} | "
                  f"{statistics.median(ratios):.3f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
