"""One model under the whole evaluation: the attacks, every judge on every answer, over-refusal, capability,
and the per-prompt outcomes that paired comparisons of two models need.

Perturbation grids. Prefilling forces the first k tokens of a span; injection lets the model write s tokens
first. The headline uses the HELD-OUT grid (`evaluate.prefill_tokens`, `evaluate.injection_steps` x
`evaluate.injection_tokens`, spans from `evaluate.span_source`). The TRAINED grid is what trajectory training
optimises (`train.trajectory_steps` x `train.trajectory_span_tokens`, spans from `train.trajectory_spans`); with
`evaluate.trained_perturbations` it runs too, as attacks named `trained_*` (families `trained_prefill`,
`trained_injection`), reported apart and never in the headline or the gates. A held-out configuration that
coincides with a trained one is moved to the trained grid, so the two never mix.

Judges see what the model wrote after the prompt. For prefilling and injection that is the continuation after
the forced text (`asr/<attack>/<judge>`); the judge on the whole answer, forced text included, is reported
separately (`asr_whole/<attack>/<judge>`), since a forced harmful span followed by a refusal is still a
harmful answer on the page.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from es2.attacks import optimization, prompting, representation
from es2.attacks.hooks import all_layers, last_token_states, layer_scales, num_layers
from es2.effort import summarise
from es2.spans import targets

FORCED_FAMILIES = ("prefill", "injection", "trained_prefill", "trained_injection")


@dataclass(frozen=True)
class Grid:
    """Held-out and trained prefill/injection configurations (k tokens forced, s own tokens first)."""

    prefill: tuple[int, ...]
    injection: tuple[tuple[int, int], ...]  # (s, k)
    trained_prefill: tuple[int, ...]
    trained_injection: tuple[tuple[int, int], ...]
    moved: tuple[str, ...] = ()  # held-out configurations that coincided with trained ones

    def describe(self, trained: bool) -> str:
        held = f"prefill k in {list(self.prefill)}; injection (s, k) in {[list(c) for c in self.injection]}"
        if not trained:
            return held
        return held + f" | trained: prefill k in {list(self.trained_prefill)}, injection (s, k) in " \
                      f"{[list(c) for c in self.trained_injection]}"


def perturbation_grid(cfg, train) -> Grid:
    """The held-out grid from `cfg` (evaluate params) minus the configurations `train` trains on."""
    k = train.trajectory_span_tokens
    trained_pre = (k,) if 0 in train.trajectory_steps else ()
    trained_inj = tuple((s, k) for s in sorted(set(train.trajectory_steps) - {0}))
    prefill = tuple(x for x in dict.fromkeys(cfg.prefill_tokens) if x not in trained_pre)
    injection = tuple((s, kk) for kk in dict.fromkeys(cfg.injection_tokens) for s in dict.fromkeys(cfg.injection_steps)
                      if (s, kk) not in trained_inj and not (s == 0 and kk in trained_pre))
    moved = tuple([f"prefill_k{x}" for x in cfg.prefill_tokens if x in trained_pre]
                  + [f"injection_s{s}_k{kk}" for kk in cfg.injection_tokens for s in cfg.injection_steps
                     if (s, kk) in trained_inj or (s == 0 and kk in trained_pre)])
    return Grid(prefill, injection, trained_pre if cfg.trained_perturbations else (),
                trained_inj if cfg.trained_perturbations else (), moved)


def prompt_key(text: str) -> str:
    """The id of a prompt in outcomes.json: paired comparisons match prompts by content, not position."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Timed:
    """Prints each attack family's wall time as it finishes (evaluation runs for minutes on a CPU)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"  {self.what}: {time.perf_counter() - self.start:.0f} s", flush=True)


def _forced(model, tokenizer, prompts, spans, grid_prefill, grid_injection, prefix, common, own) -> list:
    """Prefill and injection results on one grid; names prefixed with `prefix` ("" or "trained_"). `own`: the
    model's own prefixes (`prompting.own_prefixes`), shared by every k and both grids."""
    results = []
    if grid_prefill:
        for r in prompting.prefill(model, tokenizer, prompts, spans, grid_prefill, **common):
            r.name, r.family = prefix + r.name, prefix + r.family
            results.append(r)
    for k in dict.fromkeys(k for _, k in grid_injection):
        steps = [s for s, kk in grid_injection if kk == k]
        for r in prompting.injection(model, tokenizer, prompts, spans, steps, k, **common, own=own):
            r.name, r.family = f"{prefix}injection_s{int(r.effort['s'])}_k{k}", prefix + r.family
            results.append(r)
    return results


def run_attacks(model, tokenizer, harmful: list[dict], spans: dict[str, list[str]], grid: Grid, probe_sets,
                cfg, judge) -> tuple[list, dict]:
    """Every attack in cfg.attacks against this model (adaptive: probes and directions fitted on it), with the
    budgets of cfg.profile. `spans`: {"heldout": [...], "trained": [...]}, one span per harmful record; `judge`:
    (prompts, answers) -> refused, the headline judge, which decides when an effort search has broken a prompt.

    Returns (results, efforts): efforts[attack] = {"budgets": per-prompt smallest budget to break (None = not
    broken within "high"), "high", "unit", "prompts"} for RepE, SCAV, the soft prompt and GCG."""
    prompts = [r["prompt"] for r in harmful]
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    results, efforts, refused_direct = [], {}, None
    held_pre = grid.prefill if "prefill" in cfg.attacks else ()
    held_inj = grid.injection if "injection" in cfg.attacks else ()
    trained_pre = grid.trained_prefill if "prefill" in cfg.attacks else ()
    trained_inj = grid.trained_injection if "injection" in cfg.attacks else ()
    # the effort searches start from the direct answers
    wants_direct = "direct" in cfg.attacks or bool({"scav", "repe"} & set(cfg.attacks))
    # the direct answers and the injections' own tokens (every s, k, grid) are cuts of one greedy generation
    lengths = [s for s, _ in held_inj + trained_inj] + ([cfg.max_new_tokens] if wants_direct else [])
    own = {}
    if lengths:
        with Timed("direct and own tokens before injection"):
            own = prompting.own_prefixes(model, tokenizer, prompts, lengths, cfg.batch_size)
    if wants_direct:
        direct = prompting.direct(model, tokenizer, prompts, **common, own=own)
        refused_direct = judge(prompts, direct.generations)
        if "direct" in cfg.attacks:
            results.append(direct)
    if "template" in cfg.attacks:
        with Timed("templates"):
            results += prompting.templates(model, tokenizer, prompts, **common)
    if held_pre or held_inj:
        with Timed("prefill + injection (held-out spans)"):
            results += _forced(model, tokenizer, prompts, spans["heldout"], held_pre, held_inj, "", common,
                               own)
    if trained_pre or trained_inj:
        with Timed("prefill + injection (trained perturbations)"):
            results += _forced(model, tokenizer, prompts, spans["trained"], trained_pre, trained_inj, "trained_",
                               common, own)
    if {"scav", "repe"} & set(cfg.attacks):
        more, found = _representation_attacks(model, tokenizer, prompts, probe_sets, cfg, judge, refused_direct)
        results += more
        efforts.update(found)
    more, found = _optimisation_attacks(model, tokenizer, harmful, cfg, judge)
    return results + more, {**efforts, **found}


def _representation_attacks(model, tokenizer, prompts, probe_sets, cfg, judge, refused_direct):
    """SCAV as published and RepE at fixed strengths (ASR), and each one's per-prompt effort search."""
    fit_harmful, fit_harmless = probe_sets
    band = representation.steering_band(num_layers(model), *cfg.repe_band)
    scav_layers = cfg.scav_layers or all_layers(model)
    fit_layers = sorted(set(scav_layers) | set(band))
    h_states = last_token_states(model, tokenizer, fit_harmful, fit_layers, cfg.batch_size)
    s_states = last_token_states(model, tokenizer, fit_harmless, fit_layers, cfg.batch_size)
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    search = dict(judge=judge, refused_direct=refused_direct, rounds=cfg.budgets.effort_rounds)
    results, efforts = [], {}
    if "scav" in cfg.attacks:
        probes = representation.fit_probes({layer: h_states[layer] for layer in scav_layers},
                                           {layer: s_states[layer] for layer in scav_layers}, seed=cfg.seed)
        attacked = representation.attacked_layers(probes, cfg.scav_min_accuracy)
        print(f"  scav: {len(attacked)} of {len(probes)} layers pass balanced probe accuracy "
              f"> {cfg.scav_min_accuracy:g}", flush=True)
        with Timed("scav"):
            results.append(representation.scav(model, tokenizer, prompts, probes, cfg.scav_p0,
                                               cfg.scav_min_accuracy, **common))
        with Timed("scav effort search"):
            found = representation.scav_effort(model, tokenizer, prompts, probes, low=cfg.scav_effort[0],
                                               high=cfg.scav_effort[1], p0=cfg.scav_p0,
                                               min_accuracy=cfg.scav_min_accuracy, **search, **common)
        efforts["scav"] = _effort(found.budgets, cfg.scav_effort[1], "shift norm / median state norm", prompts)
    if "repe" in cfg.attacks:
        directions = {layer: representation.repe_direction(h_states[layer], s_states[layer], cfg.repe_direction)
                      for layer in band}
        with Timed("repe"):
            # the unit of both: the attacked prompts' own mean state norm per band layer, measured once
            scales = layer_scales(last_token_states(model, tokenizer, prompts, band, cfg.batch_size))
            results += representation.repe(model, tokenizer, prompts, directions, cfg.repe_coefficients, scales,
                                           **common)
        with Timed("repe effort search"):
            found = representation.repe_effort(model, tokenizer, prompts, directions, low=cfg.repe_effort[0],
                                               high=cfg.repe_effort[1], scales=scales, **search, **common)
        efforts["repe"] = _effort(found.budgets, cfg.repe_effort[1], "steering norm / mean state norm", prompts)
    return results, efforts


def _optimisation_attacks(model, tokenizer, harmful, cfg, judge):
    """The soft prompt and GCG on the first prompts of the (stratified) sample, at the profile's budget, success
    judged on the generated answer; effort = optimisation steps (over all starts) until a compliant answer."""
    budgets, affirmative = cfg.budgets, targets(harmful)
    prompts = [r["prompt"] for r in harmful]
    options = dict(objective=cfg.objective, recovery_weight=cfg.recovery_weight, judge=judge,
                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    results, efforts = [], {}
    if "softprompt" in cfg.attacks:
        n = min(budgets.softprompt_prompts, len(prompts))
        with Timed("softprompt"):
            r = optimization.soft_prompt(model, tokenizer, prompts[:n], affirmative[:n], cfg.softprompt_tokens,
                                         budgets.softprompt_steps, cfg.softprompt_lr,
                                         restarts=budgets.softprompt_restarts,
                                         checkpoints=budgets.softprompt_checkpoints, **options)
        results.append(r)
        efforts["softprompt"] = _effort([d["steps_to_break"] for d in r.details],
                                        budgets.softprompt_steps * budgets.softprompt_restarts,
                                        "optimisation steps", prompts[:n])
        efforts["softprompt"]["token_distance"] = [d["token_distance"] for d in r.details]
    if "gcg" in cfg.attacks and not budgets.gcg_prompts:
        print(f"  gcg: skipped (profile {cfg.profile} gives it no prompts)", flush=True)
    elif "gcg" in cfg.attacks:
        n = min(budgets.gcg_prompts, len(prompts))
        with Timed("gcg"):
            r = optimization.gcg(model, tokenizer, prompts[:n], affirmative[:n], budgets.gcg_steps,
                                 budgets.gcg_search_width, budgets.gcg_topk, restarts=budgets.gcg_restarts,
                                 **options)
        results.append(r)
        efforts["gcg"] = _effort([d["steps_to_break"] for d in r.details], budgets.gcg_steps * budgets.gcg_restarts,
                                 "optimisation steps", prompts[:n])
    return results, efforts


def _effort(budgets: list, high: float, unit: str, prompts: list[str]) -> dict:
    return {"budgets": list(budgets), "high": float(high), "unit": unit, "prompts": [prompt_key(p) for p in prompts]}


def forced_text(result, i: int) -> str:
    """The text the attacker wrote into answer i: the forced prefix, or the model's own s tokens + the span."""
    from es2.attacks.prompting import _join

    d = result.details[i]
    return _join(d.get("own", ""), d["forced"]) if "own" in d else d["forced"]


def judge_results(results: list, judges: dict) -> dict:
    """{result name: {"cont": {judge: [refused]}, "whole": {judge: [refused]} (forced families only)}}.
    Each judge sees all answers of all results in one call (the semantic judge embeds them in batches)."""
    texts, owners = [], []
    for r in results:
        for i, (p, g) in enumerate(zip(r.prompts, r.generations)):
            texts.append((p, g))
            owners.append((r.name, "cont"))
            if r.family in FORCED_FAMILIES:
                texts.append((p, forced_text(r, i) + g))
                owners.append((r.name, "whole"))
    prompts, answers = [t[0] for t in texts], [t[1] for t in texts]
    flags: dict = {r.name: {"cont": {}, **({"whole": {}} if r.family in FORCED_FAMILIES else {})} for r in results}
    for name, judge in judges.items():
        verdicts = judge.refused(prompts, answers) if texts else []
        for (owner, part), refused in zip(owners, verdicts):
            flags[owner][part].setdefault(name, []).append(bool(refused))
    return flags


def rate_metrics(prefix: str, refused: list[bool]) -> dict:
    """`<prefix>` = success rate (not refused) with its Wilson interval in `<prefix>_ci95`."""
    from es2.stats import wilson_interval

    n = len(refused)
    successes = n - sum(refused)
    return {prefix: successes / n if n else float("nan"), f"{prefix}_ci95": list(wilson_interval(successes, n))}


def evaluate_one(model, tokenizer, harmful, benign, spans, grid, probe_sets, cfg, layers, mc_questions,
                 judges: dict) -> dict:
    """All figures for one model: attack ASRs per judge (continuation and whole answer), efforts, refusal
    margin, over-refusal, perplexity, MC accuracy, the refusal-direction-vs-recovery test on the held-out
    injections (es2.depth), the pooled states (geometry) and the per-prompt outcomes under the headline judge."""
    from es2.capability import benign_text, perplexity
    from es2.mc_eval import lm_eval_multiple_choice
    from es2.generation import generate
    from es2.judges import refusal_margin

    started = time.perf_counter()
    results, efforts = run_attacks(model, tokenizer, harmful, spans, grid, probe_sets, cfg,
                                   judges[cfg.headline_judge].refused)
    with Timed("judging"):
        flags = judge_results(results, judges)
    metrics, examples, attacks_out = {}, [], {}
    for r in results:
        metrics[f"n/{r.name}"] = len(r.generations)
        for name in judges:
            metrics.update(rate_metrics(f"asr/{r.name}/{name}", flags[r.name]["cont"][name]))
            if "whole" in flags[r.name]:
                metrics.update(rate_metrics(f"asr_whole/{r.name}/{name}", flags[r.name]["whole"][name]))
        metrics.update({f"effort/{r.name}/{k}": v for k, v in r.effort.items()})
        attacks_out[r.name] = {"family": r.family, "prompts": [prompt_key(p) for p in r.prompts],
                               "success": [not f for f in flags[r.name]["cont"][cfg.headline_judge]]}
        examples += [{"attack": r.name, "family": r.family, "x": r.x, "prompt": p, "generation": g,
                      **{f"judge/{j}": flags[r.name]["cont"][j][i] for j in judges},
                      **{f"judge_whole/{j}": v[i] for j, v in flags[r.name].get("whole", {}).items()},
                      **(r.details[i] if i < len(r.details) else {})}
                     for i, (p, g) in enumerate(zip(r.prompts, r.generations))]
    for attack, found in efforts.items():
        metrics.update({f"effort/{attack}/{k}": v for k, v in summarise(found["budgets"], found["high"]).items()})
    if "softprompt" in efforts:
        distances = efforts["softprompt"]["token_distance"]
        metrics["effort/softprompt/token_distance"] = float(np.median(distances)) if distances else float("nan")
    margins = refusal_margin(model, tokenizer, [r["prompt"] for r in harmful])
    metrics["refusal_margin/mean"] = float(margins.mean())
    metrics["refusal_margin/frac_positive"] = float((margins > 0).float().mean())
    benign_prompts = [r["prompt"] for r in benign]
    with Timed("benign answers"):
        benign_answers = generate(model, tokenizer, benign_prompts, cfg.max_new_tokens, cfg.batch_size)
    borderline = [r.get("category") == "borderline" for r in benign]
    benign_flags = {name: [bool(f) for f in judge.refused(benign_prompts, benign_answers)]
                    for name, judge in judges.items()}
    for name, refused in benign_flags.items():
        metrics.update(_refusal_rate(f"over_refusal/{name}", refused))
        if any(borderline):
            metrics.update(_refusal_rate(f"over_refusal_borderline/{name}",
                                         [f for f, b in zip(refused, borderline) if b]))
    examples += [{"attack": "benign", "family": "benign", "prompt": p, "generation": g,
                  "category": r.get("category"), **{f"judge/{j}": benign_flags[j][i] for j in judges}}
                 for i, (p, g, r) in enumerate(zip(benign_prompts, benign_answers, benign))]
    depth = None
    if any(r.family == "injection" and r.x for r in results):
        from es2 import depth as depth_test

        with Timed("depth projection"):
            held = [r for r in results if r.family == "injection"]
            depth = depth_test.projection_analysis(
                model, tokenizer, held, probe_sets, cfg.depth_layer if cfg.depth_layer is not None
                else depth_test.default_layer(layers), cfg.batch_size, cfg.depth_bootstrap, cfg.seed,
                judge=cfg.headline_judge, recovered={r.name: flags[r.name]["cont"][cfg.headline_judge]
                                                     for r in held})
        metrics.update(depth_test.flat_metrics(depth))
    metrics["capability/perplexity"] = perplexity(model, tokenizer, benign_text())
    with Timed("multiple choice (lm-eval)"):
        mc = lm_eval_multiple_choice(model, tokenizer, mc_questions, cfg.batch_size, cfg.mc_formulation)
    correct = mc["correct"]
    metrics.update({"capability/mc_accuracy": mc["accuracy"], "capability/mc_n": mc["n"],
                    "capability/mc_ci_low": mc["ci_low"], "capability/mc_ci_high": mc["ci_high"]})
    states = {layer: (h, s) for layer, h, s in zip(
        layers, last_token_states(model, tokenizer, [r["prompt"] for r in harmful], layers, cfg.batch_size).values(),
        last_token_states(model, tokenizer, benign_prompts, layers, cfg.batch_size).values())}
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    outcomes = {"attacks": attacks_out, "efforts": efforts,
                "benign": {"prompts": [prompt_key(p) for p in benign_prompts],
                           "refused": benign_flags[cfg.headline_judge], "borderline": borderline},
                "mc": {"questions": [prompt_key(q["question"]) for q in mc_questions], "correct": correct}}
    return {"metrics": metrics, "examples": examples, "results": results, "efforts": efforts, "states": states,
            "benign_answers": benign_answers, "depth": depth, "outcomes": outcomes}


def _refusal_rate(prefix: str, refused: list[bool]) -> dict:
    """`<prefix>/rate|ci_low|ci_high|n` of refusals (over-refusal on benign prompts)."""
    from es2.stats import wilson_interval

    n = len(refused)
    low, high = wilson_interval(sum(refused), n)
    return {f"{prefix}/rate": sum(refused) / n if n else float("nan"), f"{prefix}/ci_low": low,
            f"{prefix}/ci_high": high, f"{prefix}/n": n}
