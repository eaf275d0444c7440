"""Hidden states and forward hooks: the plumbing the representation attacks (SCAV, RepE), es2.depth and the
trainer's reference states share.

Layer convention (one for fitting and attacking, avoiding SCAV's released off-by-one): a layer is an HF
`hidden_states` index. 0 = the input embeddings (hooked on `get_input_embeddings()`), l in 1..L-1 = the output
of decoder block l-1, L = the final-norm output (`hidden_states[L]` is taken after the final norm in HF
models). `layer_modules` maps indices to those modules; a test checks the hooked outputs equal
`hidden_states`.

Hooks live only inside `hooked` and `hidden_states_at` and are removed in a `finally`, also on exceptions.
(transformers >= 5 itself installs permanent output-capturing hooks on the first `output_hidden_states=True`
forward; those are not ours and are left alone.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from es2.features import left_pad, pad_id_of
from es2.generation import _device, _length_order, chat_prompts


def num_layers(model) -> int:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.num_hidden_layers)


def _decoder_blocks(model) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks (works through PEFT wrappers): the one with num_hidden_layers entries,
    preferring a name ending in layers/h/blocks."""
    n = num_layers(model)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise ValueError(f"no ModuleList of {n} decoder blocks found in {type(model).__name__}")
    preferred = [f for f in found if f[0].rsplit(".", 1)[-1] in ("layers", "h", "blocks")]
    return (preferred or found)[0]


def layer_modules(model, layers) -> dict[int, nn.Module]:
    """hidden_states index -> the module whose output is that hidden state (see the module docstring)."""
    name, blocks = _decoder_blocks(model)
    n = len(blocks)
    out = {}
    for layer in layers:
        layer = int(layer)
        if layer == 0:
            out[layer] = model.get_input_embeddings()
        elif 1 <= layer < n:
            out[layer] = blocks[layer - 1]
        elif layer == n:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            names = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")
            norm = next((getattr(parent, a) for a in names
                         if isinstance(getattr(parent, a, None), nn.Module)), None)
            if norm is None:
                raise ValueError(f"layer {layer} (final norm): no module to hook in {type(model).__name__}")
            out[layer] = norm
        else:
            raise ValueError(f"layer {layer} out of range 0..{n}")
    return out


@contextmanager
def hooked(model, edits: dict[int, Callable[[torch.Tensor], torch.Tensor]]):
    """Within the block, the hidden state at each layer in `edits` [B, T, D] is replaced by `edit(state)`.

    Forward hooks are registered on `layer_modules` and always removed on exit (normal or exception).
    """
    handles = []
    try:
        for layer, module in layer_modules(model, edits).items():
            edit = edits[layer]

            def hook(_module, _args, output, edit=edit):
                if isinstance(output, tuple):
                    return (edit(output[0]),) + tuple(output[1:])
                return edit(output)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Reached(Exception):
    """Raised by the hook on the deepest wanted layer, so nothing above it runs."""


def hidden_states_at(model, inputs: dict, layers) -> dict[int, torch.Tensor]:
    """layer -> hidden_states[layer] [B, T, D] of `model(**inputs)`, without the rest of the forward.

    The forward stops at the deepest of `layers`: the decoder blocks above it and the LM head never run (the
    head's [B, T, vocab] logits are about a fifth of a 135M model's forward and are not read here). The states
    are exactly those `output_hidden_states=True` returns; layer 0 is read where transformers reads it, as the
    first decoder block's input (after any position embeddings, unlike `hooked`'s embedding output).
    Call it on an unwrapped model (no DDP/FSDP wrapper, whose post-forward step the early stop would skip).
    """
    wanted = {int(layer) for layer in layers}
    found: dict[int, torch.Tensor] = {}

    def keep(layer: int, state: torch.Tensor) -> None:
        found[layer] = state
        if len(found) == len(wanted):
            raise _Reached

    def block_input(_module, args, kwargs):
        keep(0, args[0] if args else kwargs["hidden_states"])

    def output_of(layer):
        return lambda _module, _args, output: keep(layer, output[0] if isinstance(output, tuple) else output)

    handles = []
    try:
        if 0 in wanted:
            handles.append(_decoder_blocks(model)[1][0].register_forward_pre_hook(block_input, with_kwargs=True))
        for layer, module in layer_modules(model, sorted(wanted - {0})).items():
            handles.append(module.register_forward_hook(output_of(layer)))
        try:
            model(**inputs, use_cache=False)
        except _Reached:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return {int(layer): found[int(layer)] for layer in layers}


def _encode(tokenizer, prompts: list[str], system: str | None) -> list[list[int]]:
    """Token ids exactly as `es2.generation.generate` feeds them (chat template, no added special tokens)."""
    return tokenizer(chat_prompts(tokenizer, prompts, system), add_special_tokens=False)["input_ids"]


def last_token_states(model, tokenizer, prompts: list[str], layers, batch_size: int = 16,
                      system: str | None = None) -> dict[int, torch.Tensor]:
    """layer -> float32 CPU [n, D]: the state of the last prompt token (end of the generation prompt).

    The tokens are the ones generation starts from, so the states equal the prompt pass of `generate`.
    """
    return states_at_last_token(model, tokenizer, _encode(tokenizer, prompts, system), layers, batch_size)


def states_at_last_token(model, tokenizer, ids: list[list[int]], layers, batch_size: int = 16
                         ) -> dict[int, torch.Tensor]:
    """layer -> float32 CPU [n, D]: hidden_states[layer] at the last of each token-id sequence.

    Left-padded batches with position ids from the attention mask, so a row's states do not depend on padding.
    """
    layers = [int(layer) for layer in layers]
    pad, device = pad_id_of(tokenizer), _device(model)
    out = {layer: [None] * len(ids) for layer in layers}
    order = _length_order([len(x) for x in ids])
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            input_ids, mask, position_ids = left_pad([ids[i] for i in index], pad)
            hidden = hidden_states_at(model, {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                                              "position_ids": position_ids.to(device)}, layers)
            for layer in layers:
                states = hidden[layer][:, -1].float().cpu()
                for row, i in enumerate(index):
                    out[layer][i] = states[row]
    return {layer: torch.stack(rows) if rows else torch.zeros(0) for layer, rows in out.items()}


def all_layers(model) -> list[int]:
    """Every decoder layer's output as a hidden_states index, 1..L (SCAV hooks every decoder layer)."""
    return list(range(1, num_layers(model) + 1))


class Rows:
    """Which prompts (indices in the caller's order) the rows of the batch now generating belong to: hooks read
    it to apply per-prompt budgets. Pass `rows.batch` as `es2.generation.generate(around_batch=...)`."""

    def __init__(self):
        self.index: list[int] | None = None

    @contextmanager
    def batch(self, index: list[int]):
        self.index = list(index)
        try:
            yield
        finally:
            self.index = None


def layer_scales(states: dict[int, torch.Tensor]) -> dict[int, float]:
    """layer -> mean L2 norm of the states (the unit of RepE coefficients)."""
    return {layer: float(s.float().norm(dim=-1).mean()) for layer, s in states.items()}
