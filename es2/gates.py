"""Promotion gates: whether a challenger's run metrics beat the champion's by the margins in
`registry.gates`, as a table of rows and the reasons for each failure.

Pure arithmetic over metric dicts, kept apart from MLflow so the decision can be tested and read without a
tracking server; `es2.tracking.promote` fetches the metrics and moves the `champion` alias by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from es2.config import GateParams


class GateRow(NamedTuple):
    """One line of the gate table: each side's value (None when its run lacks the metric), the threshold as
    text, and whether the challenger passed."""

    gate: str
    champion: float | None
    challenger: float | None
    threshold: str
    passed: bool


@dataclass
class Decision:
    """The outcome of `es2.tracking.promote`: whether `champion` moved, the gate table and the reasons."""

    promoted: bool
    model_name: str
    challenger_version: str | None
    champion_version: str | None  # the champion before this decision
    table: list[GateRow] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def table_text(self) -> str:
        def fmt(value):
            return "-" if value is None else f"{value:.4g}"

        champion = f"champion (v{self.champion_version})" if self.champion_version else "champion (none)"
        head = ("gate", champion, f"challenger (v{self.challenger_version})", "threshold", "pass")
        rows = [head] + [(r.gate, fmt(r.champion), fmt(r.challenger), r.threshold,
                          "yes" if r.passed else "NO") for r in self.table]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        stays = f"v{self.champion_version}" if self.champion_version else "unset"
        verdict = (f"PROMOTED: '{self.model_name}' v{self.challenger_version} is the champion"
                   if self.promoted else f"NOT PROMOTED: '{self.model_name}' champion stays {stays}")
        return "\n".join(lines + ["", verdict] + [f"  - {r}" for r in self.reasons])


def _metric(metrics: dict | None, key: str) -> float | None:
    if metrics is None:
        return None
    value = metrics.get(key)
    return None if value is None or math.isnan(value) else float(value)


def dsr(metrics: dict | None, gates: GateParams) -> float | None:
    """Defence success rate: 1 - mean ASR over the gate's attacks (None when any is missing)."""
    values = [_metric(metrics, f"evaluate/asr/{a}/{gates.judge}") for a in gates.attacks]
    return None if metrics is None or any(v is None for v in values) else 1 - sum(values) / len(values)


def decide(challenger: dict, champion: dict | None, gates: GateParams) -> tuple[list[GateRow], list[str]]:
    """Gate table and failure reasons for a challenger's run metrics against the champion's (or none)."""
    eps = 1e-12
    rows: list[GateRow] = []
    reasons: list[str] = []
    attacks = "+".join(gates.attacks)

    def absolute(gate, key_or_value, limit, higher_is_better, what):
        cp = key_or_value(champion) if champion is not None else None
        ch = key_or_value(challenger)
        threshold = f"{'>=' if higher_is_better else '<='} {limit:g}"
        ok = ch is not None and (ch >= limit - eps if higher_is_better else ch <= limit + eps)
        rows.append(GateRow(gate, cp, ch, threshold, ok))
        if ch is None:
            reasons.append(f"{gate}: the challenger's run has no {what} metric")
        elif not ok:
            side = "below the floor" if higher_is_better else "above the ceiling"
            reasons.append(f"{gate}: challenger {what} {ch:.4g} is {side} {limit:g}")

    def relative(gate, key_or_value, limit, ratio, what):
        ch = key_or_value(challenger)
        threshold = f">= champion x {limit:g}" if ratio else f">= champion {limit:+g}"
        if champion is None:
            rows.append(GateRow(gate, None, ch, threshold + " (no champion: skipped)", True))
            return
        cp = key_or_value(champion)
        if ch is None or cp is None:
            rows.append(GateRow(gate, cp, ch, threshold, False))
            whose = "the challenger" if ch is None else "the champion"
            reasons.append(f"{gate}: {whose}'s run has no {what} metric to compare (set the gate to null to "
                           "skip it)")
            return
        if ratio:
            gain = ch / cp if cp > 0 else (math.inf if ch > 0 else 1.0)
            ok = gain >= limit - eps
            detail = f"challenger {what} {ch:.4g} is {gain:.3g}x the champion's {cp:.4g} (needs {limit:g}x)"
        else:
            gain = ch - cp
            ok = gain >= limit - eps
            detail = f"challenger {what} {ch:.4g} vs champion {cp:.4g}: {gain:+.4g} (needs >= {limit:+g})"
        rows.append(GateRow(gate, cp, ch, threshold, ok))
        if not ok:
            reasons.append(f"{gate}: {detail}")

    def dsr_of(m):
        return dsr(m, gates)

    if gates.min_dsr is not None:
        absolute("dsr", dsr_of, gates.min_dsr, True, f"DSR ({attacks}, {gates.judge})")
    if gates.min_dsr_gain is not None:
        relative("dsr_gain", dsr_of, gates.min_dsr_gain, False, f"DSR ({attacks}, {gates.judge})")
    if gates.min_effort_gain is not None:
        relative("effort_gain", lambda m: _metric(m, "evaluate/effort/scav/shift_norm_mean"),
                 gates.min_effort_gain, True, "SCAV effort (effort/scav/shift_norm_mean)")
    if gates.max_kl is not None:
        absolute("kl", lambda m: _metric(m, "evaluate/capability/kl_to_baseline"), gates.max_kl, False,
                 "KL to the baseline (capability/kl_to_baseline)")
    if gates.max_over_refusal is not None:
        absolute("over_refusal", lambda m: _metric(m, f"evaluate/over_refusal/{gates.judge}/rate"),
                 gates.max_over_refusal, False, f"over-refusal (over_refusal/{gates.judge}/rate)")
    if gates.min_mc_accuracy is not None:
        absolute("mc_accuracy", lambda m: _metric(m, "evaluate/capability/mc_accuracy"),
                 gates.min_mc_accuracy, True, "MC accuracy (capability/mc_accuracy)")
    return rows, reasons
