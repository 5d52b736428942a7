"""mtp_ext.data.assets: locating model files in installed packages, joining chunks, clear errors."""

from __future__ import annotations

import sys

import pytest

from mtp_ext.data import assets


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    """Two importable packages holding the two halves of a file, registered as a model."""
    for i, payload in enumerate((b"first half|", b"second half")):
        pkg = tmp_path / "pkgs" / f"mtp_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"model.bin.part{i:02d}").write_bytes(payload)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setenv("MTP_EXT_CACHE", str(tmp_path / "cache"))
    parts = tuple((f"mtp_fake_part{i}", f"data/model.bin.part{i:02d}") for i in range(2))
    monkeypatch.setitem(
        assets.MODELS, "fake", assets.ModelAsset(parts=parts, filename="model.bin", install="pip install fake")
    )
    yield tmp_path
    for i in range(2):
        sys.modules.pop(f"mtp_fake_part{i}", None)


def test_chunks_are_joined_once_into_the_cache(fake_chunks):
    path = assets.model_file("fake")
    assert path == fake_chunks / "cache" / "gguf" / "model.bin"
    assert path.read_bytes() == b"first half|second half"
    stamp = path.stat().st_mtime_ns
    assert assets.model_file("fake") == path and path.stat().st_mtime_ns == stamp


def test_missing_package_names_the_install_command(fake_chunks, monkeypatch):
    parts = (("mtp_fake_part0", "data/model.bin.part00"), ("mtp_no_such_package", "x"))
    monkeypatch.setitem(
        assets.MODELS, "fake", assets.ModelAsset(parts=parts, filename="model.bin", install="pip install fake")
    )
    with pytest.raises(FileNotFoundError, match="mtp_no_such_package.*pip install fake"):
        assets.model_file("fake")


def test_file_placed_in_the_cache_serves_without_the_package(fake_chunks, monkeypatch):
    parts = (("mtp_no_such_package", "data/model.bin"),)
    monkeypatch.setitem(
        assets.MODELS, "fake", assets.ModelAsset(parts=parts, filename="model.bin", install="pip install fake")
    )
    with pytest.raises(FileNotFoundError, match="pip install fake"):
        assets.model_file("fake")
    placed = fake_chunks / "cache" / "gguf" / "model.bin"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"copied by hand")
    assert assets.model_file("fake") == placed


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        assets.model_file("nope")
    with pytest.raises(FileNotFoundError, match="neither a known model"):
        assets.load_model("/nonexistent/folder")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_model_loads_and_answers(name):
    try:
        assets.model_file(name)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    import torch

    model, tokenizer = assets.load_model(name)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "France" in tokenizer.decode(out[0, ids.shape[1]:]) or "Paris" in tokenizer.decode(
        out[0, ids.shape[1]:]
    )


def test_verify_must_be_quick_or_full():
    with pytest.raises(ValueError, match="verify must be 'quick' or 'full'"):
        assets.load_model("smollm2-135m", verify="sometimes")


def test_publish_keeps_the_entry_that_appeared_first(tmp_path):
    from mtp_ext.data import cache

    dest = tmp_path / "entry"
    first, second = cache.temp_dir(dest), cache.temp_dir(dest)
    assert first != second and first.name.startswith(".entry.") and first.name.endswith(".tmp")
    (first / "a").write_text("first")
    (second / "a").write_text("second")
    assert cache.publish(first, dest) and not first.exists()
    assert not cache.publish(second, dest) and not second.exists()
    assert (dest / "a").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
