"""What a prompt may not contain, checked alike by the importers and the validate stage.

A control character (NUL, ESC, ...) in a prompt is damage, from a binary export or a bad paste, and tokenizers
handle it inconsistently. One of the model's special tokens is worse: the tokenizer encodes the string
`<|im_end|>` as the real end-of-turn token, so such a prompt closes the user's turn and can open a fake
assistant turn, a role injection into the training data.
"""

from __future__ import annotations

import functools
import re

# Tab, newline and carriage return are ordinary layout; every other Unicode control character (C0, DEL, C1)
# has no place in text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def control_character(text: str) -> str | None:
    """The first control character in `text` as 'U+0000 at character 13', or None."""
    match = _CONTROL.search(text)
    return None if match is None else f"U+{ord(match.group()):04X} at character {match.start() + 1}"


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """The strings a Hugging Face tokenizer encodes as its own tokens: its special tokens and added tokens.

    Added tokens made only of whitespace (runs of spaces some tokenizers add to encode code compactly) are left
    out: they are ordinary text, and would reject every indented prompt.
    """
    added = (token.content for token in tokenizer.added_tokens_decoder.values())
    return tuple(sorted({token for token in (*tokenizer.all_special_tokens, *added) if token.strip()}))


def special_token(text: str, tokens: tuple[str, ...]) -> str | None:
    """The first of `tokens` found in `text` (the longest where several start at one place), or None."""
    pattern = _alternation(tokens)
    match = pattern.search(text) if pattern else None
    return match.group() if match else None


@functools.lru_cache(maxsize=4)
def _alternation(tokens: tuple[str, ...]) -> re.Pattern | None:
    # One pass over the text for all tokens; longest first, so `<|im_start|>` is named rather than a shorter
    # token it happens to contain.
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(set(tokens), key=len, reverse=True)))
