"""The `evaluate` stage: is a model safer than its baseline, by how much, and at what cost, for any model on any
data.

`es2 evaluate` with no flags reads params (the DVC stage: the trained adapter against the model training
started from). With flags it evaluates any model (folder, HF id in the local cache, adapter folder, or a
registered model `models:/NAME@ALIAS` / `models:/NAME/VERSION`) on any prompt file: normalised JSONL, a
benchmark's own file, a table with a `prompt` column or one prompt per line (es2.data.importers). Prompts are
drawn stratified by category (`evaluate.seed`), so a benign set's borderline rows are always in. The attacks,
judges and perturbation grids are in es2.stages.suite; the headline (paired McNemar tests against the
baseline) in es2.headline.

Writes into OUT: headline.json (the verdict and headline rows), metrics.json (flat keys, DVC metrics:
asr/<attack>/<judge>, asr_whole/..., diff/<figure>, pvalue/<figure>, n/<figure>, ...), intervals.json (every
interval), outcomes.json (per-prompt outcomes under the headline judge, for paired tests against other runs),
examples.jsonl (every prompt, generation and judgement), asr.csv and depth.csv (DVC plots), depth_projection.json
(does the refusal-direction projection at the injection point predict recovery? see es2.depth), PNG plots and a
self-contained report.html that leads with the verdict.

Roles: `model`, `baseline` (the paired tests, KL, greedy agreement and PCA are taken against it) and `compare1`,
`compare2`, ... (evaluate.compare / --compare: further models shown side by side). Metrics of a role other than
`model` are prefixed `<role>/`.
"""

from __future__ import annotations

import json
from pathlib import Path

from es2.config import Params
from es2.data.importers import read_prompt_file
from es2.errors import ConfigError, DataError
from es2.io import write_json, write_jsonl, write_text
from es2.pipeline import stage

SURVIVAL_PLOTS = ("repe", "scav", "softprompt")  # survival_<attack>.csv, declared as plots in dvc.yaml


def load_model(spec: str, params: Params):
    """(model, tokenizer) for a model spec: `train-base`, a folder, an HF id, a peft adapter folder, or a
    registered model `models:/NAME@ALIAS` / `models:/NAME/VERSION` (downloaded once into the es2 cache)."""
    from es2.modeling import load_causal_lm

    if spec == "train-base":
        from es2.stages.train import base_model_path

        spec = base_model_path(params)
    if spec.startswith("models:/"):  # loaded with the dtype and trust_remote_code it was registered with
        from es2.tracking import load_registered_model

        return load_registered_model(spec, params.registry)
    options = {"trust_remote_code": params.model.trust_remote_code, "dtype": params.model.dtype}
    adapter_config = Path(spec) / "adapter_config.json"
    if adapter_config.exists():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model, tokenizer = load_causal_lm(base, **options)
        return PeftModel.from_pretrained(model, spec).eval(), tokenizer
    model, tokenizer = load_causal_lm(spec, params.model.revision, **options)
    return model.eval(), tokenizer


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    write_text(path, "\n".join([",".join(header)] + [",".join(str(v) for v in row) for row in rows]) + "\n")


def build_judges(cfg) -> dict:
    """The judges of `evaluate.judges`, plus the classifier and generative judges when their models are set;
    the headline judge must be among them."""
    from es2.judges import get_judge

    judges = {name: get_judge(name) for name in cfg.judges}
    if cfg.judge_model:
        judges["classifier"] = get_judge("classifier", path=cfg.judge_model)
    if cfg.generative_judge:
        judges["generative"] = get_judge("generative", path=cfg.generative_judge, template=cfg.generative_template)
    if cfg.headline_judge not in judges:
        raise ConfigError(f"evaluate.headline_judge {cfg.headline_judge!r} is not among the judges run "
                          f"({', '.join(judges)})", "add it to evaluate.judges or pick one of those")
    return judges


def _spans(params: Params, cfg, harmful_rows: list[dict], grid) -> dict[str, list[str]]:
    """Held-out spans (evaluate.span_source) and the trained grid's spans (train.trajectory_spans)."""
    from es2.spans import spans_for
    from es2.trajectories import model_identity

    base = params.model.name_or_path
    tokens = max([*grid.prefill, *(k for _, k in grid.injection), params.train.trajectory_span_tokens])

    def load():
        return load_model(base, params)

    options = dict(model_id=model_identity(base, params.model.revision), tokens=tokens, load=load,
                   batch_size=cfg.batch_size)
    held = spans_for(harmful_rows, cfg.span_source, **options)
    trained = (spans_for(harmful_rows, params.train.trajectory_spans, **options)
               if grid.trained_prefill or grid.trained_injection else held)
    return {"heldout": held, "trained": trained}


def run_evaluate(params: Params, out_dir: str | Path = stage("evaluate").out_dir, model: str | None = None,
                 baseline: str | None = "params", harmful: str | None = None, benign: str | None = None,
                 attacks: list[str] | None = None, limit: int | None = None,
                 compare: list[str] | None = None, benign_limit: int | None = None) -> dict:
    """Evaluate `model` (and `baseline`, when given, and each `compare` model: default evaluate.compare) and
    write the report; returns the flat metrics. `limit` caps the benign prompts too, unless `benign_limit`
    says how many."""
    import torch

    from es2.capability import greedy_agreement, load_mc_csv, mmlu_sample_path, per_token_kl
    from es2.stages.suite import Timed
    from es2.headline import as_metrics, effort_rows, from_outcomes, headline_rows, verdict
    from es2.modeling import resolve_layers
    from es2.report import write_report
    from es2.sampling import stratified_sample
    from es2.separation_metrics import flatten_report, layer_report, pca_scatter
    from es2.spans import check_source
    from es2.stages.baseline_cache import cached_run, run_key
    from es2.stages.suite import evaluate_one, perturbation_grid

    overrides = {"attacks": attacks, "limit": limit,
                 "benign_limit": benign_limit or (min(limit, params.evaluate.benign_limit) if limit else None)}
    cfg = params.evaluate.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    check_source(cfg.span_source)
    harmful_rows = stratified_sample(
        read_prompt_file(harmful or cfg.harmful or params.data.eval_harmful, "harmful"), cfg.limit, cfg.seed)
    benign_rows = stratified_sample(
        read_prompt_file(benign or cfg.benign or params.data.eval_harmless, "harmless"), cfg.benign_limit, cfg.seed)
    if not harmful_rows or not benign_rows:
        raise DataError(f"no prompts to evaluate: {len(harmful_rows)} harmful, {len(benign_rows)} benign",
                        "--limit and --benign-limit (evaluate.limit, evaluate.benign_limit) must be at least 1")
    judges = build_judges(cfg)
    grid = perturbation_grid(cfg, params.train)
    if grid.moved:
        print(f"  held-out grid: {', '.join(grid.moved)} coincide with the training grid; reported as trained_*",
              flush=True)
    spans = _spans(params, cfg, harmful_rows, grid) if {"prefill", "injection"} & set(cfg.attacks) else {}
    probe_sets = _probe_sets(harmful_rows, benign_rows)
    layer_spec = cfg.layers or params.train.layers  # indices or fractions, resolved on each model's depth
    mc_questions = load_mc_csv(cfg.mc_csv or mmlu_sample_path())
    specs = {"model": model or cfg.model}
    baseline = cfg.baseline if baseline == "params" else baseline
    if baseline:
        specs["baseline"] = baseline
    for i, spec in enumerate(cfg.compare if compare is None else compare, 1):
        specs[f"compare{i}"] = spec
    runs, loaded = {}, {}
    for role, spec in specs.items():
        print(f"evaluating {role}: {spec}", flush=True)
        m, tokenizer = load_model(spec, params)
        if role in ("model", "baseline"):  # kept for KL and agreement; compare models are dropped after use
            loaded[role] = (m, tokenizer)
        layers = resolve_layers(layer_spec, m, "evaluate.layers" if cfg.layers else "train.layers")

        def run(m=m, tokenizer=tokenizer, layers=layers):
            return evaluate_one(m, tokenizer, harmful_rows, benign_rows, spans, grid, probe_sets, cfg, layers,
                                mc_questions, judges)

        if role == "baseline" and cfg.reuse_baseline:
            # the settings that shape the baseline's own run; which model is evaluated beside it does not
            settings = cfg.model_dump(exclude={"model", "baseline", "compare", "reuse_baseline"})
            key = run_key(_identity(spec, params), cfg=settings, grid=grid, harmful=harmful_rows,
                          benign=benign_rows, spans=spans, probe_sets=probe_sets, layers=layers, mc=mc_questions)
            runs[role] = cached_run(key, run)
        else:
            runs[role] = run()
        runs[role]["spec"] = spec
        del m
        if role not in loaded and torch.cuda.is_available():
            torch.cuda.empty_cache()
    metrics = {**runs["model"]["metrics"], **flatten_report(layer_report(runs["model"]["states"]))}
    for role in (r for r in runs if r != "model"):
        metrics.update({f"{role}/{k}": v for k, v in runs[role]["metrics"].items()})
        metrics.update({f"{role}/{k}": v for k, v in flatten_report(layer_report(runs[role]["states"])).items()})
    plots = {}
    if "baseline" in runs:
        base = runs["baseline"]
        (model_, tokenizer), (baseline_model, _) = loaded["model"], loaded["baseline"]
        metrics["capability/prompt_kl_to_baseline"] = per_token_kl(model_, baseline_model, tokenizer,
                                                                   [r["prompt"] for r in benign_rows])
        metrics["capability/greedy_agreement"] = greedy_agreement(runs["model"]["benign_answers"],
                                                                  base["benign_answers"], tokenizer)
        with Timed("capability on answers"):
            metrics.update(_answer_capability(params, loaded, base["benign_answers"],
                                              [r["prompt"] for r in benign_rows], cfg.batch_size))
        runs["model"]["outcomes"]["kl"] = metrics["capability/kl_to_baseline"]
        for layer in runs["model"]["states"]:  # the layers resolved on the model above
            plots[f"pca_layer{layer}.png"] = pca_scatter(base["states"], runs["model"]["states"], layer,
                                                         out_dir / f"pca_layer{layer}.png",
                                                         f"layer {layer}: baseline (left) vs model (right)")
    alpha = params.registry.gates.alpha
    rows = headline_rows(from_outcomes(runs["model"]["outcomes"]),
                         from_outcomes(runs["baseline"]["outcomes"]) if "baseline" in runs else None, alpha)
    metrics.update(as_metrics(rows))
    efforts = effort_rows(runs["model"]["efforts"], runs["baseline"]["efforts"] if "baseline" in runs else None,
                          alpha)
    for e in efforts:
        metrics.update({f"effort/{e['attack']}/ratio": e["ratio"], f"pvalue/effort_{e['attack']}": e["pvalue"],
                        f"n/effort_{e['attack']}": e["n"]})
    plots.update(_survival_plots(out_dir, runs))
    sentence = verdict(rows, alpha, efforts)
    context = {"judge": cfg.headline_judge, "judges": list(judges), "span_source": cfg.span_source,
               "n_harmful": len(harmful_rows), "n_benign": len(benign_rows),
               "n_borderline": sum(r.get("category") == "borderline" for r in benign_rows),
               "heldout_grid": grid.describe(False), "trained_grid": grid.describe(True).split(" | ")[-1]
               if cfg.trained_perturbations else None, "profile": cfg.profile,
               "budgets": cfg.budgets.model_dump(), "efforts": efforts}
    _write_outputs(out_dir, runs, metrics, context, rows, sentence)
    write_report(out_dir, runs, metrics, plots, rows, sentence, alpha, context)
    return metrics


def _answer_capability(params: Params, loaded: dict, baseline_answers: list[str], prompts: list[str],
                       batch_size: int) -> dict:
    """KL and teacher-forced agreement on the answers a user reads: on the baseline's own greedy answers to the
    benign prompts, KL(baseline || model) (`kl_to_baseline`, the headline's and the gate's KL); on the shipped
    model's (model.name_or_path, before any training) own answers, KL(shipped || model) for the model and the
    baseline (`kl_to_shipped`: what the whole recipe, warm start included, cost)."""
    from es2.capability import answer_kl, answer_kls
    from es2.spans import base_model_spans
    from es2.trajectories import model_identity

    (model, tokenizer), (baseline, _) = loaded["model"], loaded["baseline"]
    out = {}
    found = answer_kl(model, baseline, tokenizer, prompts, baseline_answers, batch_size)
    out["capability/kl_to_baseline"], out["capability/answer_agreement"] = found["kl"], found["agreement"]
    shipped, shipped_tokenizer = load_model(params.model.name_or_path, params)
    if shipped_tokenizer.get_vocab() != tokenizer.get_vocab():  # another model family: no per-token KL exists
        print(f"  capability/kl_to_shipped skipped: {params.model.name_or_path} has another tokenizer than the "
              "evaluated model", flush=True)
        return out
    # cached by content like the held-out spans: they depend on the shipped weights, the prompts as the evaluated
    # tokenizer's chat template renders them, the dtype and the length, never on what was trained
    shipped_id = {**model_identity(params.model.name_or_path, params.model.revision),
                  "chat_template": tokenizer.chat_template, "dtype": params.model.dtype}
    shipped_answers = base_model_spans(prompts, shipped_id, params.evaluate.max_new_tokens,
                                       lambda: (shipped, tokenizer), batch_size, what="shipped answers")
    found = answer_kls({"": model, "baseline/": baseline}, shipped, tokenizer, prompts, shipped_answers,
                       batch_size)
    for prefix, result in found.items():
        out[f"{prefix}capability/kl_to_shipped"] = result["kl"]
        out[f"{prefix}capability/answer_agreement_to_shipped"] = result["agreement"]
    return out


def _survival_plots(out_dir: Path, runs: dict) -> dict:
    """survival_<attack>.png: share of prompts still refused against budget, every role on one plot."""
    from es2.effort import plot_survival

    plots = {}
    for attack, found in runs["model"]["efforts"].items():
        curves = {role: run["efforts"][attack]["budgets"] for role, run in runs.items() if attack in run["efforts"]}
        name = f"survival_{attack}.png"
        plots[name] = plot_survival(out_dir / name, curves, found["high"], attack, found["unit"])
    return plots


def _survival_rows(runs: dict) -> dict[str, list[list]]:
    """Per attack, the survival curves as rows (model, budget, share still refused) on a grid shared by the
    models."""
    from es2.effort import survival, survival_grid

    out = {}
    for attack, found in runs["model"]["efforts"].items():
        curves = {role: run["efforts"][attack]["budgets"] for role, run in runs.items() if attack in run["efforts"]}
        grid = survival_grid(curves, found["high"])
        out[attack] = [[role, f"{b:.4g}", f"{s:.4f}"] for role, budgets in curves.items()
                       for b, s in zip(grid, survival(budgets, grid))]
    return out


def _identity(spec: str, params: Params) -> dict:
    """What identifies the model behind a spec for the baseline cache: its resolved folder's files, or the
    registry/hub name (a registered version never changes; a hub id carries model.revision)."""
    from es2.trajectories import model_identity

    if spec == "train-base":
        from es2.stages.train import base_model_path

        spec = base_model_path(params)
    return model_identity(spec, None if Path(spec).is_dir() else params.model.revision)


def _probe_sets(harmful_rows, benign_rows) -> tuple[list[str], list[str]]:
    """Prompts to fit SCAV probes and RepE directions on: the pairs' validation split when the pipeline made
    one (never the attacked prompts), else the evaluation prompts themselves (stated in the report)."""
    from es2.data.schema import read_jsonl

    val = Path(stage("pairs").path("val.jsonl"))
    if val.exists():
        rows = read_jsonl(val)
        return (list(dict.fromkeys(r["harmful"] for r in rows)), list(dict.fromkeys(r["harmless"] for r in rows)))
    return [r["prompt"] for r in harmful_rows], [r["prompt"] for r in benign_rows]


def _write_outputs(out_dir: Path, runs: dict, metrics: dict, context: dict, rows: list, sentence: str) -> None:
    from es2.depth import plot_projection
    from es2.headline import as_dicts

    judges, headline_judge = context["judges"], context["judge"]
    write_jsonl(out_dir / "examples.jsonl", [{"role": role, **e} for role, run in runs.items()
                                             for e in run["examples"]])
    asr_rows, depth_rows = [], []
    for role, run in runs.items():
        for result in run["results"]:
            for judge in judges:
                asr_rows.append([role, result.name, judge, run["metrics"][f"asr/{result.name}/{judge}"]])
                if result.family == "injection":
                    depth_rows.append([role, judge, int(result.x), int(result.effort["k"]),
                                       run["metrics"][f"asr/{result.name}/{judge}"]])
    _csv(out_dir / "asr.csv", ["model", "attack", "judge", "asr"], asr_rows)
    _csv(out_dir / "depth.csv", ["model", "judge", "step", "k", "asr"], depth_rows)
    curves = _survival_rows(runs)
    # one file per attack (their budgets have other units); the ones dvc.yaml declares are always written, with
    # no rows when the attack did not run
    for attack in sorted(set(curves) | set(SURVIVAL_PLOTS)):
        _csv(out_dir / f"survival_{attack}.csv", ["model", "budget", "still_refused"], curves.get(attack, []))
    analyses = {role: run["depth"] for role, run in runs.items() if run.get("depth")}
    # always written (a DVC output): says so when no injection with s > 0 ran
    write_json(out_dir / "depth_projection.json",
               {"claim": "the refusal-direction projection at the injection point does not predict recovery "
                         f"(Park & Kim 2026); recovered = the continuation is a refusal ({headline_judge} judge)",
                **({role: {**a, "spec": runs[role].get("spec")} for role, a in analyses.items()} if analyses
                   else {"skipped": "no injection attack with s > 0 was run"})})
    if analyses:
        plot_projection(out_dir / "depth_projection.png", analyses)
    # per-prompt outcomes under the headline judge: what a paired test against another run needs (es2.gates)
    write_json(out_dir / "outcomes.json", {"judge": headline_judge,
                                           "roles": {role: run["outcomes"] for role, run in runs.items()}})
    write_json(out_dir / "headline.json", {"verdict": sentence, "rows": as_dicts(rows), "context": context})
    write_json(out_dir / "metrics.json", {k: v for k, v in metrics.items() if not isinstance(v, list)})
    write_json(out_dir / "intervals.json", {k: v for k, v in metrics.items() if isinstance(v, list)})
