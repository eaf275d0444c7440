import csv
import math
from contextlib import nullcontext

import pytest
import torch

from es2.capability import (agreement, benign_text, greedy_agreement, letter_token_ids, load_mc_csv,
                            mc_prompt, mmlu_sample_path, multiple_choice_accuracy, multiple_choice_scores,
                            over_refusal, per_token_kl, perplexity)
from es2.errors import DataError
from es2.generation import chat_prompts
from es2.modeling import load_causal_lm
from tests.tiny_model import build_model

PROMPTS = ["how do i bake bread for my family, step by step please", "hi", "write a poem about the sea",
           "explain how to wash a car"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir))


# --- KL -----------------------------------------------------------------------------------------------------


def test_kl_of_a_model_with_itself_is_zero(lm):
    model, tok = lm
    assert per_token_kl(model, model, tok, PROMPTS) == pytest.approx(0.0, abs=1e-6)
    assert per_token_kl(model, lambda: nullcontext(model), tok, PROMPTS, ["sure, here is", "ok"] * 2) == \
        pytest.approx(0.0, abs=1e-6)


def test_kl_to_another_model_is_positive_and_padding_free(lm):
    model, tok = lm
    other = build_model(tok, seed=1)
    batched = per_token_kl(model, other, tok, PROMPTS, batch_size=3)
    assert batched > 0
    # one prompt per batch (no padding), token-weighted by hand
    counts = [len(ids) for ids in tok(chat_prompts(tok, PROMPTS), add_special_tokens=False)["input_ids"]]
    singles = [per_token_kl(model, other, tok, [p], batch_size=1) for p in PROMPTS]
    assert batched == pytest.approx(sum(k * c for k, c in zip(singles, counts)) / sum(counts), rel=1e-4)
    with pytest.raises(ValueError, match="responses"):
        per_token_kl(model, other, tok, PROMPTS, ["x"])
    assert math.isnan(per_token_kl(model, other, tok, []))


# --- perplexity ---------------------------------------------------------------------------------------------


def test_perplexity_equals_exp_mean_nll_by_hand(lm):
    model, tok = lm
    text = "the capital of france is paris. write a poem about the sea."
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).mean()
    ppl = perplexity(model, tok, text, window=128)
    assert math.isfinite(ppl) and ppl == pytest.approx(float(nll.exp()), rel=1e-5)


def test_perplexity_sliding_window_scores_each_token_once(lm):
    model, tok = lm
    text = benign_text()[:400]
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    window, stride = 16, 8
    assert len(ids) > 3 * window
    # by hand: target t is scored in the first window that holds it with context, ie. begin = the window
    # start whose span [begin, begin + window) covers t and begins before t
    total, n = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(ids)):
            begin = 0 if t < window else ((t - window) // stride + 1) * stride
            chunk = ids[begin:min(begin + window, len(ids))]
            logits = model(input_ids=chunk[None]).logits[0]
            total -= float(torch.log_softmax(logits[t - begin - 1], -1)[ids[t]])
            n += 1
    ppl = perplexity(model, tok, text, window=window, stride=stride)
    assert ppl == pytest.approx(math.exp(total / n), rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, text, window=8, stride=8)


def test_shipped_benign_text_is_plain_prose():
    text = benign_text()
    assert 600 <= len(text.split()) <= 800
    assert text.isascii()


# --- greedy agreement and over-refusal ----------------------------------------------------------------------


def test_greedy_agreement_hand_cases(lm):
    _, tok = lm
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert agreement([1, 2, 3, 4], [1, 9, 3, 9]) == 0.5
    assert agreement([1, 2], [1, 2, 3, 4]) == 0.5  # one stopped early: the missing positions disagree
    assert agreement([], []) == 1.0
    assert agreement([1, 2, 3, 4, 5], [1, 2, 9, 9, 9], n_tokens=2) == 1.0  # only the first n tokens count
    assert greedy_agreement([[1, 2], [5, 6]], [[1, 2], [7, 6]]) == pytest.approx(0.75)
    assert greedy_agreement(["write a poem"], ["write a poem"], tok) == 1.0
    assert greedy_agreement(["write a poem"], ["zzz"], tok) == 0.0
    assert math.isnan(greedy_agreement([], []))
    with pytest.raises(ValueError):
        greedy_agreement([[1]], [])
    with pytest.raises(ValueError, match="tokenizer"):
        greedy_agreement(["a"], ["a"])


def test_over_refusal_rate_and_wilson_interval():
    out = over_refusal(["I'm sorry, I cannot.", "Sure, kill the process with kill -9.", "Here you go.",
                        "I cannot do that."])
    assert out["rate"] == 0.5 and out["refusals"] == 2 and out["n"] == 4
    assert 0 < out["ci_low"] < 0.5 < out["ci_high"] < 1
    assert over_refusal(["I can't help."], "qi")["rate"] == 1.0
    assert over_refusal(["x"], judge=lambda text: True)["rate"] == 1.0
    assert math.isnan(over_refusal([])["rate"])


# --- multiple choice ----------------------------------------------------------------------------------------


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_load_mc_csv_both_formats(tmp_path):
    index_form = _write(tmp_path / "a.csv",
                        ["subject", "question", "choice0", "choice1", "choice2", "choice3", "answer"],
                        [["geo", "Capital of France?", "Rome", "Paris", "Oslo", "Bern", "1"]])
    letter_form = _write(tmp_path / "b.csv", ["Question", "A", "B", "C", "D", "Answer"],
                         [["Capital of France?", "Rome", "Paris", "Oslo", "Bern", "b"]])
    for path in (index_form, letter_form):
        [q] = load_mc_csv(path)
        assert q["question"] == "Capital of France?" and q["choices"] == ["Rome", "Paris", "Oslo", "Bern"]
        assert q["answer"] == 1
    assert load_mc_csv(index_form)[0]["subject"] == "geo" and load_mc_csv(letter_form)[0]["subject"] == ""


@pytest.mark.parametrize("header, row, match", [
    (["question", "choice0", "choice1", "choice2", "choice3"], ["q", "a", "b", "c", "d"], "answer"),
    (["question", "choice0", "choice1", "answer"], ["q", "a", "b", "0"], "option columns"),
    (["question", "A", "B", "C", "D", "answer"], ["q", "a", "b", "c", "d", "4"], "row 1.*'4'"),
    (["question", "A", "B", "C", "D", "answer"], ["q", "a", "b", "c", "d", "E"], "not 0-3 or A-D"),
    (["question", "A", "B", "C", "D", "answer"], [" ", "a", "b", "c", "d", "A"], "empty question"),
])
def test_load_mc_csv_errors_name_file_and_problem(tmp_path, header, row, match):
    path = _write(tmp_path / "bad.csv", header, [row])
    with pytest.raises(DataError, match=match) as info:
        load_mc_csv(path)
    assert "bad.csv" in str(info.value)


def test_load_mc_csv_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_mc_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="no questions"):
        load_mc_csv(_write(tmp_path / "h.csv", ["question", "A", "B", "C", "D", "answer"], []))


def test_shipped_mmlu_sample():
    questions = load_mc_csv(mmlu_sample_path())
    assert len(questions) == 40
    assert {q["answer"] for q in questions} == {0, 1, 2, 3}
    assert all(len(set(q["choices"])) == 4 and q["subject"] for q in questions)


def test_shared_mmlu_subset_loads(shared_datasets):
    path = shared_datasets / "mmlu_dev_subset" / "mmlu_test_5_per_subject_seed1_disjoint.csv"
    questions = load_mc_csv(path)
    assert len(questions) == 285
    assert all(0 <= q["answer"] <= 3 and len(q["choices"]) == 4 for q in questions)


def test_multiple_choice_batched_matches_unbatched(lm):
    model, tok = lm
    questions = load_mc_csv(mmlu_sample_path())[:7]
    letters = letter_token_ids(tok)
    assert [tok.decode([i]) for i in letters] == ["A", "B", "C", "D"]
    scores = multiple_choice_scores(model, tok, questions, batch_size=3)
    with torch.no_grad():
        for row, q in enumerate(questions):
            [text] = chat_prompts(tok, [mc_prompt(q)])
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            expected = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)[letters]
            assert torch.allclose(scores[row], expected, atol=1e-5)
    accuracy, n = multiple_choice_accuracy(model, tok, questions, batch_size=3)
    assert n == 7 and 0 <= accuracy <= 1
    answers = torch.tensor([q["answer"] for q in questions])
    assert accuracy == pytest.approx(float((scores.argmax(-1) == answers).float().mean()))
    assert mc_prompt(questions[0]).endswith("\nD. " + questions[0]["choices"][3] + "\nAnswer:")
    assert multiple_choice_accuracy(model, tok, [])[1] == 0
