"""The es2 model as an MLflow pyfunc: `ES2Model` generates for prompts; `model_artifacts` gathers the folders
it is logged with (base, adapter, tokenizer and the es2 code) and `load_packaged` loads them back."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow.pyfunc

GENERATION_DEFAULTS = {"max_new_tokens": 32, "batch_size": 16}
ES2_PACKAGE = Path(__file__).resolve().parents[1]  # bundled with the model, which then loads without es2


class ES2Model(mlflow.pyfunc.PythonModel):
    """Base model + peft adapter (or a full model) + tokenizer; `predict` generates greedily for `prompt`s."""

    def load_context(self, context):  # MLflow passes context/model_input/params by keyword
        import torch

        model, self.tokenizer = load_packaged(context.artifacts, context.model_config or {})
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input, params=None):
        from es2.generation import generate

        options = {**GENERATION_DEFAULTS, **(params or {})}
        prompts = [str(p) for p in model_input["prompt"]]  # the signature makes every input a DataFrame
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=int(options["max_new_tokens"]),
                        batch_size=int(options["batch_size"]), progress=False)


def load_packaged(artifacts: dict, config: dict):
    """(model, tokenizer) in eval mode from a packaged es2 model's folders (`base`, `tokenizer`, and `adapter`
    when LoRA-trained) with the dtype and trust_remote_code it was logged with."""
    from es2.modeling import load_causal_lm

    model, tokenizer = load_causal_lm(str(artifacts["base"]), dtype=config.get("dtype", "float32"),
                                      trust_remote_code=bool(config.get("trust_remote_code")),
                                      tokenizer_from=str(artifacts["tokenizer"]))
    if "adapter" in artifacts:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(artifacts["adapter"]))
    return model.eval(), tokenizer


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([ParamSpec(k, "long", v) for k, v in GENERATION_DEFAULTS.items()])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=params)


def pip_requirements() -> list[str]:
    """Exact pins of what loading and generating needs: the installed versions without local tags such as
    +cpu (MLflow's inference would load the model at log time and pull in torchvision)."""
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}" for package in (
        "mlflow", "torch", "transformers", "peft", "tokenizers", "safetensors", "accelerate", "pandas", "jinja2",
        "tqdm", "pydantic", "pyyaml", "requests")]


def model_artifacts(params, trained: Path, base: str, staging: Path) -> dict[str, str]:
    """Local folders for the pyfunc: base (an HF folder), adapter (when peft-trained), tokenizer, and the es2
    package (bundled so that the model loads where es2 is not installed)."""
    from es2.modeling import load_causal_lm, load_tokenizer, resolve_model_path

    if (trained / "adapter_config.json").exists():
        base_dir = Path(resolve_model_path(base))
        if not base_dir.is_dir():  # an HF id in the local cache: materialise it
            model, _ = load_causal_lm(base, params.model.revision, params.model.trust_remote_code,
                                      params.model.dtype)
            base_dir = staging / "base"
            model.save_pretrained(base_dir)
        artifacts, tokenizer_source = {"base": str(base_dir), "adapter": str(trained)}, str(base_dir)
    else:  # full fine-tune: the folder is the model
        artifacts = {"base": str(trained)}
        tokenizer_source = str(trained) if (trained / "tokenizer_config.json").exists() else base
    load_tokenizer(tokenizer_source, trust_remote_code=params.model.trust_remote_code).save_pretrained(
        staging / "tokenizer")
    shutil.copytree(ES2_PACKAGE, staging / "code" / "es2",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return {**artifacts, "tokenizer": str(staging / "tokenizer")}
