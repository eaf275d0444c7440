"""Per-layer separation of harmful vs harmless hidden states, and a before/after PCA scatter plot.

Every function takes one layer's states: harmful ``h`` [n, D] and harmless ``s`` [m, D] (torch tensors or
numpy arrays; computed in float64 on the CPU). Metrics:

- ``probe_accuracy``: held-out accuracy of a logistic probe (the SCAV precondition is > 0.9).
- ``centroid_distance``: ``||mu_H - mu_S||`` (raw scale; centring both sets by the pooled mean first leaves it
  unchanged, so it is the "centred centroid distance").
- ``fisher_ratio``: ``||mu_H - mu_S||^2 / (tr Sigma_H + tr Sigma_S)`` (population covariances; scale-free, the
  same formula as ``es2.losses.distances.fisher_ratio``, in numpy).
- KLDO separation (Haldar et al., metrics.py): PCA(2) fitted on the union of both sets, then in those 2-D
  coordinates ``bhattacharyya_distance`` between Gaussian fits (sample covariances, ddof = 1)
  ``DB = 1/8 dmu^T Sbar^-1 dmu + 1/2 ln(det Sbar / sqrt(det S1 det S2))``, ``Sbar = (S1 + S2) / 2``, its
  coefficient ``exp(-DB)``, and the ``silhouette`` score with the class labels.
- d' (``es2.geometry.dprime``).

A metric that cannot be computed on the given states (too few points, a single class) is NaN rather than an
error, so one degenerate layer does not abort a report.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from es2.io import atomic_path

METRICS = ("dprime", "probe_accuracy", "centroid_distance", "fisher_ratio", "bhattacharyya_distance",
           "bhattacharyya_coefficient", "silhouette")

# Added to the diagonal of each 2x2 covariance so a degenerate (collinear or single-point) cloud stays finite.
_RIDGE = 1e-9


def _np(x) -> np.ndarray:
    """[n, D] float64 numpy array from a tensor or array (1-D input is one feature per point)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"states must be [n, D]; got shape {arr.shape}")
    return arr


def _pair(h, s) -> tuple[np.ndarray, np.ndarray]:
    h, s = _np(h), _np(s)
    if h.shape[1] != s.shape[1]:
        raise ValueError(f"harmful states have {h.shape[1]} dims but harmless have {s.shape[1]}")
    return h, s


def _xy(h: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stacked points and labels (1 = harmful, 0 = harmless)."""
    return np.concatenate([h, s]), np.concatenate([np.ones(len(h), dtype=int), np.zeros(len(s), dtype=int)])


def probe_accuracy(h, s, holdout: float = 0.3, seed: int = 0) -> float:
    """Accuracy on a held-out stratified split (fraction `holdout`) of a standardised logistic-regression
    probe trained on the rest. NaN when a class has fewer than 2 points."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    h, s = _pair(h, s)
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1); got {holdout}")
    if min(len(h), len(s)) < 2:
        return float("nan")
    x, y = _xy(h, s)
    n_test = max(2, round(holdout * len(y)))  # at least one point of each class in both parts
    n_test = min(n_test, len(y) - 2)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=n_test, stratify=y, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


def centroid_distance(h, s) -> float:
    """``||mu_H - mu_S||`` in the states' own units."""
    h, s = _pair(h, s)
    return float(np.linalg.norm(h.mean(0) - s.mean(0)))


def fisher_ratio(h, s, eps: float = 1e-12) -> float:
    """``||mu_H - mu_S||^2 / (tr Sigma_H + tr Sigma_S)`` with population (ddof 0) covariances."""
    h, s = _pair(h, s)
    spread = ((h - h.mean(0)) ** 2).sum(1).mean() + ((s - s.mean(0)) ** 2).sum(1).mean()
    return float(((h.mean(0) - s.mean(0)) ** 2).sum() / (spread + eps))


def pca2(h, s) -> tuple[np.ndarray, np.ndarray]:
    """Both sets in the 2-D PCA of their union (a 1-D input is padded with a zero second coordinate)."""
    from sklearn.decomposition import PCA

    h, s = _pair(h, s)
    x = np.concatenate([h, s])
    k = min(2, x.shape[0], x.shape[1])
    z = PCA(n_components=k).fit_transform(x) if k > 0 else np.zeros((len(x), 0))
    if z.shape[1] < 2:
        z = np.pad(z, ((0, 0), (0, 2 - z.shape[1])))
    return z[: len(h)], z[len(h):]


def _gaussian_bhattacharyya(a: np.ndarray, b: np.ndarray) -> float:
    ridge = _RIDGE * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    cov = (cov_a + cov_b) / 2
    diff = a.mean(0) - b.mean(0)
    term1 = diff @ np.linalg.solve(cov, diff) / 8
    logdet = [np.linalg.slogdet(c)[1] for c in (cov, cov_a, cov_b)]
    term2 = 0.5 * (logdet[0] - 0.5 * (logdet[1] + logdet[2]))
    return float(term1 + term2)


def bhattacharyya_distance(h, s) -> float:
    """Bhattacharyya distance between Gaussian fits of the two classes in their joint PCA-2 coordinates
    (KLDO's separation metric; >= 0, larger = more separated). NaN when a class has fewer than 2 points."""
    h, s = _pair(h, s)
    if min(len(h), len(s)) < 2:
        return float("nan")
    return _gaussian_bhattacharyya(*pca2(h, s))


def silhouette(h, s) -> float:
    """Silhouette score (sklearn, Euclidean) of the class labels on the joint PCA-2 coordinates; in [-1, 1],
    higher = better separated. NaN with fewer than 3 points or a single class."""
    from sklearn.metrics import silhouette_score

    h, s = _pair(h, s)
    if len(h) == 0 or len(s) == 0 or len(h) + len(s) < 3:
        return float("nan")
    zh, zs = pca2(h, s)
    x, y = _xy(zh, zs)
    return float(silhouette_score(x, y))


def layer_metrics(h, s, holdout: float = 0.3, seed: int = 0) -> dict[str, float]:
    """All metrics (``METRICS``) for one layer."""
    import torch

    from es2.geometry import dprime

    h, s = _pair(h, s)
    db = bhattacharyya_distance(h, s)
    return {
        "dprime": dprime(torch.from_numpy(h), torch.from_numpy(s)),
        "probe_accuracy": probe_accuracy(h, s, holdout, seed),
        "centroid_distance": centroid_distance(h, s),
        "fisher_ratio": fisher_ratio(h, s),
        "bhattacharyya_distance": db,
        "bhattacharyya_coefficient": math.exp(-db) if not math.isnan(db) else float("nan"),
        "silhouette": silhouette(h, s),
    }


def layer_report(states_by_layer: dict, holdout: float = 0.3, seed: int = 0) -> dict[int, dict[str, float]]:
    """``{layer: {metric: value}}`` for ``{layer: (harmful [n, D], harmless [m, D])}`` (e.g. the ``states`` of
    ``es2.geometry.states_and_kl``)."""
    return {layer: layer_metrics(h, s, holdout, seed) for layer, (h, s) in states_by_layer.items()}


def flatten_report(report: dict, prefix: str = "geometry") -> dict[str, float]:
    """Flat ``{"geometry/<metric>/<layer>": value}`` keys (DVC metrics), plus ``.../mean`` over layers."""
    flat: dict[str, float] = {}
    for layer, metrics in report.items():
        for name, value in metrics.items():
            flat[f"{prefix}/{name}/{layer}"] = value
    for name in {name for metrics in report.values() for name in metrics}:
        values = [m[name] for m in report.values() if name in m and not math.isnan(m[name])]
        flat[f"{prefix}/{name}/mean"] = sum(values) / len(values) if values else float("nan")
    return flat


def _layer_states(states, layer):
    """(h, s) from ``{layer: (h, s)}`` or from an ``(h, s)`` pair given directly."""
    if isinstance(states, dict):
        if layer not in states:
            raise KeyError(f"layer {layer} not in the states (have {sorted(states)})")
        return states[layer]
    return states


def pca_scatter(states_before, states_after, layer: int, path, title: str = "") -> Path:
    """Two-panel PNG (before / after training) of harmful vs harmless points at `layer`, both projected on
    the PCA-2 fitted to the BEFORE states (same axes, so movement is visible). States are ``{layer: (h, s)}``
    or an ``(h, s)`` pair. Written atomically (temporary name in the same folder, then renamed). Returns the
    path."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    from sklearn.decomposition import PCA

    hb, sb = _pair(*_layer_states(states_before, layer))
    ha, sa = _pair(*_layer_states(states_after, layer))
    if ha.shape[1] != hb.shape[1]:
        raise ValueError(f"before states have {hb.shape[1]} dims but after states have {ha.shape[1]}")
    union = np.concatenate([hb, sb])
    k = min(2, union.shape[0], union.shape[1])
    pca = PCA(n_components=k).fit(union)

    def project(x):
        z = pca.transform(x)
        return np.pad(z, ((0, 0), (0, 2 - z.shape[1]))) if z.shape[1] < 2 else z

    panels = [("before", project(hb), project(sb)), ("after", project(ha), project(sa))]
    fig = Figure(figsize=(10, 4.8), dpi=100)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, (name, zh, zs) in zip(axes, panels):
        ax.scatter(zs[:, 0], zs[:, 1], s=14, alpha=0.7, c="tab:blue", label=f"harmless (n={len(zs)})")
        ax.scatter(zh[:, 0], zh[:, 1], s=14, alpha=0.7, c="tab:red", marker="x",
                   label=f"harmful (n={len(zh)})")
        for z, colour in ((zs, "tab:blue"), (zh, "tab:red")):
            if len(z):
                ax.plot(*z.mean(0), "o", markerfacecolor="white", markeredgecolor=colour, markersize=10)
        ax.set_title(f"{name} training")
        ax.set_xlabel("PC1 (of before)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[0].set_ylabel("PC2 (of before)")
    fig.suptitle(title or f"layer {layer}: harmful vs harmless, PCA of the before states")
    fig.tight_layout()

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
