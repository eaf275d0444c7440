"""Capability metrics: KL to the base (over prompts, or over the answers a user reads), perplexity, greedy
agreement, over-refusal, multiple-choice accuracy (the hand-written scorer; es2.mc_eval is the lm-eval one).

Conventions (as in es2.generation): prompts are one user message rendered with the chat template and the
generation prompt, tokenized with ``add_special_tokens=False``; batches are LEFT-padded with explicit position
ids (cumulative attention mask), so a padded row gives the same numbers as the row alone.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from es2.errors import DataError
from es2.features import left_pad, pad_id_of
from es2.generation import _accepts, chat_prompts
from es2.judges import is_refusal, wilson_interval
from es2.losses.tokens import kl_divergence

LETTERS = ("A", "B", "C", "D")


def benign_text() -> str:
    """The shipped benign prose (original, encyclopaedic style, ~700 words) used for perplexity."""
    return resources.files("es2.resources").joinpath("benign_text.txt").read_text(encoding="utf-8")


def mmlu_sample_path() -> Path:
    """Path of the shipped MMLU-format sample: 224 original, easy general-knowledge questions (written for
    es2, not taken from MMLU) with balanced answer letters, so a small chat model scores a floor above chance
    (25%): a drop shows lost capability."""
    return Path(str(resources.files("es2.resources").joinpath("mmlu_sample.csv")))


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _forward(model, ids, mask, positions, **kwargs):
    device = _device(model)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                 use_cache=False, **kwargs)


def _tokens(item, tokenizer) -> list[int]:
    """Token ids of a text (tokenized alone, no special tokens) or of a token-id list as it is."""
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError("string generations need a tokenizer")
        return tokenizer(item, add_special_tokens=False)["input_ids"]
    return [int(t) for t in item]


# ------------------------------------------------------------------------------------------------------------
# KL to the base model


def _reference(reference):
    """A context manager yielding the reference model: `reference` itself when it is a module, else
    ``reference()`` (a zero-argument callable returning such a context manager, e.g. LoRA adapter off)."""
    return nullcontext(reference) if isinstance(reference, torch.nn.Module) else reference()


def per_token_kl(model, reference, tokenizer, prompts: list[str], responses: list[str] | None = None,
                 batch_size: int = 8, system: str | None = None) -> float:
    """Mean per-token KL(reference || model) over benign chat-rendered prompts (+ their responses when given).

    reference: either the frozen base model itself, or a zero-argument callable returning a context manager
        that yields it, e.g. ``lambda: es2.trainer.frozen_view(peft_model)`` (LoRA model, adapter disabled).
        Distinguished by ``isinstance(reference, torch.nn.Module)``.
    Every real (non-padding) position counts, including the last prompt position (the distribution of the
    first answer token); prompt and response are tokenized separately and concatenated. Token-weighted mean
    over all sequences; 0 for a model compared with itself. NaN for no prompts.
    """
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return float("nan")
    rendered = chat_prompts(tokenizer, list(prompts), system)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if responses is not None:
        resp_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        prompt_ids = [p + r for p, r in zip(prompt_ids, resp_ids)]
    total, count = 0.0, 0.0
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(prompt_ids), batch_size):
            ids, mask, positions = left_pad(prompt_ids[start:start + batch_size], pad_id_of(tokenizer))
            logits = _forward(model, ids, mask, positions).logits
            with _reference(reference) as ref_model, _eval_mode(ref_model):
                ref_logits = _forward(ref_model, ids, mask, positions).logits
            mask = mask.to(logits.device)
            s, c = kl_divergence(logits, ref_logits.to(logits.device), mask, reduction="sum")
            total, count = total + float(s), count + float(c)
    return total / count if count else float("nan")


def _answer_logits(model, ids, mask, positions, width: int) -> torch.Tensor:
    """float32 logits at the last `width` positions that predict a token: those before each of the last
    `width` tokens (only `width + 1` positions are computed when the model takes ``logits_to_keep``)."""
    kwargs = {"logits_to_keep": width + 1} if _accepts(model, "logits_to_keep") else {}
    return _forward(model, ids, mask, positions, **kwargs).logits[:, -(width + 1):-1].float()


def answer_kl(model, reference, tokenizer, prompts: list[str], answers: list, batch_size: int = 8,
              system: str | None = None) -> dict:
    """KL(reference || model) and teacher-forced agreement over the tokens of given answers, after the prompt.

    The capability that matters is what a user reads: with `answers` the baseline's own greedy answers to
    benign prompts, this scores the model's next-token distribution at exactly those positions, answer tokens
    teacher-forced after the chat-rendered prompt. The prompt positions (which ``per_token_kl`` also counts)
    and the position after the last answer token are not scored.

    reference: as for ``per_token_kl`` (a module, or a callable returning a context manager yielding one).
    answers: strings (tokenized alone with ``add_special_tokens=False``, as ``per_token_kl``'s responses) or
        token-id lists (used as they are, e.g. the generated ids, so no decode/re-encode round trip).
    Agreement is the share of answer tokens equal to the model's argmax at the position before them: one
    early divergence costs one token here, unlike the free-running ``greedy_agreement``.
    Returns ``{"kl", "agreement"}`` (token-weighted means over all answers; NaN without answer tokens),
    ``{"kl_per_prompt", "agreement_per_prompt"}`` (each answer's token mean, in the order given, NaN for an
    empty answer: the paired outcomes for comparing two models) and ``"tokens"`` (answer tokens per prompt).
    """
    return answer_kls({"model": model}, reference, tokenizer, prompts, answers, batch_size, system)["model"]


def answer_kls(models: dict, reference, tokenizer, prompts: list[str], answers: list, batch_size: int = 8,
               system: str | None = None) -> dict[str, dict]:
    """``answer_kl`` of several models against one reference, {name: result} for `models` {name: module}: the
    reference's logits are computed once per batch for all of them."""
    if len(answers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        return {name: {"kl": float("nan"), "agreement": float("nan"), "kl_per_prompt": [],
                       "agreement_per_prompt": [], "tokens": []} for name in models}
    rendered = chat_prompts(tokenizer, list(prompts), system)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    answer_ids = [_tokens(answer, tokenizer) for answer in answers]
    sequences = [p + a for p, a in zip(prompt_ids, answer_ids)]
    kl = {name: [float("nan")] * len(prompts) for name in models}
    agree = {name: [float("nan")] * len(prompts) for name in models}
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    with ExitStack() as stack, torch.inference_mode():
        for model in models.values():
            stack.enter_context(_eval_mode(model))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            width = max(len(answer_ids[i]) for i in index)
            if width == 0:
                continue
            ids, mask, positions = left_pad([sequences[i] for i in index], pad_id_of(tokenizer))
            with _reference(reference) as ref_model, _eval_mode(ref_model):
                ref_logits = _answer_logits(ref_model, ids, mask, positions, width)
            for name, model in models.items():
                logits = _answer_logits(model, ids, mask, positions, width)
                ref = ref_logits.to(logits.device)
                targets = ids[:, -width:].to(logits.device)
                for row, i in enumerate(index):  # left padding: every row's answer ends at the last position
                    n = len(answer_ids[i])
                    if n:
                        kl[name][i] = float(kl_divergence(logits[row, -n:], ref[row, -n:]))
                        hits = logits[row, -n:].argmax(-1) == targets[row, -n:]
                        agree[name][i] = float(hits.float().mean())
    tokens = [len(a) for a in answer_ids]
    total = sum(tokens)

    def weighted(values: list[float]) -> float:
        return sum(v * n for v, n in zip(values, tokens) if n) / total if total else float("nan")

    return {name: {"kl": weighted(kl[name]), "agreement": weighted(agree[name]), "kl_per_prompt": kl[name],
                   "agreement_per_prompt": agree[name], "tokens": tokens} for name in models}


# ------------------------------------------------------------------------------------------------------------
# Perplexity


def perplexity(model, tokenizer, text: str, window: int = 256, stride: int | None = None) -> float:
    """exp(mean next-token NLL) of plain `text` (no chat template, no special tokens added), sliding window.

    Windows of `window` tokens start every `stride` tokens (default window // 2, must be < window); each
    window scores only the tokens not scored by an earlier window, so every token is scored exactly once with
    at least `window - stride` tokens of context (the HF recipe). The first token is never scored (no
    context). Needs at least 2 tokens. Use `window` <= the model's context length.
    """
    stride = stride or max(1, window // 2)
    if window < 2 or not 1 <= stride < window:
        raise ValueError(f"need window >= 2 and 1 <= stride < window (windows must overlap so every token "
                         f"but the first has context); got window={window}, stride={stride}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if len(ids) < 2:
        raise ValueError(f"text has {len(ids)} tokens; perplexity needs at least 2")
    device = _device(model)
    nll, scored, prev_end = 0.0, 0, 1  # token 0 is never a target
    with _eval_mode(model), torch.inference_mode():
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            chunk = ids[begin:end].to(device)[None]
            logits = model(input_ids=chunk, use_cache=False).logits[0, :-1].float()
            targets = chunk[0, 1:]
            lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
            new = end - prev_end  # targets at absolute positions prev_end..end-1
            if new > 0:
                nll -= float(lp[-new:].sum())
                scored += new
                prev_end = end
            if end == len(ids):
                break
    return math.exp(nll / scored)


# ------------------------------------------------------------------------------------------------------------
# Greedy agreement and over-refusal


def agreement(a, b, tokenizer=None, n_tokens: int = 32) -> float:
    """Position-wise agreement of the first `n_tokens` tokens of two generations (strings, re-tokenized, or
    token-id lists): matches / min(n_tokens, longer length). A position only one of them reaches is a
    mismatch (one stopped early); two empty generations agree (1.0)."""
    ta, tb = _tokens(a, tokenizer)[:n_tokens], _tokens(b, tokenizer)[:n_tokens]
    longer = max(len(ta), len(tb))
    if longer == 0:
        return 1.0
    return sum(x == y for x, y in zip(ta, tb)) / longer


def greedy_agreement(model_generations: list, base_generations: list, tokenizer=None,
                     n_tokens: int = 32) -> float:
    """Mean over pairs of ``agreement`` (first `n_tokens` tokens) between the model's and the base's greedy
    generations for the same prompts; NaN for no pairs."""
    if len(model_generations) != len(base_generations):
        raise ValueError(f"{len(model_generations)} model generations but {len(base_generations)} base ones")
    if not model_generations:
        return float("nan")
    scores = [agreement(a, b, tokenizer, n_tokens) for a, b in zip(model_generations, base_generations)]
    return sum(scores) / len(scores)


def over_refusal(generations: list[str], judge: str | Callable[[str], bool] = "jbb") -> dict[str, float]:
    """Refusal rate on safe ("sounds dangerous but is safe", e.g. XSTest safe) prompts' generations.

    judge: a keyword list name for es2.judges.is_refusal (``jbb`` / ``qi``) or a callable text -> bool.
    Returns ``{"rate", "refusals", "n", "ci_low", "ci_high"}`` (Wilson 95%); rate NaN for no generations.
    """
    flag = judge if callable(judge) else (lambda text: is_refusal(text, judge))
    refusals = sum(bool(flag(text)) for text in generations)
    n = len(generations)
    low, high = wilson_interval(refusals, n)
    return {"rate": refusals / n if n else float("nan"), "refusals": refusals, "n": n,
            "ci_low": low, "ci_high": high}


# ------------------------------------------------------------------------------------------------------------
# Multiple choice (MMLU format)


def load_mc_csv(path) -> list[dict]:
    """Questions from an MMLU-format file: ``{"question", "choices" (4 strings), "answer" (0-3), "subject"}``.

    A CSV, JSON, JSON Lines or Parquet file (es2.data.readers; the Hugging Face Hub serves MMLU as Parquet).
    Columns: ``question``; the options as ``choice0..choice3`` or ``A..D`` (either case), or one ``choices``
    column holding the four (the Hub's layout); ``answer`` as an index 0-3 or a letter A-D (either case).
    ``subject`` is optional (empty when absent); other columns are ignored. Raises DataError naming the file, the
    row and the columns on bad input.
    """
    from es2.data.readers import file_kind, read_rows  # BOM, empty file, unquoted commas, bad JSON -> DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found", "check the multiple-choice file's path")
    header, rows = read_rows(path, file_kind(path, "csv"))
    lower = {name.lower(): name for name in header}
    fix = ("use MMLU format: question,choice0,choice1,choice2,choice3,answer (answer 0-3 or A-D), "
           "or A,B,C,D as option columns, or a choices column holding the four")
    if "question" not in lower or "answer" not in lower:
        missing = [c for c in ("question", "answer") if c not in lower]
        raise DataError(f"{path}: missing column(s) {missing}; found {header}", fix)
    for names in (("choice0", "choice1", "choice2", "choice3"), ("a", "b", "c", "d"), ("choices",)):
        if all(name in lower for name in names):
            choice_cols = [lower[name] for name in names]
            break
    else:
        raise DataError(f"{path}: no option columns (choice0..choice3, A..D or choices); found {header}", fix)
    if not rows:
        raise DataError(f"{path}: has a header but no questions", "add at least one question row")
    questions = []
    for where, row in rows:
        question = _cell(row, lower["question"])
        if not question:
            raise DataError(f"{path}: {where}: empty question", "fill in or remove the row")
        if len(choice_cols) == 1:
            options = row.get(choice_cols[0])
            if not isinstance(options, list) or len(options) != 4:
                raise DataError(f"{path}: {where}: column {choice_cols[0]!r} holds {options!r}, not four options",
                                "give each question a list of exactly four options")
            choices = [str(option).strip() for option in options]
        else:
            choices = [_cell(row, col) for col in choice_cols]
        raw = _cell(row, lower["answer"])
        if raw.upper() in LETTERS:
            answer = LETTERS.index(raw.upper())
        elif raw.isdigit() and int(raw) < 4:
            answer = int(raw)
        else:
            column = lower["answer"]
            raise DataError(f"{path}: {where}: answer {raw!r} in column {column!r} is not 0-3 or A-D",
                            "write the correct option's index (0-3) or letter (A-D)")
        subject = _cell(row, lower["subject"]) if "subject" in lower else ""
        questions.append({"question": question, "choices": choices, "answer": answer, "subject": subject})
    return questions


def _cell(row: dict, column: str) -> str:
    """A cell as stripped text: a Parquet or JSON file gives numbers (the answer index 0 among them) and nulls."""
    value = row.get(column)
    return "" if value is None else str(value).strip()
