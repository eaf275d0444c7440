"""Tokenised training examples and the collator that lays out one concatenated [harmful; harmless] batch.

An example is a pair: a harmful prompt (optionally followed by a response, e.g. a refusal target) and a
harmless prompt (optionally followed by a response). Prompts are rendered with the model's chat template and
the generation prompt, so the representation position (`rep_index`) is the last token of the template, the
position SCAV-style attacks perturb. Batches are left-padded with explicit position ids, so a sequence's
states do not depend on how much padding its batch needed.
"""

from __future__ import annotations

import hashlib

import torch

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, I won't help with this because it could cause serious harm.",
    "I cannot help with that. If you are in danger or crisis, please contact local emergency services.",
    "I cannot provide that. It could be used to hurt people.",
    "Sorry, I can't help with this one. I'm happy to help with something else, though.",
    "I'm sorry, but that could put people at risk, so I will not explain it.",
    "I do not give instructions for that. If someone is at risk, please contact the appropriate authorities.",
)


def pick_by_key(options, key: str) -> str:
    """One of `options` chosen deterministically from an example's id (varied targets, reproducible)."""
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def refusal_for(key: str) -> str:
    """A refusal string chosen from the example's id."""
    return pick_by_key(REFUSALS, key)


def encode_chat(tokenizer, prompt: str, response: str | None = None, max_length: int = 256,
                prefix: str | None = None, eos: bool = True) -> dict:
    """Token ids of the rendered user turn (+ assistant prefix + response and end-of-turn), the prompt length,
    the user span and where the loss starts.

    prefix: assistant text that comes first in the answer but carries no loss (for trajectory training: the
        model's own first s tokens and an injected span). It sits between the prompt and the response; the
        labels start after it (`loss_start`), while `prompt_len` (hence rep_index and the prompt mask) stays
        at the end of the rendered prompt. Prompt, prefix and response are tokenized separately (no merge
        across the seams), so the labelled ids are exactly `tokenizer(response [+ eos])`.
    eos: append the end-of-turn token to the response (False for a continuation that may have been cut off).

    Over-long inputs lose response tokens first, then prefix tokens from the end, then prompt tokens from the
    left, so the template tail that carries the representation is always kept. Without a prefix the result is
    the same as before prefixes existed, plus `loss_start` == `prompt_len`.
    """
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.rfind(prompt)
    span = [int(start <= a and b <= start + len(prompt) and b > a) for a, b in enc["offset_mapping"]]
    ids = enc["input_ids"]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    prefix_ids = prefix_ids[: max(0, max_length - len(ids))]
    response_ids = []
    if response is not None:
        response_ids = tokenizer(response + (tokenizer.eos_token if eos else ""),
                                 add_special_tokens=False)["input_ids"]
        response_ids = response_ids[: max(0, max_length - len(ids) - len(prefix_ids))]
    if len(ids) > max_length:
        ids, span = ids[-max_length:], span[-max_length:]
    extra = prefix_ids + response_ids
    return {"input_ids": ids + extra, "prompt_len": len(ids), "span": span + [0] * len(extra),
            "loss_start": len(ids) + len(prefix_ids)}


def pad_id_of(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token (padding is masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token-id sequences into one batch: input_ids, attention_mask and position_ids, long [N, T].

    Every row ends at the last column, so each row's next token is read at index -1. The attention mask is 1
    on real tokens; the position ids count from 0 at each row's first real token (0 on padding), so a row's
    outputs do not depend on how much padding its batch needed. An empty sequence is a row of padding.
    """
    width = max((len(seq) for seq in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def collate(features: list[dict], pad_token_id: int) -> dict:
    """Stack B pair features into 2B left-padded rows: harmful rows first, then harmless ones (`collate_rows`),
    with ref_reps [2B, L, D] when the features carry precomputed reference representations."""
    rows = [f["harmful"] for f in features] + [f["harmless"] for f in features]
    batch = collate_rows(rows, pad_token_id)
    if "ref_reps" in features[0]["harmful"]:
        batch["ref_reps"] = torch.stack([torch.as_tensor(r["ref_reps"]) for r in rows])
    return batch


def collate_rows(rows: list[dict], pad_token_id: int) -> dict:
    """Stack encoded rows (`encode_chat`) into N left-padded rows.

    Returns input_ids, attention_mask, position_ids [N, T]; rep_index [N] (last prompt token); span_mask
    [N, T] (user-message tokens); labels [N, T] (response tokens from `loss_start` on, -100 elsewhere, so an
    assistant prefix carries no loss); prompt_mask [N, T] (the rendered prompt only).
    """
    ids, mask, positions = left_pad([r["input_ids"] for r in rows], pad_token_id)
    width = ids.shape[1]
    batch = {"input_ids": ids, "attention_mask": mask,
             **{key: torch.zeros(len(rows), width, dtype=torch.long) for key in ("span_mask", "prompt_mask")}}
    batch["labels"] = torch.full((len(rows), width), -100, dtype=torch.long)
    batch["rep_index"] = torch.zeros(len(rows), dtype=torch.long)
    for i, row in enumerate(rows):
        pad = width - len(row["input_ids"])
        batch["span_mask"][i, pad:] = torch.tensor(row["span"])
        batch["prompt_mask"][i, pad:pad + row["prompt_len"]] = 1
        loss_start = pad + row.get("loss_start", row["prompt_len"])
        batch["labels"][i, loss_start:] = ids[i, loss_start:]
        batch["rep_index"][i] = pad + row["prompt_len"] - 1
    batch["position_ids"] = positions
    return batch


def lm_inputs(batch: dict, rows: slice = slice(None)) -> dict:
    """The subset of a collated batch a causal LM's forward takes."""
    return {k: batch[k][rows] for k in ("input_ids", "attention_mask", "position_ids")}
