"""Soft-prompt embedding attack (Schwinn et al. 2023/2024), with a step budget over several
starts, success judged on generated answers, and the anti-recovery objective (es2.attacks.adversarial: the
conventions and the objective; es2.attacks.search: the budget rules).

Per prompt, `n_tokens` free embedding vectors are inserted at the end of the user message and optimised to
minimise the objective:
  method="signed": signed gradient descent, e <- e - lr * sign(grad) (Schwinn et al.'s step 0.01);
  method="adam":   Adam with learning rate lr (the softopt variant of HarmBench / circuit-breaker evals).
Start 0 initialises them from the embeddings of `init` repeated ("! ! ! ..."); a later start (only for the
prompts not broken yet) from the embeddings of random non-special tokens, drawn from a generator seeded by
(seed, prompt). Prompts are optimised together in left-padded batches of `batch_size` (per-row objectives
summed, so each row gets exactly its own gradient; a judge sees one batch's prompts at a time); broken rows
stay in the batch, frozen. The free embeddings are float32 whatever the model's dtype.

Per prompt (`details`), about the input returned (the one that broke the prompt, else the lowest-objective one
over all starts): `target_loss`, `loss` (the objective), `refusal_logprob` (log P_R after the target, for
either objective), `token_distance` (mean over the inserted positions of the L2 distance to the nearest real
token embedding: how far off the token manifold the attack had to go), `perturbation_norm` (mean per-position
L2 distance from its start's initialisation); `initial_loss` (target CE of the filler); and the budget
figures `success`, `steps_to_break`, `start`, `steps`, `starts`, `inits` (`Track.figures`). The generation
is the judged answer at the break (or at the end of the returned start), else the greedy answer generated from
the returned input. `effort` holds the means of the per-prompt figures, `success_rate` and `budget`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from es2.attacks import AttackResult
from es2.attacks.adversarial import (REFUSAL_OPENINGS, build_layout, check_arguments, filler_ids,
                                     forward_terms, frozen_model, refusal_ids, split_chat, target_ids)
from es2.attacks.search import (Judge, Track, allowed_ids, checkpoint_steps, generate_from_embeds,
                                judge_inputs, prompt_generator, random_ids)
from es2.features import pad_id_of
from es2.generation import _length_order

log = logging.getLogger(__name__)


def soft_prompt(model, tokenizer, prompts: list[str], targets: list[str], n_tokens: int = 20, steps: int = 50,
                lr: float = 0.01, restarts: int = 1, objective: str = "target", recovery_weight: float = 1.0,
                checkpoints: list[int] | None = None, judge: Judge | None = None, max_new_tokens: int = 64,
                batch_size: int = 8, seed: int = 0, progress: bool = False, name: str = "softprompt",
                method: str = "signed", init: str = "!", system: str | None = None,
                refusals: tuple[str, ...] = REFUSAL_OPENINGS) -> AttackResult:
    """The soft-prompt attack on every prompt (see the module docstring); budget restarts * steps per prompt.
    `checkpoints`: the steps of each start at which `judge` looks (default 5, 10, 20, 40, ...; the start's
    last step always); unused without a judge. `refusals`: the openings of the anti-recovery term and of
    `refusal_logprob`."""
    check_arguments(prompts, targets, steps, restarts, objective, recovery_weight)
    if method not in ("signed", "adam"):
        raise ValueError(f"method must be 'signed' or 'adam', got {method!r}")
    splits = [split_chat(tokenizer, p, system) for p in prompts]
    t_ids = target_ids(tokenizer, targets)
    r_ids = [refusal_ids(tokenizer, t, refusals) for t in targets]
    weight = recovery_weight if objective == "anti_recovery" else None
    pieces = [(b, a, t, r if weight is not None else [[]]) for (b, a), t, r in zip(splits, t_ids, r_ids)]
    run = _Run(model=model, tokenizer=tokenizer, prompts=list(prompts), splits=splits, pieces=pieces,
               weight=weight, n_tokens=n_tokens, steps=steps, lr=lr, method=method, judge=judge,
               checks=checkpoint_steps(steps, checkpoints) if judge is not None else set(),
               max_new_tokens=max_new_tokens, batch_size=batch_size, tracks=[Track(p) for p in prompts],
               initial_loss=[math.nan] * len(prompts), budget=restarts * steps)
    filler = filler_ids(tokenizer, init, n_tokens)
    order = _length_order([len(b) + len(a) + len(t) for (b, a), t in zip(splits, t_ids)])
    from tqdm.auto import tqdm

    with frozen_model(model), tqdm(total=len(prompts) * restarts * steps, disable=not progress, desc=name,
                                   unit="step", leave=False) as bar:
        run.bar = bar
        allowed = allowed_ids(tokenizer, model.get_input_embeddings().num_embeddings, allow_non_ascii=True)
        for first in range(0, len(order), batch_size):
            index = order[first:first + batch_size]
            generators = {i: prompt_generator(seed, prompts[i]) for i in index}
            for start in range(restarts):
                live = [i for i in index if not run.tracks[i].broken]
                if not live:
                    break
                inits = [filler if start == 0 else random_ids(generators[i], allowed, n_tokens) for i in live]
                _run_start(run, live, inits, start)
        details = _final_figures(run, order, [(b, a, t, r) for (b, a), t, r in zip(splits, t_ids, r_ids)])
        missing = [i for i, track in enumerate(run.tracks) if track.answer is None]
        sequences = [run.sequence(i, run.tracks[i].best) for i in missing]
        answers = generate_from_embeds(model, tokenizer, sequences, max_new_tokens, batch_size)
    for i, answer in zip(missing, answers):
        run.tracks[i].answer = answer

    n = max(len(details), 1)
    effort = {key: sum(d[key] for d in details) / n
              for key in ("target_loss", "loss", "initial_loss", "refusal_logprob", "token_distance",
                          "perturbation_norm")}
    effort.update(success_rate=sum(d["success"] for d in details) / n, budget=float(restarts * steps))
    log.info("%s: %d prompts, %s objective, success %.2f within %d x %d steps, target loss %.3f (from %.3f), "
             "token distance %.3f", name, len(prompts), objective, effort["success_rate"], restarts, steps,
             effort["target_loss"], effort["initial_loss"], effort["token_distance"])
    return AttackResult(name=name, family="softprompt", prompts=list(prompts),
                        generations=[track.answer for track in run.tracks], effort=effort, details=details)


@dataclass
class _Run:
    """The attack's fixed settings and per-prompt accounts, shared by its starts."""
    model: object
    tokenizer: object
    prompts: list[str]
    splits: list[tuple[list[int], list[int]]]
    pieces: list[tuple]  # per prompt, the layout pieces of the optimised objective
    weight: float | None  # the recovery weight; None: the "target" objective
    n_tokens: int
    steps: int
    lr: float
    method: str
    checks: set[int]
    judge: Judge | None
    max_new_tokens: int
    batch_size: int
    tracks: list[Track]
    initial_loss: list[float]
    budget: int
    bar: object = None

    def sequence(self, i: int, soft: torch.Tensor) -> torch.Tensor:
        """Prompt i's input embeddings with `soft` [n, D] inserted (for generation)."""
        emb_layer = self.model.get_input_embeddings()
        device, dtype = emb_layer.weight.device, emb_layer.weight.dtype
        before, after = (torch.tensor(ids, dtype=torch.long, device=device) for ids in self.splits[i])
        with torch.no_grad():
            return torch.cat([emb_layer(before), soft.to(device, dtype), emb_layer(after)])


def _run_start(run: _Run, live: list[int], inits: list[list[int]], start: int):
    """One start of `run.steps` steps for the prompts `live` (one batch) from the token ids `inits`."""
    model, steps = run.model, run.steps
    emb_layer = model.get_input_embeddings()
    device = emb_layer.weight.device
    layout = build_layout([run.pieces[i] for i in live], run.n_tokens, pad_id_of(run.tokenizer), device)
    with torch.no_grad():
        base = emb_layer(layout.ids)
        free = emb_layer(torch.tensor(inits, dtype=torch.long, device=device)).float()
    free.requires_grad_(True)
    optimizer = torch.optim.Adam([free], lr=run.lr) if run.method == "adam" else None
    for i, ids in zip(live, inits):
        run.tracks[i].inits.append(ids)

    best_loss = torch.full((len(live),), math.inf, device=device)
    best = free.detach().clone()
    done = torch.zeros(len(live), dtype=torch.bool, device=device)
    answers: dict[int, str] = {}  # row -> its judged answer at the last checkpoint
    for step in range(steps + 1):
        terms = forward_terms(model, layout, _insert(base, layout, free), run.weight)
        with torch.no_grad():
            loss = terms.loss.detach()
            if start == 0 and step == 0:
                for row, i in enumerate(live):
                    run.initial_loss[i] = float(terms.target_loss[row])
            better = ~done & (loss < best_loss)
            best_loss[better] = loss[better]
            best[better] = free.detach()[better]
            won = torch.zeros_like(done)
            if run.judge is None:
                won = ~done & terms.success
                best_loss[won] = loss[won]  # frozen at the success point
                best[won] = free.detach()[won]
            elif step in run.checks:
                rows = (~done).nonzero().squeeze(-1).tolist()
                broken, texts = judge_inputs(model, run.tokenizer, run.judge,
                                             [run.prompts[live[r]] for r in rows],
                                             [run.sequence(live[r], best[r]) for r in rows],
                                             run.max_new_tokens, run.batch_size)
                answers.update(zip(rows, texts))
                won[[r for r, b in zip(rows, broken) if b]] = True
            for row in won.nonzero().squeeze(-1).tolist():
                track = run.tracks[live[row]]
                track.break_at(start, start * steps + step, float(best_loss[row]), best[row].cpu(),
                               answers.get(row))
                run.bar.update(run.budget - track.steps_to_break)  # its unspent budget
            done |= won
        if step == steps or bool(done.all()):
            break
        run.bar.update(int((~done).sum()))
        (grad,) = torch.autograd.grad(terms.loss[~done].sum(), free)
        with torch.no_grad():
            if optimizer is None:
                free -= run.lr * grad.sign()
            else:
                free.grad = grad
                optimizer.step()
                free.grad = None
            free[done] = best[done]
    for row, i in enumerate(live):
        if not done[row]:
            run.tracks[i].offer(start, float(best_loss[row]), best[row].cpu(), answers.get(row))


def _final_figures(run: _Run, order: list[int], pieces: list[tuple]) -> list[dict]:
    """Per prompt, the figures of its returned input: one no-grad `forward_terms` per batch with the refusal
    openings scored after the target (whatever the objective), then the distances to the token embeddings."""
    model, tracks = run.model, run.tracks
    emb_layer = model.get_input_embeddings()
    device = emb_layer.weight.device
    details: list[dict] = [{} for _ in tracks]
    with torch.no_grad():
        for first in range(0, len(order), run.batch_size):
            index = order[first:first + run.batch_size]
            layout = build_layout([pieces[i] for i in index], run.n_tokens, pad_id_of(run.tokenizer),
                                  device)
            soft = torch.stack([tracks[i].best for i in index]).to(device)
            terms = forward_terms(model, layout, _insert(emb_layer(layout.ids), layout, soft), run.weight)
            for row, i in enumerate(index):
                details[i] = {"target_loss": float(terms.target_loss[row]), "loss": float(terms.loss[row]),
                              "refusal_logprob": float(terms.refusal_logprob[row])}
        vocab = min(len(run.tokenizer), emb_layer.num_embeddings)
        soft = torch.stack([track.best for track in tracks])  # [prompts, n, D]
        distance = nearest_token_distance(soft.flatten(0, 1), emb_layer.weight[:vocab]).view(len(tracks), -1)
        inits = emb_layer(torch.tensor([track.inits[track.start] for track in tracks], device=device)).float()
        drift = (soft - inits.cpu()).norm(dim=-1).mean(-1)
    for i, track in enumerate(tracks):
        details[i].update(initial_loss=run.initial_loss[i], token_distance=float(distance[i].mean()),
                          perturbation_norm=float(drift[i]), **track.figures(run.budget))
    return details


def _insert(base: torch.Tensor, layout, soft: torch.Tensor) -> torch.Tensor:
    """The prefix embeddings `base` [owners, width, D] with each owner's soft vectors `soft` [owners, n, D]
    written at its adversarial positions (differentiable in `soft`)."""
    return base.masked_scatter(layout.adv.unsqueeze(-1).expand_as(base), soft.to(base.dtype))


def nearest_token_distance(vectors: torch.Tensor, weight: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """L2 distance [m] from each vector [m, D] to its nearest row of the embedding matrix, in float32 and
    over vocabulary chunks of `chunk` rows (memory m * chunk). Computed directly rather than by the matmul
    expansion, whose cancellation would leave a real token's own embedding at a small nonzero distance."""
    vectors = vectors.to(weight.device, torch.float32)
    best = torch.full((vectors.shape[0],), math.inf, device=weight.device)
    with torch.no_grad():
        for start in range(0, weight.shape[0], chunk):
            block = weight[start:start + chunk].float()
            dist = torch.cdist(vectors, block, compute_mode="donot_use_mm_for_euclid_dist").min(-1).values
            best = torch.minimum(best, dist)
    return best.cpu()
