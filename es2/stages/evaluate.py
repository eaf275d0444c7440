"""The `evaluate` stage: white-box attacks, keyword judges, geometry and capability, for any model on any data.

`es2 evaluate` with no flags reads params (the DVC stage: the trained adapter against the model training
started from). With flags it evaluates any model (folder, HF id in the local cache, adapter folder, or a
registered model `models:/NAME@ALIAS` / `models:/NAME/VERSION`) on any prompt file (normalised JSONL or an
importable benchmark format). Writes into OUT: metrics.json (flat keys, DVC metrics), examples.jsonl (every
prompt, generation and judgement), asr.csv and depth.csv (DVC plots; depth.csv has one row per model, judge,
injection step s and span length k), depth_projection.json (does the refusal-direction projection at the
injection point predict recovery? see es2.depth), PNG plots and a self-contained report.html.

Roles: `model`, `baseline` (KL, greedy agreement and PCA are taken against it) and `compare1`, `compare2`, ...
(evaluate.compare / --compare: further models shown side by side). Metrics of a role other than `model` are
prefixed `<role>/`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from es2.config import Params
from es2.errors import DataError
from es2.io import write_json, write_jsonl, write_text

JUDGES = ("jbb", "qi")


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


def read_prompts(path: str | Path, label: str) -> list[dict]:
    """Records with `label` from a normalised JSONL file or any importable format (sniffed from the header)."""
    from es2.data.importers import import_records
    from es2.data.schema import read_records

    path = Path(path)
    if path.suffix == ".jsonl":
        rows = read_records(path)
    elif path.suffix == ".csv":
        header = path.read_text(encoding="utf-8", errors="replace").splitlines()[0].lower()
        fmt = ("advbench" if "goal" in header and "target" in header and "behavior" not in header else
               "jailbreakbench" if "goal" in header else "harmbench" if "behavior" in header else
               "xstest" if "focus" in header else "csv")
        rows = import_records(fmt, path, None if fmt == "xstest" else label)
    elif path.suffix == ".json":
        rows = import_records("alpaca", path, label)
    else:
        raise DataError(f"{path}: unknown file type", "use .jsonl (normalised), .csv or .json")
    return [r for r in rows if r["label"] == label]


def _judged(result, judges=JUDGES, classifier=None) -> tuple[dict, list[dict]]:
    """ASR per judge with Wilson intervals, and one example row per prompt. Keyword judges count a non-refusal
    as a success; the optional classifier judge counts a response it calls harmful."""
    from es2.judges import refusal_flags, wilson_interval

    flags = {j: refusal_flags(result.generations, j) for j in judges}
    if classifier is not None:  # stored as "refused" = not harmful, so one rule below serves every judge
        flags["classifier"] = [not h for h in classifier.harmful(result.prompts, result.generations)]
        judges = (*judges, "classifier")
    n = len(result.generations)
    metrics = {}
    for judge in judges:
        successes = n - sum(flags[judge])
        low, high = wilson_interval(successes, n)
        metrics[f"asr/{result.name}/{judge}"] = successes / n if n else float("nan")
        metrics[f"asr/{result.name}/{judge}_ci95"] = [low, high]
    metrics.update({f"effort/{result.name}/{k}": v for k, v in result.effort.items()})
    examples = [{"attack": result.name, "family": result.family, "x": result.x, "prompt": p, "generation": g,
                 **{f"refused_{j}": flags[j][i] for j in judges},
                 **(result.details[i] if i < len(result.details) else {})}
                for i, (p, g) in enumerate(zip(result.prompts, result.generations))]
    return metrics, examples


def run_attacks(model, tokenizer, harmful: list[dict], probe_sets: tuple[list[str], list[str]], cfg,
                layers: list[int]) -> list:
    """Every attack in cfg.attacks against this model (adaptive: probes and directions fitted on it)."""
    from es2.attacks import optimization, prompting, representation

    prompts = [r["prompt"] for r in harmful]
    targets = [r.get("target") or f"Sure, here is how to {r['prompt'][0].lower()}{r['prompt'][1:]}"
               for r in harmful]
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    results = []
    if "direct" in cfg.attacks:
        with _Timed("direct"):
            results.append(prompting.direct(model, tokenizer, prompts, **common))
    if "template" in cfg.attacks:
        with _Timed("templates"):
            results += prompting.templates(model, tokenizer, prompts, **common)
    if "prefill" in cfg.attacks:
        with _Timed("prefill"):
            results += prompting.prefill(model, tokenizer, prompts, targets, cfg.prefill_tokens, **common)
    if "injection" in cfg.attacks:
        with _Timed("injection"):
            for k in cfg.injection_tokens:  # one name per (s, k): injection_s<s>_k<k>, x = s
                for result in prompting.injection(model, tokenizer, prompts, targets, cfg.injection_steps, k,
                                                  **common):
                    result.name = f"injection_s{int(result.effort['s'])}_k{k}"
                    results.append(result)
    if {"scav", "repe"} & set(cfg.attacks):
        fit_harmful, fit_harmless = probe_sets
        band = representation.default_band(model.config.num_hidden_layers)  # RepE's band, ~25-45% of depth
        fit_layers = sorted(set(layers) | set(band))
        h_states = representation.last_token_states(model, tokenizer, fit_harmful, fit_layers, cfg.batch_size)
        s_states = representation.last_token_states(model, tokenizer, fit_harmless, fit_layers, cfg.batch_size)
        if "scav" in cfg.attacks:
            probes = representation.fit_probes({layer: h_states[layer] for layer in layers},
                                               {layer: s_states[layer] for layer in layers}, seed=cfg.seed)
            with _Timed("scav"):
                for budget in [None, *cfg.scav_budgets]:
                    results.append(representation.scav(model, tokenizer, prompts, probes, p0=cfg.scav_p0,
                                                       min_accuracy=cfg.scav_min_accuracy, budget=budget,
                                                       **common))
        if "repe" in cfg.attacks:
            n = min(len(fit_harmful), len(fit_harmless))  # RepE pairs the i-th harmful with the i-th harmless
            directions = {layer: representation.repe_direction(h_states[layer][:n], s_states[layer][:n])
                          for layer in band}
            with _Timed("repe"):
                results += representation.repe(model, tokenizer, prompts, directions, cfg.repe_coefficients,
                                               **common)
    if "softprompt" in cfg.attacks:
        n = cfg.softprompt_prompts
        with _Timed("softprompt"):
            results.append(optimization.soft_prompt(model, tokenizer, prompts[:n], targets[:n], cfg.softprompt_tokens,
                                                    cfg.softprompt_steps, cfg.softprompt_lr,
                                                    max_new_tokens=cfg.max_new_tokens))
    if "gcg" in cfg.attacks:
        n = cfg.gcg_prompts
        with _Timed("gcg"):
            results.append(optimization.gcg(model, tokenizer, prompts[:n], targets[:n], steps=cfg.gcg_steps,
                                            search_width=cfg.gcg_search_width, topk=cfg.gcg_topk,
                                            max_new_tokens=cfg.max_new_tokens))
    return results


class _Timed:
    """Prints each attack family's wall time as it finishes (evaluation runs for minutes on a CPU)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"  {self.what}: {time.perf_counter() - self.start:.0f} s", flush=True)


def evaluate_one(model, tokenizer, harmful, benign, probe_sets, cfg, layers, mc_questions,
                 classifier=None) -> dict:
    """All figures for one model: attack ASRs and efforts, refusal margin, over-refusal, perplexity, MC accuracy,
    the refusal-direction-vs-recovery test on the injection results (es2.depth), and the pooled states (for
    geometry and the base-vs-trained comparison)."""
    from es2.attacks.representation import last_token_states, smallest_flipping_coefficient
    from es2.capability import benign_text, multiple_choice_accuracy, over_refusal, perplexity
    from es2.generation import generate
    from es2.judges import refusal_margin

    started = time.perf_counter()
    results = run_attacks(model, tokenizer, harmful, probe_sets, cfg, layers)
    metrics, examples = {}, []
    for result in results:
        m, e = _judged(result, classifier=classifier)
        metrics.update(m)
        examples += e
    repe = [r for r in results if r.family == "repe"]
    if repe:
        for judge in JUDGES:
            metrics.update({f"effort/repe/{k}/{judge}": v
                            for k, v in smallest_flipping_coefficient(repe, judge).items()})
    margins = refusal_margin(model, tokenizer, [r["prompt"] for r in harmful])
    metrics["refusal_margin/mean"] = float(margins.mean())
    metrics["refusal_margin/frac_positive"] = float((margins > 0).float().mean())
    benign_prompts = [r["prompt"] for r in benign]
    benign_answers = generate(model, tokenizer, benign_prompts, cfg.max_new_tokens, cfg.batch_size)
    for judge in JUDGES:
        metrics.update({f"over_refusal/{judge}/{k}": v for k, v in over_refusal(benign_answers, judge).items()})
        borderline = [a for a, r in zip(benign_answers, benign) if r.get("category") == "borderline"]
        if borderline:
            metrics.update({f"over_refusal_borderline/{judge}/{k}": v
                            for k, v in over_refusal(borderline, judge).items()})
    examples += [{"attack": "benign", "family": "benign", "prompt": p, "generation": g}
                 for p, g in zip(benign_prompts, benign_answers)]
    depth = None
    if any(r.family == "injection" and r.x for r in results):
        from es2 import depth as depth_test

        with _Timed("depth projection"):
            depth = depth_test.projection_analysis(
                model, tokenizer, results, probe_sets, cfg.depth_layer if cfg.depth_layer is not None
                else depth_test.default_layer(layers), cfg.batch_size, cfg.depth_bootstrap, cfg.seed)
        metrics.update(depth_test.flat_metrics(depth))
    metrics["capability/perplexity"] = perplexity(model, tokenizer, benign_text())
    accuracy, n = multiple_choice_accuracy(model, tokenizer, mc_questions, cfg.batch_size)
    metrics["capability/mc_accuracy"], metrics["capability/mc_n"] = accuracy, n
    states = {layer: (h, s) for layer, h, s in zip(
        layers, last_token_states(model, tokenizer, [r["prompt"] for r in harmful], layers, cfg.batch_size).values(),
        last_token_states(model, tokenizer, benign_prompts, layers, cfg.batch_size).values())}
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return {"metrics": metrics, "examples": examples, "results": results, "states": states,
            "benign_answers": benign_answers, "depth": depth}


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    write_text(path, "\n".join([",".join(header)] + [",".join(str(v) for v in row) for row in rows]) + "\n")


def run_evaluate(params: Params, out_dir: str | Path = "artifacts/evaluate", model: str | None = None,
                 baseline: str | None = "params", harmful: str | None = None, benign: str | None = None,
                 attacks: list[str] | None = None, limit: int | None = None,
                 compare: list[str] | None = None) -> dict:
    """Evaluate `model` (and `baseline`, when given, and each `compare` model: default evaluate.compare) and
    write the report; returns the flat metrics."""
    import torch

    from es2.capability import greedy_agreement, load_mc_csv, mmlu_sample_path, per_token_kl
    from es2.report import write_report
    from es2.separation_metrics import flatten_report, layer_report, pca_scatter

    cfg = params.evaluate.model_copy(update={k: v for k, v in
                                             {"attacks": attacks, "limit": limit}.items() if v is not None})
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    harmful_rows = read_prompts(harmful or cfg.harmful or params.data.eval_harmful, "harmful")[:cfg.limit]
    benign_rows = read_prompts(benign or cfg.benign or params.data.eval_harmless, "harmless")[:cfg.limit]
    if not harmful_rows or not benign_rows:
        raise DataError(f"no prompts to evaluate: {len(harmful_rows)} harmful, {len(benign_rows)} benign",
                        "check --harmful/--benign (or evaluate.harmful/benign): labels must be harmful/harmless")
    probe_sets = _probe_sets(harmful_rows, benign_rows)
    layers = cfg.layers or params.train.layers
    mc_questions = load_mc_csv(cfg.mc_csv or mmlu_sample_path())
    classifier = None
    if cfg.judge_model:
        from es2.judges import ClassifierJudge

        classifier = ClassifierJudge(cfg.judge_model)
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
        runs[role] = evaluate_one(m, tokenizer, harmful_rows, benign_rows, probe_sets, cfg, layers, mc_questions,
                                  classifier)
        runs[role]["spec"] = spec
        del m
        if role not in loaded and torch.cuda.is_available():
            torch.cuda.empty_cache()
    metrics = {**runs["model"]["metrics"], **flatten_report(layer_report(runs["model"]["states"]))}
    for role in (r for r in runs if r.startswith("compare")):
        metrics.update({f"{role}/{k}": v for k, v in runs[role]["metrics"].items()})
        metrics.update({f"{role}/{k}": v for k, v in flatten_report(layer_report(runs[role]["states"])).items()})
    plots = {}
    if "baseline" in runs:
        base = runs["baseline"]
        metrics.update({f"baseline/{k}": v for k, v in base["metrics"].items()})
        metrics.update({f"baseline/{k}": v for k, v in flatten_report(layer_report(base["states"])).items()})
        (model_, tokenizer), (baseline_model, _) = loaded["model"], loaded["baseline"]
        metrics["capability/kl_to_baseline"] = per_token_kl(model_, baseline_model, tokenizer,
                                                            [r["prompt"] for r in benign_rows])
        metrics["capability/greedy_agreement"] = greedy_agreement(runs["model"]["benign_answers"],
                                                                  base["benign_answers"], tokenizer)
        for layer in layers:
            plots[f"pca_layer{layer}.png"] = pca_scatter(base["states"], runs["model"]["states"], layer,
                                                         out_dir / f"pca_layer{layer}.png",
                                                         f"layer {layer}: baseline (left) vs model (right)")
    _write_outputs(out_dir, runs, metrics)
    write_report(out_dir, runs, metrics, plots)
    return metrics


def _probe_sets(harmful_rows, benign_rows) -> tuple[list[str], list[str]]:
    """Prompts to fit SCAV probes and RepE directions on: the pairs' validation split when the pipeline made
    one (never the attacked prompts), else the evaluation prompts themselves (stated in the report)."""
    from es2.data.schema import read_jsonl

    val = Path("artifacts/pairs/val.jsonl")
    if val.exists():
        rows = read_jsonl(val)
        return (list(dict.fromkeys(r["harmful"] for r in rows)), list(dict.fromkeys(r["harmless"] for r in rows)))
    return [r["prompt"] for r in harmful_rows], [r["prompt"] for r in benign_rows]


def _write_outputs(out_dir: Path, runs: dict, metrics: dict) -> None:
    from es2.depth import plot_projection

    write_jsonl(out_dir / "examples.jsonl", [{"role": role, **e} for role, run in runs.items()
                                             for e in run["examples"]])
    asr_rows, depth_rows = [], []
    for role, run in runs.items():
        for result in run["results"]:
            for judge in JUDGES:
                asr_rows.append([role, result.name, judge, run["metrics"][f"asr/{result.name}/{judge}"]])
                if result.family == "injection":
                    depth_rows.append([role, judge, int(result.x), int(result.effort["k"]),
                                       run["metrics"][f"asr/{result.name}/{judge}"]])
    _csv(out_dir / "asr.csv", ["model", "attack", "judge", "asr"], asr_rows)
    _csv(out_dir / "depth.csv", ["model", "judge", "step", "k", "asr"], depth_rows)
    analyses = {role: run["depth"] for role, run in runs.items() if run.get("depth")}
    # always written (a DVC output): says so when no injection with s > 0 ran
    write_json(out_dir / "depth_projection.json",
               {"claim": "the refusal-direction projection at the injection point does not predict recovery "
                         "(Park & Kim 2026); recovered = the continuation is a refusal (JBB list)",
                **({role: {**a, "spec": runs[role].get("spec")} for role, a in analyses.items()} if analyses
                   else {"skipped": "no injection attack with s > 0 was run"})})
    if analyses:
        plot_projection(out_dir / "depth_projection.png", analyses)
    write_json(out_dir / "metrics.json", {k: v for k, v in metrics.items() if not isinstance(v, list)})
    write_json(out_dir / "intervals.json", {k: v for k, v in metrics.items() if isinstance(v, list)})
