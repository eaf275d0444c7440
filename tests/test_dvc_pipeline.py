"""The real DVC pipeline in a throwaway git repo: data comes from the DVC remote shipped in the repo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TRACKED = ["dvc.yaml", "params.yaml", "data.dvc", ".dvc/config", "dvc-store", "es2", ".gitignore"]


def _sh(*cmd, cwd, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def dvc_project(root: Path) -> Path:
    """A throwaway git repo at `root` holding the pipeline's tracked files, with the sample data pulled from
    the DVC remote shipped in the repo."""
    for rel in TRACKED:
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    (root / ".dvc/.gitignore").write_text("/config.local\n/tmp\n/cache\n")
    _sh("git", "init", "-q", cwd=root)
    _sh("git", "add", "-A", cwd=root)
    _sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=root)
    _sh("dvc", "pull", "-q", "data.dvc", cwd=root)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return dvc_project(tmp_path_factory.mktemp("project"))


# `dvc repro pairs` runs the data stages; align and train need minutes of CPU and have their own tests.
def test_repro_runs_validate_then_pairs_from_pulled_data(project):
    assert (project / "data/train/harmful.jsonl").exists()
    _sh("dvc", "repro", "pairs", cwd=project)
    report = json.loads((project / "artifacts/validation/report.json").read_text())
    assert report["success"] is True
    stats = json.loads((project / "artifacts/pairs/stats.json").read_text())
    assert stats["splits"]["train"]["pairs"] > 0
    again = _sh("dvc", "repro", "pairs", cwd=project).stdout
    assert "didn't change, skipping" in again and "Running stage" not in again
    metrics = _sh("dvc", "metrics", "show", "--json", cwd=project).stdout
    assert "splits" in metrics


def test_failed_validation_stops_dvc_and_keeps_later_artifacts(project):
    _sh("dvc", "repro", "pairs", cwd=project)
    pairs_before = (project / "artifacts/pairs/train.jsonl").read_bytes()
    harmful = project / "data/train/harmful.jsonl"
    good = harmful.read_bytes()
    try:
        harmful.write_bytes(good + b'{"id": "bad", "prompt": "   ", "label": "harmful", "source": "t"}\n')
        done = _sh("dvc", "repro", "pairs", cwd=project, check=False)
        assert done.returncode != 0
        assert "validate" in done.stderr + done.stdout
        assert (project / "artifacts/pairs/train.jsonl").read_bytes() == pairs_before
        report = json.loads((project / "artifacts/validation/report.json").read_text())
        assert report["success"] is False
    finally:
        harmful.write_bytes(good)


def test_metrics_are_committed_so_metrics_diff_compares_with_a_commit(project):
    """As in DVC's example-get-started: metrics live in git, so `dvc metrics diff main` reads main's."""
    _sh("dvc", "repro", "pairs", cwd=project)
    _sh("git", "add", "-A", cwd=project)
    _sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pairs", cwd=project)
    tracked = _sh("git", "ls-files", "artifacts", cwd=project).stdout.split()
    assert tracked == ["artifacts/pairs/stats.json", "artifacts/validation/report.json"]  # cached outputs are not
    params = project / "params.yaml"
    committed = params.read_text()
    try:
        params.write_text(committed.replace("neighbours: 2 ", "neighbours: 3 "))
        _sh("dvc", "repro", "pairs", cwd=project)
        diff = json.loads(_sh("dvc", "metrics", "diff", "HEAD", "--json", cwd=project).stdout)
        assert diff["artifacts/pairs/stats.json"]["neighbours"] == {"old": 2, "new": 3, "diff": 1}
    finally:
        params.write_text(committed)
        _sh("dvc", "repro", "pairs", cwd=project)
