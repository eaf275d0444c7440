"""What a pipeline run records, read from the working tree: params and stage metrics flattened to MLflow's
key/value shape, the training curve, the files to log, the data and code versions, and the pipeline key that
makes logging idempotent.

Kept apart from MLflow (es2.tracking only sends these to the tracking server), so that what a run contains
can be read and tested without one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

METRIC_STAGES = ("align", "train", "evaluate")
ARTIFACT_STAGES = ("validation", "pairs", "align", "train", "evaluate")
ARTIFACT_SUFFIXES = (".png", ".html", ".csv", ".json")
MAX_ARTIFACT_BYTES = 20 * 2**20


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """params.yaml as `section.key` -> value strings (lists as JSON)."""
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for key, value in obj.items():
            out.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: (obj if isinstance(obj, str) else json.dumps(obj))[:6000]}


def run_metrics(artifacts_dir: Path) -> list[tuple[str, float, int]]:
    """(key, value, step) for every metric a run logs: each stage's metrics.json under `<stage>/` at step 0,
    then the training curve under `train/curve/` at its own steps."""
    metrics = []
    for stage in METRIC_STAGES:
        path = artifacts_dir / stage / "metrics.json"
        if path.exists():
            values = flatten_metrics(json.loads(path.read_text(encoding="utf-8")))
            metrics += [(f"{stage}/{k}", v, 0) for k, v in values.items()]
    curve = artifacts_dir / "train" / "curve.csv"
    if curve.exists():
        metrics += [(_metric_key(f"train/curve/{name}"), value, step)
                    for step, name, value in read_curve(curve)]
    return metrics


def flatten_metrics(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts/lists as `a/b/0` keys; strings and None are dropped."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten_metrics(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out.update(flatten_metrics(value, f"{prefix}/{i}"))
    elif isinstance(obj, (bool, int, float)) and prefix:
        out[_metric_key(prefix)] = float(obj)
    return out


def _metric_key(key: str) -> str:
    """The key as MLflow accepts it: letters, digits, `_-./` and spaces only, at most 250 characters."""
    key = re.sub(r"[^\w./\- ]", "_", key)
    return re.sub(r"/+", "/", key).strip("/")[:250]


def read_curve(path: Path) -> list[tuple[int, str, float]]:
    """curve.csv rows as (step, column, value), NaN cells skipped."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        return []
    header = lines[0].split(",")
    rows = []
    for line in lines[1:]:
        cells = line.split(",")
        step = int(float(cells[0]))
        for name, cell in zip(header[1:], cells[1:]):
            try:
                value = float(cell)
            except ValueError:
                continue
            if not math.isnan(value):
                rows.append((step, name, value))
    return rows


def logged_files(artifacts_dir: Path) -> list[tuple[str, Path]]:
    """(stage, file) for the plots, reports and tables each stage wrote, logged under `<stage>/`; files over
    MAX_ARTIFACT_BYTES stay out so that a large table cannot bloat the run."""
    files = []
    for stage in ARTIFACT_STAGES:
        folder = artifacts_dir / stage
        if folder.is_dir():
            files += [(stage, f) for f in sorted(folder.iterdir())
                      if f.is_file() and f.suffix in ARTIFACT_SUFFIXES and not f.name.startswith(".")
                      and f.stat().st_size <= MAX_ARTIFACT_BYTES]
    return files


def version_tags(root: Path) -> dict[str, str]:
    """Data and code versions: DVC hashes (data.dvc, each dvc.lock stage's outs) and the git commit."""
    import yaml

    tags: dict[str, str] = {}
    if (root / "data.dvc").exists():
        for out in (yaml.safe_load((root / "data.dvc").read_text()) or {}).get("outs", []):
            tags[f"dvc.data.{out.get('path', 'data')}.md5"] = str(out.get("md5"))
    lock = root / "dvc.lock"
    if lock.exists():
        text = lock.read_text()
        tags["dvc.lock.sha256"] = hashlib.sha256(text.encode()).hexdigest()
        for stage, spec in ((yaml.safe_load(text) or {}).get("stages") or {}).items():
            for dep in spec.get("deps", []):
                if dep.get("path") == "data" and dep.get("md5"):
                    tags.setdefault("dvc.data.data.md5", str(dep["md5"]))
            for out in spec.get("outs", []):
                if out.get("md5"):
                    tags[f"dvc.{stage}.{out['path']}.md5"] = str(out["md5"])
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["es2.git_dirty"] = str(bool(_git(root, "status", "--porcelain", "--untracked-files=no")))
    return tags


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def pipeline_key(params_json: str, root: Path, artifacts_dir: Path, files: list[Path], base: str) -> str:
    """hash(params, dvc.lock, the base model reference, every logged file's name and bytes). The files count
    too, so stages re-run outside DVC (a stale dvc.lock) still make a new run."""
    digest = hashlib.sha256(params_json.encode())
    if (root / "dvc.lock").exists():
        digest.update((root / "dvc.lock").read_bytes())
    digest.update(base.encode())
    for path in sorted(files):
        digest.update(path.relative_to(artifacts_dir).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
