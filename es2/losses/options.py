"""The option names the losses accept, each list written once, and the float32 upcast they all apply."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

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


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def upcast(t: Tensor) -> Tensor:
    """Half precision to float32 (distances and log-softmax are imprecise in bf16); other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
