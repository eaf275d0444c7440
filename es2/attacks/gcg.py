"""Greedy Coordinate Gradient suffix attack (Zou et al. 2023), with a step budget over several starts,
success judged on generated answers, and the anti-recovery objective (es2.attacks.adversarial: the
conventions and the objective; es2.attacks.search: the budget rules).

This is es2's own implementation: the nanogcg package (0.3.0) requires transformers<=4.47, breaks on
transformers 5's KV cache and deletes every BOS text from ChatML templates, so it is not used.

A suffix of `suffix_tokens` tokens is appended to the user message; start 0 initialises it with the filler
`init` ("! ! ! ..."), a later start (only for the prompts not broken yet) with random allowed tokens that
re-tokenize to themselves, drawn from a generator seeded by (seed, prompt). Each step: the gradient of the
objective w.r.t. the one-hot suffix; per position the `topk` most negative-gradient tokens (special and,
unless `allow_non_ascii`, non-ASCII or unprintable tokens excluded); `search_width` candidates, each one
random single-token swap; candidates whose decoded text does not re-tokenize to the same ids are dropped; the
rest are scored with the same objective in batched forwards of `batch_size` candidates (under
"anti_recovery", each candidate's refusal openings are then scored on its prefix cache, expanded to
len(openings) rows: the memory of the scoring grows with batch_size * len(openings)), and the best becomes
the current suffix (even if worse: GCG's rule). The lowest-objective suffix of a start is its best. The
prompts advance together, one step of each in turn, so that a judge sees all the prompts of a checkpoint in
one batch.

Per prompt (`details`), about the suffix returned (the one that broke the prompt, else the lowest-objective
one over all starts): `suffix`, `suffix_ids`, `attacked_prompt`, `target_loss`, `loss` (the objective),
`refusal_logprob` (log P_R after the target, for either objective); `initial_loss` (target CE of the filler),
`losses` (per start, the best objective so far after each step); and the budget figures `success`,
`steps_to_break`, `start`, `steps`, `starts`, `inits` (`Track.figures`). The generation is the judged answer
at the break (or at the end of the returned start), else the greedy answer to prompt + suffix, built from
exactly the token ids that were optimised. `effort` holds the means of the per-prompt losses, `success_rate`
and `budget`.
"""

from __future__ import annotations

import logging

import torch

from es2.attacks import AttackResult
from es2.attacks.adversarial import (REFUSAL_OPENINGS, build_layout, check_arguments, filler_ids,
                                     forward_terms, frozen_model, refusal_ids, split_chat, target_ids)
from es2.attacks.search import (Judge, Track, allowed_ids, banned_ids, checkpoint_steps, generate_from_embeds,
                                judge_inputs, prompt_generator, random_ids)
from es2.features import pad_id_of

log = logging.getLogger(__name__)

_GENERATION_BATCH = 16  # answers generated per batch at the checkpoints and at the end


def gcg(model, tokenizer, prompts: list[str], targets: list[str], steps: int = 20, search_width: int = 64,
        topk: int = 64, restarts: int = 1, objective: str = "target", recovery_weight: float = 1.0,
        checkpoints: list[int] | None = None, judge: Judge | None = None, max_new_tokens: int = 64,
        seed: int = 0, progress: bool = False, name: str = "gcg", suffix_tokens: int = 20, init: str = "!",
        batch_size: int = 128, allow_non_ascii: bool = False, system: str | None = None,
        refusals: tuple[str, ...] = REFUSAL_OPENINGS) -> AttackResult:
    """GCG on every prompt (see the module docstring); budget restarts * steps per prompt. `checkpoints`: the
    steps of each start at which `judge` looks (default 5, 10, 20, 40, ...; the start's last step always);
    unused without a judge. `refusals`: the openings of the anti-recovery term and of `refusal_logprob`."""
    check_arguments(prompts, targets, steps, restarts, objective, recovery_weight)
    weight = recovery_weight if objective == "anti_recovery" else None
    checks = checkpoint_steps(steps, checkpoints) if judge is not None else set()
    t_ids = target_ids(tokenizer, targets)
    r_ids = [refusal_ids(tokenizer, t, refusals) for t in targets]
    splits = [split_chat(tokenizer, p, system) for p in prompts]
    filler = filler_ids(tokenizer, init, suffix_tokens)
    tracks = [Track(p) for p in prompts]
    from tqdm.auto import tqdm

    with frozen_model(model), tqdm(total=len(prompts) * restarts * steps, disable=not progress, desc=name,
                                   unit="step", leave=False) as bar:
        vocab = model.get_input_embeddings().num_embeddings
        banned = banned_ids(tokenizer, vocab, allow_non_ascii)
        allowed = allowed_ids(tokenizer, vocab, allow_non_ascii)
        searches = [_Search(model, tokenizer, (b, a, t, r if weight is not None else [[]]), suffix_tokens,
                            weight, topk, search_width, batch_size, banned, prompt_generator(seed, p))
                    for p, (b, a), t, r in zip(prompts, splits, t_ids, r_ids)]
        initial_loss = [search.begin(filler) for search in searches]
        for start in range(restarts):
            live = [i for i, track in enumerate(tracks) if not track.broken]
            if not live:
                break
            for i in live:
                if start > 0:
                    searches[i].begin(searches[i].random_init(allowed))
                tracks[i].inits.append(searches[i].current.tolist())
            answers: dict[int, str] = {}  # prompt -> its judged answer at the last checkpoint
            running = list(live)
            for step in range(steps + 1):
                if step > 0:
                    for i in running:
                        searches[i].step(step)
                    bar.update(len(running))
                if judge is None:
                    won = [i for i in running if searches[i].best_success]
                elif step in checks:
                    inputs = [searches[i].sequence(searches[i].best.tolist()) for i in running]
                    broken, texts = judge_inputs(model, tokenizer, judge, [prompts[i] for i in running],
                                                 inputs, max_new_tokens, _GENERATION_BATCH)
                    answers.update(zip(running, texts))
                    won = [i for i, b in zip(running, broken) if b]
                else:
                    won = []
                for i in won:
                    search = searches[i]
                    tracks[i].break_at(start, start * steps + step, search.best_loss, search.best.tolist(),
                                       answers.get(i))
                    bar.update(restarts * steps - tracks[i].steps_to_break)  # its unspent budget
                running = [i for i in running if not tracks[i].broken]
                if not running:
                    break
            for i in running:
                tracks[i].offer(start, searches[i].best_loss, searches[i].best.tolist(), answers.get(i))

        details = [search.final_figures(track.best, refusal) for search, track, refusal
                   in zip(searches, tracks, r_ids)]
        missing = [i for i, track in enumerate(tracks) if track.answer is None]
        sequences = [searches[i].sequence(tracks[i].best) for i in missing]
        answers = generate_from_embeds(model, tokenizer, sequences, max_new_tokens, _GENERATION_BATCH)
    for i, answer in zip(missing, answers):
        tracks[i].answer = answer
    for i, (prompt, track, search) in enumerate(zip(prompts, tracks, searches)):
        suffix = tokenizer.decode(track.best)
        details[i].update(initial_loss=initial_loss[i], losses=search.history, suffix=suffix,
                          suffix_ids=list(track.best), attacked_prompt=prompt + suffix,
                          **track.figures(restarts * steps))

    n = max(len(details), 1)
    effort = {key: sum(d[key] for d in details) / n
              for key in ("target_loss", "loss", "initial_loss", "refusal_logprob")}
    effort.update(success_rate=sum(d["success"] for d in details) / n, budget=float(restarts * steps))
    log.info("%s: %d prompts, %s objective, success %.2f within %d x %d steps, target loss %.3f (from %.3f)",
             name, len(prompts), objective, effort["success_rate"], restarts, steps, effort["target_loss"],
             effort["initial_loss"])
    return AttackResult(name=name, family="gcg", prompts=list(prompts),
                        generations=[track.answer for track in tracks], effort=effort, details=details)


class _Search:
    """One prompt's GCG state: the current suffix, the best of the current start, the per-start history."""

    def __init__(self, model, tokenizer, piece, n: int, weight: float | None, topk: int, search_width: int,
                 batch_size: int, banned: torch.Tensor, generator: torch.Generator):
        self.model, self.tokenizer, self.piece, self.n, self.weight = model, tokenizer, piece, n, weight
        self.topk, self.search_width, self.batch_size = topk, search_width, batch_size
        self.generator = generator
        self.emb_layer = model.get_input_embeddings()
        self.device = self.emb_layer.weight.device
        self.banned = banned.to(self.device)
        self.layout = build_layout([piece], n, pad_id_of(tokenizer), self.device)
        self.history: list[list[float]] = []

    def begin(self, init_ids: list[int]) -> float:
        """Start from `init_ids`; returns their target loss."""
        self.current = torch.tensor(init_ids, dtype=torch.long, device=self.device)
        if not bool(_retokenizes(self.tokenizer, self.current.unsqueeze(0))[0]):
            log.warning("the initial GCG suffix %r does not re-tokenize to the same ids",
                        self.tokenizer.decode(init_ids))
        loss, target_loss, success = self.score(self.current.unsqueeze(0))
        self.best, self.best_loss, self.best_success = self.current.clone(), float(loss[0]), bool(success[0])
        self.history.append([self.best_loss])
        return float(target_loss[0])

    def random_init(self, allowed: torch.Tensor, tries: int = 20) -> list[int]:
        """Random allowed tokens that re-tokenize to themselves (the last draw if none of `tries` does)."""
        for _ in range(tries):
            ids = random_ids(self.generator, allowed, self.n)
            if bool(_retokenizes(self.tokenizer, torch.tensor([ids]))[0]):
                break
        return ids

    def step(self, step: int):
        grad = self._token_gradient()
        if self.banned.numel():
            grad[:, self.banned] = float("inf")
        top = (-grad).topk(min(self.topk, grad.shape[1]), dim=1).indices.cpu()  # [n, topk]
        width = self.search_width
        positions = torch.randint(0, self.n, (width,), generator=self.generator)
        choices = torch.randint(0, top.shape[1], (width,), generator=self.generator)
        candidates = self.current.cpu().repeat(width, 1)
        candidates[torch.arange(width), positions] = top[positions, choices]
        candidates = candidates[_retokenizes(self.tokenizer, candidates)]
        if candidates.shape[0] == 0:
            log.warning("GCG step %d: no candidate re-tokenizes identically; suffix kept", step)
        else:
            losses, _, successes = self.score(candidates.to(self.device))
            j = int(losses.argmin())
            self.current = candidates[j].to(self.device)
            if float(losses[j]) < self.best_loss:
                self.best, self.best_success = self.current.clone(), bool(successes[j])
                self.best_loss = float(losses[j])
        self.history[-1].append(self.best_loss)

    def score(self, candidates: torch.Tensor):
        """(objective, target loss, `Terms.success`) of [k, n] candidate suffixes, in batched forwards."""
        out = []
        with torch.no_grad():
            for first in range(0, candidates.shape[0], self.batch_size):
                chunk = candidates[first:first + self.batch_size]
                layout = self.layout.tile(chunk.shape[0])
                ids = layout.ids.clone()
                ids[layout.adv] = chunk.flatten()
                terms = forward_terms(self.model, layout, self.emb_layer(ids), self.weight)
                out.append((terms.loss, terms.target_loss, terms.success))
        return tuple(torch.cat(parts) for parts in zip(*out))

    def _token_gradient(self) -> torch.Tensor:
        weight = self.emb_layer.weight
        onehot = torch.nn.functional.one_hot(self.current, weight.shape[0]).to(weight.dtype)
        onehot.requires_grad_(True)
        base = self.emb_layer(self.layout.ids)
        inputs = base.masked_scatter(self.layout.adv.unsqueeze(-1).expand_as(base),
                                     onehot @ weight)
        terms = forward_terms(self.model, self.layout, inputs, self.weight)
        (grad,) = torch.autograd.grad(terms.loss.sum(), onehot)
        return grad.float()

    def sequence(self, suffix: list[int]) -> torch.Tensor:
        """The embeddings of before + suffix + after, for generation."""
        before, after = self.piece[0], self.piece[1]
        ids = torch.tensor(before + suffix + after, dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.emb_layer(ids)

    def final_figures(self, suffix: list[int], refusals: list[list[int]]) -> dict:
        """Target loss, objective and log P_R of `suffix` (the openings scored whatever the objective)."""
        before, after, target, _ = self.piece
        layout = build_layout([(before, after, target, refusals)], self.n, pad_id_of(self.tokenizer),
                              self.device)
        ids = layout.ids.clone()
        ids[layout.adv] = torch.tensor(suffix, device=self.device)
        with torch.no_grad():
            terms = forward_terms(self.model, layout, self.emb_layer(ids), self.weight)
        return {"target_loss": float(terms.target_loss[0]), "loss": float(terms.loss[0]),
                "refusal_logprob": float(terms.refusal_logprob[0])}


def _retokenizes(tokenizer, candidates: torch.Tensor) -> torch.Tensor:
    """Bool [k]: the candidate's decoded text tokenizes back to exactly the same ids."""
    rows = candidates.tolist()
    again = tokenizer(tokenizer.batch_decode(rows), add_special_tokens=False)["input_ids"]
    return torch.tensor([a == r for a, r in zip(again, rows)], dtype=torch.bool)
