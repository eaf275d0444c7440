"""Capability metrics: KL to the base, perplexity, greedy agreement, over-refusal, multiple-choice accuracy.

Conventions (as in es2.generation): prompts are one user message rendered with the chat template and the
generation prompt, tokenized with ``add_special_tokens=False``; batches are LEFT-padded with explicit position
ids (cumulative attention mask), so a padded row gives the same numbers as the row alone.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from es2.errors import DataError
from es2.generation import _accepts, chat_prompts
from es2.judges import is_refusal, wilson_interval
from es2.loss import kl_divergence

LETTERS = ("A", "B", "C", "D")


def benign_text() -> str:
    """The shipped benign prose (original, encyclopaedic style, ~700 words) used for perplexity."""
    return resources.files("es2.resources").joinpath("benign_text.txt").read_text(encoding="utf-8")


def mmlu_sample_path() -> Path:
    """Path of the shipped original 40-question MMLU-format sample (general knowledge)."""
    return Path(str(resources.files("es2.resources").joinpath("mmlu_sample.csv")))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids (0 at each row's first real token) for left padding."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


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


# ------------------------------------------------------------------------------------------------------------
# KL to the base model


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
    is_model = isinstance(reference, torch.nn.Module)
    ref_ctx: Callable = (lambda: nullcontext(reference)) if is_model else reference
    rendered = chat_prompts(tokenizer, list(prompts), system)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if responses is not None:
        resp_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        prompt_ids = [p + r for p, r in zip(prompt_ids, resp_ids)]
    total, count = 0.0, 0.0
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(prompt_ids), batch_size):
            ids, mask, positions = _left_pad(prompt_ids[start:start + batch_size], _pad_id(tokenizer))
            logits = _forward(model, ids, mask, positions).logits
            with ref_ctx() as ref_model, _eval_mode(ref_model):
                ref_logits = _forward(ref_model, ids, mask, positions).logits
            mask = mask.to(logits.device)
            s, c = kl_divergence(logits, ref_logits.to(logits.device), mask, reduction="sum")
            total, count = total + float(s), count + float(c)
    return total / count if count else float("nan")


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


def _tokens(item, tokenizer) -> list[int]:
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError("string generations need a tokenizer")
        return tokenizer(item, add_special_tokens=False)["input_ids"]
    return [int(t) for t in item]


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
    """Questions from an MMLU-format CSV: ``{"question", "choices" (4 strings), "answer" (0-3), "subject"}``.

    Columns: ``question``; the options as ``choice0..choice3`` or ``A..D`` (either case); ``answer`` as an
    index 0-3 or a letter A-D (either case). ``subject`` is optional (empty when absent); other columns are
    ignored. Raises DataError naming the file, the row and the columns on bad input.
    """
    from es2.data.importers import _read_csv  # BOM, empty file, unquoted commas, invalid CSV -> DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found", "check the multiple-choice CSV path")
    header, rows = _read_csv(path)
    lower = {name.lower(): name for name in header}
    fix = ("use MMLU format: question,choice0,choice1,choice2,choice3,answer (answer 0-3 or A-D), "
           "or A,B,C,D as option columns")
    if "question" not in lower or "answer" not in lower:
        missing = [c for c in ("question", "answer") if c not in lower]
        raise DataError(f"{path}: missing column(s) {missing}; found {header}", fix)
    for names in (("choice0", "choice1", "choice2", "choice3"), ("a", "b", "c", "d")):
        if all(name in lower for name in names):
            choice_cols = [lower[name] for name in names]
            break
    else:
        raise DataError(f"{path}: no option columns (choice0..choice3 or A..D); found {header}", fix)
    if not rows:
        raise DataError(f"{path}: has a header but no questions", "add at least one question row")
    questions = []
    for where, row in rows:
        question = (row.get(lower["question"]) or "").strip()
        if not question:
            raise DataError(f"{path}: {where}: empty question", "fill in or remove the row")
        choices = [(row.get(col) or "").strip() for col in choice_cols]
        raw = (row.get(lower["answer"]) or "").strip()
        if raw.upper() in LETTERS:
            answer = LETTERS.index(raw.upper())
        elif raw.isdigit() and int(raw) < 4:
            answer = int(raw)
        else:
            column = lower["answer"]
            raise DataError(f"{path}: {where}: answer {raw!r} in column {column!r} is not 0-3 or A-D",
                            "write the correct option's index (0-3) or letter (A-D)")
        subject = (row.get(lower["subject"]) or "").strip() if "subject" in lower else ""
        questions.append({"question": question, "choices": choices, "answer": answer, "subject": subject})
    return questions


def mc_prompt(question: dict) -> str:
    """The user message: question, the four options as ``A. ...`` lines, then ``Answer:``."""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, question["choices"]))
    return f"{question['question']}\n{options}\nAnswer:"


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of the four answer letters: ``A``..``D`` when each is one token, else `` A``..`` D``.

    The answer is the first assistant token after the chat generation prompt (which ends in a newline for
    ChatML-style templates), so the bare letter is the natural form and is tried first.
    """
    for variant in (LETTERS, tuple(f" {letter}" for letter in LETTERS)):
        ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in variant]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 4:
            return [i[0] for i in ids]
    raise ValueError("neither 'A'..'D' nor ' A'..' D' are single distinct tokens for this tokenizer")


def multiple_choice_scores(model, tokenizer, questions: list[dict], batch_size: int = 8,
                           system: str | None = None) -> torch.Tensor:
    """[n, 4] log-probabilities (over the whole vocabulary) of the four answer-letter tokens at the first
    assistant position, zero-shot, in the order given. One forward per batch (left padding, position ids)."""
    letters = letter_token_ids(tokenizer)
    if not questions:
        return torch.zeros(0, 4)
    texts = chat_prompts(tokenizer, [mc_prompt(q) for q in questions], system)
    sequences = tokenizer(texts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = torch.zeros(len(questions), 4)
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            ids, mask, positions = _left_pad([sequences[i] for i in index], _pad_id(tokenizer))
            logits = _forward(model, ids, mask, positions, **kwargs).logits[:, -1].float()
            lp = torch.log_softmax(logits, dim=-1)[:, letters].cpu()
            scores[index] = lp
    return scores


def multiple_choice_correct(model, tokenizer, questions: list[dict], batch_size: int = 8,
                            system: str | None = None) -> list[bool]:
    """Per question, whether the letter token with the highest log-likelihood (ties: the earlier letter) is the
    answer: the paired outcomes behind a comparison of two models' accuracy."""
    if not questions:
        return []
    predicted = multiple_choice_scores(model, tokenizer, questions, batch_size, system).argmax(-1)
    answers = torch.tensor([q["answer"] for q in questions])
    return (predicted == answers).tolist()


def multiple_choice_accuracy(model, tokenizer, questions: list[dict], batch_size: int = 8,
                             system: str | None = None) -> tuple[float, int]:
    """(accuracy, n) of `multiple_choice_correct`; accuracy NaN for no questions."""
    correct = multiple_choice_correct(model, tokenizer, questions, batch_size, system)
    return (sum(correct) / len(correct) if correct else float("nan")), len(correct)
