"""The one left-padding utility (es2.features.left_pad) and the pair collator built on it, on hand-written ids."""

from types import SimpleNamespace

import torch

from es2.features import collate, left_pad, pad_id_of


def test_left_pad_ends_every_row_at_the_last_column_and_counts_positions_from_its_first_token():
    ids, mask, positions = left_pad([[5, 6, 7], [8], [], [1, 2]], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9], [9, 1, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert ids.dtype == mask.dtype == positions.dtype == torch.long


def test_left_pad_of_no_sequences_is_an_empty_batch():
    assert [t.shape for t in left_pad([], pad_id=0)] == [torch.Size([0, 0])] * 3


def test_the_pad_id_is_the_pad_token_else_the_end_of_sequence_token():
    assert pad_id_of(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # id 0 is a pad token, not "none"
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2


def test_collate_lays_out_harmful_rows_then_harmless_ones_left_padded():
    # harmful: 2 prompt tokens, an unlabelled prefix token (13), a labelled response token (14);
    # harmless: 1 prompt token and a response token, loss from the end of the prompt (no loss_start)
    features = [{"harmful": {"input_ids": [11, 12, 13, 14], "prompt_len": 2, "span": [1, 1, 0, 0], "loss_start": 3},
                 "harmless": {"input_ids": [21, 22], "prompt_len": 1, "span": [1, 0]}}]
    batch = collate(features, pad_token_id=0)
    expected = {
        "input_ids": [[11, 12, 13, 14], [0, 0, 21, 22]],
        "attention_mask": [[1, 1, 1, 1], [0, 0, 1, 1]],
        "position_ids": [[0, 1, 2, 3], [0, 0, 0, 1]],
        "span_mask": [[1, 1, 0, 0], [0, 0, 1, 0]],
        "prompt_mask": [[1, 1, 0, 0], [0, 0, 1, 0]],
        "labels": [[-100, -100, -100, 14], [-100, -100, -100, 22]],
        "rep_index": [1, 2],
    }
    assert {key: value.tolist() for key, value in batch.items()} == expected
