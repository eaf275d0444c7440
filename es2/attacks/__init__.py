"""White-box attacks, each fitted against the model under evaluation (adaptive).

Every attack returns `AttackResult`s: the prompts it attacked, the generations it obtained, and its effort figures
(how hard the model made it: SCAV shift norm, smallest steering coefficient, soft-prompt steps and loss, ...).
Judging (keyword lists, classifier) is done by the evaluation stage on the generations, the same way for all.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AttackResult:
    name: str  # unique label, e.g. "prefill_k10", "injection_s8"
    family: str  # attack family: direct, template, prefill, injection, scav, repe, softprompt, gcg
    prompts: list[str]  # the harmful requests attacked (before the attack's modifications)
    generations: list[str]  # the model's answers under attack, one per prompt
    effort: dict[str, float] = field(default_factory=dict)  # attack-effort certificate figures
    details: list[dict] = field(default_factory=list)  # per-prompt extras (e.g. steps to success)
    x: float | None = None  # the sweep variable for curves (k, s, coefficient), when there is one
