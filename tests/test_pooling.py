"""Which positions each training pooling reads, on a hand-built batch whose hidden state at a column is the
column's index, so a pooled value names the positions it averaged."""

import pytest
import torch

from es2.features import collate_rows
from es2.geometry import pooled

# a trajectory row: 3 prompt tokens, a 3-token answer prefix (own tokens + injected span), a 2-token target;
# and a plain row: 4 prompt tokens, nothing after them
ROWS = [{"input_ids": [11, 12, 13, 21, 22, 23, 31, 32], "prompt_len": 3, "span": [0, 1, 0, 0, 0, 0, 0, 0],
         "loss_start": 6},
        {"input_ids": [11, 12, 13, 14], "prompt_len": 4, "span": [0, 1, 1, 0]}]


@pytest.fixture
def batch_and_states():
    batch = collate_rows(ROWS, pad_token_id=0)
    width = batch["input_ids"].shape[1]
    states = {1: torch.arange(width, dtype=torch.float32).expand(len(ROWS), width).unsqueeze(-1).clone()}
    return batch, states


def test_last_reads_the_last_prompt_token(batch_and_states):
    batch, states = batch_and_states
    assert pooled(states, batch, [1], "last")[1].flatten().tolist() == [2.0, 7.0]  # row 2 is left-padded by 4


def test_mean_reads_the_user_message(batch_and_states):
    batch, states = batch_and_states
    assert pooled(states, batch, [1], "mean")[1].flatten().tolist() == [1.0, 5.5]


def test_response_reads_the_last_prompt_token_and_the_answer_prefix_but_not_the_target(batch_and_states):
    batch, states = batch_and_states
    found = pooled(states, batch, [1], "response")[1].flatten().tolist()
    assert found == [(2 + 3 + 4 + 5) / 4, 7.0]  # no prefix: the last prompt token, as `last`
