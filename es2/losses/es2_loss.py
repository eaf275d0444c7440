"""The ES2 loss: push harmful representations away from harmless ones, keep harmless logits near the reference.

Pure tensor code on the global batch (``es2.losses.gather`` builds it from a shard): the trainer runs the
forward passes (current model, and the reference with the LoRA adapter disabled), pools the hidden states and
reduces the token terms to (sum, count); this module turns them into one scalar and the named intermediates
that get logged.

    separation = sum_l w_l S(D_l) / sum_l w_l          (D and S from ``es2.losses.distances``)
    loss = separation_weight * separation + kl_weight * KL + refusal_weight * CE(targets of harmful prompts)

pairwise with given pairs applies the form to each pair, mean_i S(||h_i - s_pair(i)||), so every pair clears
its own margin and the term is a mean of per-pair values (additive over micro-batches).

Gradient accumulation
    Batch statistics are not additive: the mean of the losses of k micro-batches is not the loss of the
    k-times larger batch (the exceptions are probe_margin and pairwise-with-pairs, and only for equal-sized
    micro-batches). For exact invariance the trainer must see the whole batch, e.g. in the GradCache way: pool
    the representations of every micro-batch without a graph, call ``separation`` once on all of them (as
    leaves with requires_grad), then re-run each micro-batch and backpropagate ``reps.backward(leaf.grad)``
    plus its share of the token terms (with ``reduction="sequence"`` a mean of per-sequence values).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from es2.losses.distances import distance, pair_distances, separation_form
from es2.losses.options import (DISTANCES, FORMS, KL_DIRECTIONS, NORMALIZATIONS, Distance, Form, KLDirection,
                                Normalization, check_choice, upcast)
from es2.losses.representations import LayerCalibration, normalize
from es2.losses.tokens import causal_lm_loss, kl_divergence

TokenSum = tuple[Tensor, Tensor]  # (sum, count) of a token term over the global batch


class Separation(NamedTuple):
    """The separation term and its per-layer diagnostics. All but ``term`` are detached."""

    term: Tensor  # layer-weighted mean of the per-layer forms
    per_layer_distance: dict[int, Tensor]  # D_l of the current model
    per_layer_ref_distance: dict[int, Tensor]  # D_l of the reference model (empty without reference reps)
    per_layer_norm: dict[int, Tensor]  # mean L2 norm of the raw (un-normalised) current representations


class ES2LossOutput(NamedTuple):
    """The loss and its named intermediates. All but ``loss`` are detached."""

    loss: Tensor  # separation_weight * separation + kl_weight * kl + refusal_weight * refusal
    separation: Tensor  # layer-weighted mean of the per-layer forms
    kl: Tensor  # token-mean KL on harmless inputs (0 when not given)
    refusal: Tensor  # token-mean cross-entropy on the harmful prompts' targets (0 when not given)
    per_layer_distance: dict[int, Tensor]
    per_layer_ref_distance: dict[int, Tensor]
    per_layer_norm: dict[int, Tensor]


class ES2Loss(nn.Module):
    """ES2 objective: separate harmful from harmless representations at chosen layers, with a KL leash on
    harmless logits (ES2, Zhao, Wang & Shen 2026, arXiv 2603.20206; the options are this project's reconstruction).

    Args:
        distance: per-layer distance (``centroid`` default: scale-free, so inflating norms does not pay).
        form: ``neg`` | ``hinge`` | ``rel_hinge`` (default; zero once D >= margin_ratio * D_ref).
        margin: absolute margin for ``hinge``.
        margin_ratio: rho for ``rel_hinge``.
        normalize: normalisation before the distance (``center`` default; needs ``calibration``).
        calibration: per-layer ``LayerCalibration`` (centre, scale, probe direction) from ``calibrate``.
        layer_weights: per-layer weights w_l (default uniform); must cover every layer passed in.
        kl_weight: lambda; the KL term is required when > 0.
        kl_direction: ``forward`` (KL(p_ref || p_theta)) | ``reverse``.
        kl_temperature: tau.
        refusal_weight: weight of the cross-entropy on the harmful prompts' targets (a refusal, or a recovery
            after an injected span); required when > 0.
        reduction: how the KL and cross-entropy average: ``sum`` = one token mean over the global batch;
            ``sequence`` = mean over sequences of each one's token mean (exactly additive over equal-sized
            micro-batches, so gradient accumulation matches one big batch).
        separation_weight: 0 turns the separation into a logged diagnostic (the refusal_sft baseline).
        eps: added to the within-class spread in ``centroid`` / ``fisher``.
    """

    def __init__(self, distance: Distance = "centroid", form: Form = "rel_hinge", margin: float = 1.0,
                 margin_ratio: float = 2.0, normalize: Normalization = "center",
                 calibration: Mapping[int, LayerCalibration] | None = None,
                 layer_weights: Mapping[int, float] | None = None, kl_weight: float = 1.0,
                 kl_direction: KLDirection = "forward", kl_temperature: float = 1.0,
                 refusal_weight: float = 0.0, reduction: Literal["sum", "sequence"] = "sum",
                 separation_weight: float = 1.0, eps: float = 1e-8):
        super().__init__()
        self.separation_weight = separation_weight
        check_choice("reduction", reduction, ("sum", "sequence"))
        self.reduction = reduction
        check_choice("distance", distance, DISTANCES)
        check_choice("form", form, FORMS)
        check_choice("normalize", normalize, NORMALIZATIONS)
        check_choice("kl_direction", kl_direction, KL_DIRECTIONS)
        if kl_weight < 0 or refusal_weight < 0 or kl_temperature <= 0:
            raise ValueError("kl_weight and refusal_weight must be >= 0 and kl_temperature > 0")
        self.distance, self.form, self.margin, self.margin_ratio = distance, form, margin, margin_ratio
        self.normalize = normalize
        self.calibration = dict(calibration or {})
        self.layer_weights = dict(layer_weights) if layer_weights is not None else None
        self.kl_weight, self.kl_direction, self.kl_temperature = kl_weight, kl_direction, kl_temperature
        self.refusal_weight, self.eps = refusal_weight, eps

    # -- the token terms, as (sum, count) of this batch: the caller adds them over micro-batches or ranks

    def kl_sum(self, logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None) -> TokenSum:
        """KL to the reference on harmless logits ``[B, T, V]`` over ``mask`` ``[B, T]``, with this loss's
        direction, temperature and reduction."""
        return kl_divergence(logits, ref_logits, mask, self.kl_direction, self.kl_temperature,
                             reduction=self.reduction)

    def refusal_sum(self, logits: Tensor, labels: Tensor) -> TokenSum:
        """Cross-entropy of the harmful prompts' targets, HF-style ``labels`` (-100 outside the target)."""
        return causal_lm_loss(logits, labels, reduction=self.reduction)

    def token_means(self, kl: TokenSum | None, refusal: TokenSum | None, zero: Tensor) -> tuple[Tensor, Tensor]:
        """The KL and cross-entropy token means from their global (sum, count); a term not given is ``zero``
        and must have weight 0."""
        if kl is None and self.kl_weight > 0:
            raise ValueError("kl_weight > 0 needs the KL of harmless logits (kl_sum), or set kl_weight 0")
        if refusal is None and self.refusal_weight > 0:
            raise ValueError("refusal_weight > 0 needs the cross-entropy of the harmful targets (refusal_sum), "
                             "or set refusal_weight 0")
        return (zero if kl is None else kl[0] / kl[1].clamp_min(1),
                zero if refusal is None else refusal[0] / refusal[1].clamp_min(1))

    # -- the separation, on the representations of the whole batch

    def _prepare(self, reps: Tensor, layer: int) -> Tensor:
        """Upcast and normalise one layer's pooled representations with that layer's fixed calibration."""
        reps = upcast(reps)
        if self.normalize == "none":
            return reps
        cal = self.calibration[layer]
        return normalize(reps, self.normalize, cal.center.to(reps), cal.scale.to(reps))

    def _layer_distance(self, harmful: Tensor, harmless: Tensor, layer: int, pairs: Tensor | None) -> Tensor:
        direction = None
        if self.distance == "probe_margin":
            direction = self.calibration[layer].direction.to(harmful)
        return distance(harmful, harmless, self.distance, pairs=pairs, direction=direction, eps=self.eps)

    def _check_layers(self, harmful, harmless, ref_harmful, ref_harmless) -> tuple[list[int], bool]:
        layers = sorted(harmful)
        if not layers or sorted(harmless) != layers:
            raise ValueError(f"harmful and harmless must hold the same, non-empty layers; got {layers} "
                             f"and {sorted(harmless)}")
        has_ref = ref_harmful is not None and ref_harmless is not None
        if has_ref and (sorted(ref_harmful) != layers or sorted(ref_harmless) != layers):
            raise ValueError("reference representations must cover the same layers as the current ones")
        if self.form == "rel_hinge" and not has_ref:
            raise ValueError("form 'rel_hinge' needs ref_harmful and ref_harmless")
        needs_calibration = self.normalize != "none" or self.distance == "probe_margin"
        missing = [layer for layer in layers if layer not in self.calibration]
        if needs_calibration and missing:
            raise ValueError(f"no calibration for layers {missing} (needed by normalize={self.normalize!r} "
                             f"or distance={self.distance!r})")
        return layers, has_ref

    def separation(self, harmful: Mapping[int, Tensor], harmless: Mapping[int, Tensor],
                   ref_harmful: Mapping[int, Tensor] | None = None,
                   ref_harmless: Mapping[int, Tensor] | None = None, pairs: Tensor | None = None) -> Separation:
        """The separation term on layer -> ``[n, D]`` / ``[m, D]`` pooled representations (reference ones are
        needed by ``rel_hinge``, else only logged); ``pairs`` ``[P, 2]`` for distance ``pairwise``."""
        layers, has_ref = self._check_layers(harmful, harmless, ref_harmful, ref_harmless)
        weights = self.layer_weights or {layer: 1.0 for layer in layers}
        if any(layer not in weights for layer in layers):
            raise ValueError(f"layer_weights {sorted(weights)} do not cover layers {layers}")
        terms, distances, ref_distances, norms = [], {}, {}, {}
        for layer in layers:
            raw_h, raw_s = upcast(harmful[layer]), upcast(harmless[layer])
            raw_norms = torch.linalg.vector_norm(torch.cat([raw_h, raw_s]), dim=-1).detach()
            norms[layer] = raw_norms.sum() / max(raw_norms.numel(), 1)
            h, s = self._prepare(raw_h, layer), self._prepare(raw_s, layer)
            if has_ref:
                ref_h, ref_s = self._prepare(ref_harmful[layer], layer), self._prepare(ref_harmless[layer], layer)
            if self.distance == "pairwise" and pairs is not None:
                # Each pair clears its own margin: a mean of per-pair terms, additive over micro-batches.
                d_pairs = pair_distances(h, s, pairs)
                d_ref_pairs = pair_distances(ref_h, ref_s, pairs).detach() if has_ref else None
                form = separation_form(d_pairs, self.form, d_ref=d_ref_pairs, margin=self.margin,
                                       ratio=self.margin_ratio)
                term, d = form.mean(), d_pairs.mean()
                if has_ref:
                    ref_distances[layer] = d_ref_pairs.mean()
            else:
                d = self._layer_distance(h, s, layer, pairs)
                d_ref = None
                if has_ref:
                    with torch.no_grad():
                        d_ref = self._layer_distance(ref_h, ref_s, layer, pairs)
                    ref_distances[layer] = d_ref
                term = separation_form(d, self.form, d_ref=d_ref, margin=self.margin, ratio=self.margin_ratio)
            terms.append(weights[layer] * term)
            distances[layer] = d.detach()
        term = torch.stack(terms).sum() / sum(weights[layer] for layer in layers)
        return Separation(term, distances, ref_distances, norms)

    def forward(self, harmful: Mapping[int, Tensor], harmless: Mapping[int, Tensor],
                ref_harmful: Mapping[int, Tensor] | None = None,
                ref_harmless: Mapping[int, Tensor] | None = None, *, kl: TokenSum | None = None,
                refusal: TokenSum | None = None, pairs: Tensor | None = None) -> ES2LossOutput:
        """The loss of the global batch.

        Args:
            harmful: layer -> ``[n, D]`` pooled representations of harmful prompts (current model).
            harmless: layer -> ``[m, D]`` pooled representations of harmless prompts (current model).
            ref_harmful: layer -> ``[n, D]`` the same from the reference model (needed by ``rel_hinge``;
                otherwise only logged).
            ref_harmless: layer -> ``[m, D]`` likewise.
            kl: ``kl_sum`` of the harmless logits (required when kl_weight > 0).
            refusal: ``refusal_sum`` of the harmful prompts' targets (required when refusal_weight > 0).
            pairs: ``[P, 2]`` (harmful, harmless) index pairs for distance ``pairwise``.
        """
        separation = self.separation(harmful, harmless, ref_harmful, ref_harmless, pairs)
        kl_mean, refusal_mean = self.token_means(kl, refusal, separation.term.new_zeros(()))
        loss = (self.separation_weight * separation.term + self.kl_weight * kl_mean
                + self.refusal_weight * refusal_mean)
        return ES2LossOutput(loss, separation.term.detach(), kl_mean.detach(), refusal_mean.detach(),
                             *separation[1:])
