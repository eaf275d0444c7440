"""Distances between the harmful set H [n, D] and the harmless set S [m, D] of one layer, and the forms that turn
a distance into a term to minimise. Single-process and pure: callers pass the whole batch.

Distances D(H, S)
    centroid      ||mu_H - mu_S|| / sqrt((tr Sigma_H + tr Sigma_S) / 2 + eps)     (default; d'-like)
    fisher        ||mu_H - mu_S||^2 / (tr Sigma_H + tr Sigma_S + eps)
    pairwise      mean over pairs (i, j) of ||h_i - s_j||: the given pairs, or all n * m of them
    nearest       mean_i min_j ||h_i - s_j||                (distance to the closest harmless point)
    probe_margin  mean_i u.h_i - mean_j u.s_j, u a fixed unit direction from the reference model
    Only centroid and fisher are invariant to r -> a * r (and to shifts). With the others a model can raise D
    by just inflating the residual-stream norm, which the downstream RMSNorm hides from the logits, so the KL
    term barely resists; use them with normalize="unit", and watch ``per_layer_norm``.

Forms S(D), minimised
    neg        -D                         (literal "maximise the distance"; unbounded)
    hinge      relu(margin - D)           (absolute margin)
    rel_hinge  relu(ratio * D_ref - D)    (D_ref: the same distance on the reference model's representations
                                           of the same batch, no gradient; zero once D >= ratio * D_ref)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from es2.losses.options import DISTANCES, FORMS, Distance, Form, check_choice


def mean_and_spread(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and trace of the population covariance, ``mean_i ||x_i - mu||^2``."""
    mu = x.mean(dim=0)
    return mu, (x - mu).pow(2).sum(dim=-1).mean()


def _pair_distances(harmful: Tensor, harmless: Tensor) -> Tensor:
    """``[n, m]`` Euclidean distances (explicit difference: exact, and a zero subgradient at 0)."""
    return torch.linalg.vector_norm(harmful[:, None, :] - harmless[None, :, :], dim=-1)


def centroid_distance(harmful: Tensor, harmless: Tensor, eps: float = 1e-8) -> Tensor:
    """``||mu_H - mu_S|| / sqrt((tr Sigma_H + tr Sigma_S) / 2 + eps)``: scale- and shift-free (d'-like)."""
    mu_h, spread_h = mean_and_spread(harmful)
    mu_s, spread_s = mean_and_spread(harmless)
    return torch.linalg.vector_norm(mu_h - mu_s) / torch.sqrt((spread_h + spread_s) / 2 + eps)


def fisher_ratio(harmful: Tensor, harmless: Tensor, eps: float = 1e-8) -> Tensor:
    """``||mu_H - mu_S||^2 / (tr Sigma_H + tr Sigma_S + eps)``: scale- and shift-free."""
    mu_h, spread_h = mean_and_spread(harmful)
    mu_s, spread_s = mean_and_spread(harmless)
    return (mu_h - mu_s).pow(2).sum() / (spread_h + spread_s + eps)


def pair_distances(harmful: Tensor, harmless: Tensor, pairs: Tensor) -> Tensor:
    """``[P]`` distances ``||h_i - s_j||`` of the given ``[P, 2]`` (harmful index, harmless index) pairs."""
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2] (harmful index, harmless index); got {tuple(pairs.shape)}")
    return torch.linalg.vector_norm(harmful[pairs[:, 0]] - harmless[pairs[:, 1]], dim=-1)


def pairwise_distance(harmful: Tensor, harmless: Tensor, pairs: Tensor | None = None) -> Tensor:
    """Mean ``||h_i - s_j||`` over ``pairs`` (``[P, 2]`` (harmful, harmless) indices) or over all pairs."""
    if pairs is None:
        return _pair_distances(harmful, harmless).mean()
    return pair_distances(harmful, harmless, pairs).mean()


def nearest_distance(harmful: Tensor, harmless: Tensor) -> Tensor:
    """``mean_i min_j ||h_i - s_j||``: how far each harmful point is from its closest harmless one."""
    return _pair_distances(harmful, harmless).amin(dim=1).mean()


def probe_margin(harmful: Tensor, harmless: Tensor, direction: Tensor) -> Tensor:
    """``mean_i u.h_i - mean_j u.s_j`` along a fixed unit ``direction`` u from the reference model: what SCAV's
    closed-form embedding attack has to overcome along its probe."""
    return (harmful @ direction).mean() - (harmless @ direction).mean()


def distance(harmful: Tensor, harmless: Tensor, how: Distance = "centroid", *, pairs: Tensor | None = None,
             direction: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Dispatch to one of the distances above (see the module docstring for the formulas).

    Args:
        harmful: ``[n, D]`` harmful representations of one layer.
        harmless: ``[m, D]`` harmless representations.
        how: ``centroid`` | ``pairwise`` | ``nearest`` | ``probe_margin`` | ``fisher``.
        pairs: ``[P, 2]`` index pairs for ``pairwise`` (None = all pairs).
        direction: ``[D]`` unit probe direction, required for ``probe_margin``.
        eps: added to the within-class spread of ``centroid`` and ``fisher``.

    Returns:
        A scalar.
    """
    check_choice("distance", how, DISTANCES)
    if harmful.dim() != 2 or harmless.dim() != 2 or harmful.shape[1] != harmless.shape[1]:
        raise ValueError(f"harmful and harmless must be [n, D] and [m, D]; got {tuple(harmful.shape)} "
                         f"and {tuple(harmless.shape)}")
    if pairs is not None and how != "pairwise":
        raise ValueError(f"pairs are only used by distance 'pairwise', not {how!r}")
    if how == "centroid":
        return centroid_distance(harmful, harmless, eps)
    if how == "fisher":
        return fisher_ratio(harmful, harmless, eps)
    if how == "pairwise":
        return pairwise_distance(harmful, harmless, pairs)
    if how == "nearest":
        return nearest_distance(harmful, harmless)
    if direction is None:
        raise ValueError("distance 'probe_margin' needs a reference direction (see calibrate())")
    return probe_margin(harmful, harmless, direction)


def separation_form(d: Tensor, how: Form = "rel_hinge", *, d_ref: Tensor | None = None, margin: float = 1.0,
                    ratio: float = 2.0) -> Tensor:
    """Turn a distance into a term to minimise: ``neg`` -D, ``hinge`` relu(margin - D), ``rel_hinge``
    relu(ratio * D_ref - D) with ``d_ref`` (the reference model's distance on the same batch) detached."""
    check_choice("form", how, FORMS)
    if how == "neg":
        return -d
    if how == "hinge":
        return F.relu(margin - d)
    if d_ref is None:
        raise ValueError("form 'rel_hinge' needs the reference distance d_ref")
    return F.relu(ratio * d_ref.detach() - d)
