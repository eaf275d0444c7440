"""Multiple choice through lm-evaluation-harness on the tiny random model: offline, MMLU's prompt, per
question."""

import csv
import socket

import pytest
import torch

from es2.capability import LETTERS, load_mc_csv
from es2.mc_eval import TASK, lm_eval_multiple_choice
from es2.modeling import load_causal_lm

# Options a CSV reader could mangle ("007" -> 7, "None"/"NA" -> missing, "1.50" -> 1.5), a quote inside an
# option (the continuation form renders the options as a list literal); one row has no subject.
ROWS = [
    ["geography", "What is the capital city of Japan?", "Tokyo", "Kyoto", "Osaka", "Sapporo", "0"],
    ["mathematics", "What is 3 halves written as a decimal?", "1.05", "1.50", "3.2", "0.66", "1"],
    ["language", "Which word means 'not any'?", "All", "Everyone's", "None", "Each", "2"],
    ["", "Which code is the secret agent's number in the films?", "001", "700", "070", "007", "3"],
    ["history", "Which of these is an abbreviation for 'not applicable'?", "NA", "OK", "PS", "AD", "0"],
    ["biology", "Which organ pumps blood?", "The lungs", "The heart", "The liver", "The skin", "1"],
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir))


@pytest.fixture
def six_questions(tmp_path):
    path = tmp_path / "six.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "question", "choice0", "choice1", "choice2", "choice3", "answer"])
        writer.writerows(ROWS)
    return path


def _mmlu_prompt(q: dict, formulation: str = "letters") -> tuple[str, list[str]]:
    """lm-eval's mmlu (letters) or mmlu_continuation prompt and four continuations, written out by hand."""
    kind = "multiple choice questions" if formulation == "letters" else "questions"
    head = f"The following are {kind} (with answers) about {q['subject']}.\n\n" if q["subject"] else ""
    if formulation == "continuation":
        return f"{head}Question: {q['question']}\nAnswer:", [f" {choice}" for choice in q["choices"]]
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q["choices"]))
    return f"{head}{q['question']}{options}\nAnswer:", [f" {letter}" for letter in LETTERS]


def _loglikelihoods(model, tok, context: str, continuations: list[str]) -> list[float]:
    """Sum of log p(continuation tokens) after `context`, split as lm-eval splits them."""
    context_ids = tok.encode(context)
    out = []
    for continuation in continuations:
        whole = tok.encode(context + continuation)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
        out.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context_ids), len(whole))))
    return out


@pytest.mark.parametrize("formulation", ["letters", "continuation"])
def test_lm_eval_scores_a_csv_offline_in_mmlu_format(lm, six_questions, monkeypatch, formulation):
    import lm_eval

    model, tok = lm
    captured = {}
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: captured.setdefault("results", real(**kw)))

    def no_network(*args, **kwargs):
        raise AssertionError("lm-eval tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model.train()
    rng = torch.random.get_rng_state()
    result = lm_eval_multiple_choice(model, tok, six_questions, batch_size=4, formulation=formulation)
    assert model.training  # the caller's mode is restored
    assert torch.equal(torch.random.get_rng_state(), rng)  # and its random generator left alone
    model.eval()

    assert result["n"] == 6 and len(result["correct"]) == 6
    assert all(isinstance(c, bool) for c in result["correct"])
    assert result["accuracy"] == pytest.approx(sum(result["correct"]) / 6)
    assert 0 <= result["ci_low"] <= result["accuracy"] <= result["ci_high"] <= 1
    questions = load_mc_csv(six_questions)
    assert result["correct"] == [p == q["answer"] for p, q in zip(result["predicted"], questions)]
    # lm-eval saw exactly lm-eval's MMLU prompt with the CSV's text (no "7" for "007", no "nan" for "None"),
    # scored the continuations as a plain forward pass does, and chose by its metric
    samples = sorted(captured["results"]["samples"][TASK], key=lambda s: s["doc_id"])
    for sample, q, chosen in zip(samples, questions, result["predicted"]):
        context, continuations = _mmlu_prompt(q, formulation)
        assert list(sample["arguments"]) == [(context, c) for c in continuations]
        lls = _loglikelihoods(model, tok, context, continuations)
        assert [float(ll) for ll, _ in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-4)
        scores = [ll / len(c) for ll, c in zip(lls, q["choices"])] if formulation == "continuation" else lls
        assert chosen == scores.index(max(scores))


def test_lm_eval_takes_loaded_questions_and_none(lm, six_questions):
    model, tok = lm
    questions = load_mc_csv(six_questions)
    assert lm_eval_multiple_choice(model, tok, questions)["correct"] == \
        lm_eval_multiple_choice(model, tok, str(six_questions))["correct"]
    assert lm_eval_multiple_choice(model, tok, [])["n"] == 0
    with pytest.raises(ValueError, match="formulation"):
        lm_eval_multiple_choice(model, tok, questions, formulation="cloze")
