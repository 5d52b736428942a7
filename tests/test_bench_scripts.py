"""The benchmark scripts that the GPU runs call (bench/device_generate.sh), run here on the CPU at
tiny sizes so that a change of the decoding code cannot break them unnoticed before a GPU is lent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_tree_step_cost_runs_and_writes_its_table(tmp_path):
    pytest.importorskip("transformers")
    res = _run(["bench/tree_step_cost.py", "--device", "cpu", "--shape", "tiny", "--reps", "1",
                "--sizes", "1,4", "--batch", "1,2", "--prefix", "16", "--out", str(tmp_path)],
               tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "tree_step_cost.json").read_text())
    rows = data["rows"]
    assert [(r["batch"], r["T"]) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert all(r["plain"] > 0 and r["tree_step"] > 0 and r["root_agrees"] == 1.0 for r in rows)
    table = (tmp_path / "tree_step_cost.md").read_text()
    assert "| batch | T | plain step ms |" in table and "Command:" in table


def test_cuda_ops_benchmark_dry_run(tmp_path):
    """bench/cuda_ops.py (the kernels' GPU benchmark) on the CPU at tiny shapes: every row is
    checked against the reference and written."""
    res = _run(["bench/cuda_ops.py", "--device", "cpu", "--small", "--no-compile", "--reps", "2",
                "--budget", "0.2", "--out", str(tmp_path)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    rows = json.loads((tmp_path / "cuda_ops.json").read_text())["rows"]
    assert len(rows) >= 9 and all(r["checked"] for r in rows)
    import mtp_ext

    assert set(mtp_ext.ops.__all__) <= {r["op"] for r in rows}  # every op is benchmarked
    assert (tmp_path / "cuda_ops.md").read_text().count("\n|") >= len(rows)


def test_marginal_one_read_dry_run(tmp_path):
    """bench/marginal_one_read.py at small shapes, without the model: the emulated CUDA
    topk_marginalize answers every row of random batches from one read, with the CPU kernel's ids."""
    res = _run(["bench/marginal_one_read.py", "--small", "--no-model", "--out", str(tmp_path)],
               tmp_path)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    shapes = json.loads((tmp_path / "marginal_one_read.json").read_text())["shapes"]
    assert shapes and all(r["every_row_one_read"] and r["ids_equal_cpu"] for r in shapes)
    assert "| every row from one read |" in (tmp_path / "marginal_one_read.md").read_text()


@pytest.mark.slow
def test_generate_speed_runs_from_the_committed_prompts(tmp_path):
    """The GPU run reads its prompts from bench/prompts/smollm2.json (the texts are not installed
    there); here on the CPU with 4 new tokens and one round."""
    from mtp_ext.data import assets

    try:
        assets.model_file("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    out = tmp_path / "speed.json"
    res = _run(["bench/generate_speed.py", "--prompts", "bench/prompts/smollm2.json",
                "--set", "continuation",
                "--new-tokens", "4", "--rounds", "1", "--tree", "4", "--json", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert len(data["prompts"]) == 7 and all(r["identical"] for _, r in data["prompts"])
    assert data["batch"]["batch"] == 4 and data["batch"]["identical"]


def _load_bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_head_kinds_learning_rates_per_kind():
    hk = _load_bench("head_kinds")
    kinds = ["conditioned", "eagle", "eagle3"]
    assert hk.parse_lrs([], kinds) == {k: 3e-3 for k in kinds}
    got = hk.parse_lrs(["1e-3", "eagle=7e-4", "eagle3=2e-3"], kinds)
    assert got == {"conditioned": 1e-3, "eagle": 7e-4, "eagle3": 2e-3}
    # a later value for every kind resets the earlier per-kind ones
    assert hk.parse_lrs(["eagle=7e-4", "5e-4"], kinds) == {k: 5e-4 for k in kinds}
    for bad, msg in [(["eagle=fast"], "not a number"), (["-1e-3"], "positive"),
                     (["linear=1e-3"], "not among the kinds")]:
        with pytest.raises(ValueError, match=msg):
            hk.parse_lrs(bad, kinds)


def test_head_kinds_eagle3_fuses_the_default_layers():
    pytest.importorskip("transformers")
    from helpers import tiny_llama

    hk = _load_bench("head_kinds")
    model = tiny_llama(64, 32, 64, 8, seed=0)
    heads = hk.make_heads(model, "eagle3", 2, 16)
    assert heads.config.kind == "eagle" and heads.config.fuse_layers == [2, 4, 5]
    assert hk.make_heads(model, "eagle", 2, 16).config.fuse_layers is None


def test_heads_e2e_compares_several_heads_and_checks_their_tokens(tmp_path):
    import shutil

    from mtp_ext.data import assets
    from mtp_ext.heads import shipped_heads_dir

    try:
        assets.model_file("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    copy = tmp_path / "copy" / "heads"
    shutil.copytree(shipped_heads_dir("smollm2-135m"), copy)
    out = tmp_path / "e2e.json"
    res = _run(["bench/heads_e2e.py", "--heads", "shipped", "--heads", str(copy), "--set", "chat",
                "--limit", "2", "--new-tokens", "6", "--tree", "4", "--json", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    names = ["shipped", str(copy.parent)]
    assert list(data["sets"]["chat"]) == names
    for name in names:
        s = data["sets"]["chat"][name]
        assert s["prompts"] == 2 and s["identical"] == 2 and s["median_speedup"] > 0
    # the same heads draft the same trees: equal tokens per step on every prompt
    for row in data["prompts"]["chat"].values():
        assert row[names[0]]["tokens_per_step"] == row[names[1]]["tokens_per_step"]
    bad = _run(["bench/heads_e2e.py", "--heads", "shipped", "--heads", "shipped"], tmp_path)
    assert bad.returncode != 0 and "same heads" in bad.stderr
