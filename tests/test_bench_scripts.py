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
