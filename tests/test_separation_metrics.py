import math

import numpy as np
import pytest
import torch

from es2.geometry import dprime
from es2.separation_metrics import (METRICS, bhattacharyya_distance, centroid_distance, fisher_ratio,
                                    flatten_report, layer_report, pca2, pca_scatter, probe_accuracy,
                                    silhouette)


def clouds(gap: float, n: int = 60, dim: int = 8, seed: int = 0):
    """Two isotropic unit-variance Gaussian clouds whose means differ by `gap` along the first axis."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, dim))
    s = rng.normal(size=(n, dim))
    h[:, 0] += gap
    return torch.tensor(h, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)


def test_probe_accuracy_separable_vs_identical():
    assert probe_accuracy(*clouds(gap=20.0)) == 1.0
    h, _ = clouds(gap=0.0, n=200)
    _, s = clouds(gap=0.0, n=200, seed=1)
    assert 0.3 <= probe_accuracy(h, s) <= 0.7  # same distribution: chance
    assert math.isnan(probe_accuracy(h[:1], s))


def test_centroid_distance_and_fisher_ratio_hand_values():
    h = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mu (2, 0), tr Sigma = 1
    s = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # mu (0, 0), tr Sigma = 1
    assert centroid_distance(h, s) == pytest.approx(2.0)
    assert fisher_ratio(h, s) == pytest.approx(4.0 / 2.0)
    # shift-invariant, and fisher is scale-invariant while the distance scales
    assert centroid_distance(h + 5, s + 5) == pytest.approx(2.0)
    assert fisher_ratio(3 * h, 3 * s) == pytest.approx(2.0)
    assert centroid_distance(3 * h, 3 * s) == pytest.approx(6.0)


def test_bhattacharyya_matches_closed_form_and_grows_with_separation():
    h, s = clouds(gap=6.0, n=400, dim=2)
    # 2-D data: PCA-2 is a rotation (+ shift), which leaves the Bhattacharyya distance unchanged
    a, b = h.double().numpy(), s.double().numpy()
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    c = (ca + cb) / 2
    d = a.mean(0) - b.mean(0)
    expected = d @ np.linalg.inv(c) @ d / 8 + 0.5 * np.log(np.linalg.det(c) / np.sqrt(np.linalg.det(ca) *
                                                                                      np.linalg.det(cb)))
    assert bhattacharyya_distance(h, s) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(6.0**2 / 8, rel=0.2)  # unit covariances: DB = gap^2 / 8
    near, far = bhattacharyya_distance(*clouds(gap=0.5)), bhattacharyya_distance(*clouds(gap=8.0))
    assert 0 <= near < far


def test_silhouette_range_and_ordering():
    near, far = silhouette(*clouds(gap=0.0)), silhouette(*clouds(gap=10.0))
    assert -1 <= near <= 1 and -1 <= far <= 1
    assert far > 0.7 and near < 0.2 and far > near


def test_pca2_shapes_and_low_dimensional_input():
    h, s = clouds(gap=1.0, n=10, dim=5)
    zh, zs = pca2(h, s)
    assert zh.shape == (10, 2) and zs.shape == (10, 2)
    zh, zs = pca2(h[:, :1], s[:, :1])  # 1-D states are padded to 2-D
    assert zh.shape == (10, 2) and np.allclose(zh[:, 1], 0)


def test_layer_report_has_every_metric_and_reuses_dprime():
    states = {3: clouds(gap=4.0), 7: clouds(gap=0.5)}
    report = layer_report(states)
    assert set(report) == {3, 7}
    for layer, metrics in report.items():
        assert set(metrics) == set(METRICS)
        assert metrics["dprime"] == pytest.approx(dprime(*states[layer]), rel=1e-5)
        coefficient = math.exp(-metrics["bhattacharyya_distance"])
        assert metrics["bhattacharyya_coefficient"] == pytest.approx(coefficient)
    assert report[3]["silhouette"] > report[7]["silhouette"]
    assert report[3]["probe_accuracy"] >= report[7]["probe_accuracy"]
    flat = flatten_report(report)
    assert flat["geometry/dprime/3"] == report[3]["dprime"]
    assert flat["geometry/dprime/mean"] == pytest.approx((report[3]["dprime"] + report[7]["dprime"]) / 2)


def test_pca_scatter_writes_a_png_atomically(tmp_path):
    before = {5: clouds(gap=0.5, dim=16)}
    after = {5: clouds(gap=6.0, dim=16, seed=3)}
    out = pca_scatter(before, after, 5, tmp_path / "plots" / "pca_layer5.png", "layer 5")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000
    assert sorted(p.name for p in out.parent.iterdir()) == ["pca_layer5.png"]  # no temporary left behind
    pca_scatter(before[5], after[5], 5, out)  # (h, s) pairs directly; overwrites in place
    with pytest.raises(KeyError, match="layer 4"):
        pca_scatter(before, after, 4, tmp_path / "x.png")
