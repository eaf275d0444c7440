"""What a pipeline run records and how gates decide, without MLflow (es2.run_record, es2.gates)."""

import json
import subprocess
import sys

from es2.run_record import flatten_metrics, read_curve, run_metrics


def test_record_and_gate_modules_do_not_import_mlflow():
    code = "import sys, es2.gates, es2.run_record; print('mlflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_flatten_metrics_keeps_numbers_under_mlflow_safe_keys():
    flat = flatten_metrics({"asr": {"direct": 0.25, "gcg?": 1}, "per_layer": [{"d'": 2}], "note": "x", "n": None,
                            "ok": True})
    assert flat == {"asr/direct": 0.25, "asr/gcg_": 1.0, "per_layer/0/d_": 2.0, "ok": 1.0}


def test_run_metrics_read_each_stage_then_the_curve_at_its_steps(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"heldout_dprime_ratio": 2.5}))
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps({"asr/direct/jbb": 0.0}))
    (tmp_path / "train" / "curve.csv").write_text("step,loss,loss_kl\n5,1.5,nan\n10,1.25,0.5\n")
    assert read_curve(tmp_path / "train" / "curve.csv") == [(5, "loss", 1.5), (10, "loss", 1.25),
                                                             (10, "loss_kl", 0.5)]
    metrics = run_metrics(tmp_path)
    assert ("train/heldout_dprime_ratio", 2.5, 0) in metrics and ("evaluate/asr/direct/jbb", 0.0, 0) in metrics
    assert ("train/curve/loss", 1.25, 10) in metrics and not any(k.startswith("align/") for k, _, _ in metrics)
