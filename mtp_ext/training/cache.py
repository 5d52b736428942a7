"""Hidden-state caches of a frozen backbone: what the heads read (the selected hidden state, or
all of them for WHS, the last one for KL targets), the token ids and the backbone's greedy next
tokens, computed once per batch of sequences under ``torch.inference_mode`` and kept in memory
and, with ``cache_dir``, on disk (a ``.pt`` file named by a fingerprint of its inputs, reused by
later runs)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path

import torch

from ..data.cache import write_file
from ..heads import MTPHeads
from .config import TrainConfig
from .distributed import barrier, dist_info
from .progress import token_progress


def _layer_index(heads: MTPHeads, n_states: int) -> int | None:
    layer = heads.config.layer
    return None if layer == "whs" else layer % n_states


def _fingerprint(model, heads: MTPHeads, ids: torch.Tensor, target: str, dtype: str) -> str:
    """16 hex digits identifying a cache: the ids, the heads' layer, the target, the dtype, the
    output embedding's shape and sum, and the backbone's name."""
    h = hashlib.sha256()
    h.update(ids.numpy().tobytes())
    lm = heads.lm_head_weight
    layer = heads.config.layer if heads.config.fuse_layers is None else heads.config.fuse_layers
    h.update(repr((layer, target == "kl", dtype, tuple(lm.shape))).encode())
    h.update(repr(float(lm.double().sum())).encode())
    h.update(str(getattr(model, "name_or_path", "")).encode())
    return h.hexdigest()[:16]


@torch.inference_mode()
def build_cache(
    model, heads: MTPHeads, ids: torch.Tensor, config: TrainConfig, cache_name: str = "train"
) -> dict:
    """Runs the backbone over ``ids`` once and returns (and with ``config.cache_dir`` saves) the
    cached tensors: ``ids [N, T]``, ``greedy [N, T]`` (the backbone's argmax at each position),
    ``feat`` (``[N, T, D]`` the selected hidden state, ``[L + 1, N, T, D]`` for WHS, ``[N, T, kD]``
    the ``k`` fused layers side by side for EAGLE-3 heads) and, for KL
    targets, ``last [N, T, D]`` (the last hidden state, when it is not ``feat`` itself)."""
    path = None
    if config.cache_dir:
        key = _fingerprint(model, heads, ids, config.target, config.cache_dtype)
        path = os.path.join(config.cache_dir, f"hidden-{cache_name}-{key}.pt")
        if os.path.isfile(path):
            return torch.load(path, map_location="cpu", weights_only=True)
    dtype = getattr(torch, config.cache_dtype)
    device = heads.lm_head_weight.device
    N, T = ids.shape
    whs = heads.config.layer == "whs"
    if whs:
        L1 = (heads.config.num_layers or 0) + 1
        gib = L1 * N * T * heads.config.hidden_size * dtype.itemsize / 2**30
        warnings.warn(
            f"caching all {L1} hidden states for WHS: {gib:.2f} GiB for {N * T} tokens",
            stacklevel=2,
        )
    feats, lasts, greedy = [], [], []
    checked = False
    bar = token_progress(N * T, f"caching hidden states ({cache_name})",
                         config.progress and dist_info()[0] == 0)
    for i in range(0, N, config.forward_batch):
        x = ids[i : i + config.forward_batch].to(device)
        out = model(x, output_hidden_states=True)
        bar(x.numel())
        hs = out.hidden_states
        greedy.append(out.logits.argmax(-1).cpu())
        li = _layer_index(heads, len(hs))
        if whs:
            feats.append(torch.stack([h.to(dtype).cpu() for h in hs], 0))
        elif heads.config.fuse_layers is not None:  # EAGLE-3: the fused layers, side by side
            feats.append(heads.fused_states(hs, dtype).cpu())
        else:
            feats.append(hs[li].to(dtype).cpu())
        if config.target == "kl":
            if not checked:
                rec = model.get_output_embeddings()(hs[-1][:1, :4])
                if not torch.allclose(rec.float(), out.logits[:1, :4].float(), atol=1e-3, rtol=1e-3):
                    raise ValueError(
                        "target='kl' recomputes the backbone's logits from its last hidden state "
                        "through the output embedding, which does not reproduce this model's logits"
                    )
                checked = True
            if whs or heads.config.fuse_layers is not None or li != len(hs) - 1:
                lasts.append(hs[-1].to(dtype).cpu())
    cache = {
        "ids": ids.cpu(),
        "greedy": torch.cat(greedy, 0),
        "feat": torch.cat(feats, 1 if whs else 0),
    }
    if lasts:
        cache["last"] = torch.cat(lasts, 0)
    if path is not None:
        write_file(Path(path), lambda tmp: torch.save(cache, tmp))
    return cache


def memory_cache(
    model, heads: MTPHeads, ids: torch.Tensor, config: TrainConfig, cache_name: str
) -> dict:
    """:func:`build_cache` in memory only (``cache_dir`` ignored): for states that change (a
    backbone trained jointly) or that are needed once."""
    return build_cache(model, heads, ids, dataclasses.replace(config, cache_dir=None), cache_name)


def shared_cache(model, heads: MTPHeads, ids: torch.Tensor, config: TrainConfig, name: str,
                 rank: int, world: int) -> dict:
    """:func:`build_cache`; distributed with ``cache_dir``, rank 0 builds and saves it first and
    the other ranks load the file after a barrier."""
    if world == 1 or not config.cache_dir:
        return build_cache(model, heads, ids, config, name)
    cache = build_cache(model, heads, ids, config, name) if rank == 0 else None
    barrier(world)
    return cache if cache is not None else build_cache(model, heads, ids, config, name)


def uncached_features(model, heads: MTPHeads, ids: torch.Tensor, s: torch.Tensor,
                      config: TrainConfig) -> tuple[dict, torch.Tensor]:
    """Recomputes the sequences ``ids[s]`` (``ids [N, T]``, ``s [P]`` int64) holding a step's
    positions (``cache_hidden=False``); returns their in-memory cache and ``s`` remapped to its
    rows (``[P]`` int64)."""
    uniq, inv = torch.unique(s, return_inverse=True)
    return memory_cache(model, heads, ids[uniq], config, "step"), inv


def select_layer(cache: dict, layer: int) -> dict:
    """A single-layer view of an all-layer cache (one built for ``layer="whs"`` heads, ``feat``
    ``[L + 1, N, T, D]``): the cache that heads reading hidden state ``layer`` would have built."""
    feat = cache["feat"]
    if feat.dim() != 4:
        raise ValueError(f"select_layer needs an all-layer cache (feat [L + 1, N, T, D]), got "
                         f"feat of shape {list(feat.shape)}")
    out = {"ids": cache["ids"], "greedy": cache["greedy"], "feat": feat[layer]}
    if "last" in cache:
        out["last"] = cache["last"]
    return out
