"""Optimisation attacks, the entry point the evaluation suite calls: the soft-prompt embedding attack (Schwinn
et al.; `es2.attacks.softprompt`) and GCG (Zou et al. 2023; `es2.attacks.gcg`).

Both fit an adversarial insertion at the end of the user message, under a budget of `restarts` starts of
`steps` steps per prompt, toward an affirmative target ("target") or toward the target with no refusal right
after it ("anti_recovery"), and record per prompt the optimisation steps it took to break the model (judged on
generated answers when a judge is given). Shared conventions and the objective's formula:
`es2.attacks.adversarial`; the budget rules: `es2.attacks.search`.
"""

from es2.attacks.adversarial import REFUSAL_OPENINGS, frozen_model, split_chat
from es2.attacks.gcg import gcg
from es2.attacks.search import generate_from_embeds
from es2.attacks.softprompt import soft_prompt

__all__ = ["REFUSAL_OPENINGS", "frozen_model", "gcg", "generate_from_embeds", "soft_prompt", "split_chat"]
