"""Circuit breakers (representation rerouting; Zou et al. 2024), the baseline trained under the same harness.

    loss = c_rr * mean relu(cos(h, h_ref)) over harmful tokens + c_retain * mean ||h - h_ref|| over harmless ones
    c_rr = alpha * (1 - t / 2),  c_retain = alpha * t / 2,  t in [0, 1] the training progress

Harmful states are rerouted orthogonal to (or away from) what the frozen model computed; harmless ones are held
in place. Each term is a mean over layers of a mean over sequences of token means, so it is additive over
equal-sized micro-batches and shards (DDP's gradient average is exact without any collective here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from es2.losses.options import upcast
from es2.losses.tokens import reduce_tokens


class CircuitBreakerOutput(NamedTuple):
    loss: Tensor
    reroute: Tensor  # mean relu(cos(h, h_ref)) over harmful tokens and layers
    retain: Tensor  # mean ||h - h_ref|| over harmless tokens and layers


def _per_layer_mean(states: Mapping[int, Tensor], refs: Mapping[int, Tensor], mask: Tensor,
                    token_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Mean over layers of the per-sequence token mean of ``token_fn(state, detached reference)``."""
    totals = []
    for layer in sorted(states):
        per_token = token_fn(upcast(states[layer]), upcast(refs[layer]).detach())
        total, count = reduce_tokens(per_token, mask.bool(), "sequence")
        totals.append(total / count.clamp_min(1))
    return torch.stack(totals).mean()


def circuit_breaker_loss(harmful: Mapping[int, Tensor], ref_harmful: Mapping[int, Tensor], harmful_mask: Tensor,
                         harmless: Mapping[int, Tensor], ref_harmless: Mapping[int, Tensor],
                         harmless_mask: Tensor, progress: float, alpha: float) -> CircuitBreakerOutput:
    """The loss above on per-layer ``[B, T, D]`` states and ``[B, T]`` token masks.

    The schedule derives from training progress t in [0, 1] (never a fixed step count).
    """
    reroute = _per_layer_mean(harmful, ref_harmful, harmful_mask,
                              lambda h, r: F.relu(F.cosine_similarity(h, r, dim=-1)))
    retain = _per_layer_mean(harmless, ref_harmless, harmless_mask,
                             lambda h, r: torch.linalg.vector_norm(h - r, dim=-1))
    c_rr, c_retain = alpha * (1 - progress / 2), alpha * progress / 2
    return CircuitBreakerOutput(c_rr * reroute + c_retain * retain, reroute.detach(), retain.detach())
