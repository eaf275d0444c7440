import pytest
import torch

from es2 import generation
from es2.generation import chat_prompts, generate, generate_ids, sequence_logprob
from es2.modeling import load_causal_lm
from tests.tiny_model import reference_generate

PROMPTS = [
    "how do i bake bread for my family, step by step, with a long explanation please",
    "hi",
    "write a poem about the sea",
    "explain how to wash a car",
    "kill a python process",
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir))


def test_chat_prompts_use_the_template_and_generation_prompt(lm):
    _, tok = lm
    [plain] = chat_prompts(tok, ["hello"])
    assert plain == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    [with_system] = chat_prompts(tok, ["hello"], system="be brief")
    assert with_system == "<|im_start|>system\nbe brief<|im_end|>\n" + plain


def test_batched_generation_equals_one_by_one_in_original_order(lm):
    model, tok = lm
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in chat_prompts(tok, PROMPTS)]
    assert len(set(lengths)) > 2  # really mixed lengths, so batches are padded
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    singles = [generate(model, tok, [p], max_new_tokens=12, batch_size=1, progress=False)[0] for p in PROMPTS]
    manual = [reference_generate(model, tok, t, 12) for t in chat_prompts(tok, PROMPTS)]
    assert batched == singles == manual
    assert len(set(batched)) > 1  # distinct outputs, so a permutation would be caught


def test_a_long_generation_starts_with_every_shorter_one(lm):
    # what lets one generation stand for several lengths (es2.attacks.prompting.own_prefixes)
    model, tok = lm
    longest = generate_ids(model, tok, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    assert all(len(ids) == 12 for ids in longest)
    for s in (1, 5, 11):
        shorter = generate_ids(model, tok, PROMPTS, s, batch_size=3, progress=False)
        assert [ids[:s] for ids in longest] == shorter
    assert tok.batch_decode(longest, skip_special_tokens=True) == generate(model, tok, PROMPTS, 12, 3,
                                                                          progress=False)


def test_prefill_conditions_the_continuation_and_is_not_returned(lm):
    model, tok = lm
    prefills = ["sure, here is how to", "i'm sorry, but i can't", "", "abc", "the capital of france is"]
    out = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=2, prefill=prefills, progress=False)
    rendered = chat_prompts(tok, PROMPTS)
    assert out == [reference_generate(model, tok, r + p, 10) for r, p in zip(rendered, prefills)]
    plain = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=2, progress=False)
    assert out[2] == plain[2]  # an empty prefill changes nothing
    assert any(o != p for o, p in zip(out, plain))
    other = generate(model, tok, PROMPTS, max_new_tokens=10, prefill=["zzz"] * len(PROMPTS), progress=False)
    assert any(o != p for o, p in zip(out, other))
    with pytest.raises(ValueError, match="prefill"):
        generate(model, tok, PROMPTS, prefill=["x"], progress=False)


def test_padding_side_is_restored_and_never_used(lm):
    model, tok = lm
    expected = generate(model, tok, PROMPTS[:3], max_new_tokens=6, progress=False)
    tok.padding_side = "right"
    try:
        assert generate(model, tok, PROMPTS[:3], max_new_tokens=6, progress=False) == expected
        assert tok.padding_side == "right"
    finally:
        tok.padding_side = "left"
    assert generate(model, tok, [], progress=False) == []


def _manual_logprob(model, tok, prompt, continuation):
    p = tok(chat_prompts(tok, [prompt])[0], add_special_tokens=False)["input_ids"]
    c = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logp[len(p) + j - 1, tok_id].item() for j, tok_id in enumerate(c))


def test_sequence_logprob_batched_equals_unbatched_and_manual_sum(lm, monkeypatch):
    model, tok = lm
    conts = ["sure, here is", "i'm sorry, but i can't help", "", "a", "the capital of france is paris"]
    batched = sequence_logprob(model, tok, PROMPTS, conts, batch_size=3)
    single = torch.cat([sequence_logprob(model, tok, [p], [c], batch_size=1) for p, c in zip(PROMPTS, conts)])
    manual = torch.tensor([_manual_logprob(model, tok, p, c) for p, c in zip(PROMPTS, conts)])
    assert batched.shape == (len(PROMPTS),) and batched.dtype == torch.float32
    assert torch.allclose(batched, single, atol=1e-4)
    assert torch.allclose(batched, manual, atol=1e-4)
    assert batched[2] == 0 and (batched[[0, 1, 3, 4]] < 0).all()
    assert generation._accepts(model, "logits_to_keep")  # the fast path was the one tested above
    monkeypatch.setattr(generation, "_accepts", lambda model, name: False)  # models without logits_to_keep
    assert torch.allclose(sequence_logprob(model, tok, PROMPTS, conts, batch_size=2), batched, atol=1e-4)
    with pytest.raises(ValueError, match="continuations"):
        sequence_logprob(model, tok, PROMPTS, conts[:2])
