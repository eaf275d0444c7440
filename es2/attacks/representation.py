"""Representation-space attacks: SCAV (per-layer probes + closed-form minimal shift) and RepE steering, each with
a behavioural effort search (the smallest budget that gets a compliant answer, per prompt).

Both are adaptive: probes and directions are fitted on the states of the model under evaluation
(`es2.attacks.hooks.last_token_states`), then applied to that model's generation through forward hooks
(layer convention in es2.attacks.hooks).

SCAV as published (Xu et al. 2024, EEEEEKKO/SCAV `embedding-level/perturbation.py`): a probe on every decoder
layer, every layer whose probe accuracy (cross-validated, balanced) passes the bar is perturbed (chosen per
model), target probability p0 = 0.001, and the shift is applied to the last position of EVERY forward pass
during generation (the prompt's last token, then each generated token, since the KV cache feeds one token per
step).

Budgets are relative, so they compare across models whose hidden states differ in scale (ES2 itself enlarges
distances): SCAV's is the shift norm as a multiple of the layer's median state norm; RepE's the steering norm as
a multiple of the layer's mean last-token norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from es2.attacks import AttackResult
from es2.attacks.hooks import Rows, hooked, last_token_states, layer_scales
from es2.config import depth_index
from es2.effort import ascending_budgets
from es2.generation import _device, generate

Judge = Callable[[list[str], list[str]], list[bool]]  # (prompts, answers) -> refused


def _per_prompt(budget, n: int) -> torch.Tensor | None:
    """A budget for every prompt: None (no budget), one float for all, or one value per prompt."""
    if budget is None:
        return None
    values = [float(budget)] * n if isinstance(budget, (int, float)) else [float(b) for b in budget]
    if len(values) != n:
        raise ValueError(f"{len(values)} budgets for {n} prompts")
    return torch.tensor(values)


def _effort_search(attack: Callable[[list[int], list[float]], list[str]], prompts: list[str], judge: Judge,
                   refused_direct: list[bool] | None, low: float, high: float, rounds: int):
    """The smallest breaking budget per prompt, bracketed from below and bisected (es2.effort's
    ascending_budgets): `attack(indices, budgets)` returns the answers of prompts[indices] at those budgets; a
    prompt is broken when `judge` does not call its answer a refusal. Prompts answered without any attack (`refused_direct` False) have budget 0 and are never attacked."""

    def broken(indices, budgets):
        answers = attack(indices, budgets)
        return [not r for r in judge([prompts[i] for i in indices], answers)]

    at_zero = None if refused_direct is None else [not r for r in refused_direct]
    return ascending_budgets(broken, len(prompts), low, high, rounds, broken_at_zero=at_zero)


# ------------------------------------------------------------------------------------------------------------
# SCAV


@dataclass
class Probe:
    """P(harmful | e) = sigmoid(w.e + b) in the raw state space of one layer."""

    w: torch.Tensor  # [D] float32
    b: float
    accuracy: float  # cross-validated balanced accuracy (fit_probes)
    scale: float  # median ‖e‖ over the fitting states: the unit of SCAV budgets

    def prob(self, e: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(e.float() @ self.w.to(e.device) + self.b)


def fit_probes(harmful_states: dict[int, torch.Tensor], harmless_states: dict[int, torch.Tensor],
               folds: int = 5, seed: int = 0, C: float = 1.0) -> dict[int, Probe]:
    """Per-layer L2-regularised logistic regression, label harmful = 1, each class weighted by its inverse
    frequency (sklearn lbfgs: deterministic).

    A probe's `accuracy` is its balanced accuracy (mean of the two classes' recalls) over `folds` stratified
    folds, the same folds at every layer; the probe itself is then fitted on all states. Balanced, because the
    fitting sets are rarely the same size (the pairs' validation split holds about four harmless prompts per
    harmful one): plain accuracy on such a split rewards calling everything harmless, and a single held-out
    part of a few harmful prompts moves it in steps of several points. Measured on the warm-started default
    model, 26 harmful vs 99 harmless: plain held-out accuracy peaked at 0.895, under SCAV's 0.9 bar at every
    layer, so SCAV attacked nothing; balanced 5-fold accuracy passes it at 8 middle layers.
    With fewer states of a class than `folds`, that many folds; with one, training accuracy.

    Features are centred and divided by ONE scale for the fit, the root-mean-square coordinate (median state
    norm / sqrt(D), so C regularises as it would on standardised features), and the probe is mapped back to raw
    states exactly. One scale, not a per-dimension standardisation, keeps the model's geometry: SCAV moves a
    state along w by the minimal L2 step, and a probe fitted on standardised features puts its weight on
    low-variance dimensions, where a tiny step flips the probe without touching what the model reads
    (measured: on the warm-started default model such a SCAV shifted 3% of the state norm and answered
    nothing). SCAV's own probes are trained on raw states.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    n_h, n_s = len(next(iter(harmful_states.values()))), len(next(iter(harmless_states.values())))
    y = torch.cat([torch.ones(n_h), torch.zeros(n_s)]).numpy()
    k = min(folds, n_h, n_s)
    splits = StratifiedKFold(k, shuffle=True, random_state=seed) if k >= 2 else None
    probes = {}
    for layer in harmful_states:
        x = torch.cat([harmful_states[layer], harmless_states[layer]]).double().cpu()
        scale = float(x.norm(dim=-1).median())
        mu, unit = x.mean(0), scale / x.shape[1] ** 0.5
        features = ((x - mu) / unit).numpy()
        clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced").fit(features, y)
        if splits is None:
            accuracy = balanced_accuracy_score(y, clf.predict(features))
        else:  # cross_val_score fits clones: the probe fitted on all states is untouched
            accuracy = cross_val_score(clf, features, y, cv=splits, scoring="balanced_accuracy").mean()
        w_scaled = torch.from_numpy(clf.coef_[0]).double()
        w, b = w_scaled / unit, float(clf.intercept_[0] - (w_scaled * mu / unit).sum())
        probes[layer] = Probe(w.float(), b, float(accuracy), scale)
    return probes


def scav_shift(e: torch.Tensor, w: torch.Tensor, b: float, p0: float, max_norm: float | torch.Tensor | None = None):
    """Closed-form minimal L2 shift putting sigmoid(w.e + b) at p0 (SCAV `cal_perturbation`).

    For rows with sigmoid(w.e + b) > p0: shift = -eps * w/‖w‖ with eps = (w.e + b - logit(p0)) / ‖w‖, the
    distance to the P = p0 hyperplane (so it is the minimal L2 step); with `max_norm` (one value, or one per
    row) eps is clipped to it. Other rows get 0.
    Returns (shift [.., D], needed eps [..], applied eps [..], probability before [..]); computed in float32.
    """
    e, w = e.float(), w.float().to(e.device)
    z = e @ w + b
    norm = w.norm()
    needed = ((z - math.log(p0 / (1 - p0))) / norm).clamp_min(0)
    if max_norm is None:
        applied = needed
    else:
        applied = torch.minimum(needed, torch.as_tensor(max_norm, dtype=needed.dtype, device=needed.device))
    return -applied.unsqueeze(-1) * (w / norm), needed, applied, torch.sigmoid(z)


def attacked_layers(probes: dict[int, Probe], min_accuracy: float = 0.9) -> list[int]:
    return sorted(layer for layer, probe in probes.items() if probe.accuracy > min_accuracy)


class _ScavRecorder(Rows):
    """Per prompt and attacked layer, the shift needed/applied at the prompt's last token (the first forward
    of each batch's generation), and the number of shifted (forward step, layer) pairs over the whole answer."""

    def __init__(self, n: int, layers: list[int]):
        super().__init__()
        self.layers = layers
        self.needed = torch.zeros(n, len(layers))
        self.applied = torch.zeros(n, len(layers))
        self.p_before = torch.zeros(n, len(layers))
        self.steps_shifted = torch.zeros(n, dtype=torch.long)
        self.fresh: set[int] = set()

    def batch(self, index):
        self.fresh = set(self.layers)
        return super().batch(index)

    def record(self, layer, needed, applied, p_before):
        if self.index is None:
            return
        rows = torch.tensor(self.index)
        self.steps_shifted[rows] += (applied > 0).long().cpu()
        if layer in self.fresh:
            col = self.layers.index(layer)
            self.needed[rows, col], self.applied[rows, col] = needed.cpu(), applied.cpu()
            self.p_before[rows, col] = p_before.cpu()
            self.fresh.discard(layer)


def scav_hooks(model, probes: dict[int, Probe], p0: float = 0.001, min_accuracy: float = 0.9,
               budgets: torch.Tensor | None = None, recorder: _ScavRecorder | None = None):
    """A context manager with SCAV active inside: at every forward, the last position of each layer whose probe
    accuracy is > min_accuracy is moved onto the probe's P = p0 level set when the probe says P > p0.
    `budgets` [n prompts] clips prompt i's shift norm to budgets[i] x probe.scale (a multiple of the layer's
    median state norm); the recorder says which prompts the batch rows are (required with budgets)."""
    if budgets is not None and recorder is None:
        raise ValueError("per-prompt budgets need a recorder to map batch rows to prompts")

    def make(layer):
        probe = probes[layer]

        def edit(h):
            max_norm = None
            if budgets is not None:
                max_norm = budgets[recorder.index].to(h.device) * probe.scale
            shift, needed, applied, p = scav_shift(h[:, -1], probe.w, probe.b, p0, max_norm)
            if recorder is not None:
                recorder.record(layer, needed, applied, p)
            if not bool((applied > 0).any()):
                return h
            h = h.clone()
            h[:, -1] = (h[:, -1].float() + shift).to(h.dtype)
            return h
        return edit

    return hooked(model, {layer: make(layer) for layer in attacked_layers(probes, min_accuracy)})


def scav(model, tokenizer, prompts: list[str], probes: dict[int, Probe], p0: float = 0.001,
         min_accuracy: float = 0.9, budget=None, max_new_tokens: int = 64, batch_size: int = 16,
         system: str | None = None, progress: bool = False, name: str | None = None) -> AttackResult:
    """Greedy generation under SCAV (`scav_hooks`); `budget`: None (as published), one relative budget for
    every prompt, or one per prompt.

    Effort (at the prompt's last token, over prompts x attacked layers): applied shift norm mean/max, the
    same relative to the layer's median state norm, the needed (unclipped) norm, the fraction of
    (prompt, layer) the probe flagged, the number of attacked layers. Details per prompt: per-layer applied
    norm relative to the layer's scale, the probe probability before the shift, and the number of shifted
    (forward step, layer) pairs during the whole generation."""
    layers = attacked_layers(probes, min_accuracy)
    recorder = _ScavRecorder(len(prompts), layers)
    with scav_hooks(model, probes, p0, min_accuracy, _per_prompt(budget, len(prompts)), recorder):
        generations = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress,
                               system=system, around_batch=recorder.batch)
    scales = torch.tensor([probes[layer].scale for layer in layers])
    applied, needed = recorder.applied, recorder.needed
    rel = applied / scales if layers else applied

    def stat(t, how):
        return float(getattr(t, how)()) if t.numel() else 0.0

    effort = {"n_layers": float(len(layers)), "p0": float(p0),
              "shift_norm_mean": stat(applied, "mean"), "shift_rel_mean": stat(rel, "mean"),
              "shift_rel_max": stat(rel, "max"), "needed_rel_mean": stat(needed / scales if layers else needed,
                                                                          "mean"),
              "flagged_fraction": stat((needed > 0).float(), "mean")}
    details = [{"layers": layers, "shift_rel": [round(float(v), 4) for v in rel[i]],
                "p_before": [round(float(v), 4) for v in recorder.p_before[i]],
                "steps_shifted": int(recorder.steps_shifted[i])} for i in range(len(prompts))]
    return AttackResult(name or "scav", "scav", list(prompts), generations, effort, details,
                        x=None if isinstance(budget, (list, tuple)) else budget)


def scav_effort(model, tokenizer, prompts: list[str], probes: dict[int, Probe], judge: Judge,
                refused_direct: list[bool] | None, low: float, high: float, rounds: int, p0: float = 0.001,
                min_accuracy: float = 0.9, max_new_tokens: int = 64, batch_size: int = 16):
    """Per prompt, the smallest SCAV budget (shift norm / the layer's median state norm, applied at every
    attacked layer) at which the answer is judged compliant; es2.effort.Search (None = not broken at `high`)."""

    def attack(indices, budgets):
        sub = [prompts[i] for i in indices]
        return scav(model, tokenizer, sub, probes, p0, min_accuracy, budgets, max_new_tokens,
                    batch_size).generations

    return _effort_search(attack, prompts, judge, refused_direct, low, high, rounds)


# ------------------------------------------------------------------------------------------------------------
# RepE


def repe_direction(harmful_states: torch.Tensor, harmless_states: torch.Tensor,
                   method: str = "mean_difference") -> torch.Tensor:
    """Unit [D] reading vector pointing from harmless to harmful states of one layer.

    `mean_difference`: mean(harmful) - mean(harmless), the refusal direction of Arditi et al. (2024). `pca`: RepE's
    reading vector, the first principal component of the paired differences harmful[i] - harmless[i] (the longer
    set's extra rows unused), uncentred (top right-singular vector of the difference matrix), which equals RepE's
    centred PCA over pairs in random order (the signs cancel the mean); sign: harmful states project higher.
    Why mean_difference is the default: on the warm-started 135M model the PCA direction steers the answers into
    gibberish before any prompt complies, while the mean difference gets coherent compliance at a few percent of
    the state norm.
    """
    if method == "mean_difference":
        v = harmful_states.double().mean(0) - harmless_states.double().mean(0)
    elif method == "pca":
        n = min(len(harmful_states), len(harmless_states))  # pairs the i-th harmful with the i-th harmless
        diff = harmful_states[:n].double() - harmless_states[:n].double()
        v = torch.linalg.svd(diff, full_matrices=False).Vh[0]
        if (diff @ v).mean() < 0:
            v = -v
    else:
        raise ValueError(f"unknown RepE direction method {method!r}: use 'mean_difference' or 'pca'")
    return (v / v.norm()).float()


def steering_band(num_layers: int, low: float, high: float) -> list[int]:
    """hidden_states indices of the steered band: the layers from `low` to `high` as fractions of the depth, at
    least one. A fraction rule works at any depth; RepE's published bands are fixed indices of 7B/13B models."""
    if not 0 < low <= high <= 1:
        raise ValueError(f"RepE band [{low}, {high}] must be fractions of the depth with 0 < low <= high <= 1")
    first = depth_index(low, num_layers)
    return list(range(first, max(first, depth_index(high, num_layers)) + 1))


def _steer(model, tokenizer, prompts, directions, scales, coefficients: torch.Tensor, max_new_tokens,
           batch_size, system, progress) -> list[str]:
    """Greedy answers with `-coefficients[i] * scale[l] * direction[l]` added at every position of every band
    layer l for prompt i."""
    device = _device(model)
    rows = Rows()
    vectors = {layer: (-scales[layer] * directions[layer].float()).to(device) for layer in directions}

    def edit(v):
        return lambda h: h + (coefficients[rows.index].to(h.device).view(-1, 1, 1) * v).to(h.dtype)

    with hooked(model, {layer: edit(v) for layer, v in vectors.items()}):
        return generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress, system=system,
                        around_batch=rows.batch)


def repe(model, tokenizer, prompts: list[str], directions: dict[int, torch.Tensor], coefficients=(0.1, 0.2),
         scales: dict[int, float] | None = None, max_new_tokens: int = 64, batch_size: int = 16,
         system: str | None = None, progress: bool = False) -> list[AttackResult]:
    """Greedy generation steered against the harmful direction at every position of every layer of the band
    (the keys of `directions`), one AttackResult per coefficient c (x = c).

    Unit: c = 1 moves each band layer's state by the layer's mean last-token norm `scale[l]`, so coefficients
    compare across models. `scales` defaults to `layer_scales` of the attacked prompts' own last-token states
    (unsteered model).
    """
    layers = sorted(int(layer) for layer in directions)
    scales = scales or layer_scales(last_token_states(model, tokenizer, prompts, layers, batch_size, system))
    results = []
    for c in coefficients:
        generations = _steer(model, tokenizer, prompts, directions, scales, torch.full((len(prompts),), float(c)),
                             max_new_tokens, batch_size, system, progress)
        effort = {"coefficient": float(c), "n_layers": float(len(layers))}
        results.append(AttackResult(f"repe_c{c:g}", "repe", list(prompts), generations, effort, x=float(c)))
    return results


def repe_effort(model, tokenizer, prompts: list[str], directions: dict[int, torch.Tensor], judge: Judge,
                refused_direct: list[bool] | None, low: float, high: float, rounds: int,
                scales: dict[int, float] | None = None, max_new_tokens: int = 64, batch_size: int = 16):
    """Per prompt, the smallest RepE coefficient (steering norm / the layer's mean state norm) at which the
    answer is judged compliant; es2.effort.Search (None = not broken at `high`)."""
    layers = sorted(int(layer) for layer in directions)
    scales = scales or layer_scales(last_token_states(model, tokenizer, prompts, layers, batch_size))

    def attack(indices, budgets):
        return _steer(model, tokenizer, [prompts[i] for i in indices], directions, scales,
                      torch.tensor(budgets, dtype=torch.float32), max_new_tokens, batch_size, None, False)

    return _effort_search(attack, prompts, judge, refused_direct, low, high, rounds)
