"""Tiled inference with overlap and blending for any image-to-image network (pure torch).

Used by :class:`grl_plugin.models.GRLModel` for validation/testing and by the inference CLI.
Tile origins follow the official ``forward_tile`` (``range(0, H - tile, stride) + [H - tile]``);
tiles are rounded up to a multiple of the network's padding size so that no tile is padded
inside the image. ``blend="linear"`` (default) ramps tile weights across the overlaps so that
seams disappear; ``blend="uniform"`` averages overlapping predictions with equal weights, as
the official code does. When one tile covers the image the network runs once on the whole
image, so the result is exactly the untiled one.

:func:`self_ensemble` is the x8 self-ensemble (``grl-infer --ensemble``, ``val.self_ensemble``
of :class:`grl_plugin.models.GRLModel`): the 8 flips/rotations of the input, each restored and
turned back (:func:`transform` / :func:`untransform`), averaged.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

BLENDS = ("linear", "uniform")
#: The x8 self-ensemble: transform ``k`` (0..7) flips left-right when ``k & 4``, then turns the
#: image ``k & 3`` quarter turns; :func:`untransform` undoes it on the output.
ENSEMBLE = tuple(range(8))


def transform(x: torch.Tensor, k: int) -> torch.Tensor:
    """Dihedral transform ``k`` of an (..., H, W) tensor: optional left-right flip, then rotation."""
    if k & 4:
        x = torch.flip(x, dims=(-1, ))
    return torch.rot90(x, k & 3, dims=(-2, -1)) if k & 3 else x


def untransform(y: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`transform`: rotation undone first, then the flip."""
    if k & 3:
        y = torch.rot90(y, -(k & 3), dims=(-2, -1))
    return torch.flip(y, dims=(-1, )) if k & 4 else y


def self_ensemble(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean (float32) of ``untransform(fn(transform(x, k)), k)`` over the 8 transforms ``k``."""
    total = None
    for k in ENSEMBLE:
        y = untransform(fn(transform(x, k).contiguous()), k).float()
        total = y if total is None else total + y
    return total / len(ENSEMBLE)


def tile_origins(length: int, tile: int, stride: int) -> List[int]:
    """Start offsets along one axis: every ``stride`` plus a last tile flush with the end."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def _ramp(length: int, overlap: int, lead: bool, trail: bool, device, dtype) -> torch.Tensor:
    w = torch.ones(length, device=device, dtype=dtype)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, device=device, dtype=dtype) / (overlap + 1)
        n = min(overlap, length)
        if lead:
            w[:n] = torch.minimum(w[:n], ramp[:n])
        if trail:
            w[-n:] = torch.minimum(w[-n:], ramp[:n].flip(0))
    return w


def tiled_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: Optional[int],
                  overlap: int = 0, scale: int = 1, multiple: int = 1, blend: str = "linear") -> torch.Tensor:
    """Apply ``fn`` to (B, C, H, W) ``x`` tile by tile and blend the (B, C', sH, sW) results.

    Args:
        fn: the network (maps an (h, w) tile to (h * scale, w * scale)).
        x: input batch.
        tile: tile side in input pixels (``None`` or <= 0: no tiling); rounded up to ``multiple``.
        overlap: overlap between neighbouring tiles in input pixels (< tile).
        scale: output / input size ratio of ``fn``.
        multiple: the network's padding multiple (e.g. ``GRL.pad_size``).
        blend: ``"linear"`` or ``"uniform"``.
    """
    if blend not in BLENDS:
        raise ValueError(f"tile blend must be one of {BLENDS}, got {blend!r}")
    H, W = x.shape[-2:]
    if not tile or tile <= 0:
        return fn(x)
    tile = -(-int(tile) // multiple) * multiple
    if H <= tile and W <= tile:
        return fn(x)
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    th, tw = min(tile, H), min(tile, W)
    stride = tile - overlap
    rows, cols = tile_origins(H, th, stride), tile_origins(W, tw, stride)
    out = weight = None
    for i in rows:
        for j in cols:
            y = fn(x[..., i:i + th, j:j + tw])
            if out is None:
                out = y.new_zeros(y.shape[:2] + (H * scale, W * scale))
                weight = y.new_zeros((1, 1, H * scale, W * scale))
            if blend == "linear":
                o = overlap * scale
                wr = _ramp(th * scale, o, i > 0, i + th < H, y.device, y.dtype)
                wc = _ramp(tw * scale, o, j > 0, j + tw < W, y.device, y.dtype)
                w = wr[:, None] * wc[None, :]
            else:
                w = y.new_ones((th * scale, tw * scale))
            out[..., i * scale:(i + th) * scale, j * scale:(j + tw) * scale] += y * w
            weight[..., i * scale:(i + th) * scale, j * scale:(j + tw) * scale] += w
    return out / weight
