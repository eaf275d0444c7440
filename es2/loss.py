"""The ES2 loss: push harmful representations away from harmless ones, keep harmless logits near the
reference.

Pure tensor code: no model, no I/O. The trainer runs the forward passes (current model, and the reference
with the LoRA adapter disabled) and hands in pooled hidden states and logits; this module turns them into one
scalar and the named intermediates that get logged.

Hidden-state index convention
    Layer ``l`` is ``outputs.hidden_states[l]`` of an HF causal LM called with ``output_hidden_states=True``:
    ``0`` is the embedding output and ``l >= 1`` the output of decoder block ``l - 1`` (blocks counted from
    0). The last entry (``l = num_hidden_layers``) is taken *after* the final norm in HF Llama/Qwen2, so its
    scale is not comparable with the other layers (on SmolLM2 its norm is ~53 against ~640 just before).
    SCAV's code mixes these indices with decoder-block hooks; everything here uses ``hidden_states`` indices.

Notation (one layer)
    H in R^{n x D}: harmful representations, S in R^{m x D}: harmless ones; mu_H, mu_S their means;
    tr Sigma_H = (1/n) sum_i ||h_i - mu_H||^2 (population covariance trace, so n = 1 is allowed); same for S.

Representations
    pool "last"  hidden state at the last position whose attention_mask is 1 (left or right padding).
    pool "mean"  mean over the positions where attention_mask and span_mask (e.g. the user message) are 1.
    normalize    none: r | center: r - c | unit: (r - c) / ||r - c|| | standardize: (r - c) / s, elementwise,
                 with c, s the per-dimension mean and std of the *reference* model's representations of a
                 calibration set of both classes, fixed before training (``calibrate``).

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
    separation = sum_l w_l S(D_l) / sum_l w_l
    pairwise with given pairs applies the form to each pair, mean_i S(||h_i - s_pair(i)||), so every pair clears
    its own margin and the term is a mean of per-pair values (additive over micro-batches).

KL on harmless inputs (positions M chosen by the trainer: prompt, response or all; token mean)
    KL = tau^2 / |M| * sum_{t in M} KL_dir(t),  p = softmax(z_ref / tau), q = softmax(z_theta / tau)
    forward: KL(p || q) (distillation direction), reverse: KL(q || p). Log-space, reference detached.

Total
    loss = separation + kl_weight * KL + refusal_weight * CE(refusal targets on harmful prompts)

Distributed invariance (N processes, each holding a shard of the batch)
    Every term is computed on the *global* batch, identically on every rank:
    - batch statistics (all distances) run on representations concatenated over ranks by
      ``gather_with_grad``, a differentiable all_gather (``pairwise`` with given pairs gathers the per-pair
      distances instead);
    - token means (KL, refusal CE) all-reduce their (sum, count), with a differentiable all_reduce on the sum.
    So ``loss`` is, on every rank, the 1-process loss of the concatenated batch. Gradients: the backward of a
    differentiable collective sums over ranks the gradients of the N identical per-rank losses, so a rank's
    local inputs receive N times their true gradient; DDP (also accelerate, FSDP) *averages* parameter
    gradients over the N ranks, which divides the N out again. The result equals the 1-process gradient
    exactly, so do not rescale by the world size, and do not pair this with a reducer that sums gradients.
    ``tests/test_loss.py`` checks it with 2 gloo processes. Each call issues the same collectives in the same
    order on every rank, so every rank must call with the same layers and the same optional terms; per-rank
    batch sizes may differ.

Gradient accumulation
    Batch statistics are not additive: the mean of the losses of k micro-batches is not the loss of the
    k-times larger batch (the exceptions are probe_margin and pairwise-with-pairs, and only for equal-sized
    micro-batches). For exact invariance the trainer must see the whole batch, e.g. in the GradCache way: pool
    the representations of every micro-batch without a graph, call this loss once on all of them (as leaves
    with requires_grad), then re-run each micro-batch and backpropagate ``reps.backward(reps_leaf.grad)``.
    For token means, use ``kl_divergence(..., reduction="sum")`` / ``causal_lm_loss(..., reduction="sum")``
    and divide by the total count.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

Pooling = Literal["last", "mean"]
Normalization = Literal["none", "center", "unit", "standardize"]
Distance = Literal["centroid", "pairwise", "nearest", "probe_margin", "fisher"]
Form = Literal["neg", "hinge", "rel_hinge"]
KLDirection = Literal["forward", "reverse"]
Reduction = Literal["mean", "sum", "sequence"]

POOLINGS = ("last", "mean")
NORMALIZATIONS = ("none", "center", "unit", "standardize")
DISTANCES = ("centroid", "pairwise", "nearest", "probe_margin", "fisher")
FORMS = ("neg", "hinge", "rel_hinge")
KL_DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("mean", "sum", "sequence")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _upcast(t: Tensor) -> Tensor:
    """Half precision to float32 (distances and log-softmax are imprecise in bf16); other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ------------------------------------------------------------------------------------------------------------
# Distributed helpers


def world_size() -> int:
    """Number of processes in the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` over all ranks along dim 0, keeping the autograd graph; the identity on one process.

    Ranks may hold different numbers of rows: they are padded to the largest for the collective and trimmed
    after. In backward, each rank's rows receive the sum over ranks of the gradients flowing into them (see
    the module docstring for why DDP's averaging then gives the exact 1-process gradient).
    """
    n_ranks = world_size()
    if n_ranks == 1:
        return t
    import torch.distributed.nn.functional as dist_nn

    rows = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.empty_like(rows) for _ in range(n_ranks)]
    dist.all_gather(sizes, rows)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    if t.shape[0] < longest:
        t = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    with warnings.catch_warnings():
        # Deprecated in favour of a private API (torch.distributed._functional_collectives); still correct.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_nn.all_gather(t)
    return torch.cat([part[:k] for part, k in zip(parts, sizes)])


def all_reduce_with_grad(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks, keeping the autograd graph; the identity on one process."""
    if world_size() == 1:
        return t
    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist_nn.all_reduce(t)


def global_token_mean(total: Tensor, count: Tensor) -> Tensor:
    """``(sum over ranks of total) / (sum over ranks of count)``, 0 without tokens; grad flows to total."""
    if world_size() > 1:
        total = all_reduce_with_grad(total)
        count = count.detach().clone()
        dist.all_reduce(count)
    return total / count.clamp_min(1)


def _global_mean_detached(values: Tensor) -> Tensor:
    """Mean of a 1-D tensor over all ranks' entries, without gradient (for logging)."""
    values = values.detach()
    stats = torch.stack([values.sum(), values.new_tensor(float(values.numel()))])
    if world_size() > 1:
        dist.all_reduce(stats)
    return (stats[0] / stats[1].clamp_min(1)).to(values.dtype)


# ------------------------------------------------------------------------------------------------------------
# Representations


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
    _check_choice("pooling", how, POOLINGS)
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
    _check_choice("normalize", how, NORMALIZATIONS)
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
    harmful, harmless = _upcast(ref_harmful), _upcast(ref_harmless)
    both = torch.cat([harmful, harmless])
    center = both.mean(dim=0)
    scale = both.std(dim=0, correction=0).clamp_min(eps)
    diff = normalize(harmful, how, center, scale).mean(0) - normalize(harmless, how, center, scale).mean(0)
    return LayerCalibration(center, scale, diff / diff.norm().clamp_min(eps))


# ------------------------------------------------------------------------------------------------------------
# Distances between the harmful set H [n, D] and the harmless set S [m, D]; all gather over ranks first.


def mean_and_spread(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and trace of the population covariance, ``mean_i ||x_i - mu||^2``."""
    mu = x.mean(dim=0)
    return mu, (x - mu).pow(2).sum(dim=-1).mean()


def _pair_distances(harmful: Tensor, harmless: Tensor) -> Tensor:
    """``[n, m]`` Euclidean distances (explicit difference: exact, and a zero subgradient at 0)."""
    return torch.linalg.vector_norm(harmful[:, None, :] - harmless[None, :, :], dim=-1)


def centroid_distance(harmful: Tensor, harmless: Tensor, eps: float = 1e-8) -> Tensor:
    """``||mu_H - mu_S|| / sqrt((tr Sigma_H + tr Sigma_S) / 2 + eps)``: scale- and shift-free (d'-like)."""
    harmful, harmless = gather_with_grad(harmful), gather_with_grad(harmless)
    mu_h, spread_h = mean_and_spread(harmful)
    mu_s, spread_s = mean_and_spread(harmless)
    return torch.linalg.vector_norm(mu_h - mu_s) / torch.sqrt((spread_h + spread_s) / 2 + eps)


def fisher_ratio(harmful: Tensor, harmless: Tensor, eps: float = 1e-8) -> Tensor:
    """``||mu_H - mu_S||^2 / (tr Sigma_H + tr Sigma_S + eps)``: scale- and shift-free."""
    harmful, harmless = gather_with_grad(harmful), gather_with_grad(harmless)
    mu_h, spread_h = mean_and_spread(harmful)
    mu_s, spread_s = mean_and_spread(harmless)
    return (mu_h - mu_s).pow(2).sum() / (spread_h + spread_s + eps)


def pairwise_distance(harmful: Tensor, harmless: Tensor, pairs: Tensor | None = None) -> Tensor:
    """Mean ``||h_i - s_j||`` over ``pairs`` (``[P, 2]`` local (harmful, harmless) indices) or all pairs.

    With ``pairs`` each rank computes its own pairs' distances (indices refer to its shard) and the mean runs
    over all ranks' pairs; without, all pairs of the gathered sets.
    """
    if pairs is None:
        return _pair_distances(gather_with_grad(harmful), gather_with_grad(harmless)).mean()
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2] (harmful index, harmless index); got {tuple(pairs.shape)}")
    local = torch.linalg.vector_norm(harmful[pairs[:, 0]] - harmless[pairs[:, 1]], dim=-1)
    return gather_with_grad(local).mean()


def nearest_distance(harmful: Tensor, harmless: Tensor) -> Tensor:
    """``mean_i min_j ||h_i - s_j||``: how far each harmful point is from its closest harmless one."""
    return _pair_distances(gather_with_grad(harmful), gather_with_grad(harmless)).amin(dim=1).mean()


def probe_margin(harmful: Tensor, harmless: Tensor, direction: Tensor) -> Tensor:
    """``mean_i u.h_i - mean_j u.s_j`` along a fixed unit ``direction`` u from the reference model.

    This is what SCAV's closed-form embedding attack has to overcome along its probe. Only the projections are
    gathered over ranks.
    """
    return gather_with_grad(harmful @ direction).mean() - gather_with_grad(harmless @ direction).mean()


def distance(harmful: Tensor, harmless: Tensor, how: Distance = "centroid", *, pairs: Tensor | None = None,
             direction: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Dispatch to one of the distances above (see the module docstring for the formulas).

    Args:
        harmful: ``[n, D]`` this rank's harmful representations of one layer.
        harmless: ``[m, D]`` this rank's harmless representations.
        how: ``centroid`` | ``pairwise`` | ``nearest`` | ``probe_margin`` | ``fisher``.
        pairs: ``[P, 2]`` index pairs for ``pairwise`` (None = all pairs).
        direction: ``[D]`` unit probe direction, required for ``probe_margin``.
        eps: added to the within-class spread of ``centroid`` and ``fisher``.

    Returns:
        A scalar, the same on every rank.
    """
    _check_choice("distance", how, DISTANCES)
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
    _check_choice("form", how, FORMS)
    if how == "neg":
        return -d
    if how == "hinge":
        return F.relu(margin - d)
    if d_ref is None:
        raise ValueError("form 'rel_hinge' needs the reference distance d_ref")
    return F.relu(ratio * d_ref.detach() - d)


# ------------------------------------------------------------------------------------------------------------
# Token-level terms


def _reduce(per_token: Tensor, mask: Tensor, reduction: str) -> Tensor | tuple[Tensor, Tensor]:
    """Reduce ``[B, T]`` per-token values over ``mask`` (bool ``[B, T]``).

    mean: token mean (0 without tokens); sum: ``(sum, token count)``; sequence: ``(sum over sequences of each
    one's token mean, number of sequences with a token)``. The sequence form is a mean of per-example values, so
    it is additive over equal-sized micro-batches (exact gradient accumulation) and over equal shards.
    """
    per_token = per_token.masked_fill(~mask, 0.0)
    if reduction == "sequence":
        counts = mask.sum(dim=-1).to(per_token.dtype)
        has_any = counts > 0
        means = per_token.sum(dim=-1)[has_any] / counts[has_any]
        return means.sum(), means.new_tensor(float(has_any.sum()))
    total = per_token.sum()
    count = mask.sum().to(total.dtype)
    if reduction == "sum":
        return total, count
    return total / count.clamp_min(1)


def kl_divergence(logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None,
                  direction: KLDirection = "forward", temperature: float = 1.0,
                  reduction: Reduction = "mean") -> Tensor | tuple[Tensor, Tensor]:
    """Temperature-scaled KL between the current and the reference next-token distributions, per position.

    ``tau^2 * KL(p_ref || p_theta)`` (forward) or ``tau^2 * KL(p_theta || p_ref)`` (reverse) with
    ``p = softmax(z / tau)``, computed from log_softmax; ``ref_logits`` are detached. The ``tau^2`` keeps
    gradient magnitudes comparable across temperatures (Hinton et al.; CRL uses tau = 2).

    Args:
        logits: ``[B, T, V]`` current logits (finite).
        ref_logits: ``[B, T, V]`` reference logits (finite).
        mask: ``[B, T]`` positions that count (1) and that do not (0, e.g. padding); None = all.
        direction: ``forward`` | ``reverse``.
        temperature: tau > 0.
        reduction: ``mean`` (token mean), ``sum`` (``(sum, count)``, so callers can combine calls or ranks into
            one token mean; ``global_token_mean`` does ranks) or ``sequence`` (see ``_reduce``).
    """
    _check_choice("kl_direction", direction, KL_DIRECTIONS)
    _check_choice("reduction", reduction, REDUCTIONS)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    if logits.dim() == 2:  # a single sequence [T, V]
        logits, ref_logits = logits[None], ref_logits[None]
        mask = None if mask is None else mask[None]
    if mask is not None and mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask must be {tuple(logits.shape[:-1])}; got {tuple(mask.shape)}")
    keep = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
    log_q = F.log_softmax(_upcast(logits) / temperature, dim=-1)
    log_p = F.log_softmax(_upcast(ref_logits.detach()) / temperature, dim=-1)
    if direction == "forward":
        per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    else:
        per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    # masked positions are zeroed before reduction, so a non-finite value there cannot leak in
    return _reduce(torch.where(keep, per_token, 0.0) * temperature**2, keep, reduction)


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                   reduction: Reduction = "mean") -> Tensor | tuple[Tensor, Tensor]:
    """Next-token cross-entropy with HF's ``labels`` convention (``logits[:, t]`` predicts ``labels[:, t + 1]``;
    ``ignore_index`` marks prompt and padding). Used for the optional refusal term.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids aligned with the inputs.
        reduction: ``mean`` (token mean, 0 if no target), ``sum`` or ``sequence`` (see ``kl_divergence``).
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    targets = labels[:, 1:]
    keep = targets != ignore_index
    per_token = F.cross_entropy(_upcast(logits[:, :-1]).transpose(1, 2), targets.masked_fill(~keep, 0),
                                reduction="none")
    return _reduce(per_token, keep, reduction)


# ------------------------------------------------------------------------------------------------------------
# The full loss


class ES2LossOutput(NamedTuple):
    """The loss and its named intermediates. All but ``loss`` are detached; all are global-batch values."""

    loss: Tensor  # separation_weight * separation + kl_weight * kl + refusal_weight * refusal
    separation: Tensor  # layer-weighted mean of the per-layer forms
    kl: Tensor  # token-mean KL on harmless inputs (0 when no logits were given)
    refusal: Tensor  # token-mean refusal cross-entropy (0 when not given)
    per_layer_distance: dict[int, Tensor]  # D_l of the current model
    per_layer_ref_distance: dict[int, Tensor]  # D_l of the reference model (empty without reference reps)
    per_layer_norm: dict[int, Tensor]  # mean L2 norm of the raw (un-normalised) current representations


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
        refusal_weight: weight of the optional refusal cross-entropy; its inputs are required when > 0.
        reduction: how the KL and refusal terms average: ``sum`` = one token mean over the global batch;
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
        _check_choice("reduction", reduction, ("sum", "sequence"))
        self.reduction = reduction
        _check_choice("distance", distance, DISTANCES)
        _check_choice("form", form, FORMS)
        _check_choice("normalize", normalize, NORMALIZATIONS)
        _check_choice("kl_direction", kl_direction, KL_DIRECTIONS)
        if kl_weight < 0 or refusal_weight < 0 or kl_temperature <= 0:
            raise ValueError("kl_weight and refusal_weight must be >= 0 and kl_temperature > 0")
        self.distance, self.form, self.margin, self.margin_ratio = distance, form, margin, margin_ratio
        self.normalize = normalize
        self.calibration = dict(calibration or {})
        self.layer_weights = dict(layer_weights) if layer_weights is not None else None
        self.kl_weight, self.kl_direction, self.kl_temperature = kl_weight, kl_direction, kl_temperature
        self.refusal_weight, self.eps = refusal_weight, eps

    def _prepare(self, reps: Tensor, layer: int) -> Tensor:
        """Upcast and normalise one layer's pooled representations with that layer's fixed calibration."""
        reps = _upcast(reps)
        if self.normalize == "none":
            return reps
        cal = self.calibration[layer]
        return normalize(reps, self.normalize, cal.center.to(reps), cal.scale.to(reps))

    def _layer_distance(self, harmful: Tensor, harmless: Tensor, layer: int, pairs: Tensor | None) -> Tensor:
        direction = None
        if self.distance == "probe_margin":
            direction = self.calibration[layer].direction.to(harmful)
        return distance(harmful, harmless, self.distance, pairs=pairs, direction=direction, eps=self.eps)

    def forward(self, harmful: Mapping[int, Tensor], harmless: Mapping[int, Tensor],
                ref_harmful: Mapping[int, Tensor] | None = None,
                ref_harmless: Mapping[int, Tensor] | None = None, *, logits: Tensor | None = None,
                ref_logits: Tensor | None = None, kl_mask: Tensor | None = None,
                refusal_logits: Tensor | None = None, refusal_labels: Tensor | None = None,
                pairs: Tensor | None = None) -> ES2LossOutput:
        """Compute the loss on this rank's shard of the batch (global statistics when distributed).

        Args:
            harmful: layer -> ``[n, D]`` pooled representations of harmful prompts (current model).
            harmless: layer -> ``[m, D]`` pooled representations of harmless prompts (current model).
            ref_harmful: layer -> ``[n, D]`` the same from the reference model (needed by ``rel_hinge``;
                otherwise only logged).
            ref_harmless: layer -> ``[m, D]`` likewise.
            logits: ``[B, T, V]`` current logits on harmless inputs (required when kl_weight > 0).
            ref_logits: ``[B, T, V]`` reference logits on the same inputs.
            kl_mask: ``[B, T]`` positions the KL covers (padding 0); None = all.
            refusal_logits: ``[B', T', V]`` current logits on harmful prompts + refusal targets.
            refusal_labels: ``[B', T']`` HF-style labels (-100 outside the refusal).
            pairs: ``[P, 2]`` (harmful, harmless) index pairs for distance ``pairwise``.
        """
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
        weights = self.layer_weights or {layer: 1.0 for layer in layers}
        if any(layer not in weights for layer in layers):
            raise ValueError(f"layer_weights {sorted(weights)} do not cover layers {layers}")

        terms, distances, ref_distances, norms = [], {}, {}, {}
        for layer in layers:
            raw_h, raw_s = _upcast(harmful[layer]), _upcast(harmless[layer])
            norms[layer] = _global_mean_detached(torch.linalg.vector_norm(torch.cat([raw_h, raw_s]), dim=-1))
            h, s = self._prepare(raw_h, layer), self._prepare(raw_s, layer)
            if has_ref:
                ref_h, ref_s = self._prepare(ref_harmful[layer], layer), self._prepare(ref_harmless[layer], layer)
            if self.distance == "pairwise" and pairs is not None:
                # Each pair clears its own margin: a mean of per-pair terms, additive over micro-batches.
                d_pairs = torch.linalg.vector_norm(h[pairs[:, 0]] - s[pairs[:, 1]], dim=-1)
                d_ref_pairs = (torch.linalg.vector_norm(ref_h[pairs[:, 0]] - ref_s[pairs[:, 1]], dim=-1).detach()
                               if has_ref else None)
                form = separation_form(d_pairs, self.form, d_ref=d_ref_pairs, margin=self.margin,
                                       ratio=self.margin_ratio)
                term, d = gather_with_grad(form).mean(), gather_with_grad(d_pairs).mean()
                if has_ref:
                    ref_distances[layer] = gather_with_grad(d_ref_pairs).mean()
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
        separation = torch.stack(terms).sum() / sum(weights[layer] for layer in layers)

        zero = separation.new_zeros(())
        kl = zero
        if logits is not None:
            if ref_logits is None:
                raise ValueError("the KL term needs ref_logits with logits")
            kl = global_token_mean(*kl_divergence(logits, ref_logits, kl_mask, self.kl_direction,
                                                  self.kl_temperature, reduction=self.reduction))
        elif self.kl_weight > 0:
            raise ValueError("kl_weight > 0 needs logits and ref_logits on harmless inputs (or kl_weight 0)")
        refusal = zero
        if refusal_logits is not None:
            if refusal_labels is None:
                raise ValueError("the refusal term needs refusal_labels with refusal_logits")
            refusal = global_token_mean(*causal_lm_loss(refusal_logits, refusal_labels,
                                                        reduction=self.reduction))
        elif self.refusal_weight > 0:
            raise ValueError("refusal_weight > 0 needs refusal_logits and refusal_labels")

        loss = self.separation_weight * separation + self.kl_weight * kl + self.refusal_weight * refusal
        return ES2LossOutput(loss, separation.detach(), kl.detach(), refusal.detach(), distances,
                             ref_distances, norms)


# ------------------------------------------------------------------------------------------------------------
# Circuit breakers (representation rerouting; Zou et al. 2024), a baseline under one harness


class CircuitBreakerOutput(NamedTuple):
    loss: Tensor
    reroute: Tensor  # mean relu(cos(h, h_ref)) over harmful tokens and layers
    retain: Tensor  # mean ||h - h_ref|| over harmless tokens and layers


def circuit_breaker_loss(harmful: Mapping[int, Tensor], ref_harmful: Mapping[int, Tensor], harmful_mask: Tensor,
                         harmless: Mapping[int, Tensor], ref_harmless: Mapping[int, Tensor],
                         harmless_mask: Tensor, progress: float, alpha: float) -> CircuitBreakerOutput:
    """``c_rr * mean relu(cos(h, h_ref)) + c_retain * mean ||h - h_ref||`` on per-layer ``[B, T, D]`` states.

    Harmful states are rerouted orthogonal to (or away from) what the frozen model computed; harmless ones are
    held in place. The schedule derives from training progress t in [0, 1] (never a fixed step count):
    ``c_rr = alpha * (1 - t / 2)``, ``c_retain = alpha * t / 2``. Each term is a mean over sequences of token
    means (``_reduce(..., "sequence")``), so it is additive over micro-batches.
    """
    def per_layer(states, refs, mask, token_fn):
        totals = []
        for layer in sorted(states):
            per_token = token_fn(_upcast(states[layer]), _upcast(refs[layer]).detach())
            total, count = _reduce(per_token, mask.bool(), "sequence")
            totals.append(total / count.clamp_min(1))
        return torch.stack(totals).mean()

    reroute = per_layer(harmful, ref_harmful, harmful_mask,
                        lambda h, r: F.relu(F.cosine_similarity(h, r, dim=-1)))
    retain = per_layer(harmless, ref_harmless, harmless_mask,
                       lambda h, r: torch.linalg.vector_norm(h - r, dim=-1))
    c_rr, c_retain = alpha * (1 - progress / 2), alpha * progress / 2
    return CircuitBreakerOutput(c_rr * reroute + c_retain * retain, reroute.detach(), retain.detach())
