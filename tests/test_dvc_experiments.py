"""DVC experiments end to end on a tiny model, in a throwaway git repo: `dvc exp run -S`, `dvc metrics diff`,
`dvc plots diff`, `dvc exp show`, and a `dvc push`/`dvc pull` round trip through a temporary local remote.

Every stage runs for real (validate, pairs, align writing its disabled marker, train, evaluate); the overrides
below shrink the work to seconds. About a minute on 2 CPU cores, most of it DVC and Python start-up.
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_params

TRACKED = ["dvc.yaml", "params.yaml", "data.dvc", ".dvc/config", "dvc-store", "es2"]
# name -> `dvc exp run -S` override; "traj" switches train.method in params (issue 6: the trajectory method runs
# through `dvc repro`, which `dvc exp run` is)
EXPERIMENTS = {"kl05": "train.kl_weight=0.5", "kl2": "train.kl_weight=2.0", "traj": "train.method=es2_trajectory"}
KL_EXPERIMENTS = ("kl05", "kl2")


def _env(root: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "DVC_SITE_CACHE_DIR": str(root.parent / "dvc_site"), "DVC_NO_ANALYTICS": "1",
            "ES2_THREADS": os.environ.get("ES2_THREADS", "1"),
            # `dvc exp run` commits experiments: give git an identity that does not depend on the machine
            "GIT_AUTHOR_NAME": "es2-test", "GIT_AUTHOR_EMAIL": "test@es2.invalid",
            "GIT_COMMITTER_NAME": "es2-test", "GIT_COMMITTER_EMAIL": "test@es2.invalid"}


def _sh(*cmd, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True)
    if check and done.returncode != 0:
        tail = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        raise AssertionError(f"{cmd} failed ({done.returncode}):\n{tail}")
    return done


def _cached_outs(root: Path) -> list[str]:
    """Stage outputs that live in the DVC cache (the `cache: false` ones are kept in git instead)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if opts.get("cache", True):
                paths.append(path)
    return paths


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("exp") / "project"
    for rel in TRACKED:
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, dst))
    (root / ".dvc/.gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (root / ".gitignore").write_text("__pycache__/\n")
    params_file = root / "params.yaml"
    tiny = tiny_params(yaml.safe_load(params_file.read_text()), tiny_model_dir)
    params_file.write_text(yaml.safe_dump(tiny, sort_keys=False))
    _sh("git", "init", "-q", cwd=root)
    _sh("git", "add", "-A", cwd=root)
    _sh("git", "commit", "-qm", "tiny-model project", cwd=root)
    _sh("dvc", "pull", "-q", "data.dvc", cwd=root)
    return root


@pytest.fixture(scope="module")
def experiments(project):
    """Run each experiment once for the module; returns {name: experiment commit}."""
    first = _sh("dvc", "exp", "run", "-n", "kl05", "-S", EXPERIMENTS["kl05"], cwd=project).stdout
    for stage in ("validate", "pairs", "align", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first, first
    assert (project / "artifacts/align/adapter/DISABLED.txt").exists()  # align.enabled: false left its marker
    second = _sh("dvc", "exp", "run", "-n", "kl2", "-S", EXPERIMENTS["kl2"], cwd=project).stdout
    assert "Running stage 'train'" in second and "Running stage 'pairs'" not in second, second
    third = _sh("dvc", "exp", "run", "-n", "traj", "-S", EXPERIMENTS["traj"], cwd=project).stdout
    assert "Running stage 'train'" in third and "Running stage 'evaluate'" in third, third
    refs = {}
    for line in _sh("git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps", cwd=project
                    ).stdout.splitlines():
        ref, sha = line.split()
        refs[ref.rsplit("/", 1)[-1]] = sha
    assert set(EXPERIMENTS) <= set(refs), refs
    return {name: refs[name] for name in EXPERIMENTS}


def test_exp_run_applies_params_and_writes_every_stage(project, experiments):
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["method"] == "es2_trajectory"  # the last experiment's results are applied to the workspace
    for name, rev in experiments.items():
        at_rev = yaml.safe_load(_sh("git", "show", f"{rev}:params.yaml", cwd=project).stdout)
        key, value = EXPERIMENTS[name].split("=")
        assert at_rev["train"][key.split(".")[1]] == (float(value) if name in KL_EXPERIMENTS else value)
        lock = yaml.safe_load(_sh("git", "show", f"{rev}:dvc.lock", cwd=project).stdout)
        assert {"validate", "pairs", "align", "train", "evaluate"} <= set(lock["stages"])
    assert json.loads((project / "artifacts/train/metrics.json").read_text())
    assert json.loads((project / "artifacts/evaluate/metrics.json").read_text())


def test_switching_train_method_in_params_trains_on_trajectories(project, experiments):
    """The "traj" experiment trained with recovery after injected spans: its metrics name the method and its
    curve logs the recovery term (the refusal CE column), which the ES2-only curves do not have."""
    def at(rev: str, path: str) -> str:
        return _sh("git", "show", f"{rev}:{path}", cwd=project).stdout

    assert json.loads(at(experiments["traj"], "artifacts/train/metrics.json"))["method"] == "es2_trajectory"
    assert json.loads(at(experiments["kl2"], "artifacts/train/metrics.json"))["method"] == "es2"
    recovery = [float(row["loss_refusal"]) for row in csv.DictReader(
        io.StringIO(at(experiments["traj"], "artifacts/train/curve.csv")))]
    assert recovery and all(r > 0 for r in recovery)
    assert "loss_refusal" not in at(experiments["kl2"], "artifacts/train/curve.csv").splitlines()[0]


def test_exp_show_lists_all_experiments(project, experiments):
    shown = json.loads(_sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    text = json.dumps(shown)
    for name, rev in experiments.items():
        assert f'"{name}"' in text and rev in text
    assert "train.kl_weight" in _sh("dvc", "exp", "show", "--no-pager", "--md", cwd=project).stdout


def test_metrics_diff_compares_the_experiments(project, experiments):
    a, b = experiments["kl05"], experiments["kl2"]
    diff = json.loads(_sh("dvc", "metrics", "diff", a, b, "--all", "--json", cwd=project).stdout)
    assert "artifacts/train/metrics.json" in diff and "artifacts/evaluate/metrics.json" in diff
    train = diff["artifacts/train/metrics.json"]
    assert train and all({"old", "new"} <= set(v) for v in train.values())
    params = json.loads(_sh("dvc", "params", "diff", a, b, "--json", cwd=project).stdout)
    kl = params["params.yaml"]["train.kl_weight"]
    assert (kl["old"], kl["new"]) == (0.5, 2.0)
    md = _sh("dvc", "metrics", "diff", a, b, "--md", cwd=project).stdout
    assert md.lstrip().startswith("|") and "artifacts/train/metrics.json" in md


def test_plots_diff_renders_both_revisions(project, experiments, tmp_path):
    a, b = experiments["kl05"], experiments["kl2"]
    out = tmp_path / "plots"
    _sh("dvc", "plots", "diff", a, b, "-o", str(out), cwd=project)
    assert (out / "index.html").stat().st_size > 0
    rendered = json.loads(_sh("dvc", "plots", "diff", a, b, "--json", "-o", str(tmp_path / "json"),
                              cwd=project).stdout)["data"]
    curve = rendered["artifacts/train/curve.csv"]
    assert {a, b} <= {rev for plot in curve for rev in plot["revisions"]}, curve
    images = [p for name, plots in rendered.items() if name.endswith(".png") for p in plots]
    assert images and all(Path(p["url"]).exists() for p in images)


def test_push_pull_round_trip_through_a_local_remote(project, experiments, tmp_path):
    remote = tmp_path / "remote"
    _sh("dvc", "remote", "add", "-d", "tmpremote", str(remote), cwd=project)
    try:
        _sh("dvc", "push", cwd=project)
        assert any(remote.rglob("*")), "dvc push wrote nothing"
        shutil.rmtree(project / ".dvc/cache")
        shutil.rmtree(project / "data")
        outs = _cached_outs(project)
        for rel in outs:
            path = project / rel
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        pulled = _sh("dvc", "pull", cwd=project)
        assert (project / "data/train/harmful.jsonl").exists(), pulled.stdout
        assert all((project / rel).exists() for rel in outs)
        status = _sh("dvc", "status", "--json", cwd=project).stdout
        assert json.loads(status) == {}, status
    finally:
        _sh("dvc", "remote", "default", "sample", cwd=project)
        _sh("dvc", "remote", "remove", "tmpremote", cwd=project)
