"""The token terms, defined once: the KL leash to the reference on harmless logits and next-token cross-entropy.

KL on harmless inputs (positions M chosen by the trainer: prompt, response or all; token mean)
    KL = tau^2 / |M| * sum_{t in M} KL_dir(t),  p = softmax(z_ref / tau), q = softmax(z_theta / tau)
    forward: KL(p || q) (distillation direction), reverse: KL(q || p). Log-space, reference detached.

Both return a token mean, or a ``(sum, count)`` pair that callers combine over micro-batches or ranks into one
mean (``reduction="sum"`` or ``"sequence"``): that pair is what the ES2 loss takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from es2.losses.options import KL_DIRECTIONS, REDUCTIONS, KLDirection, Reduction, check_choice, upcast


def reduce_tokens(per_token: Tensor, mask: Tensor, reduction: str) -> Tensor | tuple[Tensor, Tensor]:
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
            one token mean; ``es2.losses.gather.all_reduce_sums`` does ranks) or ``sequence`` (see
            ``reduce_tokens``).
    """
    check_choice("kl_direction", direction, KL_DIRECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
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
    log_q = F.log_softmax(upcast(logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(ref_logits.detach()) / temperature, dim=-1)
    if direction == "forward":
        per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    else:
        per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    # masked positions are zeroed before reduction, so a non-finite value there cannot leak in
    return reduce_tokens(torch.where(keep, per_token, 0.0) * temperature**2, keep, reduction)


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                   reduction: Reduction = "mean") -> Tensor | tuple[Tensor, Tensor]:
    """Next-token cross-entropy with HF's ``labels`` convention (``logits[:, t]`` predicts ``labels[:, t + 1]``;
    ``ignore_index`` marks prompt and padding). Used for the optional refusal term.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids aligned with the inputs.
        reduction: ``mean`` (token mean, 0 if no target), ``sum`` or ``sequence`` (see ``kl_divergence``).
    """
    check_choice("reduction", reduction, REDUCTIONS)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    targets = labels[:, 1:]
    keep = targets != ignore_index
    per_token = F.cross_entropy(upcast(logits[:, :-1]).transpose(1, 2), targets.masked_fill(~keep, 0),
                                reduction="none")
    return reduce_tokens(per_token, keep, reduction)
