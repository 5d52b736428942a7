"""The cache folder under stress: processes that fill an empty cache at once, converted models that
were damaged or half written, temporary folders left by crashed runs, and a cache that cannot be
written (the converted-model cache of ``mtp_ext.data.assets``; the cached step costs of
``mtp_ext.step_costs`` are tested in ``test_controlled_decoding.py``, the kernel choices of
``mtp_ext.linear_choice`` in ``test_linear_choice.py``).

The GGUF conversion (``assets._dequantize``) is swapped for a small random Llama and a word-level
tokenizer, so that everything else (joining, publishing, the manifest, verification, repair) runs
as it does for the real models, in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtp_ext.data import assets

TESTS = Path(__file__).resolve().parent
NAME = "fake-chunked"


def tiny_model_and_tokenizer(gguf: Path, seed: int = 0):
    """Stands in for the GGUF conversion: ``(model, tokenizer)`` of a small random Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def register_fake_model(pkgs: Path) -> None:
    """Registers ``NAME``: a GGUF file shipped in two chunks by two packages under ``pkgs``."""
    if str(pkgs) not in sys.path:
        sys.path.insert(0, str(pkgs))
    parts = tuple((f"mtp_cache_part{i}", f"data/model.gguf.part{i:02d}") for i in range(2))
    assets.MODELS[NAME] = assets.ModelAsset(parts=parts, filename="fake.gguf",
                                            install="pip install fake")


def _write_chunk_packages(pkgs: Path) -> None:
    for i in range(2):
        pkg = pkgs / f"mtp_cache_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"model.gguf.part{i:02d}").write_bytes(bytes([i + 1]) * (1 << 16))


def _weights_sum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """``NAME`` registered, an empty cache, and a conversion that counts its calls."""
    pkgs = tmp_path / "pkgs"
    _write_chunk_packages(pkgs)
    monkeypatch.syspath_prepend(str(pkgs))
    monkeypatch.setenv("MTP_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTP_EXT_VERIFY", raising=False)
    monkeypatch.setitem(assets.MODELS, NAME, None)
    register_fake_model(pkgs)
    calls = []

    def convert(gguf):
        calls.append(gguf)
        return tiny_model_and_tokenizer(gguf, seed=len(calls))

    monkeypatch.setattr(assets, "_dequantize", convert)
    yield calls
    for i in range(2):
        sys.modules.pop(f"mtp_cache_part{i}", None)


def _folder(tmp_path) -> Path:
    (folder,) = [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]
    return folder


def _leftovers(tmp_path) -> list[str]:
    return sorted(p.name for d in ("models", "gguf") for p in (tmp_path / "cache" / d).iterdir()
                  if p.name.endswith(".tmp") or p.name.startswith("."))


# ---- two processes on an empty cache -------------------------------------------------------------

def race_child(what: str, pkgs: str, barrier: str, index: int) -> None:
    """One of two processes started at once by the tests below: waits for the other, then joins
    the chunks (``what == "join"``) or loads the model (``"load"``), and prints what it got. The
    copying of chunks and the conversion are slowed down so that the two overlap."""
    register_fake_model(Path(pkgs))
    copy = shutil.copyfileobj

    def slow_copy(*args):
        time.sleep(0.5)
        copy(*args)

    def slow_convert(gguf):
        time.sleep(1.0)
        return tiny_model_and_tokenizer(gguf, seed=index + 1)

    shutil.copyfileobj = slow_copy
    assets._dequantize = slow_convert
    Path(barrier, f"ready{index}").touch()
    deadline = time.time() + 60
    while len(list(Path(barrier).glob("ready*"))) < 2 and time.time() < deadline:
        time.sleep(0.005)
    if what == "join":
        print(assets.model_file(NAME).read_bytes() == b"\x01" * (1 << 16) + b"\x02" * (1 << 16))
    else:
        model, tokenizer = assets.load_model(NAME)
        print(_weights_sum(model), tokenizer("w1 w2").input_ids)


def _race(tmp_path, what: str) -> list[str]:
    pkgs, barrier = tmp_path / "pkgs", tmp_path / "barrier"
    _write_chunk_packages(pkgs)
    barrier.mkdir()
    if what == "load":  # chunks already joined: the two race on the conversion alone
        (tmp_path / "cache" / "gguf").mkdir(parents=True)
        joined = b"\x01" * (1 << 16) + b"\x02" * (1 << 16)
        (tmp_path / "cache" / "gguf" / "fake.gguf").write_bytes(joined)
    env = dict(os.environ, MTP_EXT_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("MTP_EXT_VERIFY", None)
    code = "import sys, test_cache_safety as t; t.race_child(*sys.argv[1:4], int(sys.argv[4]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, what, str(pkgs), str(barrier), str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out.strip().splitlines()[-1] for out, _ in outs]


def test_two_processes_join_the_chunks_at_once(tmp_path):
    assert _race(tmp_path, "join") == ["True", "True"]
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == ["fake.gguf"]


def test_two_processes_convert_at_once(tmp_path):
    first, second = _race(tmp_path, "load")
    assert first == second  # both loaded the one folder that was published
    models = tmp_path / "cache" / "models"
    (folder,) = models.iterdir()  # no temporary folder left behind
    assert (folder / "config.json").is_file() and (folder / assets.MANIFEST).is_file()


# ---- damaged converted models repair themselves --------------------------------------------------

def test_manifest_records_every_file(fake, tmp_path):
    assets.load_model(NAME)
    folder = _folder(tmp_path)
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    names = {p.name for p in folder.iterdir() if p.name != assets.MANIFEST}
    assert set(manifest["files"]) == names and "model.safetensors" in names
    for name, entry in manifest["files"].items():
        assert entry["size"] == (folder / name).stat().st_size and len(entry["sha256"]) == 64
    assert len(fake) == 1
    assets.load_model(NAME)
    assert len(fake) == 1  # converted once


@pytest.mark.parametrize(
    "damage", ["config_missing", "weights_truncated", "manifest_missing_and_truncated"]
)
def test_damage_seen_on_load_is_rebuilt(fake, tmp_path, capsys, damage):
    _, _ = assets.load_model(NAME)
    folder = _folder(tmp_path)
    weights = folder / "model.safetensors"
    if damage == "config_missing":
        (folder / "config.json").unlink()
    else:
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        if damage == "manifest_missing_and_truncated":
            (folder / assets.MANIFEST).unlink()
    capsys.readouterr()
    model, _ = assets.load_model(NAME)
    said = capsys.readouterr().out
    assert said.count("damaged") == 1 and "rebuilding" in said
    rebuilt, _ = tiny_model_and_tokenizer(None, seed=2)
    assert len(fake) == 2 and _weights_sum(model) == _weights_sum(rebuilt)
    assert _folder(tmp_path) == folder and (folder / "config.json").is_file()
    assert _leftovers(tmp_path) == []
    capsys.readouterr()
    assets.load_model(NAME)
    assert len(fake) == 2 and "damaged" not in capsys.readouterr().out


def _flip(path: Path, start: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_flipped_bytes_are_found_by_the_full_check(fake, tmp_path, capsys, monkeypatch, how):
    assets.load_model(NAME)
    weights = _folder(tmp_path) / "model.safetensors"
    size = weights.stat().st_size
    _flip(weights, size // 2, 1 << 14)  # inside the tensor data: the header still parses
    assets.load_model(NAME)  # the cheap check (sizes, headers) does not read the data
    assert len(fake) == 1
    capsys.readouterr()
    if how == "argument":
        assets.load_model(NAME, verify="full")
    else:
        monkeypatch.setenv("MTP_EXT_VERIFY", "full")
        assets.load_model(NAME)
    assert "damaged" in capsys.readouterr().out and len(fake) == 2
    assets.load_model(NAME, verify="full")
    assert len(fake) == 2


def test_a_load_failure_runs_the_full_check(fake, tmp_path, capsys):
    assets.load_model(NAME)
    config = _folder(tmp_path) / "config.json"
    config.write_bytes(b"#" + config.read_bytes()[1:])  # same size: not valid JSON any more
    capsys.readouterr()
    model, _ = assets.load_model(NAME)
    assert "damaged" in capsys.readouterr().out and len(fake) == 2
    assert model.config.hidden_size == 64


def test_a_load_failure_on_an_intact_cache_is_raised(fake, tmp_path, monkeypatch):
    assets.load_model(NAME)
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("not the cache's fault")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="not the cache's fault"):
        assets.load_model(NAME)
    assert len(fake) == 1


def test_cache_written_before_manifests_is_kept(fake, tmp_path):
    assets.load_model(NAME)
    folder = _folder(tmp_path)
    (folder / assets.MANIFEST).unlink()
    assets.load_model(NAME)
    assert len(fake) == 1 and (folder / assets.MANIFEST).is_file()


def test_leftover_temporaries_are_ignored_and_stale_ones_removed(fake, tmp_path):
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    fresh = models / ".fake-chunked-0123.abcd.tmp"
    stale = models / "fake-chunked-0123.tmp"  # as left by a run that crashed while converting
    for d in (fresh, stale):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    old = time.time() - 2 * 24 * 3600
    for p in (stale / "model.safetensors", stale):
        os.utime(p, (old, old))
    model, _ = assets.load_model(NAME)
    assert fresh.is_dir() and not stale.exists()
    assert model.config.hidden_size == 64 and len(fake) == 1


# ---- a cache that cannot be written --------------------------------------------------------------

def _chmod_blocks_writes(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        (path / "probe").write_bytes(b"")
    except PermissionError:
        return True
    (path / "probe").unlink()
    return False


def _refuse_writes_under(folder: Path, monkeypatch) -> None:
    """Every call that would create, write or rename something under ``folder`` raises
    PermissionError, as on a read-only file system."""
    import builtins

    def inside(path) -> bool:
        if not isinstance(path, (str, os.PathLike)):
            return False
        return os.path.abspath(path).startswith(str(folder))

    def guard(original, writes):
        def call(*args, **kwargs):
            if any(inside(a) for a in args[:2]) and writes(*args, **kwargs):
                raise PermissionError(13, "Permission denied", str(args[0]))
            return original(*args, **kwargs)
        return call

    def open_writes(file, mode="r", *args, **kwargs):
        return any(c in mode for c in "wax+")

    def os_open_writes(path, flags, *args, **kwargs):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    monkeypatch.setattr(builtins, "open", guard(builtins.open, open_writes))
    monkeypatch.setattr(os, "open", guard(os.open, os_open_writes))
    for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), lambda *a, **k: True))


@pytest.fixture(params=["read_only_folder", "under_a_file", "permission_error"])
def unwritable_cache(request, tmp_path, monkeypatch):
    """A cache folder into which nothing can be written: read-only (chmod, where it stops this
    user), a path under a regular file, or every new file and folder refused."""
    cache = tmp_path / "cache"
    if request.param == "read_only_folder":
        for sub in ("", "models", "gguf", "tree_profiles"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        subs = ("models", "gguf", "tree_profiles", "")
        if not all(_chmod_blocks_writes(cache / sub) for sub in subs):
            cache.chmod(0o755)
            pytest.skip("chmod does not stop this user from writing (root)")
        request.addfinalizer(lambda: [p.chmod(0o755) for p in (cache, *cache.iterdir())])
    elif request.param == "under_a_file":
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
    else:
        cache.mkdir()
        _refuse_writes_under(cache, monkeypatch)
    monkeypatch.setenv("MTP_EXT_CACHE", str(cache))
    from mtp_ext.data import cache as cache_module

    monkeypatch.setattr(cache_module, "_WARNED", set())
    return cache


def test_unwritable_model_cache_loads_with_one_warning(fake, unwritable_cache, capsys):
    for _ in range(2):
        model, tokenizer = assets.load_model(NAME)
        assert model.config.hidden_size == 64 and tokenizer("w3").input_ids == [6]
    err = capsys.readouterr().err
    assert err.count("could not be saved") == 1, err
    models = unwritable_cache / "models"
    assert not models.is_dir() or not any(models.iterdir())


