"""Artifacts travel: an adapter that `train` wrote under one es2 cache loads after the cache moves (as on a
colleague's machine after `dvc pull`), a missing merged warm start is rebuilt from the align adapter, and when
it cannot be, the error names the command that brings back what rebuilds it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from es2.config import load_params
from es2.errors import ModelError
from es2.modeling import load_causal_lm, merged_model_name
from es2.stages.align import run_align
from es2.stages.evaluate import load_model
from es2.stages.train import run_train
from tests.conftest import REPO

ADAPTER = Path("artifacts/train/adapter")
ALIGN = Path("artifacts/align/adapter")


def _params(tiny_model_dir):
    return load_params(REPO / "params.yaml", (
        f"model.name_or_path={tiny_model_dir}", "align.enabled=true", "align.steps=2", "align.batch_size=4",
        "align.lr=0.01", "align.harmless_prompts=4", "align.max_new_tokens=4", "align.eval_prompts=2",
        "align.eval_max_new_tokens=4", "train.layers=[1,2]", "train.steps=2", "train.batch_size=4",
        "train.logging_steps=1", "train.save_steps=2"))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A machine's folder: `repo/` with the align stage's adapter and the train stage's adapter, trained on the
    merged warm start in the es2 cache `cache/`."""
    root = tmp_path_factory.mktemp("machine")
    repo = root / "repo"
    (repo / "artifacts" / "pairs").mkdir(parents=True)
    for name, ids in (("train", range(8)), ("val", range(8, 12))):
        rows = [{"id": f"p{i}", "harmful_id": f"h{i}", "harmful": f"explain how to steal car number {i}",
                 "harmless_id": f"s{i}", "harmless": f"explain how to wash car number {i}", "similarity": 0.5,
                 "rank": 0, "category": "c"} for i in ids]
        (repo / "artifacts" / "pairs" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        mp.setenv("ES2_CACHE", str(root / "cache"))
        params = _params(tiny_model_dir)
        run_align(params, "artifacts/align", "artifacts/pairs")
        run_train(params, "artifacts/train", "artifacts/pairs")
    return root


@pytest.fixture
def machine(trained, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the trained machine's folder to move things in; the working directory is its repo."""
    copy = tmp_path / "machine"
    shutil.copytree(trained, copy)
    monkeypatch.chdir(copy / "repo")
    monkeypatch.setenv("ES2_CACHE", str(copy / "cache"))
    return copy


def _logits(params) -> torch.Tensor:
    model, tokenizer = load_model(str(ADAPTER), params)  # how `es2 evaluate` loads an adapter folder
    with torch.no_grad():
        return model(**tokenizer(["explain how to wash a car"], return_tensors="pt")).logits


def _merged(machine: Path) -> Path:
    return machine / "cache" / "models" / merged_model_name(machine / "repo" / ALIGN)


def _move_cache(machine: Path, monkeypatch) -> Path:
    moved = machine / "elsewhere" / "es2-cache"
    moved.parent.mkdir()
    (machine / "cache").rename(moved)
    monkeypatch.setenv("ES2_CACHE", str(moved))
    return moved


def test_the_adapter_names_its_base_by_a_cache_reference_and_loads_after_the_cache_moves(
        machine, tiny_model_dir, monkeypatch):
    params = _params(tiny_model_dir)
    reference = f"es2-cache:models/{_merged(machine).name}"
    assert json.loads((ADAPTER / "adapter_config.json").read_text())["base_model_name_or_path"] == reference
    card = (ADAPTER / "README.md").read_text()  # the model card names it the same way
    assert f"base_model: {reference}" in card and "/cache/models/" not in card
    before = _logits(params)
    moved = _move_cache(machine, monkeypatch)
    assert torch.equal(_logits(params), before)
    assert not (machine / "cache").exists() and (moved / "models" / _merged(machine).name).is_dir()


def test_a_missing_merged_warm_start_is_rebuilt_from_the_align_adapter(machine, tiny_model_dir):
    params = _params(tiny_model_dir)
    before = _logits(params)
    shutil.rmtree(_merged(machine))  # a colleague's cache: `dvc pull` brought the adapters, not the merged model
    assert torch.equal(_logits(params), before)
    rebuilt, tiny = (load_file(folder / "model.safetensors") for folder in (_merged(machine), tiny_model_dir))
    assert any(not torch.equal(rebuilt[k], tiny[k]) for k in tiny)  # the align adapter is merged in


def test_a_warm_start_that_cannot_be_rebuilt_is_named_with_the_command_that_brings_it_back(
        machine, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    params = _params(tiny_model_dir)
    name = _merged(machine).name
    shutil.rmtree(_merged(machine))
    shutil.rmtree(ALIGN)
    with pytest.raises(ModelError, match=rf"(?s)merged warm start {name} is not in the es2 cache .*"
                                         rf"{ALIGN} is missing.*run `dvc pull artifacts/align/adapter`"):
        _logits(params)
    model, _ = load_causal_lm(str(tiny_model_dir))  # a retrained align adapter merges into another folder
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(ALIGN))
    with pytest.raises(ModelError, match=rf"{ALIGN} is another align adapter \(it merges into aligned-"):
        _logits(params)


def test_adapters_saved_with_an_absolute_base_path_still_load(machine, tiny_model_dir, monkeypatch):
    """Adapters written before references were portable name this machine's cache folder: that folder when it
    exists, else the same entry of the cache in use (here moved, then emptied and rebuilt)."""
    params = _params(tiny_model_dir)
    before = _logits(params)
    config_file = ADAPTER / "adapter_config.json"
    config = json.loads(config_file.read_text())
    outside = machine / "kept-by-hand"
    shutil.copytree(_merged(machine), outside)
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(outside)}))
    shutil.rmtree(_merged(machine))
    shutil.rmtree(ALIGN)  # nothing to rebuild from: only the absolute path can be what loads
    assert torch.equal(_logits(params), before)

    old_path = str(_merged(machine))  # the old cache location, gone once the cache moves
    shutil.copytree(outside, _merged(machine))
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": old_path}))
    moved = _move_cache(machine, monkeypatch)
    assert torch.equal(_logits(params), before)
    assert not Path(old_path).exists() and (moved / "models" / Path(old_path).name).is_dir()
