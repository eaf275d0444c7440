"""Optimisation attacks: the soft-prompt embedding attack (Schwinn et al.) and GCG (Zou et al. 2023).

Both fit an adversarial insertion at the END of the user message (between the request and the end-of-turn /
assistant header) so that the model's teacher-forced answer starts with a target such as "Sure, here is ...",
then generate the answer greedily from the attacked prompt. Their effort figures (target loss, steps to
success) are part of the attack-effort certificate: how hard the model made the attack.

Shared conventions (as in `es2.generation`): the prompt is rendered with the chat template and generation prompt
and tokenized with `add_special_tokens=False`; the target is tokenized on its own (no merge across the boundary).
The insertion point is found from the rendered text's character offsets, so that with nothing inserted the tokens
are exactly those of the direct request. During an attack the model is in eval mode and its parameters have
`requires_grad=False` (no weight gradients are computed or stored); both are restored afterwards.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager

import torch

from es2.attacks import AttackResult
from es2.generation import _accepts, _length_order, _left_padding, chat_prompts

log = logging.getLogger(__name__)

_MARK = "\u2063es2-insert\u2063"  # a marker no template rewrites, used to locate the end of the user content


@contextmanager
def frozen_model(model):
    """Eval mode and `requires_grad=False` on every parameter for the duration; each module's training flag and
    each parameter's requires_grad are restored on exit (also on error)."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def split_chat(tokenizer, prompt: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the chat-rendered prompt (with generation prompt) split where the user content ends:
    (before: template start + request, after: end-of-turn + assistant header).

    `before + after` equals the direct request's tokens. The cut is located by rendering once more with a marker
    appended to the content, then mapped to a token boundary with the offsets of a fast tokenizer (a token that
    straddles the cut stays before it); without offsets, the two halves of the text are tokenized separately.
    """
    [rendered] = chat_prompts(tokenizer, [prompt], system)
    [marked] = chat_prompts(tokenizer, [prompt + _MARK], system)
    cut = marked.find(_MARK)
    if cut < 0 or marked[:cut] != rendered[:cut]:
        found = rendered.rfind(prompt)
        if found < 0:
            raise ValueError(f"cannot find the end of the user message in the chat-rendered prompt: {rendered!r}")
        cut = found + len(prompt)
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        enc = None
    if enc is None or "offset_mapping" not in enc:
        return (tokenizer(rendered[:cut], add_special_tokens=False)["input_ids"],
                tokenizer(rendered[cut:], add_special_tokens=False)["input_ids"])
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    k = next((i for i, (start, _) in enumerate(offsets) if start >= cut), len(ids))
    return ids[:k], ids[k:]


def _target_ids(tokenizer, targets: list[str]) -> list[list[int]]:
    ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    if any(not t for t in ids):
        raise ValueError("every target needs at least one token")
    return ids


def _filler_ids(tokenizer, init: str, n: int) -> list[int]:
    """n token ids of the filler `init init init ...` (e.g. "! ! ! ..."), cycled if it tokenizes shorter."""
    if n < 1:
        raise ValueError(f"need at least one inserted token, got {n}")
    ids = tokenizer(" ".join([init] * n), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the filler {init!r} tokenizes to nothing")
    return [ids[i % len(ids)] for i in range(n)]


def _check_inputs(prompts, targets):
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")


def _target_loss(logits: torch.Tensor, target: torch.Tensor, scored: torch.Tensor):
    """Per-row mean cross-entropy over the scored target positions, and whether the teacher-forced argmax equals
    the target everywhere (Schwinn's success test; equivalent to the greedy decode starting with the target).
    logits: [rows, T, V] predicting target [rows, T]; scored: [rows, T] bool (False on a shorter row's left)."""
    logits = logits.float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    # where, not multiply: an unscored position's logits may be NaN.
    ce = -torch.where(scored, token_lp, 0.0).sum(-1) / scored.sum(-1)
    hit = torch.where(scored, logits.argmax(-1) == target, True).all(-1)
    return ce, hit


def generate_from_embeds(model, tokenizer, embeds: list[torch.Tensor], max_new_tokens: int = 64,
                         batch_size: int = 16) -> list[str]:
    """Greedy answers from per-prompt input embeddings [L_i, D] (left-padded batches with an attention mask,
    KV cache); returns the decoded new tokens, special tokens dropped, in the order given."""
    if not embeds:
        return []
    emb_layer = model.get_input_embeddings()
    device, dtype = emb_layer.weight.device, emb_layer.weight.dtype
    outputs: list[str | None] = [None] * len(embeds)
    with _left_padding(tokenizer), torch.inference_mode():
        pad = emb_layer(torch.tensor([tokenizer.pad_token_id], device=device))[0]
        order = _length_order([e.shape[0] for e in embeds])
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            width = max(embeds[i].shape[0] for i in index)
            batch = pad.expand(len(index), width, -1).clone()
            mask = torch.zeros((len(index), width), dtype=torch.long, device=device)
            for row, i in enumerate(index):
                length = embeds[i].shape[0]
                batch[row, width - length:] = embeds[i].to(device, dtype)
                mask[row, width - length:] = 1
            out = model.generate(inputs_embeds=batch, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                 temperature=None, top_p=None, top_k=None)
            # with inputs_embeds only, decoder-only generate returns just the new tokens
            for i, text in zip(index, tokenizer.batch_decode(out, skip_special_tokens=True)):
                outputs[i] = text
    return outputs  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- soft prompt

def soft_prompt(model, tokenizer, prompts: list[str], targets: list[str], n_tokens: int = 20, steps: int = 50,
                lr: float = 0.01, method: str = "signed", init: str = "!", batch_size: int = 8,
                max_new_tokens: int = 64, system: str | None = None, name: str = "softprompt",
                progress: bool = False) -> AttackResult:
    """Soft-prompt embedding attack (Schwinn et al. 2023/2024; METHOD.md §2.3).

    Per prompt, `n_tokens` free embedding vectors are inserted at the end of the user message, initialised from
    the embeddings of `init` repeated ("! ! ! ..."), and optimised to minimise the teacher-forced cross-entropy
    (mean over tokens) of `target` after the generation prompt:
      method="signed": signed gradient descent, e <- e - lr * sign(grad) (Schwinn; lr 0.01 per METHOD.md);
      method="adam":   Adam with learning rate lr (the softopt variant of HarmBench / circuit-breaker evals).
    A prompt stops at the first step where the teacher-forced argmax equals the target (success: the greedy
    answer then starts with the target); its embeddings are frozen there. Otherwise it runs `steps` updates and
    keeps the lowest-loss embeddings seen. The answer is then generated greedily from the attacked embeddings.

    Prompts are optimised together in left-padded batches of `batch_size` (explicit position ids, per-row
    losses summed, so each row gets exactly its own gradient); finished rows stay in the batch, frozen.
    The free embeddings are kept in float32 whatever the model's dtype.

    Effort: `target_loss` (mean target CE of the returned soft prompts), `initial_loss`, `success_rate`,
    `steps_to_success` (mean over successes; the step budget when none succeeded), `perturbation_norm` (mean
    per-token L2 distance of the soft prompt from its initialisation).
    """
    _check_inputs(prompts, targets)
    if method not in ("signed", "adam"):
        raise ValueError(f"method must be 'signed' or 'adam', got {method!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    splits = [split_chat(tokenizer, p, system) for p in prompts]
    target_ids = _target_ids(tokenizer, targets)
    init_ids = _filler_ids(tokenizer, init, n_tokens)
    details: list[dict] = [{} for _ in prompts]
    soft: list[torch.Tensor | None] = [None] * len(prompts)
    order = _length_order([len(b) + len(a) + len(t) for (b, a), t in zip(splits, target_ids)])
    from tqdm.auto import tqdm

    with frozen_model(model), _left_padding(tokenizer), \
            tqdm(total=len(prompts), disable=not progress, desc=name, unit="prompt", leave=False) as bar:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            results = _soft_prompt_batch(model, tokenizer, [splits[i] for i in index],
                                         [target_ids[i] for i in index], init_ids, steps, lr, method)
            for i, (embeds, info) in zip(index, results):
                soft[i], details[i] = embeds, info
            bar.update(len(index))
        emb_layer = model.get_input_embeddings()
        device = emb_layer.weight.device
        with torch.no_grad():
            sequences = [torch.cat([emb_layer(torch.tensor(b, dtype=torch.long, device=device)),
                                    soft[i].to(device, emb_layer.weight.dtype),
                                    emb_layer(torch.tensor(a, dtype=torch.long, device=device))])
                         for i, (b, a) in enumerate(splits)]
        generations = generate_from_embeds(model, tokenizer, sequences, max_new_tokens, batch_size)

    successes = [d["steps"] for d in details if d["success"]]
    n = max(len(details), 1)
    effort = {
        "target_loss": sum(d["target_loss"] for d in details) / n,
        "initial_loss": sum(d["initial_loss"] for d in details) / n,
        "success_rate": len(successes) / n,
        "steps_to_success": (sum(successes) / len(successes)) if successes else float(steps),
        "perturbation_norm": sum(d["perturbation_norm"] for d in details) / n,
    }
    log.info("%s: %d prompts, success %.2f, target loss %.3f (from %.3f), steps to success %.1f", name,
             len(prompts), effort["success_rate"], effort["target_loss"], effort["initial_loss"],
             effort["steps_to_success"])
    return AttackResult(name=name, family="softprompt", prompts=list(prompts), generations=generations,
                        effort=effort, details=details)


def _soft_prompt_batch(model, tokenizer, splits, target_ids, init_ids, steps, lr, method):
    """Optimise one left-padded batch; returns [(soft embeddings [n, D] float32 CPU, details)] per row."""
    emb_layer = model.get_input_embeddings()
    device, dtype = emb_layer.weight.device, emb_layer.weight.dtype
    n, rows = len(init_ids), len(splits)
    lengths = [len(b) + n + len(a) + len(t) for (b, a), t in zip(splits, target_ids)]
    width, n_target = max(lengths), max(len(t) for t in target_ids)
    ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    free_mask = torch.zeros((rows, width), dtype=torch.bool)
    scored = torch.zeros((rows, n_target), dtype=torch.bool)
    for row, ((before, after), target) in enumerate(zip(splits, target_ids)):
        seq = before + [tokenizer.pad_token_id] * n + after + target
        offset = width - len(seq)
        ids[row, offset:] = torch.tensor(seq, dtype=torch.long)
        mask[row, offset:] = 1
        free_mask[row, offset + len(before):offset + len(before) + n] = True
        scored[row, n_target - len(target):] = True
    ids, mask, free_mask, scored = ids.to(device), mask.to(device), free_mask.to(device), scored.to(device)
    target = ids[:, -n_target:]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": n_target + 1} if _accepts(model, "logits_to_keep") else {}
    with torch.no_grad():
        base = emb_layer(ids)
        init = emb_layer(torch.tensor(init_ids, dtype=torch.long, device=device)).float()
    free = init.expand(rows, -1, -1).clone().requires_grad_(True)
    scatter_mask = free_mask.unsqueeze(-1).expand_as(base)
    optimizer = torch.optim.Adam([free], lr=lr) if method == "adam" else None

    best_loss = torch.full((rows,), float("inf"), device=device)
    best = free.detach().clone()
    initial = torch.zeros(rows, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    steps_taken = torch.full((rows,), steps, dtype=torch.long)
    for step in range(steps + 1):
        inputs = base.masked_scatter(scatter_mask, free.to(dtype))
        logits = model(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids, use_cache=False,
                       **kwargs).logits[:, -(n_target + 1):-1]
        ce, hit = _target_loss(logits, target, scored)
        with torch.no_grad():
            loss = ce.detach()
            if step == 0:
                initial = loss.clone()
            active = ~done
            better = active & (loss < best_loss)
            best_loss[better] = loss[better]
            best[better] = free.detach()[better]
            won = active & hit
            best_loss[won] = loss[won]  # frozen at the success point
            best[won] = free.detach()[won]
            steps_taken[won.cpu()] = step
            done |= won
        if step == steps or bool(done.all()):
            break
        (grad,) = torch.autograd.grad(ce[~done].sum(), free)
        with torch.no_grad():
            if optimizer is None:
                free -= lr * grad.sign()
            else:
                free.grad = grad
                optimizer.step()
                free.grad = None
            free[done] = best[done]
    drift = (best - init).norm(dim=-1).mean(-1)
    return [(best[row].cpu(), {"target_loss": float(best_loss[row]), "initial_loss": float(initial[row]),
                               "success": bool(done[row]), "steps": int(steps_taken[row]),
                               "perturbation_norm": float(drift[row])})
            for row in range(rows)]


# ------------------------------------------------------------------------------------------------------------ GCG

def nanogcg_available() -> bool:
    try:
        import nanogcg  # noqa: F401
    except ImportError:
        return False
    return True


def gcg(model, tokenizer, prompts: list[str], targets: list[str], steps: int = 20, search_width: int = 64,
        topk: int = 64, suffix_tokens: int = 20, init: str = "!", batch_size: int | None = None, seed: int = 0,
        early_stop: bool = True, allow_non_ascii: bool = False, max_new_tokens: int = 64,
        system: str | None = None, backend: str = "es2", name: str = "gcg",
        progress: bool = False) -> AttackResult:
    """Greedy Coordinate Gradient suffix attack (Zou et al. 2023), one prompt at a time.

    A suffix of `suffix_tokens` tokens (initialised "! ! ! ...") is appended to the user message. Each step:
    gradient of the target loss (mean teacher-forced CE of `target`) w.r.t. the one-hot suffix tokens; per
    position the `topk` most negative-gradient tokens (special and, unless `allow_non_ascii`, non-ASCII or
    unprintable tokens excluded); `search_width` candidates, each one random single-token swap; candidates whose
    decoded text does not re-tokenize to the same ids are dropped; the rest are scored in batched forwards
    (`batch_size` rows, default all) and the best becomes the current suffix. The lowest loss ever seen is kept
    (best-so-far). With `early_stop` a prompt stops when the best suffix's teacher-forced argmax equals the target.

    backend: "es2" (default) is this module's own implementation, written because nanogcg 0.3.0 (the package the
    issue names) does not work as shipped here: it declares transformers<=4.47.1 (we pin 5.x; it installs only with
    --no-deps), its default prefix cache indexes the KV cache as a tuple (transformers 5's DynamicCache is not:
    TypeError), and it deletes every occurrence of the BOS text from the rendered template, which for ChatML
    models whose BOS is `<|im_start|>` (SmolLM2, the default) strips all turn markers. "nanogcg" runs the package
    when installed, with use_prefix_cache=False, refusing templates where the BOS text occurs more than once; its
    process-wide seeding and deterministic-algorithms switch are undone afterwards.
    The backend used is logged and recorded in each prompt's details.

    Effort: `best_loss` (mean over prompts of the lowest target loss), `initial_loss`, `steps` (mean steps run),
    `success_rate` (teacher-forced argmax of the best suffix equals the target). The generation is the greedy
    answer to prompt + best suffix, built from exactly the token ids that were optimised.
    """
    _check_inputs(prompts, targets)
    if backend not in ("es2", "nanogcg"):
        raise ValueError(f"backend must be 'es2' or 'nanogcg', got {backend!r}")
    if backend == "nanogcg" and not nanogcg_available():
        raise ImportError("backend='nanogcg' needs the nanogcg package: pip install --no-deps nanogcg==0.3.0")
    if backend == "es2":
        log.info("%s: es2's own GCG implementation (nanogcg 0.3.0 requires transformers<=4.47 and breaks on "
                 "transformers 5's KV cache; see es2.attacks.optimization.gcg)", name)
    else:
        log.info("%s: GCG by the nanogcg package (use_prefix_cache=False under transformers 5)", name)
    target_ids = _target_ids(tokenizer, targets)
    details, sequences = [], []
    from tqdm.auto import tqdm

    with frozen_model(model):
        emb_layer = model.get_input_embeddings()
        device = emb_layer.weight.device
        banned = None if backend == "nanogcg" else _not_allowed_ids(tokenizer, emb_layer.num_embeddings,
                                                                     allow_non_ascii, device)
        for prompt, target, t_ids in tqdm(list(zip(prompts, targets, target_ids)), disable=not progress,
                                          desc=name, unit="prompt", leave=False):
            if backend == "es2":
                before, after = split_chat(tokenizer, prompt, system)
                info, suffix = _gcg_one(model, tokenizer, before, after, t_ids, steps, search_width, topk,
                                        _filler_ids(tokenizer, init, suffix_tokens), batch_size, seed, early_stop,
                                        banned)
            else:
                before, after, info, suffix = _gcg_nanogcg(model, tokenizer, prompt, target, steps, search_width,
                                                           topk, " ".join([init] * suffix_tokens), batch_size,
                                                           seed, early_stop, allow_non_ascii, system)
            suffix_text = tokenizer.decode(suffix)
            info.update(backend=backend, suffix=suffix_text, suffix_ids=list(suffix),
                        attacked_prompt=prompt + suffix_text)
            details.append(info)
            with torch.no_grad():
                sequences.append(emb_layer(torch.tensor(before + list(suffix) + after, dtype=torch.long,
                                                        device=device)))
        generations = generate_from_embeds(model, tokenizer, sequences, max_new_tokens)

    n = max(len(details), 1)
    effort = {
        "best_loss": sum(d["best_loss"] for d in details) / n,
        "initial_loss": sum(d["initial_loss"] for d in details) / n,
        "steps": sum(d["steps"] for d in details) / n,
        "success_rate": sum(d["success"] for d in details) / n,
    }
    log.info("%s: %d prompts, best loss %.3f (from %.3f), %.1f steps, success %.2f", name, len(prompts),
             effort["best_loss"], effort["initial_loss"], effort["steps"], effort["success_rate"])
    return AttackResult(name=name, family="gcg", prompts=list(prompts), generations=generations, effort=effort,
                        details=details)


def _not_allowed_ids(tokenizer, vocab: int, allow_non_ascii: bool, device) -> torch.Tensor:
    """Token ids a suffix may not use: special/added tokens, ids past the tokenizer, and (unless allowed)
    tokens whose text is not printable ASCII (nanogcg's rule)."""
    banned = set(tokenizer.all_special_ids) | set(range(len(tokenizer), vocab))
    banned |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if not allow_non_ascii:
        for i in range(min(len(tokenizer), vocab)):
            text = tokenizer.decode([i])
            if not text or not (text.isascii() and text.isprintable()):
                banned.add(i)
    return torch.tensor(sorted(i for i in banned if i < vocab), dtype=torch.long, device=device)


def _retokenizes(tokenizer, candidates: torch.Tensor) -> torch.Tensor:
    """Bool [k]: the candidate's decoded text tokenizes back to exactly the same ids."""
    rows = candidates.tolist()
    again = tokenizer(tokenizer.batch_decode(rows), add_special_tokens=False)["input_ids"]
    return torch.tensor([a == r for a, r in zip(again, rows)], dtype=torch.bool)


def _gcg_one(model, tokenizer, before, after, target, steps, search_width, topk, init_ids, batch_size, seed,
             early_stop, banned):
    emb_layer = model.get_input_embeddings()
    device, weight = emb_layer.weight.device, emb_layer.weight
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    before_t, after_t, target_t = as_tensor(before), as_tensor(after), as_tensor(target)
    n_target = len(target)
    kwargs = {"logits_to_keep": n_target + 1} if _accepts(model, "logits_to_keep") else {}
    generator = torch.Generator().manual_seed(seed)
    suffix = as_tensor(init_ids)
    if not bool(_retokenizes(tokenizer, suffix.unsqueeze(0))[0]):
        log.warning("the initial GCG suffix %r does not re-tokenize to the same ids", tokenizer.decode(init_ids))

    def score(candidates: torch.Tensor):
        """Target loss and success for [k, n] candidate suffixes, in batched forwards."""
        losses, hits = [], []
        step = batch_size or candidates.shape[0]
        with torch.no_grad():
            for start in range(0, candidates.shape[0], step):
                chunk = candidates[start:start + step]
                k = chunk.shape[0]
                ids = torch.cat([before_t.expand(k, -1), chunk, after_t.expand(k, -1), target_t.expand(k, -1)], 1)
                logits = model(input_ids=ids, use_cache=False, **kwargs).logits[:, -(n_target + 1):-1]
                ce, hit = _target_loss(logits, target_t.expand(k, -1), torch.ones_like(ids[:, -n_target:],
                                                                                        dtype=torch.bool))
                losses.append(ce)
                hits.append(hit)
        return torch.cat(losses), torch.cat(hits)

    def token_gradient(current: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(current, weight.shape[0]).to(weight.dtype).requires_grad_(True)
        inputs = torch.cat([emb_layer(before_t), onehot @ weight, emb_layer(after_t), emb_layer(target_t)])
        logits = model(inputs_embeds=inputs.unsqueeze(0), use_cache=False, **kwargs).logits[:, -(n_target + 1):-1]
        ce, _ = _target_loss(logits, target_t.unsqueeze(0), torch.ones((1, n_target), dtype=torch.bool,
                                                                          device=device))
        (grad,) = torch.autograd.grad(ce.sum(), onehot)
        return grad.float()

    loss0, hit0 = score(suffix.unsqueeze(0))
    best_loss, best, success = float(loss0[0]), suffix.clone(), bool(hit0[0])
    history = [best_loss]
    steps_run = 0
    n = suffix.shape[0]
    for _ in range(steps):
        if early_stop and success:
            break
        grad = token_gradient(suffix)
        if banned is not None and banned.numel():
            grad[:, banned] = float("inf")
        top = (-grad).topk(min(topk, grad.shape[1]), dim=1).indices.cpu()  # [n, topk]
        positions = torch.randint(0, n, (search_width,), generator=generator)
        choices = torch.randint(0, top.shape[1], (search_width,), generator=generator)
        candidates = suffix.cpu().repeat(search_width, 1)
        candidates[torch.arange(search_width), positions] = top[positions, choices]
        candidates = candidates[_retokenizes(tokenizer, candidates)]
        steps_run += 1
        if candidates.shape[0] == 0:
            log.warning("GCG step %d: no candidate re-tokenizes identically; suffix kept", steps_run)
            history.append(best_loss)
            continue
        losses, hits = score(candidates.to(device))
        j = int(losses.argmin())
        suffix = candidates[j].to(device)  # GCG moves to the step's best candidate even if it is worse
        if float(losses[j]) < best_loss:
            best_loss, best, success = float(losses[j]), suffix.clone(), bool(hits[j])
        history.append(best_loss)
    info = {"best_loss": best_loss, "initial_loss": history[0], "steps": steps_run, "success": success,
            "losses": history}
    return info, best.tolist()


def _gcg_nanogcg(model, tokenizer, prompt, target, steps, search_width, topk, init_str, batch_size, seed,
                 early_stop, allow_non_ascii, system):
    """One prompt through nanogcg.run; returns the token ids it optimised around, so that the answer is
    generated from exactly the sequence it scored (nanogcg's own template split, BOS handling included)."""
    import numpy as np
    from nanogcg import GCGConfig
    from nanogcg import run as nanogcg_run

    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": prompt + "{optim_str}"})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if tokenizer.bos_token and rendered.count(tokenizer.bos_token) > 1:
        raise ValueError(f"nanogcg 0.3.0 deletes every {tokenizer.bos_token!r} (the BOS text) from the rendered "
                         "chat, which here also marks every turn: the attack would run on a malformed prompt; "
                         "use backend='es2'")
    config = GCGConfig(num_steps=steps, optim_str_init=init_str, search_width=search_width, topk=topk,
                       batch_size=batch_size, early_stop=early_stop, use_prefix_cache=False,
                       allow_non_ascii=allow_non_ascii, seed=seed, verbosity="WARNING")
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    chat_template = tokenizer.chat_template
    try:
        result = nanogcg_run(model, tokenizer, messages, target, config)
    finally:  # nanogcg seeds every RNG and switches deterministic algorithms on, process-wide
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        tokenizer.chat_template = chat_template
    # nanogcg's layout: template split at {optim_str}, BOS text removed then re-added by tokenizing `before`
    template = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if tokenizer.bos_token and template.startswith(tokenizer.bos_token):
        template = template.replace(tokenizer.bos_token, "")
    before_str, after_str = template.split("{optim_str}")
    before = tokenizer(before_str)["input_ids"]
    after = tokenizer(after_str, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(result.best_string, add_special_tokens=False)["input_ids"]
    best_so_far, history = float("inf"), []
    for value in result.losses:
        best_so_far = min(best_so_far, float(value))
        history.append(best_so_far)
    with torch.no_grad():  # nanogcg reports no initial loss or success flag: score them here
        device = model.get_input_embeddings().weight.device
        t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        init_ids = tokenizer(init_str, add_special_tokens=False)["input_ids"]
        scores = []
        for middle in (init_ids, suffix):
            ids = torch.tensor([before + middle + after + t_ids], dtype=torch.long, device=device)
            logits = model(input_ids=ids, use_cache=False).logits[:, -(len(t_ids) + 1):-1]
            scores.append(_target_loss(logits, ids[:, -len(t_ids):], torch.ones_like(ids[:, -len(t_ids):],
                                                                                     dtype=torch.bool)))
    info = {"best_loss": float(result.best_loss), "initial_loss": float(scores[0][0][0]),
            "steps": len(result.losses), "success": bool(scores[1][1][0]), "losses": history}
    return before, after, info, suffix
