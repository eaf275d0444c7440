"""The pipeline, declared once: every stage's command, inputs, outputs, params, metrics and plots.

The CLI takes its stage folders from here, the Prefect flow its stage list and report links, and `dvc.yaml` is
rendered from this table (`es2 pipeline dvc-yaml > dvc.yaml`; a test fails when the two disagree). A stage's code
dependencies are not listed by hand: they are the import closure within `es2/` of its entry module, imports
inside functions included, so a module the stage runs can never be missing from its deps.

Metrics and plots are not cached by DVC: they are committed to git (`.gitignore` lets them through), so
`dvc metrics diff main` and `dvc plots diff main` compare against the committed state.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ARTIFACTS = "artifacts"  # every stage writes into its own folder below this one
DATA = "data"            # the raw inputs, tracked by data.dvc
PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent    # deps are written relative to the folder holding the package


@dataclass(frozen=True)
class Stage:
    """One DVC stage. `outs` are cached by DVC; `uncached` are rewritten by every run and versioned nowhere;
    `metrics` and `plots` (path -> dvc plot properties) are versioned in git. Output paths are relative to
    the stage's folder; `inputs` (data, upstream outputs, package data files) are relative to the repository."""

    name: str
    folder: str
    module: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...] = ()
    uncached: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[tuple[str, dict], ...] = ()

    @property
    def out_dir(self) -> str:
        return f"{ARTIFACTS}/{self.folder}"

    @property
    def cmd(self) -> str:
        return f"es2 {self.name} --out {self.out_dir}"

    def path(self, rel: str = "") -> str:
        return f"{self.out_dir}/{rel}" if rel else self.out_dir


_SURVIVAL = {"x": "budget", "y": "still_refused", "template": "linear"}
_JUDGE_HEAD = "es2/resources/judge/head.json"
_RECOVERIES = "es2/resources/recoveries.txt"

STAGES: tuple[Stage, ...] = (
    Stage("validate", "validation", "es2.stages.validate",
          inputs=(DATA,), params=("data", "model", "validate"),
          uncached=("data_docs",), metrics=("report.json",)),
    Stage("pairs", "pairs", "es2.stages.pairs",
          # the validation report orders pairs after a successful validation
          inputs=(DATA, f"{ARTIFACTS}/validation/report.json"), params=("data", "pairs"),
          outs=("train.jsonl", "val.jsonl", "eval.jsonl"), uncached=("similarity.png",), metrics=("stats.json",)),
    Stage("align", "align", "es2.stages.align",
          inputs=(f"{ARTIFACTS}/pairs/train.jsonl", f"{ARTIFACTS}/pairs/val.jsonl", _JUDGE_HEAD, _RECOVERIES),
          # align trains through train's training arguments with its own steps, batch, rate and seed
          params=("model", "align", "train.gradient_checkpointing", "train.lr_schedule", "train.warmup_steps",
                  "train.weight_decay", "train.precision"),
          outs=("adapter",), metrics=("metrics.json",)),
    Stage("train", "train", "es2.stages.train",
          inputs=(f"{ARTIFACTS}/pairs/train.jsonl", f"{ARTIFACTS}/pairs/val.jsonl",
                  f"{ARTIFACTS}/align/metrics.json", _JUDGE_HEAD, _RECOVERIES),
          params=("model", "align.enabled", "train"),
          outs=("adapter",), uncached=("curve.png",), metrics=("metrics.json",),
          plots=(("curve.csv", {"x": "step", "y": "loss"}),)),
    Stage("evaluate", "evaluate", "es2.stages.evaluate",
          inputs=(DATA, f"{ARTIFACTS}/pairs/val.jsonl", f"{ARTIFACTS}/align/adapter", f"{ARTIFACTS}/train/adapter",
                  _JUDGE_HEAD, _RECOVERIES, "es2/resources/benign_text.txt", "es2/resources/mmlu_sample.csv",
                  "es2/templates/report.html.j2"),
          params=("model", "evaluate", "data.eval_harmful", "data.eval_harmless", "align.enabled", "train.layers",
                  "train.trajectory_steps", "train.trajectory_span_tokens", "train.trajectory_spans",
                  "registry.retries", "registry.backoff_seconds", "registry.timeout_seconds",
                  "registry.gates.alpha"),
          outs=("examples.jsonl", "outcomes.json"),
          uncached=("report.html", "intervals.json", "depth_projection.json", "headline.json"),
          metrics=("metrics.json",),
          plots=(("depth.csv", {"x": "step", "y": "asr", "template": "linear"}), ("asr_jbb.png", {}),
                 ("asr_semantic.png", {}), ("survival_repe.csv", _SURVIVAL), ("survival_scav.csv", _SURVIVAL),
                 ("survival_softprompt.csv", _SURVIVAL))),
)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(s.name for s in STAGES)}")


def module_file(module: str) -> Path | None:
    """The source file of an `es2` module or package (None for a name that is not a module, e.g. a function)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(module: str, source: Path) -> set[str]:
    """Every es2 module `source` imports, at module level or inside a function (the stages import lazily)."""
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from the importing package
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from es2 import tracking`
    return {name for name in found if name.split(".")[0] == PACKAGE.name and module_file(name)}


def import_closure(module: str) -> set[str]:
    """`module` and every es2 module it runs, directly or not, with the packages above each (Python runs a
    package's __init__ before any module in it)."""
    closure: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        package = name.rpartition(".")[0]
        todo.extend([package] if package else [])
        todo.extend(_imported(name, module_file(name)))
    return closure


def code_deps(stage_: Stage) -> list[str]:
    """The stage's code dependencies: the files of its entry module's import closure, relative to the repo."""
    return sorted(module_file(m).relative_to(ROOT).as_posix() for m in import_closure(stage_.module))


def _dvc_stage(s: Stage) -> dict:
    entry: dict = {"cmd": s.cmd, "deps": [*s.inputs, *code_deps(s)], "params": list(s.params)}
    outs = [s.path(p) for p in s.outs] + [{s.path(p): {"cache": False}} for p in s.uncached]
    if outs:
        entry["outs"] = outs
    if s.metrics:
        entry["metrics"] = [{s.path(p): {"cache": False}} for p in s.metrics]
    if s.plots:
        entry["plots"] = [{s.path(p): {"cache": False, **props}} for p, props in s.plots]
    return entry


DVC_YAML_HEADER = """\
# Generated from the stage table in es2/pipeline.py by `es2 pipeline dvc-yaml > dvc.yaml`: edit the table, not
# this file (tests/test_pipeline.py fails when they disagree). `dvc repro` re-runs only stages whose deps or
# params changed; a stage's code deps are its entry module's import closure within es2/. Commands run the `es2`
# CLI from the active environment (`make run` puts .venv/bin first on PATH).
"""


def dvc_yaml() -> str:
    """dvc.yaml's text, rendered from STAGES."""
    import yaml

    body = yaml.safe_dump({"stages": {s.name: _dvc_stage(s) for s in STAGES}}, sort_keys=False, width=110)
    return DVC_YAML_HEADER + body
