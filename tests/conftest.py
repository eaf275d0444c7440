"""Shared test setup: offline environment, paths to the optional shared datasets, small record fixtures, the
tiny model and a finished train stage on it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

# Offline and quiet before any library import reads them. Tests never touch the network or the user's home.
_TMP = Path(tempfile.mkdtemp(prefix="es2-tests-"))
for key, value in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("ES2_CACHE", str(_TMP / "cache"))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture
def shared_datasets() -> Path:
    """The development datasets beside the checkout; tests needing them skip when absent (e.g. in a bare CI)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS} (only present on the development machine)")
    return SHARED_DATASETS


def make_records(label: str, n: int, stem: str) -> list[dict]:
    """n distinct, valid records of one label, with prompts that share no word 3-grams across stems."""
    return [
        {"id": f"{stem}-{i}", "prompt": f"{stem} request number {i}: please {stem} item {i * 7919 % 1000}",
         "label": label, "source": "fixture", "category": stem}
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer random Llama with a chat-template tokenizer (no download)."""
    from tests.tiny_model import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The tiny model and its tokenizer, loaded once per test module on one thread (the attack tests share it;
    a module that needs a fresh model per test defines its own `lm`)."""
    import torch

    from es2.modeling import load_causal_lm

    torch.set_num_threads(1)
    return load_causal_lm(str(tiny_model_dir))


@pytest.fixture(scope="session")
def trained(tiny_model_dir, tmp_path_factory):
    """A finished train stage: a perturbed (non-zero) LoRA on the tiny model, its metrics, curve and plot,
    the align metrics. Returns (template artifacts dir, in-memory peft model, tokenizer). Here rather than in
    tests/tracking_support.py so that both tracking test modules share one (a fixture imported into two
    modules is built once per module, whatever its scope); tests/test_portable_artifacts.py defines its own
    `trained`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from es2.modeling import load_tokenizer
    from es2.stages.train import _save_curve

    art = tmp_path_factory.mktemp("pipeline") / "artifacts"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA B starts at zero: make the adapter change the logits
    model.eval()
    model.save_pretrained(art / "train" / "adapter")
    history = [{"step": s, "loss": 1.0 / s, "loss/separation": -0.5 * s, "loss/kl": 0.01 * s,
                "grad_norm": 2.0} for s in (5, 10, 15, 20)]
    _save_curve(history, art / "train")
    (art / "train" / "metrics.json").write_text(json.dumps({
        "method": "es2", "steps": 20, "world_size": 1, "heldout_dprime_base": 1.2,
        "heldout_dprime_trained": 2.9,
        "heldout_dprime_ratio": 2.42, "heldout_norm_change": 0.03, "heldout_kl_harmless": 0.004,
        "final_train_loss": 0.05, "wall_seconds": 42.0,
        "per_layer": {"base": {"dprime/mean": 1.2, "dprime/layer1": 1.1}, "trained": {"dprime/mean": 2.9}}}))
    (art / "align").mkdir()
    (art / "align" / "metrics.json").write_text(json.dumps({
        "enabled": True, "steps": 40,
        "before": {"examples": {"harmful": ["Sure, ..."]},
                   "refusal_jbb": {"rate": 0.125, "ci95": [0.04, 0.31], "n": 24}},
        "after": {"refusal_jbb": {"rate": 0.92, "ci95": [0.74, 0.98], "n": 24}}}))
    return art, model, load_tokenizer(str(tiny_model_dir))


def tiny_params(params: dict, model_dir: Path) -> dict:
    """params.yaml shrunk to seconds on the tiny model: every stage still runs for real (align writes its
    disabled marker; evaluate runs the direct and injection attacks at s = 0, so depth.csv has rows)."""
    params["model"]["name_or_path"] = str(model_dir)
    params["align"]["enabled"] = False
    params["train"].update(layers=[1, 2], steps=2, batch_size=4, logging_steps=1, save_steps=2)
    params["evaluate"].update(model="artifacts/train/adapter", baseline=None, attacks=["direct", "injection"],
                              injection_steps=[0], injection_tokens=2, limit=2, max_new_tokens=4,
                              layers=[1, 2])
    return params


def tool_path(name: str) -> str | None:
    """A command-line tool from this venv's bin (pip-installed linters), else from PATH; None when absent."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the servers tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
