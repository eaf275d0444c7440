"""The evaluation report: PNG plots and one self-contained HTML page (images inlined), comparing the evaluated
model with its baseline and any further models (roles compare1, compare2, ...: one column each). Every rate is
shown with its Wilson 95% interval."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from es2.io import write_text

ROWS = [  # (metric key, label, lower is better for the defender?)
    ("refusal_margin/mean", "refusal margin log p(refuse) - log p(comply), mean", False),
    ("over_refusal/jbb/rate", "over-refusal on benign prompts (JBB list)", True),
    ("over_refusal/qi/rate", "over-refusal on benign prompts (Qi list)", True),
    ("over_refusal_borderline/jbb/rate", "over-refusal on 'sounds dangerous but safe' prompts (JBB)", True),
    ("capability/perplexity", "perplexity on benign text", True),
    ("capability/mc_accuracy", "multiple-choice accuracy (A-D log-likelihood)", False),
    ("geometry/dprime/mean", "d' harmful vs harmless, mean over layers", False),
    ("geometry/probe_accuracy/mean", "held-out probe accuracy, mean over layers", False),
    ("geometry/bhattacharyya_distance/mean", "Bhattacharyya distance (PCA-2), mean over layers", False),
    ("geometry/silhouette/mean", "silhouette (PCA-2), mean over layers", False),
]


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _rate(metrics: dict, key: str) -> str:
    value, ci = metrics.get(key), metrics.get(f"{key}_ci95")
    if value is None:
        return "–"
    return f"{value:.0%} <small>[{ci[0]:.0%}, {ci[1]:.0%}]</small>" if ci else f"{value:.0%}"


def _plot_asr(out_dir: Path, runs: dict, judge: str) -> Path:
    from matplotlib.figure import Figure

    names = [r.name for r in runs["model"]["results"]]
    fig = Figure(figsize=(max(6, 0.55 * len(names)), 3.6))
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, (role, run) in enumerate(runs.items()):
        values = [run["metrics"].get(f"asr/{n}/{judge}", float("nan")) for n in names]
        ax.bar([j + i * width for j in range(len(names))], values, width, label=role)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))], names, rotation=60, ha="right")
    ax.set_ylabel(f"attack success rate ({judge})")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"asr_{judge}.png"
    fig.savefig(path, dpi=90)
    return path


def _legend_name(role: str, run: dict) -> str:
    """The role with the last two parts of the model's path or id (e.g. "compare1: es2/adapter")."""
    spec = run.get("spec")
    return f"{role}: {'/'.join(Path(spec).parts[-2:])}" if spec else role


def _plot_depth(out_dir: Path, runs: dict) -> Path | None:
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
            points = sorted((r.x, run["metrics"][f"asr/{r.name}/jbb"]) for r in injected
                            if int(r.effort.get("k", 0)) == k)
            if points:
                style = styles[all_ks.index(k) % len(styles)]
                ax.plot(*zip(*points), marker="o", color=f"C{i % 10}", linestyle=style,
                        label=f"{_legend_name(role, run)}, k={k}")
                drawn = True
    if not drawn:
        return None
    ax.set_xlabel("injection step s (own tokens before the span)")
    ax.set_ylabel("ASR (JBB list)")
    ax.set_ylim(-0.03, 1.03)  # lines at exactly 0 and 1 stay visible
    ax.set_title("depth of safety")
    ax.legend(fontsize=7, handlelength=3.5, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside, not over, lines
    fig.tight_layout()
    path = out_dir / "depth_of_safety.png"
    fig.savefig(path, dpi=90)
    return path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(path.name)}</figcaption></figure>'


def _ci(low, high) -> str:
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return ""
    return f" <small>[{low:.2f}, {high:.2f}]</small>"


def _depth_section(out_dir: Path, runs: dict) -> str:
    """The claim test of es2.depth: projection at the injection point vs recovery, one row per model role."""
    analyses = {role: run.get("depth") for role, run in runs.items() if run.get("depth")}
    if not analyses:
        return ""
    rows = []
    for role, a in analyses.items():
        for name, s in [("pooled (all s > 0)", a["pooled"]), *a["by_result"].items()]:
            rows.append(f"<tr><td>{html.escape(role)}</td><td>{html.escape(name)}</td><td>{s['n']}</td>"
                        f"<td>{_fmt(s['recovery_rate'])}</td><td>{_fmt(s['corr'])}{_ci(s['ci_low'], s['ci_high'])}"
                        f"</td><td>{_ci(s['boot_low'], s['boot_high']) or '–'}</td><td>{_fmt(s['auc'])}</td>"
                        f"<td>{html.escape(s['reason'] or '')}</td></tr>")
    layers = ", ".join(f"{html.escape(r)}: {a['layer']}" for r, a in analyses.items())
    scatter = out_dir / "depth_projection.png"
    return f"""<h2 id="depth-projection">Does the refusal direction predict recovery?</h2>
<p>Claim tested (Park &amp; Kim 2026): the projection of the hidden state at the injection point (last token of
chat prompt + the model's own s tokens + the injected span) onto the refusal direction (difference of harmful and
harmless means of the probe-fitting prompts, unit length, measured from their midpoint; layer {layers}) does not
predict whether the continuation recovers (is a refusal, JBB list). Point-biserial r with Fisher-z and bootstrap
95% intervals; AUC of the projection as a predictor of recovery (0.5 = no information). An interval that contains
0 is consistent with the claim. Per-prompt points: depth_projection.json.</p>
<table><tr><th>model</th><th>injection</th><th>n</th><th>recovered</th><th>r [Fisher 95%]</th>
<th>bootstrap 95%</th><th>AUC</th><th>note</th></tr>{''.join(rows)}</table>
{_img(scatter) if scatter.exists() else ''}"""


def write_report(out_dir: Path, runs: dict, metrics: dict, plots: dict[str, Path]) -> Path:
    roles = list(runs)
    images = [_plot_asr(out_dir, runs, j) for j in ("jbb", "qi")]
    depth = _plot_depth(out_dir, runs)
    images += ([depth] if depth else []) + list(plots.values())

    def scoped(role: str) -> dict:
        return metrics if role == "model" else {k[len(role) + 1:]: v for k, v in metrics.items()
                                                if k.startswith(f"{role}/")}

    head = "".join(f"<th>{html.escape(r)}<br><small>{html.escape(runs[r]['spec'])}</small></th>" for r in roles)
    attack_rows = "".join(
        f"<tr><td>{html.escape(r.name)}</td>" + "".join(
            f"<td>{_rate(scoped(role), f'asr/{r.name}/{j}')}</td>" for role in roles for j in ("jbb", "qi"))
        + "</tr>" for r in runs["model"]["results"])
    effort_keys = sorted({k for k in metrics if k.startswith("effort/")})  # the model's (roles are prefixed)
    effort_rows = "".join(f"<tr><td>{html.escape(k[7:])}</td>" + "".join(
        f"<td>{_fmt(scoped(role).get(k))}</td>" for role in roles) + "</tr>" for k in effort_keys)
    other_rows = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(
        f"<td>{_fmt(scoped(role).get(key))}" + (
            f" <small>[{scoped(role).get(key.replace('/rate', '/ci_low')):.0%}, "
            f"{scoped(role).get(key.replace('/rate', '/ci_high')):.0%}]</small>"
            if key.endswith("/rate") and scoped(role).get(key.replace('/rate', '/ci_low')) is not None else "")
        + "</td>" for role in roles) + "</tr>" for key, label, _ in ROWS)
    capability = "".join(f"<li>{html.escape(k)}: {_fmt(metrics.get(k))}</li>"
                         for k in ("capability/kl_to_baseline", "capability/greedy_agreement") if k in metrics)
    judge_heads = "".join(f"<th>{html.escape(r)} JBB</th><th>{html.escape(r)} Qi</th>" for r in roles)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>es2 evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}img{{max-width:100%}}small{{color:#666}}</style>
</head><body><h1>es2 evaluation report</h1>
<p>Attack success rate (ASR) = share of harmful prompts the model did not refuse, by two public keyword lists
(JBB: JailbreakBench prefixes; Qi: Qi et al. keywords). Square brackets: Wilson 95% intervals.
Attacks are white-box and fitted against each model.</p>
<h2>Attack success</h2><table><tr><th>attack</th>{judge_heads}</tr>{attack_rows}</table>
<h2>Attack effort (higher = harder to attack)</h2><table><tr><th>figure</th>{head}</tr>{effort_rows}</table>
<h2>Refusal, capability and geometry</h2><table><tr><th>metric</th>{head}</tr>{other_rows}</table>
<ul>{capability}</ul>
{_depth_section(out_dir, runs)}
<h2>Plots</h2>{''.join(_img(p) for p in images)}
<p>Per-example prompts, generations and judgements: examples.jsonl. Flat metrics: metrics.json.</p>
</body></html>"""
    path = out_dir / "report.html"
    write_text(path, page)
    return path


def summary_text(metrics: dict) -> str:
    """What `es2 evaluate` prints: JBB-list ASR per attack with one column per model role, over-refusal on the
    benign prompts, and per role the depth claim test (correlation of the refusal-direction projection at the
    injection point with recovery, with its 95% interval)."""
    roles = ["model"] + sorted({k.split("/", 1)[0] for k in metrics
                                if k.startswith(("baseline/", "compare")) and "/asr/" in k})
    key = {role: (lambda k, role=role: k if role == "model" else f"{role}/{k}") for role in roles}
    attacks = [k[4:-4] for k in metrics if k.startswith("asr/") and k.endswith("/jbb")]  # in the order run
    lines = [f"{'ASR (JBB list)':28s}" + "".join(f"{role:>11s}" for role in roles)]
    for attack in attacks:
        cells = [metrics.get(key[role](f"asr/{attack}/jbb")) for role in roles]
        lines.append(f"{attack:28s}" + "".join(f"{'–' if v is None else format(v, '.0%'):>11s}" for v in cells))
    cells = [metrics.get(key[role]("over_refusal/jbb/rate")) for role in roles]
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
