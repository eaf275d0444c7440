"""params.yaml: the only home of hyperparameters and their defaults, parsed strictly.

This module holds types and validation only: no field has a default, so every key must be in params.yaml and
a value can never come from a second place that drifts from it. Each stage reads its own section. A missing
file or key, an unknown key, a wrong type and malformed YAML are refused with the key's dotted name (and, for
an unknown key, the valid keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator,
)

from es2.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    """Raw inputs, tracked by data.dvc. Evaluation files must not overlap the training files."""

    train_harmful: str
    train_harmless: str
    eval_harmful: str
    eval_harmless: str


class ModelParams(Section):
    """`name_or_path`: `smollm2-135m-instruct` (the embedded default), an HF hub id, or a local folder."""

    name_or_path: str
    revision: str | None
    trust_remote_code: bool
    dtype: Literal["float32", "bfloat16", "float16"]


class ValidateParams(Section):
    min_rows: int = Field(ge=1, description="row-count floor per file")
    min_chars: int = Field(ge=1, description="shortest prompt after stripping")
    max_chars: int = Field(ge=1, description="longest prompt")
    harmful_share_min: float = Field(ge=0, le=1, description="class balance: harmful / all rows")
    harmful_share_max: float = Field(ge=0, le=1)
    near_duplicate_jaccard: float = Field(gt=0, le=1, description="word 3-gram overlap counted as leakage")
    opening_word_share_max: float = Field(gt=0, le=1, description="warn when more than this share of the "
                                          "training prompts that open with one word are harmful")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_chars > self.max_chars or self.harmful_share_min > self.harmful_share_max:
            raise ValueError("min must not exceed max (min_chars/max_chars, harmful_share_min/max)")
        return self


class PairsParams(Section):
    strategy: Literal["nearest", "random"]
    neighbours: int = Field(ge=1, description="harmless partners per harmful prompt")
    cover_harmless: bool = Field(description="also pair every harmless prompt no neighbour list picked with its "
                                             "most similar harmful prompt, so no harmless data is dropped")
    seed: int
    val_fraction: float = Field(ge=0, lt=1)
    embedding_model: str
    batch_size: int = Field(ge=1)
    leakage_cosine: float = Field(gt=0, le=1, description="embedding similarity counted as a leak")


class LoraParams(Section):
    r: int = Field(ge=1)
    alpha: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str]


class AlignParams(Section):
    """Refusal warm-start: LoRA SFT to refuse harmful prompts and to keep the base's own answers otherwise."""

    enabled: bool
    harmless_prompts: int | None = Field(ge=1, description="harmless training prompts to self-distill (null: all)")
    max_new_tokens: int = Field(ge=1, description="length of the self-distilled harmless answers")
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="sequences per step, refusals and answers mixed as in the data")
    lr: float = Field(gt=0)
    seed: int
    eval_prompts: int = Field(ge=1, description="held-out prompts per class for the before/after rates")
    eval_max_new_tokens: int = Field(ge=1)
    lora: LoraParams


class TrainParams(Section):
    """ES2 fine-tuning and the baselines trained under the same harness (README, Training)."""

    method: Literal["es2", "es2_refusal", "es2_adversarial", "refusal_sft", "circuit_breakers", "es2_trajectory",
                    "trajectory"]
    layers: list[int] | list[float] = Field(min_length=1,
                                            description="HF hidden_states indices (0 = embeddings, l = after "
                                                        "block l-1), or fractions of the depth in (0, 1)")
    pooling: Literal["last", "mean", "response"]
    normalize: Literal["none", "center", "unit", "standardize"]
    distance: Literal["centroid", "pairwise", "nearest", "probe_margin", "fisher"]
    form: Literal["neg", "hinge", "rel_hinge"]
    margin: float = Field(gt=0)
    margin_ratio: float = Field(gt=0)
    kl_weight: float = Field(ge=0)
    kl_direction: Literal["forward", "reverse"]
    kl_temperature: float = Field(gt=0)
    kl_positions: Literal["prompt", "response", "all"]
    kl_answers: Literal["pairs", "self"] = Field(description="what follows a harmless prompt: the harmless "
                                                           "records' `response` if any (pairs), or the model's "
                                                           "own greedy answer before training (self)")
    kl_answer_tokens: int = Field(ge=1, description="kl_answers self: length of those answers")
    reduction: Literal["sum", "sequence"]
    refusal_weight: float = Field(ge=0, description="refusal CE weight (es2_refusal, refusal_sft)")
    cb_alpha: float = Field(gt=0, description="circuit_breakers coefficient scale")
    adversarial_share: float = Field(ge=0, le=1, description="es2_adversarial: share of each batch's harmful rows "
                                                             "trained with the refusal direction ablated")
    recovery_weight: float = Field(ge=0, description="recovery CE weight (es2_trajectory, trajectory)")
    trajectory_steps: list[int] = Field(min_length=1,
                                        description="own tokens s before the injected span (0 = prefilling)")
    trajectory_span_tokens: int = Field(ge=1, description="k: tokens of the injected span")
    trajectory_continuation_tokens: int = Field(ge=1, description="harmless trajectories' own continuation")
    trajectory_spans: Literal["target", "response", "base_model"] = Field(
        description="injected harmful spans: the records' target prefix, the harmful records' "
                    "`response` (user-supplied harmful answers), or answers of the not-yet-aligned "
                    "model.name_or_path (it complies)")
    full_finetune: bool
    lora: LoraParams
    lr: float = Field(gt=0)
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        description="transformers' learning-rate schedule over train.steps")
    warmup_steps: int = Field(ge=0, description="linear warm-up steps at the start of the schedule")
    weight_decay: float = Field(ge=0, description="AdamW weight decay")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        description="mixed precision: auto = bf16 on a GPU that supports it, else fp32")
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="pairs per device per micro-batch")
    grad_accum: int = Field(ge=1)
    seed: int
    max_length: int = Field(ge=8)
    save_steps: int = Field(ge=1)
    logging_steps: int = Field(ge=1)
    gradient_checkpointing: bool
    num_processes: int = Field(ge=1, description="> 1 launches through accelerate/torchrun")
    accelerate_config: str | None = Field(description="configs/accelerate/*.yaml for multi-GPU")


def _ordered_budget(value: tuple[float, float]) -> tuple[float, float]:
    if not 0 < value[0] < value[1]:
        raise ValueError(f"need 0 < low < high, got {list(value)}")
    return value


Budget = Annotated[tuple[float, float], AfterValidator(_ordered_budget)]


def _depth_band(value: tuple[float, float]) -> tuple[float, float]:
    if not 0 < value[0] <= value[1] <= 1:
        raise ValueError(f"need fractions of the depth with 0 < low <= high <= 1, got {list(value)}")
    return value


DepthBand = Annotated[tuple[float, float], AfterValidator(_depth_band)]


def depth_index(fraction: float, depth: int) -> int:
    """The hidden_states index at `fraction` of a `depth`-block model (at least 1: index 0 is the embeddings),
    the one rounding rule of every layer setting given as fractions (train/evaluate.layers, repe_band)."""
    return max(1, round(fraction * depth))


class AttackBudgets(Section):
    """The budgets of one evaluation profile (evaluate.profiles): what the costly attacks may spend per prompt."""

    effort_rounds: int = Field(ge=0, description="bisection rounds of the RepE and SCAV effort searches, after "
                                                 "bracketing from below by doubling (bracket 2 ** (1 / 2 ** r))")
    softprompt_prompts: int = Field(ge=1)
    softprompt_steps: int = Field(ge=1, description="optimisation steps per start")
    softprompt_restarts: int = Field(ge=1, description="starts for a prompt not yet broken")
    softprompt_checkpoints: list[int] = Field(min_length=1, description="steps within a start at which the "
                                                                        "answer is generated and judged")
    gcg_prompts: int = Field(ge=0)
    gcg_steps: int = Field(ge=1)
    gcg_search_width: int = Field(ge=1)
    gcg_topk: int = Field(ge=1)
    gcg_restarts: int = Field(ge=1)


class EvaluateParams(Section):
    """Safety and capability evaluation (es2 evaluate). Attack budgets are per model evaluated."""

    model: str = Field(description="a model folder, HF id, adapter folder or "
                                   "models:/NAME@ALIAS | models:/NAME/VERSION (in DVC, "
                                   "pin a VERSION: DVC cannot see an alias move)")
    baseline: str | None = Field(description="train-base = the model training started from")
    harmful: str | None = Field(description="default: data.eval_harmful")
    benign: str | None = Field(description="default: data.eval_harmless")
    limit: int = Field(ge=1, description="harmful prompts attacked")
    benign_limit: int = Field(ge=1, description="benign prompts answered for over-refusal and KL")
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    seed: int
    attacks: list[Literal["direct", "template", "prefill", "injection", "scav", "repe", "softprompt", "gcg"]]
    layers: list[int] | list[float] | None = Field(description="probe/steering layers (indices or fractions "
                                                                "of the depth); default train.layers")
    judges: list[str] = Field(min_length=1,
                              description="refusal judges run on every answer (es2 judge --help lists them)")
    headline_judge: str = Field(description="the judge behind the headline table and outcomes.json")
    span_source: str = Field(description="held-out prefill/injection spans: base_model (the "
                                         "unaligned model.name_or_path's own answers, cached), "
                                         "target, response, or a JSONL file of prompt + span")
    prefill_tokens: list[int] = Field(min_length=1, description="k forced tokens (held out: not 10)")
    injection_steps: list[int] = Field(min_length=1,
                                       description="s: own tokens before the span (held out: not train's)")
    injection_tokens: list[int] = Field(min_length=1,
                                        description="k: injected span lengths (an int = [int]; held out: not 10)")
    trained_perturbations: bool = Field(description="also run the training grid and span source, "
                                                    "labelled trained_*, never in the headline or gates")
    scav_p0: float = Field(gt=0, lt=1, description="SCAV pushes the probe's harmful probability to p0")
    scav_min_accuracy: float = Field(ge=0, le=1, description="perturb layers whose held-out probe "
                                                             "accuracy passes this bar (per model)")
    scav_layers: list[int] | None = Field(description="layers SCAV fits probes on; null: every decoder "
                                                      "layer")
    scav_effort: Budget = Field(description="[low, high] SCAV budget searched: shift norm / the "
                                            "layer's median state norm")
    repe_coefficients: list[float] = Field(description="fixed steering strengths reported as ASR, "
                                                       "in units of the layer's mean state norm")
    repe_effort: Budget = Field(description="[low, high] RepE coefficient searched")
    repe_direction: Literal["mean_difference", "pca"] = Field(
        description="RepE reading vector: difference of class means, or PCA of paired differences")
    repe_band: DepthBand = Field(description="[low, high] steered layers as fractions of the model's depth")
    softprompt_tokens: int = Field(ge=1)
    softprompt_lr: float = Field(gt=0)
    objective: Literal["target", "anti_recovery"] = Field(
        description="soft prompt and GCG: the affirmative target alone, or also penalise a "
                    "refusal right after it (attacks recovery-trained models where they defend)")
    recovery_weight: float = Field(ge=0, description="weight of the anti-recovery term")
    profile: str = Field(description="which of `profiles` sets the attack budgets")
    profiles: dict[str, AttackBudgets] = Field(description="named budget sets (quick, standard, paper); "
                                                           "params.yaml is their only home")
    mc_csv: str | None = Field(description="MMLU-format CSV, JSON(L) or Parquet; default: the packaged sample")
    mc_formulation: Literal["continuation", "letters"] = Field(
        description="lm-eval's MMLU prompt: the option texts scored (mmlu_continuation) or the "
                    "letters A-D (mmlu; small models answer one letter to everything)")
    judge_model: str | None = Field(description="folder of a sequence-classification harm judge (GPU)")
    generative_judge: str | None = Field(description="folder of a local causal LM used as a judge (GPU)")
    generative_template: str = Field(description="harmbench | llamaguard | a template file")
    compare: list[str] = Field(description="extra model specs evaluated like the baseline (compare1, ...)")
    depth_layer: int | None = Field(ge=0, description="refusal-direction layer for the depth claim test; "
                                                      "default the middle of the evaluate layers")
    depth_bootstrap: int = Field(ge=0, description="bootstrap resamples for the projection correlation")
    reuse_baseline: bool = Field(description="keep the baseline's evaluation in the es2 cache, keyed by its "
                                             "files, this protocol, the prompts and the es2 source")

    @model_validator(mode="after")
    def _known_profile(self):
        if self.profiles and self.profile not in self.profiles:
            raise ValueError(f"evaluate.profile {self.profile!r} is not among evaluate.profiles "
                             f"({', '.join(self.profiles)})")
        return self

    @property
    def budgets(self) -> AttackBudgets:
        """The attack budgets of the selected profile."""
        if self.profile not in self.profiles:
            raise ConfigError(f"evaluate.profiles has no {self.profile!r} profile",
                              "copy evaluate.profiles from the repository's params.yaml")
        return self.profiles[self.profile]

    @field_validator("injection_tokens", mode="before")
    @classmethod
    def _one_k(cls, value):
        return [value] if isinstance(value, int) else value

    @field_validator("injection_tokens")
    @classmethod
    def _positive_k(cls, value):
        if any(k < 1 for k in value):
            raise ValueError(f"every k must be >= 1, got {value}")
        return value


class GateParams(Section):
    """`champion` moves only when every gate passes; `null` turns a gate off.

    DSR (defence success rate) = 1 - mean ASR over `attacks` under `judge` (evaluate's asr/<attack>/<judge>).
    Relative gates compare with the current champion and are skipped while there is none; absolute gates
    always apply.
    """

    attacks: list[str] = Field(min_length=1,
                               description="attack names whose ASR makes up the DSR (held-out perturbations)")
    judge: str = Field(description="the judge of asr/<attack>/<judge> behind DSR and over-refusal")
    alpha: float = Field(gt=0, lt=1, description="a gain counts only when its paired test has p < alpha")
    min_dsr: float | None = Field(ge=0, le=1, description="absolute DSR floor")
    min_dsr_gain: float | None = Field(ge=-1, le=1, description="challenger DSR - champion DSR >= this")
    min_effort_gain: float | None = Field(gt=0, description="challenger / champion median budget to break "
                                                            "a prompt (effort/<attack>/median), each attack")
    effort_attacks: list[str] = Field(description="attacks whose effort/<attack>/median the effort gate compares")
    max_kl: float | None = Field(ge=0, description="capability/kl_to_baseline ceiling (on the baseline's "
                                                   "benign answers), nats per token")
    max_over_refusal: float | None = Field(ge=0, le=1, description="over_refusal/<judge>/rate ceiling")
    min_mc_accuracy: float | None = Field(ge=0, le=1, description="capability/mc_accuracy floor")


class RegistryParams(Section):
    """MLflow: where `es2 register` logs the run and registers the model, and how `es2 promote` gates it.

    The tracking URI is not a parameter: `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the
    working directory (artifacts under `mlruns/`).
    """

    experiment: str = Field(min_length=1)
    model_name: str = Field(min_length=1, description="registered model name")
    retries: int = Field(ge=0, description="attempts after the first when the server does not answer")
    backoff_seconds: float = Field(gt=0, description="MLflow's HTTP backoff factor, rounded up to whole seconds "
                                                     "(MLflow reads an integer): the retries wait 0, then 2x, 4x, "
                                                     "... it, plus random jitter")
    timeout_seconds: int = Field(ge=1, description="per HTTP request (large model uploads need more)")
    gates: GateParams


class Params(Section):
    data: DataParams
    model: ModelParams
    validate_: ValidateParams = Field(alias="validate")
    pairs: PairsParams
    align: AlignParams
    train: TrainParams
    evaluate: EvaluateParams
    registry: RegistryParams

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
        elif err["type"] == "missing":
            lines.append(f"missing key '{key}' (params.yaml is the only home of defaults: every key is set there)")
        else:
            lines.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return ConfigError(f"{source}: " + "; ".join(lines), "edit the key in params.yaml (see README, Parameters); "
                                                         "the repository's params.yaml has every key")


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
    """Parse params.yaml, which must set every key, plus `section.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path.resolve()}: params file not found (it holds every hyperparameter; there are no "
                          "defaults elsewhere)", "run from the repository root or pass --params FILE")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}", "fix the YAML syntax (indentation, colons)") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections", "see params.yaml in the repo")
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise _explain(exc, str(path)) from None
