"""The README's measured results, regenerated from an evaluation's outputs (`es2 results`).

No figure is typed into the README by hand: the block between RESULTS_START and RESULTS_END is rendered from
`headline.json` and `metrics.json` of an `es2 evaluate` output folder (by default the DVC stage's
`artifacts/evaluate`, whose neighbours `align` and `train` add their wall time), and names the judges, span
source, perturbation grid and n behind every figure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from es2.errors import DataError
from es2.io import write_text
from es2.pipeline import stage

RESULTS_START = "<!-- results:start (es2 results --readme README.md regenerates this block) -->"
RESULTS_END = "<!-- results:end -->"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _cell(row: dict, side: str) -> str:
    value = row[side]
    if value is None or (row["figure"] == "kl" and side == "baseline"):  # KL is already model vs baseline
        return "–"
    return f"{value:.3f}" if row["figure"] == "kl" else _pct(value)


def _diff(row: dict) -> str:
    if row["diff"] is None or row["figure"] == "kl":
        return "–"
    interval = "" if row["ci_low"] is None else f" [{100 * row['ci_low']:+.0f}, {100 * row['ci_high']:+.0f}]"
    return f"{100 * row['diff']:+.0f} pts{interval}"


def _effort_lines(context: dict) -> list[str]:
    """The effort certificate: median budget to break a prompt, per attack and model, and the paired test."""
    from es2.report import effort_text

    rows = [effort_text(e) for e in context.get("efforts", [])]
    if not rows:
        return []
    lines = ["", "| effort to break (median [95% CI]) | model | baseline | ratio | Wilcoxon p | n | budget unit |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {e['label']} | {e['model_text']} | {e['baseline_text']} | {e['ratio_text']} | {e['p_text']} | "
              f"{e['n']} | {e['unit']} |" for e in rows]
    return lines


# the figures a refusal judge decides outright, shown under every judge that ran: a reader sees at once how much
# of a difference is the judge's (benchmarks/judges.py measures each judge on the models' own labelled answers)
JUDGED = (("direct ASR", "asr/direct/{}"), ("over-refusal", "over_refusal/{}/rate"),
          ("borderline over-refusal", "over_refusal_borderline/{}/rate"))


def _judge_lines(metrics: dict, judges: list[str]) -> list[str]:
    if len(judges) < 2:
        return []
    cells = []
    for label, key in JUDGED:
        if key.format(judges[0]) in metrics:
            cells.append(f"{label} " + ", ".join(
                f"{j} {_pct(metrics.get(key.format(j)))} / {_pct(metrics.get('baseline/' + key.format(j)))}"
                for j in judges))
    return ["", "The same figures under every judge (model / baseline): " + "; ".join(cells) + "."] if cells else []


def _timing_lines(metrics: dict, eval_dir: Path) -> list[str]:
    """Wall time behind the figures as each stage recorded it: `align` and `train` when the folder is the
    pipeline's own evaluation (their outputs beside it made the model it evaluated), then each role's evaluation."""
    shown = []
    pipeline = eval_dir.name == Path(stage("evaluate").out_dir).name
    for name in ("align", "train") if pipeline else ():
        path = eval_dir.parent / Path(stage(name).out_dir).name / "metrics.json"
        wall = json.loads(path.read_text(encoding="utf-8")).get("wall_seconds") if path.exists() else None
        if wall:
            shown.append(f"{name} {wall / 60:.1f} min")
    for role in ("", "baseline/"):
        if evaluation := metrics.get(f"{role}seconds"):
            shown.append(f"evaluation of the {role.rstrip('/') or 'model'} {evaluation / 60:.1f} min")
    return ["", "Wall time as recorded: " + ", ".join(shown) + "."] if shown else []


def render(eval_dir: Path) -> str:
    """The markdown block for one evaluation folder, between its marker lines."""
    return f"{RESULTS_START}\n\n{_results(eval_dir)}\n\n{RESULTS_END}"


def _results(eval_dir: Path) -> str:
    """What the results block holds for one evaluation folder."""
    paths = {name: eval_dir / f"{name}.json" for name in ("headline", "metrics", "outcomes")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise DataError(f"not an es2 evaluate output: missing {', '.join(missing)}",
                        "run `dvc repro evaluate` (or `es2 evaluate --out DIR`) first, then pass --eval DIR")
    headline = json.loads(paths["headline"].read_text(encoding="utf-8"))
    metrics = json.loads(paths["metrics"].read_text(encoding="utf-8"))
    context = headline.get("context", {})
    lines = [f"**{headline['verdict']}**", "",
             "| figure | model | baseline | difference [95% CI] | McNemar p | n | attack |",
             "|---|---|---|---|---|---|---|"]
    for row in headline["rows"]:
        p = "–" if row["pvalue"] is None else f"{row['pvalue']:.3g}"
        lines.append(f"| {row['label']} | {_cell(row, 'model')} | {_cell(row, 'baseline')} | {_diff(row)} | {p} | "
                     f"{row['n']} | {row['attack'] or ''} |")
    lines += (_effort_lines(context) + _judge_lines(metrics, context.get("judges", []))
              + _timing_lines(metrics, eval_dir))
    trained = sorted(k.split("/")[1] for k in metrics if k.startswith("asr/trained_")
                     and k.endswith(f"/{context.get('judge', 'semantic')}"))
    lines += ["", f"Judge: `{context.get('judge')}` (all judges run: {', '.join(context.get('judges', []))}); "
                  f"held-out spans: `{context.get('span_source')}`; held-out grid: {context.get('heldout_grid')}; "
                  f"{context.get('n_harmful')} harmful and {context.get('n_benign')} benign prompts "
                  f"({context.get('n_borderline')} borderline), stratified by category; attack profile "
                  f"`{context.get('profile')}`.",
              f"Trained perturbations (not in the table): "
              f"{(context.get('trained_grid') or 'not run').removeprefix('trained: ')}."]
    if trained:
        judge = context.get("judge", "semantic")
        lines.append("Their ASR, model / baseline: " + "; ".join(
            f"{name} {_pct(metrics.get(f'asr/{name}/{judge}'))} / "
            f"{_pct(metrics.get(f'baseline/asr/{name}/{judge}'))}" for name in trained) + ".")
    return "\n".join(lines)


def update_readme(readme: Path, eval_dir: Path) -> None:
    """Replace the results block of `readme` (written atomically; the rest of the file is untouched)."""
    replace_block(readme, "results", RESULTS_START, RESULTS_END, lambda: _results(eval_dir))


def replace_block(readme: Path, name: str, start: str, end: str, body: Callable[[], str]) -> None:
    """Replace what lies between the marker lines `start` and `end` of `readme` with `body()`, atomically;
    a README without the markers is refused before anything is computed."""
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise DataError(f"{readme} has no {name} block", f"add the two lines {start!r} and {end!r} where it goes")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    write_text(readme, head + start + "\n\n" + body().strip("\n") + "\n\n" + end + tail)
