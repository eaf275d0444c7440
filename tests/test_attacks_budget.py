"""The optimisation attacks' budget (judged checkpoints, restarts, steps_to_break), the anti-recovery
objective (and its shared-prefix computation against a plain forward per opening) and the token-distance
figure, on tiny random models."""

import math

import pytest
import torch

from es2.attacks.adversarial import (REFUSAL_OPENINGS, build_layout, filler_ids, forward_terms, log1mexp,
                                     refusal_ids)
from es2.attacks.gcg import _Search
from es2.attacks.optimization import frozen_model, gcg, soft_prompt, split_chat
from es2.attacks.search import banned_ids
from es2.attacks.softprompt import _insert, nearest_token_distance
from es2.generation import chat_prompts
from es2.modeling import load_causal_lm

from tests.test_attacks_optimization import PROMPTS, TARGETS

FAST = dict(max_new_tokens=4, batch_size=4)  # one batch: the judge sees all prompts of a checkpoint at once


@pytest.fixture(scope="module")
def recovering_lm(tiny_model_dir):
    """The tiny model trained (60 Adam steps, < 1 s) to answer each prompt with its target, then " I'm
    sorry": a model that passes the target-only objective and refuses right after the affirmative opening."""
    model, tok = load_causal_lm(str(tiny_model_dir))
    rows = []
    for prompt, target in zip(PROMPTS, TARGETS):
        [chat] = chat_prompts(tok, [prompt])
        head = tok(chat, add_special_tokens=False)["input_ids"]
        rows.append((head, tok(target, add_special_tokens=False)["input_ids"]
                     + tok(" I'm sorry", add_special_tokens=False)["input_ids"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = 0.0
        for head, answer in rows:
            ids = torch.tensor([head + answer])
            labels = ids.clone()
            labels[0, :len(head)] = -100
            loss = loss + model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, tok


class RecordingJudge:
    """Refuses the prompts in `refuse` (all when None) and records every call."""

    def __init__(self, refuse=None):
        self.refuse, self.calls = refuse, []

    def __call__(self, prompts, answers):
        self.calls.append((list(prompts), list(answers)))
        return [self.refuse is None or p in self.refuse for p in prompts]


@pytest.mark.parametrize("attack", ["softprompt", "gcg"])
def test_a_compliant_answer_breaks_every_prompt_at_the_first_checkpoint(lm, attack):
    model, tok = lm
    judge = RecordingJudge(refuse=set())
    result = _run(attack, model, tok, steps=8, restarts=2, checkpoints=[3, 6], judge=judge)
    assert len(judge.calls) == 1 and judge.calls[0][0] == PROMPTS
    for info in result.details:
        assert info["success"] and info["steps_to_break"] == info["steps"] == 3
        assert info["start"] == 0 and info["starts"] == 1
    assert result.generations == judge.calls[0][1]  # the answer at the break
    assert result.effort["success_rate"] == 1.0 and result.effort["budget"] == 16


@pytest.mark.parametrize("attack", ["softprompt", "gcg"])
def test_a_judge_that_refuses_everything_censors_every_prompt_at_the_budget(lm, attack):
    model, tok = lm
    judge = RecordingJudge()
    result = _run(attack, model, tok, steps=4, restarts=2, checkpoints=[2], judge=judge)
    assert len(judge.calls) == 2 * 2  # steps 2 and 4 of each start
    for info in result.details:
        assert not info["success"] and info["steps_to_break"] is None
        assert info["steps"] == 8 and info["starts"] == len(info["inits"]) == 2
        assert info["start"] in (0, 1)
    # every returned answer is one the judge saw at the end of the returned start
    end_of_start = {0: judge.calls[1][1], 1: judge.calls[3][1]}
    assert result.generations == [end_of_start[info["start"]][i] for i, info in enumerate(result.details)]
    assert result.effort["success_rate"] == 0.0


@pytest.mark.parametrize("attack", ["softprompt", "gcg"])
def test_only_unbroken_prompts_restart_from_a_fresh_seeded_init(lm, attack):
    model, tok = lm
    judge = RecordingJudge(refuse={PROMPTS[0]})
    result = _run(attack, model, tok, steps=4, restarts=3, checkpoints=[2], judge=judge, seed=5)
    assert [call[0] for call in judge.calls] == [PROMPTS] + [PROMPTS[:1]] * 5
    stubborn, *others = result.details
    for info in others:
        assert info["steps_to_break"] == 2 and info["starts"] == 1
    assert stubborn["steps_to_break"] is None and stubborn["steps"] == 12 and stubborn["starts"] == 3
    filler = filler_ids(tok, "!", 5)
    assert stubborn["inits"][0] == filler
    assert len({tuple(ids) for ids in stubborn["inits"]}) == 3  # each start from its own draw
    special = set(tok.all_special_ids)
    assert not special & {i for ids in stubborn["inits"] for i in ids}
    again = _run(attack, model, tok, steps=4, restarts=3, checkpoints=[2], judge=RecordingJudge({PROMPTS[0]}),
                 seed=5)
    assert again.details[0]["inits"] == stubborn["inits"] and again.generations == result.generations


def test_without_a_judge_the_target_test_misses_a_recovery_the_judge_sees(recovering_lm):
    model, tok = recovering_lm
    blind = soft_prompt(model, tok, PROMPTS[:2], TARGETS[:2], n_tokens=5, steps=0, lr=0.05, max_new_tokens=8)
    assert all(info["steps_to_break"] == 0 for info in blind.details)
    assert all("sorry" in g for g in blind.generations)
    judged = soft_prompt(model, tok, PROMPTS[:2], TARGETS[:2], n_tokens=5, steps=0, lr=0.05, max_new_tokens=8,
                         judge=lambda prompts, answers: ["sorry" in a for a in answers])
    assert all(info["steps_to_break"] is None for info in judged.details)
    # without a judge, the anti-recovery test also asks that a refusal be unlikely after the target
    anti = soft_prompt(model, tok, PROMPTS[:2], TARGETS[:2], n_tokens=5, steps=0, lr=0.05, max_new_tokens=8,
                       objective="anti_recovery")
    assert all(info["steps_to_break"] is None and info["refusal_logprob"] > -0.7 for info in anti.details)


@pytest.mark.parametrize("attack", ["softprompt", "gcg"])
def test_the_anti_recovery_term_lowers_the_refusal_after_the_target(recovering_lm, attack):
    model, tok = recovering_lm
    runs = {objective: _run(attack, model, tok, steps=6, restarts=1, judge=RecordingJudge(),
                            objective=objective, recovery_weight=1.0)
            for objective in ("target", "anti_recovery")}
    target, anti = ([info["refusal_logprob"] for info in runs[objective].details]
                    for objective in ("target", "anti_recovery"))
    assert all(a < t for a, t in zip(anti, target))
    assert sum(anti) < sum(target) - (2.0 if attack == "softprompt" else 0.05)
    assert all(info["target_loss"] < 0.5 for info in runs["anti_recovery"].details)  # the target still holds
    assert runs["target"].effort["loss"] == pytest.approx(runs["target"].effort["target_loss"])
    assert runs["anti_recovery"].effort["loss"] > runs["anti_recovery"].effort["target_loss"]


def test_token_distance_is_zero_on_real_tokens_and_grows_off_them(lm):
    model, tok = lm
    weight = model.get_input_embeddings().weight.detach()
    rows = weight[[5, 17, 200]]
    assert torch.equal(nearest_token_distance(rows, weight, chunk=7), torch.zeros(3))
    moved = rows + 0.1 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(0))
    assert (nearest_token_distance(moved, weight, chunk=7) > 0).all()
    assert torch.allclose(nearest_token_distance(moved, weight, chunk=7),
                          torch.cdist(moved, weight).min(-1).values, atol=1e-5)
    still = soft_prompt(model, tok, PROMPTS, TARGETS, n_tokens=5, steps=0, lr=0.05, **FAST)
    assert all(info["token_distance"] == 0 and info["perturbation_norm"] == 0 for info in still.details)
    moved = soft_prompt(model, tok, PROMPTS, TARGETS, n_tokens=5, steps=3, lr=0.05, **FAST)
    assert all(info["token_distance"] > 0 for info in moved.details)
    assert moved.effort["token_distance"] > 0


def test_gcg_suffixes_and_inits_use_only_allowed_tokens(lm):
    model, tok = lm
    result = gcg(model, tok, PROMPTS[:2], TARGETS[:2], steps=3, search_width=16, topk=16, restarts=2,
                 suffix_tokens=6, judge=RecordingJudge(), max_new_tokens=3)
    banned = set(banned_ids(tok, model.get_input_embeddings().num_embeddings, allow_non_ascii=False).tolist())
    for info in result.details:
        assert len(info["inits"]) == len(info["losses"]) == 2
        assert not banned & set(info["suffix_ids"]) and not banned & {i for ids in info["inits"] for i in ids}
        assert all(len(losses) == 4 for losses in info["losses"])


@pytest.mark.parametrize("single_token", [False, True])
def test_shared_prefix_objective_and_gradient_equal_a_forward_per_opening(recovering_lm, single_token):
    """The objective read from one prefix pass and a continuation pass on its expanded KV cache equals, in
    value and in gradient w.r.t. the soft embeddings, a plain forward of each whole sequence: prompts of
    different lengths (left padding), targets of different lengths, openings of different lengths and numbers
    per prompt (single_token: one token each, so no continuation pass), on the model that refuses after the
    target, so that P_R and its gradient are not negligible."""
    model, tok = recovering_lm
    emb = model.get_input_embeddings()
    filler = filler_ids(tok, "!", 4)
    sorry = tok(" I'm sorry", add_special_tokens=False)["input_ids"]  # the trained refusal
    pieces = []
    for i, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        before, after = split_chat(tok, prompt)
        others = [ids for ids in refusal_ids(tok, target, REFUSAL_OPENINGS) if ids != sorry]
        conts = [sorry] + others[:i]
        if single_token:
            conts = [[t] for t in dict.fromkeys(c[k] for c in conts for k in (0, -1))]
        pieces.append((before, after, tok(target, add_special_tokens=False)["input_ids"], conts))
    noise = torch.randn((len(PROMPTS), 4, emb.weight.shape[1]), generator=torch.Generator().manual_seed(0))
    free = (emb.weight[filler].detach() + 0.01 * noise).requires_grad_(True)
    with frozen_model(model):
        layout = build_layout(pieces, 4, tok.pad_token_id, "cpu")
        terms = forward_terms(model, layout, _insert(emb(layout.ids), layout, free), 0.7)
        prefixes = [torch.cat([emb(torch.tensor(b)), free[i], emb(torch.tensor(a + t))])
                    for i, (b, a, t, _) in enumerate(pieces)]
        reference = _per_opening_reference(model, prefixes, [(t, c) for *_, t, c in pieces], 0.7)
    for value, expected in zip((terms.loss, terms.target_loss, terms.refusal_logprob), reference):
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(terms.hit, reference[3])
    assert float(reference[2].detach().min()) > -3  # a likely refusal: the anti-recovery term counts
    for got, expected in ((terms.loss, reference[0]), (terms.refusal_logprob, reference[2])):
        (grad,) = torch.autograd.grad(got.sum(), free, retain_graph=True)
        (want,) = torch.autograd.grad(expected.sum(), free, retain_graph=True)
        assert want.abs().max() > 1e-2  # the gradient reaches the soft embeddings
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4)


def test_gcg_candidate_scores_equal_a_forward_per_opening(recovering_lm):
    """GCG's scoring (candidates in chunks, each with its openings on its own prefix cache) equals a plain
    forward of each whole candidate sequence."""
    model, tok = recovering_lm
    before, after = split_chat(tok, PROMPTS[0])
    t_ids = tok(TARGETS[1], add_special_tokens=False)["input_ids"]
    conts = refusal_ids(tok, TARGETS[1], REFUSAL_OPENINGS)
    vocab = model.get_input_embeddings().num_embeddings
    candidates = torch.tensor(filler_ids(tok, "!", 5)).repeat(7, 1)  # each with one random swap
    swaps = torch.randint(4, vocab, (7,), generator=torch.Generator().manual_seed(1))
    candidates[torch.arange(7), torch.arange(7) % 5] = swaps
    with frozen_model(model):
        search = _Search(model, tok, (before, after, t_ids, conts), 5, 0.7, 8, 8, 3,
                         banned_ids(tok, vocab, False), torch.Generator())
        loss, target_loss, success = search.score(candidates)  # chunks of 3, 3 and 1 candidates
        emb = model.get_input_embeddings()
        prefixes = [emb(torch.tensor(before + c + after + t_ids)) for c in candidates.tolist()]
        ref_loss, ref_target, log_p, hit = _per_opening_reference(model, prefixes, [(t_ids, conts)] * 7, 0.7)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target_loss, ref_target, atol=1e-5, rtol=1e-5)
    assert torch.equal(success, hit & (log_p < -math.log(2)))
    assert float((ref_loss - ref_target).abs().max()) > 1e-2  # the refusal term weighs in the scores


def _per_opening_reference(model, prefixes, scored, weight):
    """The anti-recovery objective computed directly, for prompts given as their prefix embeddings [L, D]
    (ending with the target) and (target ids, openings): a plain forward (no cache) of each prefix and of
    each prefix + opening, all left-padded into one batch; returns (loss, target CE, log P_R, target hit)."""
    emb = model.get_input_embeddings()
    rows = [(i, e, t) for i, (e, (t, _)) in enumerate(zip(prefixes, scored))]
    rows += [(i, torch.cat([prefixes[i], emb(torch.tensor(c))]), c)
             for i, (_, conts) in enumerate(scored) for c in conts]
    width = max(e.shape[0] for _, e, _ in rows)
    embeds = torch.stack([torch.cat([e.new_zeros(width - e.shape[0], e.shape[1]), e]) for _, e, _ in rows])
    mask = torch.stack([torch.arange(width) >= width - e.shape[0] for _, e, _ in rows]).long()
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   use_cache=False).logits.float()
    token_lp, hits = [], []
    for row, (_, _, labels) in enumerate(rows):
        predicted, labels = logits[row, width - len(labels) - 1:-1], torch.tensor(labels)
        token_lp.append(predicted.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1))
        hits.append(bool((predicted.argmax(-1) == labels).all()))
    n = len(prefixes)
    ce = torch.stack([-lp.mean() for lp in token_lp[:n]])
    per_opening = [(i, lp.sum()) for (i, _, _), lp in zip(rows[n:], token_lp[n:])]
    log_p = torch.stack([torch.stack([lp for i, lp in per_opening if i == owner]).logsumexp(0)
                         for owner in range(n)])
    return ce - weight * log1mexp(log_p), ce, log_p, torch.tensor(hits[:n])


def _run(attack, model, tok, steps, restarts, judge, checkpoints=None, seed=0, **kwargs):
    if attack == "softprompt":
        return soft_prompt(model, tok, PROMPTS, TARGETS, n_tokens=5, steps=steps, lr=0.05, restarts=restarts,
                           checkpoints=checkpoints, judge=judge, seed=seed, **FAST, **kwargs)
    return gcg(model, tok, PROMPTS, TARGETS, steps=steps, search_width=16, topk=16, restarts=restarts,
               checkpoints=checkpoints, judge=judge, seed=seed, suffix_tokens=5, max_new_tokens=4, **kwargs)
