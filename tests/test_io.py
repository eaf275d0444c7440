"""Atomic writes (es2.io): nothing half-written survives, and finished files get the user's normal mode."""

import os

import pytest

import es2.io
from es2.data.importers import import_records, write_records
from es2.io import atomic_dir, atomic_path, write_json, write_jsonl, write_text
from tests.conftest import FIXTURES


def test_finished_files_follow_the_umask_not_mkstemp_private_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_every_writer_ends_with_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
        write_text(tmp_path / "a.txt", "x")
        write_json(tmp_path / "a.json", {})
        write_jsonl(tmp_path / "a.jsonl", [{}])
        write_records(import_records("advbench", FIXTURES / "importers" / "advbench.csv", None),
                      tmp_path / "out" / "advbench.jsonl")
        (tmp_path / "private.json").write_text("{}")
        os.chmod(tmp_path / "private.json", 0o600)  # a rewrite gives the umask's mode, as a new file would
        write_json(tmp_path / "private.json", {"b": 2})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == dict.fromkeys(["plain.txt", "a.txt", "a.json", "a.jsonl", "advbench.jsonl", "private.json"],
                                  mode)


def test_without_proc_the_umask_is_read_and_left_as_it_was(tmp_path, monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(es2.io, "open", no_proc, raising=False)  # as on macOS
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert target.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_atomic_dir_swaps_the_finished_folder_in_for_the_old_one(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_dir(target) as staging:
        assert staging.parent == tmp_path and list(staging.iterdir()) == []
        (staging / "new.bin").write_text("new")
        assert (target / "old.bin").read_text() == "old"  # the old folder serves until the block succeeds
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_failed_atomic_dir_leaves_the_old_folder_and_no_staging_folder(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as staging:
            (staging / "half.bin").write_text("partial")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.bin"] and (target / "old.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_new_atomic_dir_gets_its_parents_and_the_mode_a_plain_mkdir_gives(tmp_path):
    target = tmp_path / "cache" / "models" / "aligned"
    old = os.umask(0o027)
    try:
        with atomic_dir(target) as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (target / "config.json").read_text() == "{}" and target.stat().st_mode & 0o777 == 0o750
