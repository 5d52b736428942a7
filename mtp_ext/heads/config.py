"""Configuration of :class:`~mtp_ext.heads.MTPHeads` (saved as ``config.json`` beside the weights)."""

from __future__ import annotations

import dataclasses
import math
from typing import Union

from .registry import KINDS

__all__ = ["MTPHeadsConfig", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "heads.safetensors"


@dataclasses.dataclass
class MTPHeadsConfig:
    """Configuration of :class:`MTPHeads` (saved as ``config.json``).

    Attributes:
        num_heads: ``H >= 1``; head ``h`` predicts the token at ``t + 1 + h``.
        hidden_size: the backbone's ``D``.
        vocab_size: the backbone's ``V`` (rows of its unembedding).
        kind: ``"resblock"``, ``"linear"``, ``"conditioned"``, ``"transformer"`` (one decoder
            block per head, initialized from the backbone's last decoder layer; needs inputs with a
            sequence axis ``[B, S, D]``) or ``"eagle"`` (one decoder block shared by every depth,
            EAGLE-1 or EAGLE-3 layout, see :mod:`mtp_ext.heads.eagle`).
        layer: index into the backbone's ``hidden_states`` tuple (default -1, the last), or
            ``"whs"`` (learned softmax-weighted sum over all of them).
        num_layers: the backbone's number of decoder layers ``L`` (``hidden_states`` has ``L + 1``
            elements); required for ``"whs"`` and for a non-negative ``layer``, recorded otherwise.
        whs_per_channel: with ``"whs"``, one softmax per channel (weights ``[L + 1, D]``).
        draft_vocab_size: ``N`` to draft over ``N`` tokens only, or None for the whole vocabulary.
        backbone: the backbone's name (``model.name_or_path``), checked on loading when recorded.
        rms_norm_eps: epsilon of the backbone's final RMSNorm (also used by the conditioned heads'
            own RMSNorms).
        fuse_layers: ``"eagle"`` heads only: the EAGLE-3 layout, the feature fused by ``fc`` from
            these hidden states (indices into ``hidden_states``, e.g. ``[2, L // 2, L - 3]``: low,
            middle and high layers; ``layer`` is then unused); None: the EAGLE-1 layout (the last
            hidden state, ``layer=-1``).
        fc_bias: ``"eagle"`` heads only: ``fc`` has a bias.
    """

    num_heads: int
    hidden_size: int
    vocab_size: int
    kind: str = "resblock"
    layer: Union[int, str] = -1
    num_layers: int | None = None
    whs_per_channel: bool = False
    draft_vocab_size: int | None = None
    backbone: str = ""
    rms_norm_eps: float = 1e-6
    fuse_layers: list[int] | None = None
    fc_bias: bool = False

    def __post_init__(self):
        self._check_types()
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if int(self.num_heads) < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if int(self.hidden_size) < 1 or int(self.vocab_size) < 1:
            raise ValueError(
                f"hidden_size and vocab_size must be >= 1, got {self.hidden_size}, "
                f"{self.vocab_size}"
            )
        if isinstance(self.layer, str):
            if self.layer != "whs":
                raise ValueError(f"layer must be an int or 'whs', got {self.layer!r}")
            if self.num_layers is None:
                raise ValueError("layer='whs' needs num_layers (the backbone's layer count)")
        elif isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"layer must be an int or 'whs', got {self.layer!r}")
        elif self.num_layers is not None:
            n = self.num_layers + 1
            if not -n <= self.layer < n:
                raise ValueError(
                    f"layer must be in [-{n}, {n}) for a backbone with {self.num_layers} layers "
                    f"({n} hidden states), got {self.layer}"
                )
        elif self.layer >= 0:
            raise ValueError(f"layer={self.layer} (non-negative) needs num_layers")
        if self.whs_per_channel and self.layer != "whs":
            raise ValueError("whs_per_channel needs layer='whs'")
        self._check_eagle_options()
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [1, vocab_size={self.vocab_size}], "
                f"got {self.draft_vocab_size}"
            )

    def _check_eagle_options(self) -> None:
        if self.kind != "eagle":
            if self.fuse_layers is not None or self.fc_bias:
                raise ValueError(f"fuse_layers and fc_bias need kind='eagle', got kind={self.kind!r}")
            return
        if self.fuse_layers is None:
            if self.layer != -1 and not (self.num_layers is not None and self.layer == self.num_layers):
                raise ValueError("eagle heads read the last hidden state (layer=-1) or fused layers "
                                 f"(fuse_layers), got layer={self.layer!r}")
            return
        layers = self.fuse_layers
        if (not isinstance(layers, (list, tuple)) or len(layers) < 2
                or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)):
            raise ValueError(f"fuse_layers must be a list of at least 2 ints, got {layers!r}")
        if self.num_layers is None:
            raise ValueError("fuse_layers needs num_layers (the backbone's layer count)")
        n = self.num_layers + 1
        norm = [i % n if -n <= i < n else None for i in layers]
        if None in norm or len(set(norm)) != len(norm):
            raise ValueError(f"fuse_layers must be distinct indices in [-{n}, {n}), got {layers!r}")
        self.fuse_layers = [int(i) for i in norm]

    def _check_types(self) -> None:
        """Raises ValueError naming a field whose value has the wrong type (a config file edited
        by hand, or written by another tool), before anything uses it."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("num_heads", "hidden_size", "vocab_size"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in ("num_layers", "draft_vocab_size"):
            value = getattr(self, name)
            if value is not None and not is_int(value):
                raise ValueError(f"{name} must be an int or None, got {value!r}")
        if not isinstance(self.kind, str):
            raise ValueError(f"kind must be a string, got {self.kind!r}")
        if not isinstance(self.fc_bias, bool):
            raise ValueError(f"fc_bias must be a bool, got {self.fc_bias!r}")
        if not isinstance(self.whs_per_channel, bool):
            raise ValueError(f"whs_per_channel must be a bool, got {self.whs_per_channel!r}")
        if not isinstance(self.backbone, str):
            raise ValueError(f"backbone must be a string, got {self.backbone!r}")
        eps = self.rms_norm_eps
        if (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                or eps <= 0):
            raise ValueError(f"rms_norm_eps must be a positive finite number, got {eps!r}")

    @property
    def reads_last(self) -> bool:
        """True when the heads read the last element of ``hidden_states`` alone (already normed)."""
        if self.layer == "whs" or self.fuse_layers is not None:
            return False
        if self.layer < 0:
            return self.layer == -1
        return self.layer == self.num_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MTPHeadsConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
