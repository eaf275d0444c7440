"""The report page (es2.report) on a hand-made evaluation: no model, no browser."""

import re

from markupsafe import escape

from es2.attacks import AttackResult
from es2.headline import effort_rows, headline_rows, verdict
from es2.report import summary_text, write_report

JUDGES = ["semantic", "jbb"]
T, F = True, False
# (name, family, model successes, baseline successes) on 4 prompts, doubled to 8 so McNemar can show a gain
ATTACKS = [(name, family, model * 2, base * 2) for name, family, model, base in [
           ("direct", "direct", [F, F, F, F], [T, T, T, F]),
           ("prefill_k5", "prefill", [T, F, F, F], [T, T, T, T]),
           ("injection_s8_k10", "injection", [T, T, F, F], [T, T, T, T]),
           ("scav", "scav", [T, F, F, F], [T, T, F, F]),
           ("repe_c1", "repe", [F, F, F, F], [T, F, F, F]),
           ("trained_injection_s8_k10", "trained_injection", [F, F, F, F], [T, T, T, T])]]
PROMPTS = [f"harmful request {i}" for i in range(8)]
SCRIPT = "<script>alert('pwned')</script>"


def _role(successes: dict[str, list[bool]], tag: str, prefix: str = "") -> tuple[dict, dict]:
    results, metrics, examples = [], {}, []
    for name, family, _, _ in ATTACKS:
        effort = {"s": 8.0, "k": 10.0} if "injection" in name else {"k": 5.0} if "prefill" in name else {}
        if family == "scav":
            effort = {"n_layers": 2.0, "p0": 0.01, "budget": 4.0, "shift_norm_mean": 3.25}
        if family == "repe":
            effort = {"coefficient": 1.0, "shift_rel": 0.5}
        gens = [f"{tag} answer {i} to {name}" + (f" {SCRIPT}" if i == 0 else "") for i in range(8)]
        results.append(AttackResult(name, family, PROMPTS, gens, effort, x=effort.get("s", effort.get("k"))))
        rate = sum(successes[name]) / 8
        for j in JUDGES:
            metrics[f"{prefix}asr/{name}/{j}"] = rate
            metrics[f"{prefix}asr/{name}/{j}_ci95"] = [max(rate - 0.3, 0.0), min(rate + 0.3, 1.0)]
            if family in ("prefill", "injection", "trained_injection"):
                metrics[f"{prefix}asr_whole/{name}/{j}"] = min(rate + 0.25, 1.0)
        metrics[f"{prefix}n/{name}"] = 8
        metrics.update({f"{prefix}effort/{name}/{k}": v for k, v in effort.items()})
        examples += [{"attack": name, "family": family, "prompt": p, "generation": g,
                      **{f"judge/{j}": not s for j in JUDGES}}
                     for p, g, s in zip(PROMPTS, gens, successes[name])]
    metrics[f"{prefix}effort/scav/shift_norm_per_prompt"] = [1.0, 2.0]  # a list: never shown
    metrics[f"{prefix}effort/repe/mean/semantic"] = 1.5
    metrics[f"{prefix}effort/repe/n/semantic"] = 8
    metrics[f"{prefix}effort/repe/median"] = 0.2  # in the certificate table, not among the other figures
    metrics[f"{prefix}capability/mc_accuracy"] = 0.5
    return {"results": results, "examples": examples, "spec": f"runs/{tag}"}, metrics


KEYS = [f"k{i}" for i in range(8)]
# per-prompt budgets to break (None: never broken within high = 1.0); the model needs more on every prompt
EFFORTS = ({"repe": {"budgets": [0.2, 0.4, 0.4, None, None, None, 0.3, 0.8], "high": 1.0,
                     "unit": "steering norm / mean state norm", "prompts": KEYS}},
           {"repe": {"budgets": [0.1, 0.1, 0.2, 0.2, 0.05, 0.1, 0.0, 0.4], "high": 1.0,
                     "unit": "steering norm / mean state norm", "prompts": KEYS}})


def _outcomes(which: int) -> dict:
    return {"attacks": {name: {"family": fam, "success": outcome[which]} for name, fam, *outcome in ATTACKS},
            "benign_refused": [F, F, T, F] if which == 0 else [F, F, F, F], "borderline": [F, F, T, T],
            "mc_correct": [T, F] if which == 0 else [T, T], "kl": 0.042 if which == 0 else None}


def build_report(out_dir):
    """report.html of a fake model-vs-baseline evaluation; returns (path, headline rows, verdict)."""
    model, metrics = _role({name: m for name, _, m, _ in ATTACKS}, "model")
    baseline, base_metrics = _role({name: b for name, _, _, b in ATTACKS}, "baseline", "baseline/")
    rows = headline_rows(_outcomes(0), _outcomes(1))
    efforts = effort_rows(*EFFORTS)
    sentence = verdict(rows, efforts=efforts)
    context = {"judge": "semantic", "judges": JUDGES, "span_source": "base_model", "n_harmful": 8,
               "n_benign": 4, "n_borderline": 2, "trained_grid": "s in [8], k = 10, spans: target",
               "heldout_grid": "prefill k in [5]; injection s in [8], k = 10", "profile": "quick",
               "efforts": efforts}
    path = write_report(out_dir, {"model": model, "baseline": baseline}, {**metrics, **base_metrics}, {},
                        rows, sentence, 0.05, context)
    return path, rows, sentence


def _section(page: str, heading: str) -> str:
    start = page.index(f"<h2>{heading}")
    end = page.find("<h2", start + 4)
    return page[start:end if end > 0 else len(page)]


def test_the_page_leads_with_the_verdict_and_the_headline_rows_in_order(tmp_path):
    path, rows, sentence = build_report(tmp_path)
    page = path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.glob(".*.tmp")] == []  # written atomically
    headline = page[page.index('<table id="headline">'):page.index("</table>")]
    assert page.index('class="verdict"') < page.index('id="headline"') < page.index("<h2>Plots")
    assert sentence.startswith("Safer") and str(escape(sentence)) in page
    positions = [headline.index(str(escape(r.label))) for r in rows]
    assert positions == sorted(positions) and len(rows) == 8  # every figure of es2.headline
    for r in rows:
        assert str(escape(r.words(0.05))) in headline
    assert "-75 pts" in headline and "Judge: <b>semantic</b>" in page and "<b>base_model</b>" in page
    order = ["Effort to break", "Plots", "Attack success, held-out", "Trained perturbations", "Other effort",
             "Refusal, capability", "Examples"]
    assert [page.index(f"<h2>{h}") for h in order] == sorted(page.index(f"<h2>{h}") for h in order)
    assert page.count("data:image/png;base64,") == 3  # ASR per judge and the depth-of-safety curve, inlined


def test_generations_are_escaped(tmp_path):
    page = build_report(tmp_path)[0].read_text(encoding="utf-8")
    assert SCRIPT not in page and "<script" not in page
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page


def test_trained_perturbations_have_their_own_table(tmp_path):
    page = build_report(tmp_path)[0].read_text(encoding="utf-8")
    held, trained = _section(page, "Attack success, held-out"), _section(page, "Trained perturbations")
    assert "trained_" not in held and "injection_s8_k10" in held and "whole" in held
    assert "(not in the headline)" in trained and "trained_injection_s8_k10" in trained
    assert "s in [8], k = 10, spans: target" in page


def test_effort_table_holds_only_effort_figures(tmp_path):
    effort = _section(build_report(tmp_path)[0].read_text(encoding="utf-8"), "Other effort")
    names = re.findall(r"<tr><td>([^<]+)</td>", effort)
    assert names == ["repe/mean/semantic", "scav/shift_norm_mean"]
    assert "3.250" in effort and "[" not in effort and "/s<" not in effort and "/k<" not in effort


def test_the_effort_certificate_shows_medians_censoring_ratio_and_the_paired_test(tmp_path):
    path, _, sentence = build_report(tmp_path)
    certificate = _section(path.read_text(encoding="utf-8"), "Effort to break")
    row = re.findall(r"<tr><td>RepE steering</td>(.*?)</tr>", certificate, re.S)[0]
    cells = re.findall(r'<td[^>]*>([^<]*)</td>', row)
    assert cells[0] == "steering norm / mean state norm" and cells[-1] == "8"
    assert cells[1].startswith("0.4 [") and cells[1].endswith(", &gt;1]")  # 3 of 8 never broken: upper bound censored
    assert cells[2].startswith("0.1 [") and cells[3] == "x4"
    assert float(cells[4]) < 0.05 and "effort to break: RepE steering x4" in sentence
    assert "Profile <b>quick</b>" in certificate


def test_examples_show_both_answers_and_every_judge(tmp_path):
    examples = _section(build_report(tmp_path)[0].read_text(encoding="utf-8"), "Examples")
    assert examples.count("<h3>") == len(ATTACKS) and examples.count("harmful request 3") == 0  # 3 per attack
    assert "model answer 1 to scav" in examples and "baseline answer 1 to scav" in examples
    assert "[semantic: R, jbb: R]" in examples and "[semantic: C, jbb: C]" in examples


def test_summary_leads_with_the_verdict_and_headline_rows():
    rows = headline_rows(_outcomes(0), _outcomes(1))
    lines = summary_text({"asr/direct/semantic": 0.0}, rows, verdict(rows), 0.05, "semantic").splitlines()
    assert lines[0] == verdict(rows) and lines[1] == ""
    assert [line.split()[0] for line in lines[2:2 + len(rows)]] == [r.label.split()[0] for r in rows]
    assert "0% vs    75%" in lines[2] and rows[0].words(0.05) in lines[2]
    assert lines[2 + len(rows) + 1].startswith("ASR (semantic)")
