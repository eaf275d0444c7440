import subprocess
import sys

import pytest

from es2.cli import EXAMPLES, main


def test_top_level_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "es2.cli", "--help"], capture_output=True, text=True, check=True)
    for command in {name.split()[0] for name in EXAMPLES}:
        assert command in out.stdout


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_each_subcommand_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_unknown_param_key_exits_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("pairs:\n  neighbors: 2\n")
    assert main(["pairs", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'pairs.neighbors'" in err and "neighbours" in err


def test_import_writes_records_and_reports_bad_input(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("question\nHow do I tie a bowline knot?\n")
    out = tmp_path / "out.jsonl"
    assert main(["data", "import", "csv", str(src), "--label", "harmless", "--columns", "prompt=question",
                 "--output", str(out)]) == 0
    assert '"label": "harmless"' in out.read_text()
    assert main(["data", "import", "csv", str(src), "--label", "harmless", "--output", str(out)]) == 2
    assert "prompt" in capsys.readouterr().err


def test_run_and_serve_start_the_flows_as_a_process_after_checking_params(monkeypatch):
    """es2 never imports flows (an import contract): `es2 run` hands its flags to `python -m flows`."""
    import es2.cli as cli

    started = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: started.append(cmd) or 3)
    assert main(["run", "--no-register", "--set", "train.steps=3"]) == 3  # the flow's exit status
    assert main(["serve"]) == 3
    assert started == [[sys.executable, "-m", "flows", "run", "--no-register", "--set", "train.steps=3"],
                       [sys.executable, "-m", "flows", "serve"]]
    assert main(["run", "--set", "train.stepz=3"]) == 2 and len(started) == 2  # a bad key never starts a flow


def test_pipeline_dvc_yaml_prints_the_rendered_file(capsys):
    from es2.pipeline import dvc_yaml

    assert main(["pipeline", "dvc-yaml"]) == 0
    assert capsys.readouterr().out == dvc_yaml()
