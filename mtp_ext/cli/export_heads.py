"""``mtp-ext export-heads``: write ``"eagle"`` heads as a drafter checkpoint that vLLM or SGLang
loads (:func:`mtp_ext.heads.export.export_heads`), and print how to serve it."""

from __future__ import annotations

import argparse
import json
import os
import shlex

__all__ = ["add_parser", "run", "serve_commands"]

# What the known models are on the Hugging Face Hub (the project loads GGUF files of them, whose
# dequantized weights are what the heads were trained on).
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def add_parser(sub) -> None:
    """Adds the ``export-heads`` command to the subcommands ``sub``."""
    from ..heads.export import FORMATS

    p = sub.add_parser(
        "export-heads",
        help="write eagle heads as a vLLM / SGLang drafter checkpoint (mtp_ext.heads.export)",
    )
    p.add_argument("--model", default="smollm2-135m", help="known model name or model folder")
    p.add_argument("--heads", required=True,
                   help="a heads folder (save_pretrained) or shipped heads: a model name, or "
                        "NAME:VARIANT (e.g. smollm2-135m:eagle3)")
    p.add_argument("--format", required=True, choices=list(FORMATS),
                   help="vllm-eagle / sglang-eagle: EAGLE-1 heads; eagle3: EAGLE-3 heads "
                        "(both engines)")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=run)


def _target(model_arg: str) -> str:
    if os.path.isdir(model_arg):
        return model_arg
    return HUB_IDS.get(model_arg, "<TARGET>")


def serve_commands(format: str, out: str, target: str, num_heads: int,
                   token_map: str | None = None) -> list[str]:
    """The commands that serve ``target`` with the drafter in ``out``: vLLM's (``--speculative-
    config``, ``method`` ``eagle`` / ``eagle3``), then SGLang's (``--speculative-algorithm``
    ``EAGLE`` / ``EAGLE3``; ``--speculative-token-map`` for SGLang's EAGLE with a draft
    vocabulary). ``vllm-eagle`` gives no SGLang command and ``sglang-eagle`` no vLLM command."""
    cmds = []
    if format in ("vllm-eagle", "eagle3"):
        spec = {"method": "eagle3" if format == "eagle3" else "eagle", "model": out,
                "num_speculative_tokens": num_heads}
        cmds.append(f"vllm serve {shlex.quote(target)} --speculative-config "
                    f"{shlex.quote(json.dumps(spec))}")
    if format in ("sglang-eagle", "eagle3"):
        algo = "EAGLE3" if format == "eagle3" else "EAGLE"
        cmd = (f"python -m sglang.launch_server --model-path {shlex.quote(target)} "
               f"--speculative-algorithm {algo} --speculative-draft-model-path {shlex.quote(out)} "
               f"--speculative-num-steps {num_heads} --speculative-eagle-topk 1 "
               f"--speculative-num-draft-tokens {num_heads + 1}")
        if token_map:
            cmd += f" --speculative-token-map {shlex.quote(token_map)}"
        cmds.append(cmd)
    return cmds


def _shipped_ref(arg: str) -> tuple[str, str | None]:
    """``(model name, variant or None)`` of a ``--heads`` value naming shipped heads
    (``NAME`` or ``NAME:VARIANT``)."""
    name, _, variant = arg.partition(":")
    return name, (variant or None)


def _load_heads(arg: str, model):
    """The heads ``arg`` names (checked by :func:`_check_kind`) on ``model``."""
    from ..heads import MTPHeads, load_heads

    if os.path.isdir(arg):
        return MTPHeads.from_pretrained(arg, model)
    name, variant = _shipped_ref(arg)
    return load_heads(name, model, variant=variant)


def _check_kind(args: argparse.Namespace) -> None:
    """Before the model loads: the heads exist and are ``"eagle"`` heads of the format's layout
    (ValueError, FileNotFoundError); :func:`~mtp_ext.heads.export.export_heads` checks the rest."""
    from ..heads import (CONFIG_NAME, SHIPPED_HEADS, SHIPPED_VARIANTS, MTPHeadsConfig,
                         shipped_heads_dir)
    from ..heads.export import FORMATS
    from .checks import check_heads_folder

    name, variant = _shipped_ref(args.heads)
    if os.path.isdir(args.heads):
        check_heads_folder(args.heads, "--heads")
        folder = args.heads
    elif name in SHIPPED_HEADS:
        folder = shipped_heads_dir(name, variant)
    else:
        raise FileNotFoundError(f"--heads {args.heads!r} is neither a heads folder nor shipped "
                                f"heads {sorted(SHIPPED_HEADS)}")
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        config = MTPHeadsConfig.from_dict(json.load(f))
    if config.kind != "eagle":
        hint = ""
        if name in SHIPPED_VARIANTS:
            eagles = [f"{name}:{v}" for v in sorted(SHIPPED_VARIANTS[name]) if "eagle" in v]
            hint = f" (shipped eagle heads: {', '.join(eagles)})" if eagles else ""
        raise ValueError(f"--heads {args.heads!r}: only eagle heads export to the engines' "
                         f"drafter formats; these heads are kind={config.kind!r}{hint}")
    layout = "eagle3" if config.fuse_layers is not None else "eagle1"
    if layout != FORMATS[args.format].layout:
        other = "eagle3" if layout == "eagle3" else "vllm-eagle or sglang-eagle"
        raise ValueError(f"--heads {args.heads!r} are {layout.upper()} heads; --format "
                         f"{args.format} takes the other layout: use --format {other}")


def run(args: argparse.Namespace) -> int:
    """Runs ``mtp-ext export-heads``; returns the exit status."""
    from ..data.assets import load_model
    from ..heads.export import TOKEN_MAP_FILE, export_heads
    from .checks import check_model

    check_model(args.model)
    _check_kind(args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"output {args.out!r} exists and is not a folder")
    model, _ = load_model(args.model)
    heads = _load_heads(args.heads, model)
    result = export_heads(heads, model, args.out, args.format)
    out = os.path.abspath(args.out)
    print(f"mtp-ext: wrote {args.format} drafter ({heads.config.num_heads} draft steps) to "
          f"{args.out}:")
    for name in result["files"]:
        print(f"  {name}")
    for name, shape in result["tensors"].items():
        print(f"    {name} {list(shape)}")
    target = _target(args.model)
    token_map = (os.path.join(out, TOKEN_MAP_FILE) if TOKEN_MAP_FILE in result["files"]
                 else None)
    print("serve it with:")
    for cmd in serve_commands(args.format, out, target, heads.config.num_heads, token_map):
        print(f"  {cmd}")
    if target == "<TARGET>" or args.model in HUB_IDS:
        print(f"  (the target must hold the weights the heads were trained on, here the "
              f"project's {args.model!r}; the drafter shares its embedding"
              f"{'' if args.format == 'eagle3' else ' and output layer'})")
    return 0
