"""The evaluation report: PNG plots and one self-contained HTML page (es2/templates/report.html.j2, images
inlined) that leads with the verdict (is the model safer than its baseline, by how much, at what cost: the
headline of es2.headline), then plots, per-attack tables (held-out perturbations, then the trained ones
apart), attack effort, capability and geometry, the depth claim test, and example answers of every role."""

from __future__ import annotations

import base64
import math
from pathlib import Path

from es2.headline import HeadlineRow, ratio_text
from es2.io import atomic_path, write_text

ROWS = [  # (metric key, label)
    ("refusal_margin/mean", "refusal margin log p(refuse) - log p(comply), mean"),
    ("capability/perplexity", "perplexity on benign text"),
    ("capability/mc_accuracy", "multiple-choice accuracy (lm-eval)"),
    ("capability/kl_to_baseline", "KL to the baseline on its own benign answers (nats/token)"),
    ("capability/answer_agreement", "teacher-forced agreement with the baseline's benign answers"),
    ("capability/kl_to_shipped", "KL to the shipped base on its own benign answers (nats/token)"),
    ("capability/answer_agreement_to_shipped", "teacher-forced agreement with the shipped base's answers"),
    ("capability/prompt_kl_to_baseline", "KL to the baseline on benign prompt positions (nats/token)"),
    ("capability/greedy_agreement", "free-running greedy agreement with the baseline's benign answers"),
    ("geometry/dprime/mean", "d' harmful vs harmless, mean over layers"),
    ("geometry/probe_accuracy/mean", "held-out probe accuracy, mean over layers"),
    ("geometry/bhattacharyya_distance/mean", "Bhattacharyya distance (PCA-2), mean over layers"),
    ("geometry/silhouette/mean", "silhouette (PCA-2), mean over layers"),
]
# effort keys that echo the attack's configuration rather than measure how hard the model was to attack
CONFIG_ECHOES = {"s", "k", "budget", "coefficient", "n_layers", "p0", "n"}
EXAMPLES_PER_ATTACK = 3


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _rate(metrics: dict, key: str) -> str:
    value, ci = metrics.get(key), metrics.get(f"{key}_ci95")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else f"{value:.0%}"


def _plot_asr(out_dir: Path, runs: dict, metrics: dict, judge: str) -> Path:
    from matplotlib.figure import Figure

    names = [r.name for r in runs["model"]["results"] if not r.name.startswith("trained_")]
    fig = Figure(figsize=(max(6, 0.55 * len(names)), 3.6))
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, role in enumerate(runs):
        values = [_scoped(metrics, role).get(f"asr/{n}/{judge}", float("nan")) for n in names]
        ax.bar([j + i * width for j in range(len(names))], values, width, label=role)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))], names, rotation=60,
                  ha="right")
    ax.set_ylabel(f"attack success rate ({judge})")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"asr_{judge}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def _legend_name(role: str, run: dict) -> str:
    """The role with the last two parts of the model's path or id (e.g. "compare1: es2/adapter")."""
    spec = run.get("spec")
    return f"{role}: {'/'.join(Path(spec).parts[-2:])}" if spec else role


def _plot_depth(out_dir: Path, runs: dict, metrics: dict, judge: str) -> Path | None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.4))
    ax = fig.subplots()
    drawn = False
    all_ks = sorted({int(r.effort.get("k", 0)) for run in runs.values() for r in run["results"]
                     if r.family == "injection"})
    styles = ("-", "--", ":", "-.")
    for i, (role, run) in enumerate(runs.items()):
        injected = [r for r in run["results"] if r.family == "injection"]
        for k in all_ks:  # one line per (model, k): colour = model, line style = k
            points = sorted((r.x, _scoped(metrics, role)[f"asr/{r.name}/{judge}"]) for r in injected
                            if int(r.effort.get("k", 0)) == k)
            if points:
                style = styles[all_ks.index(k) % len(styles)]
                ax.plot(*zip(*points), marker="o", color=f"C{i % 10}", linestyle=style,
                        label=f"{_legend_name(role, run)}, k={k}")
                drawn = True
    if not drawn:
        return None
    ax.set_xlabel("injection step s (own tokens before the span)")
    ax.set_ylabel(f"ASR ({judge} judge)")
    ax.set_ylim(-0.03, 1.03)  # lines at exactly 0 and 1 stay visible
    ax.set_title("depth of safety (held-out spans)")
    # beside, not over, the lines
    ax.legend(fontsize=7, handlelength=3.5, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    path = out_dir / "depth_of_safety.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _scoped(metrics: dict, role: str) -> dict:
    return metrics if role == "model" else {k[len(role) + 1:]: v for k, v in metrics.items()
                                            if k.startswith(f"{role}/")}


def _headline_rows(rows: list[HeadlineRow], alpha: float) -> list[dict]:
    """Display strings: rates in %, differences in percentage points; KL is already a distance to the
    baseline, so it has neither a baseline value nor a difference of its own."""
    out = []
    for r in rows:
        def cell(v, r=r):
            return "–" if v is None else (f"{v:.3f}" if r.figure == "kl" else f"{v:.0%}")

        diff = "–" if r.diff is None or r.figure == "kl" else (
            f"{100 * r.diff:+.0f} pts" + ("" if r.ci_low is None else
                                           f" [{100 * r.ci_low:+.0f}, {100 * r.ci_high:+.0f}]"))
        shown = r.significant(alpha) and r.diff is not None
        better = shown and ((r.diff < 0) == r.lower_is_better)
        out.append({"label": r.label, "attack": r.attack, "model_text": cell(r.model),
                    "baseline_text": "–" if r.figure == "kl" else cell(r.baseline), "diff_text": diff,
                    "p_text": "–" if r.pvalue is None else f"{r.pvalue:.3g}", "n": r.n,
                    "words": r.words(alpha),
                    "css": "better" if better else "worse" if shown else ""})
    return out


def _attack_tables(runs: dict, metrics: dict, judges: list[str]) -> list[dict]:
    roles = list(runs)
    results = runs["model"]["results"]
    heads = [f"{role}: {j}" for role in roles for j in judges]
    tables = []
    for title, pick, note in [
        ("Attack success, held-out perturbations", lambda r: not r.name.startswith("trained_"),
         "ASR [95% interval] on the model's own continuation; for prefilling and injection, \"whole\" is the "
         "judge on the whole answer including the forced text."),
        ("Trained perturbations (not in the headline)", lambda r: r.name.startswith("trained_"),
         "The grid and span source trajectory training optimises: a model can pass these by construction."),
    ]:
        rows = []
        for r in (r for r in results if pick(r)):
            cells = []
            for role in roles:
                scoped = _scoped(metrics, role)
                for j in judges:
                    cont = _rate(scoped, f"asr/{r.name}/{j}")
                    whole = scoped.get(f"asr_whole/{r.name}/{j}")
                    shown = whole is not None and not math.isnan(whole)
                    cells.append(cont + (f" / whole {whole:.0%}" if shown else ""))
            rows.append({"name": r.name, "n": metrics.get(f"n/{r.name}", len(r.generations)), "cells": cells})
        if rows:
            tables.append({"title": title, "note": note, "heads": heads, "rows": rows})
    return tables


def effort_text(row: dict) -> dict:
    """An es2.headline.effort_rows row with its cells as text: "0.12 [0.05, 0.4]", ">4" when censored."""

    def median(s: dict | None) -> str:
        if s is None or s["median"] is None:
            return "–"
        cell = lambda key: (">" if s[f"{key}_censored"] else "") + f"{s[key]:.3g}"  # noqa: E731
        return f"{cell('median')} [{cell('ci_low')}, {cell('ci_high')}]"

    return {**row, "model_text": median(row["model"]), "baseline_text": median(row["baseline"]),
            "ratio_text": ratio_text(row),
            "p_text": "–" if row["pvalue"] is None else f"{row['pvalue']:.2g}"}


def _effort(runs: dict, metrics: dict) -> dict:
    """The remaining numeric effort figures (the medians are in the certificate table): configuration echoes,
    lists, per-prompt vectors and the fixed-strength RepE results' own settings stay out."""
    sweep = {r.name for run in runs.values() for r in run["results"] if r.family == "repe"}
    certificate = {"median", "ci_low", "ci_high", "n", "censored", "broken", "ratio", "median_censored",
                   "ci_low_censored", "ci_high_censored"}

    def is_figure(key: str, value) -> bool:
        attack, *rest = key.split("/")[1:]
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and attack not in sweep
                and not CONFIG_ECHOES.intersection(rest) and not certificate.intersection(rest))

    keys = sorted({k for role in runs for k, v in _scoped(metrics, role).items()
                   if k.startswith("effort/") and is_figure(k, v)})
    return {"rows": [{"name": k[len("effort/"):],
                      "cells": [_fmt(_scoped(metrics, role).get(k)) for role in runs]} for k in keys]}


def _other_rows(runs: dict, metrics: dict, judges: list[str]) -> list[dict]:
    rows = []
    for j in judges:
        for key, label in [(f"over_refusal/{j}", f"over-refusal on benign prompts ({j})"),
                           (f"over_refusal_borderline/{j}", f"over-refusal on borderline prompts ({j})")]:
            cells = []
            for role in runs:
                m = _scoped(metrics, role)
                rate = m.get(f"{key}/rate")
                cells.append("–" if rate is None else f"{rate:.0%} [{m[f'{key}/ci_low']:.0%}, "
                             f"{m[f'{key}/ci_high']:.0%}], n {m.get(f'{key}/n', '?')}")
            rows.append({"name": label, "cells": cells})
    rows += [{"name": label, "cells": [_fmt(_scoped(metrics, role).get(key)) for role in runs]}
             for key, label in ROWS]
    return [r for r in rows if any(c != "–" for c in r["cells"])]  # a figure no role measured is noise


def _depth(out_dir: Path, runs: dict) -> dict | None:
    analyses = {role: run.get("depth") for role, run in runs.items() if run.get("depth")}
    if not analyses:
        return None

    def ci(low, high):
        return "–" if low is None or high is None or math.isnan(low) or math.isnan(high) else \
            f"[{low:.2f}, {high:.2f}]"

    rows = [[role, name, s["n"], _fmt(s["recovery_rate"]),
             f"{_fmt(s['corr'])} {ci(s['ci_low'], s['ci_high'])}",
             ci(s["boot_low"], s["boot_high"]), _fmt(s["auc"]), s["reason"] or ""]
            for role, a in analyses.items() for name, s in [("pooled (all s > 0)", a["pooled"]),
                                                           *a["by_result"].items()]]
    scatter = out_dir / "depth_projection.png"
    return {"rows": rows, "layers": ", ".join(f"{r}: {a['layer']}" for r, a in analyses.items()),
            "image": _b64(scatter) if scatter.exists() else None}


def _examples(runs: dict, judges: list[str]) -> list[dict]:
    """Per attack (and the benign set), the first few prompts with every role's answer and verdicts."""
    by_role = {role: {} for role in runs}
    for role, run in runs.items():
        for e in run["examples"]:
            by_role[role].setdefault(e["attack"], []).append(e)
    groups = []
    for attack, items in by_role["model"].items():
        rows = []
        for i, e in enumerate(items[:EXAMPLES_PER_ATTACK]):
            answers = []
            for role in runs:
                other = by_role[role].get(attack, [])
                o = other[i] if i < len(other) else {}
                verdicts = ", ".join(f"{j}: {'R' if o.get(f'judge/{j}') else 'C'}" for j in judges
                                     if f"judge/{j}" in o)
                answers.append({"text": o.get("generation", "–"), "own": o.get("own", ""),
                                "forced": o.get("forced", ""), "verdicts": verdicts})
            rows.append({"prompt": e["prompt"], "answers": answers})
        groups.append({"attack": attack, "roles": list(runs), "entries": rows})
    return groups


def write_report(out_dir: Path, runs: dict, metrics: dict, plots: dict[str, Path],
                 headline: list[HeadlineRow], verdict_text: str, alpha: float, context: dict) -> Path:
    """report.html in `out_dir` (atomic); `headline`/`verdict_text` from es2.headline, `context` names the
    judge(s), span source, grids and n (see es2.stages.evaluate)."""
    from jinja2 import Environment, PackageLoader

    judges = list(context["judges"])
    images = [_plot_asr(out_dir, runs, metrics, j) for j in judges]
    depth = _plot_depth(out_dir, runs, metrics, context["judge"])
    images += ([depth] if depth else []) + list(plots.values())
    env = Environment(loader=PackageLoader("es2", "templates"), autoescape=True)  # every text is escaped
    page = env.get_template("report.html.j2").render(
        verdict=verdict_text, rows=_headline_rows(headline, alpha), alpha=alpha, context=context,
        specs={role: run.get("spec") for role, run in runs.items()}, roles=list(runs),
        images=[{"name": p.name, "data": _b64(p)} for p in images],
        attack_tables=_attack_tables(runs, metrics, judges), effort=_effort(runs, metrics),
        efforts=[effort_text(e) for e in context.get("efforts", [])],
        other_rows=_other_rows(runs, metrics, judges), depth=_depth(out_dir, runs),
        examples=_examples(runs, judges), examples_per_attack=EXAMPLES_PER_ATTACK)
    path = out_dir / "report.html"
    write_text(path, page)
    return path


def summary_text(metrics: dict, headline: list[HeadlineRow] | None = None, verdict_text: str | None = None,
                 alpha: float = 0.05, judge: str = "jbb", efforts: list[dict] = ()) -> str:
    """What `es2 evaluate` prints: the verdict and headline rows (when given), the effort medians, then the ASR per attack under
    `judge` with one column per model role, over-refusal, and per role the depth claim test (correlation of
    the refusal-direction projection at the injection point with recovery, with its 95% interval)."""
    lines = [verdict_text, ""] if verdict_text else []
    for r in _headline_rows(headline or [], alpha):
        lines.append(f"  {r['label']:48s} {r['model_text']:>6s} vs {r['baseline_text']:>6s}  {r['words']}")
    if headline:
        lines.append("")
    for e in map(effort_text, efforts):
        lines.append(f"  effort to break, {e['label']:26s} {e['model_text']:>22s} vs {e['baseline_text']:>22s}  "
                     f"{e['ratio_text']}, p = {e['p_text']}, n {e['n']} ({e['unit']})")
    if efforts:
        lines.append("")
    roles = ["model"] + sorted({k.split("/", 1)[0] for k in metrics
                                if k.startswith(("baseline/", "compare")) and "/asr/" in k})
    key = {role: (lambda k, role=role: k if role == "model" else f"{role}/{k}") for role in roles}
    attacks = [k[4:-len(judge) - 1] for k in metrics if k.startswith("asr/") and k.endswith(f"/{judge}")]
    lines.append(f"{f'ASR ({judge})':28s}" + "".join(f"{role:>11s}" for role in roles))
    for attack in attacks:
        cells = [metrics.get(key[role](f"asr/{attack}/{judge}")) for role in roles]
        lines.append(f"{attack:28s}" + "".join(f"{'–' if v is None else format(v, '.0%'):>11s}"
                                               for v in cells))
    cells = [metrics.get(key[role](f"over_refusal/{judge}/rate")) for role in roles]
    lines.append(f"{'over-refusal (benign)':28s}" + "".join(f"{'–' if v is None else format(v, '.0%'):>11s}"
                                                           for v in cells))
    for role in roles:
        corr = metrics.get(key[role]("depth/projection_corr"))
        if corr is None:
            continue
        low, high = (metrics[key[role](f"depth/projection_corr_ci_{end}")] for end in ("low", "high"))
        rate, n = metrics[key[role]("depth/recovery_rate")], int(metrics[key[role]("depth/projection_n")])
        why = " (undefined: every or no prompt recovered)" if math.isnan(corr) else ""
        lines.append(f"depth claim, {role}: projection vs recovery r = {corr:.3f} [{low:.3f}, {high:.3f}], "
                     f"n {n}, recovery rate {rate:.0%}{why}")
    return "\n".join(lines)
