"""Batched greedy generation and teacher-forced sequence log-probabilities for chat models.

Conventions shared by every function here:
  - A prompt is one user message; it is rendered with the tokenizer's chat template and the generation
    prompt (`chat_prompts`), then tokenized with `add_special_tokens=False`: the template already writes
    any BOS token, and adding it again would shift every position.
  - Batches are LEFT-padded by `es2.features.left_pad` (every sequence ends at index -1, so new tokens line
    up); the tokenizer never pads, so its `padding_side` does not matter.
  - Inputs are sorted by token length (longest first) so each batch holds similar lengths and the largest
    batch runs first (an out-of-memory error shows up at once); results come back in the caller's order.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

from es2.features import left_pad, pad_id_of


def chat_prompts(tokenizer, prompts: list[str], system: str | None = None) -> list[str]:
    """Render each prompt as a one-turn chat (optional system message first) ending with the generation
    prompt."""
    rendered = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": prompt})
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _length_order(lengths: list[int]) -> list[int]:
    """Indices sorted longest first (stable, so equal lengths keep their order)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="prompt", leave=False)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             prefill: list[str] | None = None, progress: bool = True, system: str | None = None,
             chat: bool = True, around_batch: Callable[[list[int]], AbstractContextManager] | None = None
             ) -> list[str]:
    """Greedy continuations of `prompts`, one string each, in the order given: `generate_ids` decoded with
    special tokens (EOS, padding) dropped."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, prefill, progress, system, chat,
                       around_batch)
    return tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []


def generate_ids(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
                 prefill: list[str] | None = None, progress: bool = True, system: str | None = None,
                 chat: bool = True, around_batch: Callable[[list[int]], AbstractContextManager] | None = None
                 ) -> list[list[int]]:
    """The new token ids of greedy continuations of `prompts`, one list each, in the order given, as the model
    wrote them (a row that stopped before its batch did is padded with the pad id after its EOS).

    Greedy decoding never looks ahead, so the first s ids of a continuation are exactly what the same call
    with `max_new_tokens=s` writes: one long call can stand for several shorter ones on the same prompts.

    prefill: one string per prompt, appended after the generation prompt as if the assistant had written
        it (the prefilling attack); it conditions the continuation but is not part of the returned text.
        The rendered prompt and its prefill are tokenized together, as `tokenizer(rendered + prefill)`.
    chat: False treats `prompts` as already-rendered text (no chat template applied).
    around_batch: called with the prompt indices (caller's order) of each batch; the generation of that batch
        runs inside the context manager it returns (representation attacks use it to know which prompt each
        row of their hooked forwards belongs to).
    Uses the KV cache, `do_sample=False`, under inference mode.
    """
    if prefill is not None and len(prefill) != len(prompts):
        raise ValueError(f"prefill has {len(prefill)} strings for {len(prompts)} prompts")
    if not prompts:
        return []
    texts = chat_prompts(tokenizer, prompts, system) if chat else list(prompts)
    if prefill is not None:
        texts = [text + pre for text, pre in zip(texts, prefill)]
    device, pad_id = _device(model), pad_id_of(tokenizer)
    outputs: list[list[int]] = [[] for _ in texts]
    with torch.inference_mode():
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        order = _length_order([len(ids) for ids in encoded])
        with _progress(len(texts), progress, "generate") as bar:
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                # no position ids: generate derives them from the attention mask, at every decoding step
                ids, mask, _ = left_pad([encoded[i] for i in index], pad_id)
                with around_batch(index) if around_batch is not None else nullcontext():
                    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                         pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
                for i, row in zip(index, out[:, ids.shape[1]:].tolist()):
                    outputs[i] = row
                bar.update(len(index))
    return outputs


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def sequence_logprob(model, tokenizer, prompts: list[str], continuations: list[str], batch_size: int = 16,
                     system: str | None = None, chat: bool = True) -> torch.Tensor:
    """Teacher-forced sum over the continuation's tokens of log p(token | chat-rendered prompt, earlier ones).

    Prompt and continuation are tokenized separately (no merge across the boundary), so the scored tokens are
    exactly `tokenizer(continuation, add_special_tokens=False)`. Sequences are left-padded with explicit
    position ids (cumulative attention mask), so a padded row scores the same as the row alone. An empty
    continuation scores 0. Returns a float32 CPU tensor of shape [n], in the order given.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if not prompts:
        return torch.zeros(0)
    texts = chat_prompts(tokenizer, prompts, system) if chat else list(prompts)
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    if any(not p for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the first continuation token needs context)")
    sequences = [p + c for p, c in zip(prompt_ids, cont_ids)]
    device, pad_id = _device(model), pad_id_of(tokenizer)
    keep_logits = _accepts(model, "logits_to_keep")
    result = torch.zeros(len(texts), dtype=torch.float32)
    order = _length_order([len(s) for s in sequences])
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            n_cont = max(len(cont_ids[i]) for i in index)
            if n_cont == 0:
                continue
            ids, mask, position_ids = left_pad([sequences[i] for i in index], pad_id)
            scored = torch.zeros((len(index), n_cont), dtype=torch.bool)  # over the last n_cont positions
            for row, i in enumerate(index):
                if cont_ids[i]:
                    scored[row, n_cont - len(cont_ids[i]):] = True
            kwargs = {"logits_to_keep": n_cont + 1} if keep_logits else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=position_ids.to(device), use_cache=False, **kwargs).logits
            # logits at position t predict token t+1: the last n_cont targets use logits[-n_cont-1:-1].
            logits = logits[:, -(n_cont + 1):-1].float()
            targets = ids[:, -n_cont:].to(logits.device)
            token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            # where, not multiply: a padding position's logits may be NaN, and NaN * 0 is still NaN.
            sums = torch.where(scored.to(logits.device), token_lp, 0.0).sum(-1).cpu()
            for row, i in enumerate(index):
                result[i] = sums[row]
    return result
