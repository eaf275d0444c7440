"""The stage table (es2/pipeline.py) is the pipeline's one declaration: dvc.yaml, the CLI, the flow, the git
ignores and each stage's deps and params must agree with it and with the code the stage runs."""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib

import grimp
import pytest

from es2.cli import PARAMS_COMMANDS
from es2.config import load_params
from es2.pipeline import ARTIFACTS, ROOT, STAGES, code_deps, dvc_yaml, import_closure, module_file, stage
from tests.conftest import REPO
from tests.params_reads import ROOT as PARAMS_ROOT
from tests.params_reads import covered, function_reads

NAMES = [s.name for s in STAGES]


def test_dvc_yaml_is_rendered_from_the_stage_table():
    assert (REPO / "dvc.yaml").read_text(encoding="utf-8") == dvc_yaml(), (
        "dvc.yaml differs from the stage table: run `es2 pipeline dvc-yaml > dvc.yaml` (edit es2/pipeline.py, "
        "not dvc.yaml)")


def test_cli_and_flow_run_the_stages_of_the_table():
    from flows.pipeline import DVC_STAGES

    assert DVC_STAGES == NAMES
    assert set(NAMES) <= set(PARAMS_COMMANDS)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("es2", cache_dir=None)


@pytest.mark.parametrize("name", NAMES)
def test_every_module_a_stage_runs_is_among_its_deps(graph, name):
    """grimp's import graph (imports inside functions included), independent of the table's own closure."""
    s = stage(name)
    deps = set(code_deps(s))
    runs = {s.module} | graph.find_upstream_modules(s.module)
    missing = sorted(f for m in runs if (f := module_file(m).relative_to(ROOT).as_posix()) not in deps)
    assert not missing, f"stage {name} runs {missing} without depending on them"


def test_closure_follows_lazy_and_package_imports():
    closure = import_closure("es2.stages.evaluate")
    # evaluate runs generation, the losses and model loading only through imports inside functions
    assert {"es2.generation", "es2.modeling", "es2.stages.train"} <= closure
    assert {"es2", "es2.stages", "es2.judges"} <= closure  # packages whose __init__ runs first
    assert "es2.cli" not in closure and "es2.stages.validate" not in closure


def _package_data() -> list[str]:
    """Non-Python files shipped in the package (pyproject's package-data), relative to the repository."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    return sorted(p.relative_to(REPO).as_posix() for package, patterns in globs.items() for pattern in patterns
                  for p in (REPO / package.replace(".", "/")).glob(pattern))


def _strings(module: str) -> str:
    tree = ast.parse(module_file(module).read_text(encoding="utf-8"))
    return "\n".join(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))


@pytest.mark.parametrize("name", NAMES)
def test_package_data_a_stage_names_is_among_its_deps(name):
    s = stage(name)
    # the stage table names every stage's inputs, so its strings say nothing about what this stage reads
    text = "\n".join(_strings(m) for m in import_closure(s.module) if m != "es2.pipeline")
    named = [f for f in _package_data() if f.rsplit("/", 1)[-1] in text]
    missing = [f for f in named if f not in s.inputs]
    assert not missing, f"stage {name}'s code names {missing}: add them to its inputs in es2/pipeline.py"


_ARTIFACT_PATH = re.compile(rf"(?<![\w./-]){ARTIFACTS}/")


def _artifact_literals(source: str) -> list[tuple[int, int, str]]:
    """(line, column, string) for each string in the code (docstrings aside) that spells a path under the artifacts
    folder, and each function default that spells the folder itself."""
    tree = ast.parse(source)
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, documented) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    defaults = {id(d) for n in ast.walk(tree) if isinstance(n, ast.arguments) for d in [*n.defaults, *n.kw_defaults]
                if isinstance(d, ast.Constant) and d.value == ARTIFACTS}
    return sorted((n.lineno, n.col_offset, n.value) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
                  and (_ARTIFACT_PATH.search(n.value) or id(n) in defaults))


def test_artifact_paths_come_from_the_stage_table():
    """Stage folders and the files in them are spelled in es2/pipeline.py only (`stage(name).out_dir`, `.path()`,
    `ARTIFACTS`), so moving one is an edit of the table, not a hunt through the modules."""
    modules = sorted(p for p in [*(REPO / "es2").rglob("*.py"), *(REPO / "flows").rglob("*.py")]
                     if p != REPO / "es2" / "pipeline.py")
    literals = [f"{p.relative_to(REPO)}:{line}: {text!r}" for p in modules
                for line, _, text in _artifact_literals(p.read_text(encoding="utf-8"))]
    assert not literals, f"artifact paths spelled out instead of taken from es2.pipeline: {literals}"


def test_the_literal_check_sees_paths_and_defaults():
    source = ('"""Writes artifacts/x/."""\n'
              'def run(out="artifacts/train", root="artifacts", other="tests/artifacts/y"):\n'
              '    """Reads artifacts/pairs/."""\n'
              '    flavor.get("artifacts")\n'
              '    return Path("artifacts/pairs/val.jsonl"), f"run `dvc pull artifacts/align/adapter` in {root}"\n')
    assert [text for _, _, text in _artifact_literals(source)] == [
        "artifacts/train", "artifacts", "artifacts/pairs/val.jsonl", "run `dvc pull artifacts/align/adapter` in "]


@pytest.mark.parametrize("name", NAMES)
def test_every_param_a_stage_reads_is_declared(name):
    """The stage's CLI command, followed into every es2 function the params reach."""
    handler = PARAMS_COMMANDS[name]
    reads = function_reads("es2.cli", handler.__name__, (("params", PARAMS_ROOT),))
    undeclared = sorted(r for r in reads if not covered(r, stage(name).params))
    assert not undeclared, f"stage {name} reads params {undeclared} that its entry in es2/pipeline.py lacks"


def test_declared_params_exist_in_params_yaml():
    raw = load_params(REPO / "params.yaml").model_dump(by_alias=True)
    for s in STAGES:
        for key in s.params:
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {s.name} declares unknown param {key}"
                node = node[part]


def test_the_params_analysis_sees_what_the_issue_named():
    """evaluate reads data and align keys (its prompts, the warm-started base) through helpers in other modules."""
    reads = function_reads("es2.stages.evaluate", "run_evaluate", (("params", PARAMS_ROOT),))
    assert {"data.eval_harmful", "align.enabled", "train.trajectory_steps"} <= reads
    assert not any(r == "train" or r.startswith("train.lr") for r in reads)  # precise, not the whole section


def _ignored(paths: list[str]) -> set[str]:
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    return set(done.stdout.split())


def test_metrics_and_plots_are_versioned_in_git_and_cached_outputs_are_not():
    versioned = [s.path(p) for s in STAGES for p in [*s.metrics, *(p for p, _ in s.plots)]]
    cached = [s.path(p) for s in STAGES for p in s.outs]
    assert not _ignored(versioned), "metrics and plots must not be git-ignored (dvc metrics diff reads git)"
    # a cached output is a file or a folder: either it is ignored or whatever is written inside it is
    ignored = _ignored([q for p in cached for q in (p, f"{p}/file")])
    assert all(p in ignored or f"{p}/file" in ignored for p in cached), "DVC-cached outputs must stay out of git"
