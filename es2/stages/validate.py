"""The `validate` stage: the data quality suite over the files named in params (or given on the command line)."""

from __future__ import annotations

from pathlib import Path

from es2.config import Params
from es2.data.validation import ValidationReport, validate_datasets
from es2.pipeline import stage


def run_validate(params: Params, out_dir: str | Path = stage("validate").out_dir, harmful: Path | None = None,
                 harmless: Path | None = None) -> ValidationReport:
    """Validate training files against each other and against the evaluation files (leakage).

    With --harmful/--harmless the user validates new files before adopting them; they are still checked for
    leakage into the configured evaluation files when those exist. Prompts are also checked for the configured
    model's special-token strings (its tokenizer is loaded for that).
    """
    from es2.data.prompt_checks import special_token_strings
    from es2.modeling import load_tokenizer

    data, model = params.data, params.model
    eval_files = [Path(p) for p in (data.eval_harmful, data.eval_harmless) if Path(p).exists()]
    # a prompt holding the model's own role markers would inject a turn into its training data
    tokens = special_token_strings(load_tokenizer(model.name_or_path, model.revision, model.trust_remote_code))
    return validate_datasets(harmful or data.train_harmful, harmless or data.train_harmless, eval_files,
                             params.validate_, Path(out_dir).resolve(), special_tokens=tokens)
