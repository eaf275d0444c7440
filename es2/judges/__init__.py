"""Judges: whether a response is a refusal (full or partial), and for the model-based ones whether it is harmful.

Every judge has a `name` and `refused(prompts, responses) -> list[bool]` (True = refusal), so the evaluation,
`es2 judge` and the trajectory builder treat them alike:

  jbb, qi      the JailbreakBench and Qi et al. keyword lists (es2.judges.keywords)
  semantic     sentence embeddings + a small trained head, shipped with the package (es2.judges.semantic)
  classifier   a local HF sequence-classification harm judge (`path=`; es2.judges.classifier)
  generative   a local causal LM through a HarmBench or Llama Guard template (`path=`, `template=`)

The first three run offline on a CPU (`OFFLINE_JUDGES`); the last two need a model you supply.
"""

from __future__ import annotations

from es2.judges.keywords import (JBB_REFUSAL_PREFIXES, JUDGES, QI_REFUSAL_KEYWORDS, KeywordJudge, is_refusal,
                                 refusal_flags, refusal_rate)
from es2.judges.margin import refusal_margin
from es2.stats import wilson_interval

OFFLINE_JUDGES = ("jbb", "qi", "semantic")
MODEL_JUDGES = ("classifier", "generative")


def get_judge(name: str, **options):
    """The judge called `name` (see the module docstring); `path` (and `template`) for the model-based ones."""
    if name in JUDGES:
        return KeywordJudge(name)
    if name == "semantic":
        from es2.judges.semantic import shipped_judge

        return shipped_judge(options.get("path"))
    if name in MODEL_JUDGES and not options.get("path"):
        from es2.errors import ModelError

        raise ModelError(f"the {name} judge needs a model", f"get_judge({name!r}, path=LOCAL_MODEL_FOLDER)")
    if name == "classifier":
        from es2.judges.classifier import ClassifierJudge

        return ClassifierJudge(options["path"])
    if name == "generative":
        from es2.judges.generative import GenerativeJudge

        return GenerativeJudge(options["path"], options.get("template", "harmbench"))
    raise ValueError(f"unknown judge {name!r}; expected one of {', '.join(OFFLINE_JUDGES + MODEL_JUDGES)}")


def judge_all(judges: dict, prompts: list[str], responses: list[str]) -> dict[str, list[bool]]:
    """{judge name: refused flags} for the same responses."""
    return {name: [bool(f) for f in judge.refused(prompts, responses)] for name, judge in judges.items()}


def __getattr__(name: str):  # the classifier judge imports transformers: only when asked for
    if name == "ClassifierJudge":
        from es2.judges.classifier import ClassifierJudge

        return ClassifierJudge
    raise AttributeError(name)


__all__ = ["JBB_REFUSAL_PREFIXES", "JUDGES", "MODEL_JUDGES", "OFFLINE_JUDGES", "QI_REFUSAL_KEYWORDS",
           "KeywordJudge", "get_judge", "is_refusal", "judge_all", "refusal_flags", "refusal_margin",
           "refusal_rate", "wilson_interval"]
