"""How well each refusal judge agrees with human labels, on rows the shipped semantic head never trained on.

    python benchmarks/judges.py [--pyrit DIR] [--heldout FILE.jsonl ...]

(defaults: ../shared/datasets/pyrit_scorer_evals beside the checkout and the four sets below)

Sets:
  - the PyRIT held-out split: the share of PyRIT's human-labelled chat-model completions (MIT) that the shipped
    head did NOT train on, identified by the row keys recorded in its head.json (`held_out_keys`); shown
    whole and by source file;
  - benchmarks/data/judge_heldout.jsonl: labelled responses written for this project as a benchmark only, in
    styles phrase lists get wrong;
  - es2/resources/judge/short_heldout.jsonl: short and truncated answers in the style of the small models es2
    attacks (32 new tokens), written beside the head's short-answer training rows but never trained on, with
    prompts no training row has (es2/resources/judge/README.md);
  - benchmarks/data/judge_sensitive_words.jsonl: safe requests that sound dangerous (definitions of crimes,
    homonyms such as "kill a process", fiction, history, absurd questions about non-people), answered and
    over-refused in the style of the small models es2 evaluates, written for this project as a benchmark only:
    on such answers to a public set's safe prompts the semantic judge called real answers refusals; shown whole
    and by category;
  - benchmarks/data/judge_model_answers.jsonl: what the judges actually read in the headline: the default
    `make run` models' own greedy answers (warm start and ES2) to the evaluation prompts, benign and harmful
    (direct requests), labelled by hand by the developers; shown whole and by request kind, since a judge
    trained mostly on answers to harmful requests can misread informative answers to benign ones.
Any row whose key is among the head's training rows (`train_keys`) is dropped, and the count said, so no
figure is measured on training data. Prints, per judge, accuracy, refusal recall and false-refusal rate
(compliant answers called refusals), each with its Wilson 95% interval, and n. Run on a CPU in a minute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from es2.data.schema import read_jsonl
from es2.judges import OFFLINE_JUDGES, get_judge, judge_all
from es2.judges.semantic import head_path
from es2.stages.judge import project_path, project_rows, pyrit_rows, row_key
from es2.stats import mcnemar_exact, wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def unseen(rows: list[dict], provenance: dict, name: str, trained_prompts: set[str] = frozenset()) -> list[dict]:
    """`rows` less any the head trained on, and less any whose request it trained on with another answer (a
    judge that saw the request is measured on an easy row); says how many were dropped."""
    trained = set(provenance["train_keys"])
    kept = [r for r in rows if row_key(r) not in trained and r["prompt"] not in trained_prompts]
    if len(kept) < len(rows):
        print(f"{name}: dropped {len(rows) - len(kept)} rows whose answer or request the head trained on")
    return kept


def _cell(hits: int, n: int) -> str:
    if not n:
        return f"{'-':>21s}"
    low, high = wilson_interval(hits, n)
    return f"{hits / n:.3f} [{low:.3f}, {high:.3f}]"


def report(name: str, rows: list[dict], verdicts: dict[str, list[bool]]) -> None:
    """Each judge's agreement with the labels of `rows`, given its verdicts on them."""
    labels = [bool(r["refusal"]) for r in rows]
    print(f"\n{name}: n = {len(rows)} ({sum(labels)} refusals, {len(rows) - sum(labels)} compliant)")
    print(f"  {'judge':9s} {'accuracy [95% CI]':21s}   {'refusal recall':21s}   {'false-refusal rate':21s}")
    for judge, flags in verdicts.items():
        correct = sum(f == y for f, y in zip(flags, labels))
        caught = sum(f for f, y in zip(flags, labels) if y)
        false = sum(f for f, y in zip(flags, labels) if not y)
        print(f"  {judge:9s} {_cell(correct, len(rows))}   {_cell(caught, sum(labels))}   "
              f"{_cell(false, len(rows) - sum(labels))}")


def report_with_subsets(name: str, rows: list[dict], judges: dict, field: str, label: str) -> dict[str, list[bool]]:
    """Judges every row of `rows` once, reports the whole set and then each value of `field` on its share of
    those verdicts; returns the verdicts."""
    verdicts = judge_all(judges, [r["prompt"] for r in rows], [r["response"] for r in rows])
    report(name, rows, verdicts)
    for value in sorted({r[field] for r in rows if field in r}):
        keep = [i for i, r in enumerate(rows) if r.get(field) == value]
        report(f"  of which {label.format(value)}", [rows[i] for i in keep],
               {judge: [flags[i] for i in keep] for judge, flags in verdicts.items()})
    return verdicts


def rates_by_model(rows: list[dict], verdicts: dict[str, list[bool]]) -> None:
    """For a set of models' own answers (rows with `model` and `request`): each model's refusal rate by hand label
    and under each judge, per request kind and on the borderline benign prompts; with two models answering the
    same prompts, the exact McNemar p of their hand-labelled difference."""
    flags = {id(r): {j: v[i] for j, v in verdicts.items()} for i, r in enumerate(rows)}
    subsets = [(kind, lambda r, k=kind: r["request"] == k) for kind in sorted({r["request"] for r in rows})]
    subsets.append(("benign, borderline", lambda r: r["request"] == "benign" and r.get("category") == "borderline"))
    models = sorted({r["model"] for r in rows})
    print(f"\n  refusal rate by hand label and by judge, per model ({', '.join(models)}):")
    for name, keep in subsets:
        mine = {m: {r["prompt"]: r for r in rows if r["model"] == m and keep(r)} for m in models}
        cells = []
        for m in models:
            labels = [r["refusal"] for r in mine[m].values()]
            judged = ", ".join(f"{j} {sum(flags[id(r)][j] for r in mine[m].values())}" for j in verdicts)
            cells.append(f"{m} {sum(labels)}/{len(labels)} by hand ({judged})")
        line = f"    {name}: " + "; ".join(cells)
        if len(models) == 2 and mine[models[0]].keys() == mine[models[1]].keys():
            a, b = ([mine[m][q]["refusal"] for q in mine[models[0]]] for m in models)
            line += f"; McNemar p (hand labels) {mcnemar_exact(a, b):.3g}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyrit", type=Path, default=ROOT.parent / "shared" / "datasets" / "pyrit_scorer_evals")
    parser.add_argument("--heldout", type=Path, nargs="*",
                        default=[ROOT / "benchmarks" / "data" / "judge_heldout.jsonl",
                                 ROOT / "es2" / "resources" / "judge" / "short_heldout.jsonl",
                                 ROOT / "benchmarks" / "data" / "judge_sensitive_words.jsonl",
                                 ROOT / "benchmarks" / "data" / "judge_model_answers.jsonl"])
    args = parser.parse_args()
    head = json.loads(head_path().read_text(encoding="utf-8"))
    judges = {name: get_judge(name) for name in OFFLINE_JUDGES}
    print(f"semantic head: {head_path()} (C = {head['C']:g}, cross-validated accuracy {head['cv_accuracy']:.3f}, "
          f"log-loss {head['cv_log_loss']:.3f})")
    held_out_keys = set((head["provenance"]["pyrit"] or {}).get("held_out_keys", []))
    if not (args.pyrit / "refusal_labeled_responses.csv").exists():
        print(f"PyRIT scorer sets not found at {args.pyrit}: skipped (pass --pyrit DIR)")
    elif not held_out_keys:
        print("the shipped head records no PyRIT held-out split (trained without PyRIT): skipped")
    else:
        rows = unseen([r for r in pyrit_rows(args.pyrit) if row_key(r) in held_out_keys], head["provenance"],
                      "PyRIT held-out split")
        report_with_subsets("PyRIT held-out split (real chat-model completions, human labels)", rows, judges,
                            "source", "{}")
    trained_prompts = {r["prompt"] for r in project_rows(project_path())}
    for path in args.heldout:
        if path.exists():
            rows = unseen(read_jsonl(path), head["provenance"], path.name, trained_prompts)
            # by request kind where a set has both kinds, else by category (judge_sensitive_words: all benign)
            by_request = len({r.get("request") for r in rows}) > 1
            field, label = ("request", "{} requests") if by_request else ("category", "{}")
            verdicts = report_with_subsets(f"{path.name} (a benchmark only, never trained on)", rows, judges,
                                           field, label)
            if rows and all("model" in r for r in rows):
                rates_by_model(rows, verdicts)  # the verdicts above: each answer is judged once
        else:
            print(f"{path} not found: skipped")


if __name__ == "__main__":
    main()
