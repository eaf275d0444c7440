"""One vector per sequence, and the fixed normalisation the distances see.

    pool "last"  hidden state at the last position whose attention_mask is 1 (left or right padding).
    pool "mean"  mean over the positions where attention_mask and span_mask (e.g. the user message) are 1.
    normalize    none: r | center: r - c | unit: (r - c) / ||r - c|| | standardize: (r - c) / s, elementwise,
                 with c, s the per-dimension mean and std of the *reference* model's representations of a
                 calibration set of both classes, fixed before training (``calibrate``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from es2.losses.options import NORMALIZATIONS, POOLINGS, Normalization, Pooling, check_choice, upcast


def pool(hidden: Tensor, attention_mask: Tensor, how: Pooling = "last",
         span_mask: Tensor | None = None) -> Tensor:
    """One vector per sequence from a layer's hidden states.

    Args:
        hidden: ``[B, T, D]`` hidden states of one layer.
        attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding (left or right).
        how: ``"last"``: the last real token (the end of the generation prompt, SCAV's choice);
            ``"mean"``: the mean over the real tokens that are also in ``span_mask``.
        span_mask: ``[B, T]`` positions to average for ``"mean"`` (e.g. the user-message tokens); None = all.

    Returns:
        ``[B, D]`` pooled representations.

    Raises:
        ValueError: on a bad shape or option, or a row with no token to pool.
    """
    check_choice("pooling", how, POOLINGS)
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, D] and attention_mask [B, T]; got {tuple(hidden.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if how == "last":
        if span_mask is not None:
            raise ValueError("span_mask is only used with pooling 'mean'")
        if not mask.any(dim=1).all():
            raise ValueError("a row of attention_mask has no real token")
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if span_mask is not None:
        if span_mask.shape != mask.shape:
            raise ValueError(f"span_mask must be [B, T] = {tuple(mask.shape)}; got {tuple(span_mask.shape)}")
        mask = mask & span_mask.bool()
    counts = mask.sum(dim=1, keepdim=True)
    if (counts == 0).any():
        raise ValueError("a row has no token to average (empty span_mask & attention_mask)")
    return hidden.masked_fill(~mask.unsqueeze(-1), 0).sum(dim=1) / counts.to(hidden.dtype)


def normalize(reps: Tensor, how: Normalization = "none", center: Tensor | None = None,
              scale: Tensor | None = None) -> Tensor:
    """Apply a fixed normalisation to ``[N, D]`` representations.

    Args:
        reps: ``[N, D]``.
        how: ``none`` | ``center`` (``reps - center``) | ``unit`` (centre, then L2-normalise each row) |
            ``standardize`` (centre, then divide each dimension by ``scale``).
        center: ``[D]`` reference mean (``calibrate``); required unless ``how == "none"``.
        scale: ``[D]`` reference standard deviation; required for ``standardize``.
    """
    check_choice("normalize", how, NORMALIZATIONS)
    if how == "none":
        return reps
    if center is None:
        raise ValueError(f"normalize={how!r} needs the reference centre (see calibrate())")
    centred = reps - center
    if how == "center":
        return centred
    if how == "unit":
        return F.normalize(centred, dim=-1)
    if scale is None:
        raise ValueError("normalize='standardize' needs the reference scale (see calibrate())")
    return centred / scale


class LayerCalibration(NamedTuple):
    """Fixed per-layer statistics of the reference model on a calibration set, computed before training."""

    center: Tensor  # [D] mean over both classes
    scale: Tensor  # [D] standard deviation over both classes (floored at eps)
    direction: Tensor  # [D] unit vector from the harmless mean to the harmful mean, in the normalised space


@torch.no_grad()
def calibrate(ref_harmful: Tensor, ref_harmless: Tensor, how: Normalization = "center",
              eps: float = 1e-6) -> LayerCalibration:
    """Centre, scale and probe direction of one layer from the reference model's pooled representations.

    ``direction`` = unit(mean(normalize(H)) - mean(normalize(S))), the difference-of-means probe, computed
    after the normalisation ``how`` so that ``probe_margin`` measures along it in the space the loss uses.
    """
    harmful, harmless = upcast(ref_harmful), upcast(ref_harmless)
    both = torch.cat([harmful, harmless])
    center = both.mean(dim=0)
    scale = both.std(dim=0, correction=0).clamp_min(eps)
    diff = normalize(harmful, how, center, scale).mean(0) - normalize(harmless, how, center, scale).mean(0)
    return LayerCalibration(center, scale, diff / diff.norm().clamp_min(eps))
