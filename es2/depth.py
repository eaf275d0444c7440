"""Does the refusal-direction projection at the injection point predict recovery? (Park & Kim 2026's claim)

Park & Kim (2026) claim that how far a model's hidden state lies along its refusal direction does not predict
whether it recovers from a mid-sequence injection. This module tests that on the evaluate stage's injection
results (s > 0):

- refusal direction: difference of the means of harmful and harmless last-token states (the probe-fitting
  prompts, chat template, end of the generation prompt) at one layer, unit-normalised;
- projection of prompt i under result (s, k): the last-token state of `chat prompt + own s tokens + injected
  span` (exactly the text `injection` continued from), minus the harmful/harmless midpoint, dotted with the
  direction (positive = on the harmful, refusal-triggering side);
- recovered: the continuation after the span is a refusal under the evaluation's headline judge.

Figures: the point-biserial correlation (Pearson r between the projection and the 0/1 flag) with a Fisher-z 95%
interval and a percentile bootstrap interval (fixed seed), n, and the AUC of the projection as a predictor of
recovery (Mann-Whitney, ties count one half). NaN, with a reason, when it is undefined (all flags equal,
constant projections, n < 4). A correlation near 0 whose interval contains 0 supports the claim; an interval
clear of 0 (with AUC away from 0.5) contradicts it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------------------
# Statistics


def _undefined(x: np.ndarray, y: np.ndarray) -> str | None:
    if len(x) < 4:
        return f"only {len(x)} points (need at least 4)"
    if np.all(y == y[0]):
        return f"{'every' if y[0] else 'no'} prompt recovered: the correlation is undefined"
    if np.ptp(x) == 0:
        return "every projection is equal: the correlation is undefined"
    return None


def point_biserial(projection, recovered, bootstrap: int = 2000, seed: int = 0) -> dict:
    """Point-biserial correlation of `projection` with the 0/1 `recovered` flags, with intervals and the AUC.

    Returns {n, recovered, recovery_rate, corr, ci_low, ci_high (Fisher z), boot_low, boot_high (percentile
    bootstrap over prompts, `bootstrap` resamples from numpy's generator seeded with `seed`; resamples with
    one class only are skipped, their count is `boot_valid`), auc, reason (None, or why the figures are NaN)}.
    """
    x = np.asarray(projection, dtype=float)
    y = np.asarray(recovered, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"projection {x.shape} and recovered {y.shape} must be equal-length vectors")
    n = len(x)
    out = {"n": n, "recovered": int(y.sum()), "recovery_rate": float(y.mean()) if n else float("nan"),
           "corr": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "boot_low": float("nan"),
           "boot_high": float("nan"), "boot_valid": 0, "auc": float("nan")}
    reason = _undefined(x, y) if n else "no points"
    out["reason"] = reason
    if reason:
        return out
    from scipy.stats import ConstantInputWarning, pearsonr
    from sklearn.metrics import roc_auc_score

    fit = pearsonr(x, y)
    interval = fit.confidence_interval(0.95)  # Fisher z: tanh(atanh(r) -+ z / sqrt(n - 3))
    out["corr"], out["ci_low"], out["ci_high"] = float(fit.statistic), float(interval.low), float(interval.high)
    out["auc"] = float(roc_auc_score(y, x))  # Mann-Whitney: ties count one half
    if bootstrap > 0:
        index = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
        with warnings.catch_warnings():  # a resample with one class only is NaN, skipped below
            warnings.simplefilter("ignore", ConstantInputWarning)
            rs = pearsonr(x[index], y[index], axis=1).statistic
        rs = rs[np.isfinite(rs)]
        out["boot_valid"] = int(len(rs))
        if len(rs):
            out["boot_low"], out["boot_high"] = (float(v) for v in np.quantile(rs, [0.025, 0.975]))
    return out


# ------------------------------------------------------------------------------------------------------------
# States


def raw_last_token_states(model, tokenizer, texts: list[str], layer: int, batch_size: int = 16) -> torch.Tensor:
    """float32 CPU [n, D]: hidden_states[layer] at the last token of each already-rendered text (tokenized
    without added special tokens, as `generate` does with a prefill)."""
    from es2.attacks.hooks import states_at_last_token

    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return states_at_last_token(model, tokenizer, ids, [layer], batch_size)[layer]


def refusal_direction(harmful_states: torch.Tensor, harmless_states: torch.Tensor) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """(unit direction mean(harmful) - mean(harmless), midpoint of the two means), float32 [D] each."""
    mu_h, mu_s = harmful_states.double().mean(0), harmless_states.double().mean(0)
    diff = mu_h - mu_s
    norm = diff.norm()
    if not norm > 0:
        raise ValueError("harmful and harmless means coincide: no refusal direction")
    return (diff / norm).float(), ((mu_h + mu_s) / 2).float()


def injection_texts(tokenizer, result, system: str | None = None) -> list[str]:
    """The text each prompt of an injection result was continued from: chat prompt + own s tokens + span."""
    from es2.attacks.prompting import _join
    from es2.generation import chat_prompts

    rendered = chat_prompts(tokenizer, list(result.prompts), system)
    return [text + _join(d["own"], d["forced"]) for text, d in zip(rendered, result.details)]


def default_layer(layers) -> int:
    """The middle of the evaluate layers (the upper middle for an even count)."""
    ordered = sorted(int(layer) for layer in layers)
    return ordered[len(ordered) // 2]


def projection_analysis(model, tokenizer, results: list, probe_sets: tuple[list[str], list[str]], layer: int,
                        batch_size: int = 16, bootstrap: int = 2000, seed: int = 0,
                        judge: str = "jbb", recovered: dict[str, list[bool]] | None = None) -> dict | None:
    """The claim test for one model: projections at the injection point vs recovery, per injection result with
    s > 0 and pooled over them. None when there is no such result.

    `recovered[result name]`: precomputed refusal flags of the continuations (any judge, named by `judge`);
    default the keyword list `judge`.
    Returns {layer, judge, n_fit_harmful, n_fit_harmless, pooled: point_biserial(...), by_result: {name: ...},
    points: [{attack, s, k, i, projection, recovered}]}.
    """
    from es2.attacks.hooks import last_token_states
    from es2.judges import is_refusal

    chosen = [r for r in results if r.family == "injection" and r.effort.get("s", r.x or 0) > 0]
    if not chosen:
        return None
    fit_harmful, fit_harmless = probe_sets
    h = last_token_states(model, tokenizer, fit_harmful, [layer], batch_size)[layer]
    s = last_token_states(model, tokenizer, fit_harmless, [layer], batch_size)[layer]
    direction, midpoint = refusal_direction(h, s)
    texts = [t for r in chosen for t in injection_texts(tokenizer, r)]
    states = raw_last_token_states(model, tokenizer, texts, layer, batch_size)
    projections = ((states - midpoint) @ direction).tolist()
    points, by_result, start = [], {}, 0
    for r in chosen:
        n = len(r.generations)
        proj = projections[start:start + n]
        flags = recovered[r.name] if recovered else [is_refusal(g, judge) for g in r.generations]
        start += n
        by_result[r.name] = point_biserial(proj, flags, bootstrap, seed)
        points += [{"attack": r.name, "s": int(r.effort.get("s", r.x)), "k": int(r.effort.get("k", 0)), "i": i,
                    "projection": p, "recovered": f} for i, (p, f) in enumerate(zip(proj, flags))]
    pooled = point_biserial([p["projection"] for p in points], [p["recovered"] for p in points], bootstrap, seed)
    return {"layer": int(layer), "judge": judge, "n_fit_harmful": len(fit_harmful),
            "n_fit_harmless": len(fit_harmless), "pooled": pooled, "by_result": by_result, "points": points}


def flat_metrics(analysis: dict | None) -> dict:
    """Flat `depth/...` metrics (pooled over the injection results with s > 0)."""
    if analysis is None:
        return {}
    p = analysis["pooled"]
    return {"depth/projection_corr": p["corr"], "depth/projection_corr_ci_low": p["ci_low"],
            "depth/projection_corr_ci_high": p["ci_high"], "depth/projection_corr_boot_low": p["boot_low"],
            "depth/projection_corr_boot_high": p["boot_high"], "depth/projection_auc": p["auc"],
            "depth/projection_n": p["n"], "depth/recovery_rate": p["recovery_rate"],
            "depth/layer": analysis["layer"]}


# ------------------------------------------------------------------------------------------------------------
# Plot


def plot_projection(path, analyses: dict[str, dict], seed: int = 0):
    """Scatter of projection (x) against recovered (y, 0/1 with vertical jitter), one panel per model role,
    one colour per injection result. Returns the path, or None when there is nothing to draw."""
    from matplotlib.figure import Figure

    analyses = {role: a for role, a in analyses.items() if a and a["points"]}
    if not analyses:
        return None
    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(4.2 * len(analyses), 3.4))
    axes = fig.subplots(1, len(analyses), squeeze=False)[0]
    for ax, (role, a) in zip(axes, analyses.items()):
        names = list(dict.fromkeys(p["attack"] for p in a["points"]))
        for name in names:
            pts = [p for p in a["points"] if p["attack"] == name]
            ys = np.array([float(p["recovered"]) for p in pts]) + rng.uniform(-0.08, 0.08, len(pts))
            ax.scatter([p["projection"] for p in pts], ys, s=14, alpha=0.7, label=name)
        pooled = a["pooled"]
        r = "–" if math.isnan(pooled["corr"]) else f"{pooled['corr']:.2f}"
        roc = "–" if math.isnan(pooled["auc"]) else f"{pooled['auc']:.2f}"
        ax.set_title(f"{role}: r = {r}, AUC = {roc}", fontsize=9)
        ax.set_yticks([0, 1], ["not recovered", "recovered"])
        ax.set_ylim(-0.3, 1.3)
        ax.axvline(0, color="#999", lw=0.8)
        ax.set_xlabel(f"projection on refusal direction (layer {a['layer']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
