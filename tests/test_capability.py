import csv
import json
import math
from contextlib import nullcontext

import pytest
import torch

from es2.capability import (agreement, answer_kl, answer_kls, benign_text, greedy_agreement, load_mc_csv,
                            mmlu_sample_path, over_refusal, per_token_kl, perplexity)
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


class _NoisyPrompt(torch.nn.Module):
    """The wrapped model with noise added to its logits everywhere but the `n_answer` positions that predict
    the answer tokens (or only there: only_answer=False); one unpadded sequence per call."""

    def __init__(self, inner, n_answer: int, only_answer: bool = True):
        super().__init__()
        self.inner, self.n_answer, self.only_answer = inner, n_answer, only_answer

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        noise = torch.randn_like(out.logits) * 5
        scored = torch.zeros(out.logits.shape[1], dtype=torch.bool)
        scored[-(self.n_answer + 1):-1] = True
        out.logits = torch.where(scored[None, :, None] == self.only_answer, out.logits, out.logits + noise)
        return out


def _greedy_ids(model, tok, prompt: str, n: int) -> list[int]:
    enc = tok(chat_prompts(tok, [prompt]), add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_answer_kl_with_itself_and_own_greedy_answers(lm):
    model, tok = lm
    answers = [_greedy_ids(model, tok, p, 6) for p in PROMPTS]
    out = answer_kl(model, model, tok, PROMPTS, answers, batch_size=3)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6) and out["agreement"] == 1.0
    assert out["agreement_per_prompt"] == [1.0] * 4 and out["tokens"] == [6] * 4
    itself = answer_kl(model, lambda: nullcontext(model), tok, PROMPTS, ["sure, here is", "ok", "", "x"])
    assert itself["kl"] == pytest.approx(0.0, abs=1e-6)


def test_answer_kl_counts_only_answer_positions(lm):
    model, tok = lm
    prompt, answer = PROMPTS[0], "sure, here is how to"
    n = len(tok(answer, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    prompt_noise = _NoisyPrompt(model, n)
    assert answer_kl(model, prompt_noise, tok, [prompt], [answer], batch_size=1)["kl"] == \
        pytest.approx(0.0, abs=1e-6)
    assert per_token_kl(model, prompt_noise, tok, [prompt], [answer], batch_size=1) > 0.1  # counts prompts
    answer_noise = _NoisyPrompt(model, n, only_answer=False)
    assert answer_kl(model, answer_noise, tok, [prompt], [answer], batch_size=1)["kl"] > 0.1


def test_answer_kl_to_another_model_is_token_weighted_and_padding_free(lm):
    model, tok = lm
    other = build_model(tok, seed=1)
    answers = ["sure, here is how to bake bread", "ok", "", "the capital of france is paris"]
    out = answer_kl(model, other, tok, PROMPTS, answers, batch_size=3)
    singles = [answer_kl(model, other, tok, [p], [a], batch_size=1) for p, a in zip(PROMPTS, answers)]
    assert out["kl_per_prompt"][:2] + out["kl_per_prompt"][3:] == \
        pytest.approx([s["kl"] for i, s in enumerate(singles) if i != 2], rel=1e-4)
    assert math.isnan(out["kl_per_prompt"][2]) and math.isnan(out["agreement_per_prompt"][2])
    tokens = out["tokens"]
    assert tokens[2] == 0 and out["kl"] > 0
    assert out["kl"] == pytest.approx(sum(k * n for k, n in zip(out["kl_per_prompt"], tokens) if n)
                                      / sum(tokens), rel=1e-6)
    assert 0 <= out["agreement"] <= 1
    assert math.isnan(answer_kl(model, other, tok, [], [])["kl"])
    with pytest.raises(ValueError, match="answers"):
        answer_kl(model, other, tok, PROMPTS, ["x"])


# --- perplexity ---------------------------------------------------------------------------------------------


def test_answer_kls_equal_one_answer_kl_per_model(lm):
    # the evaluation scores the model and its baseline against the shipped model's logits, computed once
    model, tok = lm
    other, reference = build_model(tok, seed=1), build_model(tok, seed=2)
    answers = ["sure, here is how to bake bread", "ok", "", "the capital of france is paris"]
    both = answer_kls({"model": model, "other": other}, reference, tok, PROMPTS, answers, batch_size=3)
    for name, alone in (("model", model), ("other", other)):  # repr: exact, and NaN (empty answer) equals NaN
        assert repr(both[name]) == repr(answer_kl(alone, reference, tok, PROMPTS, answers, batch_size=3))
    assert both["model"]["kl"] != both["other"]["kl"]


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


def test_load_mc_csv_reads_the_hubs_parquet_and_json_lines_layout(tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = [{"question": "Capital of France?", "subject": "geo", "choices": ["Rome", "Paris", "Oslo", "Bern"],
             "answer": 1}, {"question": "2 + 2?", "subject": "maths", "choices": ["4", "5", "6", "7"], "answer": 0}]
    hub = tmp_path / "test-00000-of-00001.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), hub)
    lines = tmp_path / "mmlu.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for path in (hub, lines):
        assert load_mc_csv(path) == rows  # the answer index 0 read as an answer, not as an empty cell
    lines.write_text(json.dumps({**rows[0], "choices": ["Rome", "Paris"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="column 'choices' holds \\['Rome', 'Paris'\\], not four options"):
        load_mc_csv(lines)


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
    assert len(questions) >= 200
    counts = [sum(q["answer"] == k for q in questions) for k in range(4)]
    assert min(counts) >= 50 and max(counts) - min(counts) <= 4  # balanced letters: chance is 25%
    assert len({q["question"] for q in questions}) == len(questions)
    assert all(len(set(q["choices"])) == 4 and q["subject"] for q in questions)


def test_shared_mmlu_subset_loads(shared_datasets):
    path = shared_datasets / "mmlu_dev_subset" / "mmlu_test_5_per_subject_seed1_disjoint.csv"
    questions = load_mc_csv(path)
    assert len(questions) == 285
    assert all(0 <= q["answer"] <= 3 and len(q["choices"]) == 4 for q in questions)
