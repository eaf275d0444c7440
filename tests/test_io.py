"""Atomic writes (es2.io): nothing half-written survives, and finished files get the user's normal mode."""

import os

import pytest

from es2.io import atomic_path, write_json


def test_finished_files_follow_the_umask_not_mkstemp_private_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert target.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
