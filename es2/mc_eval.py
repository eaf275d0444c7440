"""Multiple-choice accuracy through lm-evaluation-harness, on a model already loaded in this process.

This is the reported multiple-choice figure: lm-eval's own loglikelihood scoring, zero-shot, no chat template,
in the prompt of one of its two MMLU tasks, so the method matches published lm-eval numbers even though the
questions do not:

- ``letters`` (its ``mmlu``): "The following are multiple choice questions (with answers) about SUBJECT.",
  the question, ``A. ..`` to ``D. ..``, ``Answer:``; the continuations `` A`` to `` D``; metric ``acc``.
- ``continuation`` (its ``mmlu_continuation``, "cloze"): "The following are questions (with answers) about
  SUBJECT.", ``Question: ..``, ``Answer:``; the continuations are the four option texts; metric ``acc_norm``
  (loglikelihood per character, so a long option is not penalised for its length). Small models have a
  strong letter bias (SmolLM2-135M-Instruct answers "A" to nearly every question, 25% on a balanced sample)
  but rank option texts well, so this is the form that measures their capability.

Offline by construction: the questions are written to a temporary CSV read by the `datasets` library's
packaged ``csv`` builder (local, no hub lookup), with that library's cache in the same temporary folder.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Literal

from es2.capability import LETTERS, _eval_mode, load_mc_csv
from es2.stats import wilson_interval

TASK = "es2_multiple_choice"
_COLUMNS = ("subject", "question", "choice0", "choice1", "choice2", "choice3")


def _description(kind: str) -> str:
    """lm-eval's per-subject MMLU description as one template (none for a question without subject)."""
    return ("{% if subject %}The following are " + kind + " (with answers) about "
            "{{ subject.replace('_', ' ') }}.\n\n{% endif %}")


# lm_eval/tasks/mmlu/default/_default_template_yaml and mmlu/continuation/_continuation_template_yaml
FORMULATIONS = {
    "letters": {
        "description": _description("multiple choice questions"),
        "doc_to_text": "{{ question.strip() }}\nA. {{ choice0 }}\nB. {{ choice1 }}\nC. {{ choice2 }}\n"
                       "D. {{ choice3 }}\nAnswer:",
        "doc_to_choice": list(LETTERS),
        "metric": "acc",
    },
    "continuation": {
        "description": _description("questions"),
        "doc_to_text": "Question: {{ question.strip() }}\nAnswer:",
        "doc_to_choice": "{{ [choice0, choice1, choice2, choice3] }}",
        "metric": "acc_norm",
    },
}
Formulation = Literal["letters", "continuation"]


def _task_config(csv_path: Path, cache_dir: Path, formulation: Formulation) -> dict:
    """lm-eval's MMLU task in the given formulation, on a local CSV."""
    from datasets import Features, Value

    # Every text column read as a string with no NA parsing: pandas would otherwise turn an option "007" into
    # 7 or "None" into a missing value, and the prompt would show something other than the CSV.
    features = Features({**{name: Value("string") for name in _COLUMNS}, "answer": Value("int64")})
    form = FORMULATIONS[formulation]
    return {
        "task": TASK,
        "dataset_path": "csv",
        "dataset_kwargs": {"data_files": {"test": str(csv_path)}, "cache_dir": str(cache_dir),
                           "features": features, "na_filter": False},
        "test_split": "test",
        "output_type": "multiple_choice",
        "description": form["description"],
        "doc_to_text": form["doc_to_text"],
        "doc_to_choice": form["doc_to_choice"],
        "doc_to_target": "answer",
        "num_fewshot": 0,
        "metric_list": [{"metric": form["metric"], "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _write_questions(questions: list[dict], path: Path) -> None:
    """The questions in the packaged column layout, whatever layout they were read from."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*_COLUMNS, "answer"])
        for q in questions:
            writer.writerow([q.get("subject", ""), q["question"], *q["choices"], q["answer"]])


def _choice(sample: dict, lengths: list[int]) -> int:
    """The option lm-eval's metric counts as chosen: np.argmax of the loglikelihoods, each divided by its
    option's length in characters for ``acc_norm`` (all 1 for ``acc``); on a tie the earlier option."""
    scores = [float(ll) / n for (ll, _), n in zip(sample["filtered_resps"], lengths)]
    return scores.index(max(scores))


def lm_eval_multiple_choice(model, tokenizer, questions: list[dict] | str | Path, batch_size: int = 8,
                            formulation: Formulation = "letters") -> dict:
    """Score MMLU-format questions with lm-eval's HFLM wrapped around `model` (a transformers or PEFT model).

    questions: as from ``es2.capability.load_mc_csv``, or the path of such a file (read with it, so every
        layout it accepts works and bad rows fail with its messages).
    formulation: ``letters`` (lm-eval's ``mmlu``) or ``continuation`` (its ``mmlu_continuation``); see above.
    Returns ``{"accuracy", "n", "correct", "predicted", "ci_low", "ci_high"}``: ``correct`` (bool) and
    ``predicted`` (the chosen option, 0-3) are per question in the order given (the paired outcomes for
    comparing two models), the interval is Wilson 95%; accuracy NaN for no questions.
    The model's train/eval mode is restored. lm-eval gives `tokenizer` a pad token when it has none.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {sorted(FORMULATIONS)}; got {formulation!r}")
    if isinstance(questions, (str, Path)):
        questions = load_mc_csv(questions)
    if not questions:
        return {"accuracy": float("nan"), "n": 0, "correct": [], "predicted": [], "ci_low": float("nan"),
                "ci_high": float("nan")}
    # Set before lm-eval imports `datasets`, which reads it once; the local csv builder needs no hub anyway.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="es2-mc-") as tmp, _eval_mode(model):
        csv_path = Path(tmp) / "questions.csv"
        _write_questions(questions, csv_path)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(
            model=lm, tasks=[_task_config(csv_path, Path(tmp) / "datasets", formulation)],
            # only the inline task: indexing lm-eval's thousands of bundled task files takes seconds
            task_manager=TaskManager(include_defaults=False),
            log_samples=True, bootstrap_iters=0,  # no stderr: the Wilson interval below replaces it
            # None: leave the caller's random, numpy and torch generators alone (scoring draws nothing)
            random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None)
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    if len(samples) != len(questions):
        raise RuntimeError(f"lm-eval scored {len(samples)} of {len(questions)} questions")
    metric = FORMULATIONS[formulation]["metric"]
    correct = [bool(sample[metric]) for sample in samples]
    predicted = [_choice(sample, [len(c) if metric == "acc_norm" else 1 for c in q["choices"]])
                 for sample, q in zip(samples, questions)]
    low, high = wilson_interval(sum(correct), len(correct))
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "correct": correct,
            "predicted": predicted, "ci_low": low, "ci_high": high}
