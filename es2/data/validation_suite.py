"""The Great Expectations suite of the validate stage, and running it with Data Docs.

The expectations are standard GX ones over the frame es2.data.validation builds: its raw columns as read, and
derived columns computed in pandas for checks GX cannot express (stripped length, normalised text, control
characters, special tokens, near-duplicate leakage). Per-file checks (the expected label, the row-count floor)
and training-only checks (class balance) are the same expectations restricted with a GX `row_condition`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from es2.config import ValidateParams
from es2.data.schema import LABELS, OPTIONAL_FIELDS, REQUIRED_FIELDS

if TYPE_CHECKING:
    from es2.data.validation import Dataset


def expectations(gxe, Column, datasets: list[Dataset], params: ValidateParams,
                 check_special_tokens: bool) -> list:
    """The suite, in reading order. `meta.check` is the short name shown in the summary."""

    def meta(check: str, dataset: str = "all files") -> dict:
        return {"check": check, "dataset": dataset}

    parsed = Column("has_required") == True  # noqa: E712 (a GX condition, not a Python comparison)
    out = [
        gxe.ExpectColumnValuesToBeNull(column="parse_error", meta=meta("readable line (UTF-8 JSON object)")),
        gxe.ExpectColumnValuesToBeNull(column="missing_columns", meta=meta("required columns present")),
    ]
    out += [gxe.ExpectColumnValuesToNotBeNull(column=c, row_condition=parsed, meta=meta("value not null"))
            for c in REQUIRED_FIELDS]
    out += [gxe.ExpectColumnValuesToBeOfType(column=c, type_="str", meta=meta("string type"))
            for c in REQUIRED_FIELDS + OPTIONAL_FIELDS]
    out += [
        gxe.ExpectColumnValuesToNotMatchRegex(column="prompt_text", regex=r"^\s*$",
                                              meta=meta("prompt empty after stripping")),
        gxe.ExpectColumnValuesToBeBetween(column="prompt_stripped_chars", min_value=params.min_chars,
                                          row_condition=Column("prompt_stripped_chars") > 0,
                                          meta=meta("prompt too short (stripped)")),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt_text", max_value=params.max_chars,
                                                meta=meta("prompt too long")),
        gxe.ExpectColumnValuesToBeNull(column="prompt_control_char", meta=meta("control character in prompt")),
    ]
    if check_special_tokens:
        out.append(gxe.ExpectColumnValuesToBeNull(
            column="prompt_special_token", meta=meta("model special token in prompt (role injection)")))
    out.append(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(LABELS), meta=meta("known label")))
    out += [gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[ds.expected_label],
                                            row_condition=Column("dataset") == ds.name,
                                            meta=meta("label matches the file", ds.name))
            for ds in datasets if ds.expected_label]
    out += [
        gxe.ExpectColumnValuesToBeUnique(column="id", meta=meta("unique id")),
        gxe.ExpectColumnValuesToBeUnique(column="prompt_text", meta=meta("exact duplicate prompt")),
        gxe.ExpectColumnValuesToBeUnique(column="prompt_normalised",
                                         meta=meta("normalised duplicate prompt")),
    ]
    if any(ds.split == "eval" for ds in datasets):
        out.append(gxe.ExpectColumnValuesToBeBetween(
            column="train_jaccard", max_value=params.near_duplicate_jaccard, strict_max=True,
            meta=meta("train/eval near-duplicate leakage (word 3-gram Jaccard)", "eval files vs training")))
    train = Column("split") == "train"
    out += [
        gxe.ExpectColumnMeanToBeBetween(
            column="is_harmful", min_value=params.harmful_share_min, max_value=params.harmful_share_max,
            row_condition=train, meta=meta("class balance (harmful share of training rows)", "training")),
        gxe.ExpectColumnDistinctValuesToContainSet(
            column="label", value_set=list(LABELS), row_condition=train,
            meta=meta("both classes in training", "training")),
    ]
    out += [gxe.ExpectTableRowCountToBeBetween(min_value=params.min_rows,
                                               row_condition=(Column("dataset") == ds.name)
                                               & Column("parse_error").is_null(),
                                               meta=meta("row-count floor (readable records)", ds.name))
            for ds in datasets]
    return out


def run_suite(frame, datasets: list[Dataset], params: ValidateParams, docs_dir: Path,
              check_special_tokens: bool):
    """Run the suite via a Checkpoint that writes Data Docs into docs_dir; return the validation result."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.expectations.row_conditions import Column

    # An ephemeral context whose only Data Docs site is ours: the default one would go to a fresh /tmp dir.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={"es2": {
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
        progress_bars=ProgressBarsConfig(globally=False),
    )
    ctx = gx.get_context(mode="ephemeral", project_config=config)
    suite = gx.ExpectationSuite(name="es2_prompts")
    for expectation in expectations(gxe, Column, datasets, params, check_special_tokens):
        suite.add_expectation(expectation)
    suite = ctx.suites.add(suite)
    batch = (ctx.data_sources.add_pandas("es2").add_dataframe_asset("prompts")
             .add_batch_definition_whole_dataframe("all_rows"))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="es2_prompts", data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="es2_validate", validation_definitions=[vd],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["es2"])],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row_key"],
                       "return_unexpected_index_query": False},
    ))
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))
