"""The global batch from this process's shard: the one place where the losses meet several processes.

The losses in this package are single-process; the trainer calls this module once per step, at its boundary,
and hands the result to a loss, so every term is computed on the *global* batch, identically on every rank:
- batch statistics (all distances) need the representations of the whole batch: ``gather_with_grad`` is a
  differentiable all_gather (ranks may hold different numbers of rows);
- token means (KL, cross-entropy) need only the global (sum, count): ``all_reduce_sums`` adds them over ranks,
  with a differentiable all_reduce on the sum (logits are never gathered).
So a loss is, on every rank, the 1-process loss of the concatenated batch. Gradients: the backward of a
differentiable collective sums over ranks the gradients of the N identical per-rank losses, so a rank's local
inputs receive N times their true gradient; DDP (also accelerate, FSDP) *averages* parameter gradients over the
N ranks, which divides the N out again. The result equals the 1-process gradient exactly, so do not rescale by
the world size, and do not pair this with a reducer that sums gradients. ``tests/test_loss_distributed.py``
checks it with 2 gloo processes. Every rank must issue the same collectives in the same order (the same layers,
the same token terms); per-rank batch sizes may differ. On one process every function here is the identity.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor


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
    import torch.distributed.nn.functional as dist_nn  # only multi-process runs need the autograd collectives

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


def gather_layers(reps: Mapping[int, Tensor]) -> dict[int, Tensor]:
    """layer -> ``[rows, D]`` of this rank, concatenated over ranks layer by layer (in sorted layer order, so
    every rank issues the same collectives)."""
    return {layer: gather_with_grad(reps[layer]) for layer in sorted(reps)}


def all_reduce_sums(total: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """A token term's ``(sum, count)`` added over ranks; the gradient flows to ``total`` only."""
    if world_size() == 1:
        return total, count
    import torch.distributed.nn.functional as dist_nn

    count = count.detach().clone()
    dist.all_reduce(count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist_nn.all_reduce(total), count
