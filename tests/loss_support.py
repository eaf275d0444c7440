"""What the loss tests share (tests/test_loss_terms.py, test_loss_objectives.py, test_loss_distributed.py): a
fixed torch seed for every test, and the running example of the distance tests as the `sets` fixture. A test
module imports the fixtures by name, which is how pytest finds them there (`_seed` is autouse: importing it
seeds every test of that module).

Running example (D = 2):
    H = [[1, 0], [3, 0]]   mu_H = (2, 0)   tr Sigma_H = ((1-2)^2 + (3-2)^2) / 2 = 1
    S = [[0, 0], [0, 2]]   mu_S = (0, 1)   tr Sigma_S = ((0-1)^2 + (2-1)^2) / 2 = 1
    mu_H - mu_S = (2, -1), ||.|| = sqrt(5)
    ||h_i - s_j||: h1-s1 = 1, h1-s2 = sqrt(1 + 4) = sqrt(5), h2-s1 = 3, h2-s2 = sqrt(9 + 4) = sqrt(13)
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Registered as `sets` under another Python name, so that a test's `sets` argument does not shadow the import.
@pytest.fixture(name="sets")
def sets_fixture() -> tuple[torch.Tensor, torch.Tensor]:
    """(H, S) of the running example."""
    return torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
