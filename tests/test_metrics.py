"""metrics: thresholds, confusion metrics, bootstrap CI and evaluate, checked against direct computation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from scanomaly.errors import ScanomalyError
from scanomaly.metrics import (
    bootstrap_auroc_ci,
    choose_threshold,
    evaluate,
    format_metrics_table,
    patient_scores,
    threshold_metrics,
)

SEPARABLE_Y = np.array([0, 0, 0, 0, 1, 1, 1])
SEPARABLE_S = np.array([0.1, 0.2, 0.3, 0.35, 0.7, 0.8, 0.9])


def noisy(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(int)
    return y, rng.normal(size=n) + 1.2 * y


def direct(y, s, t):
    pred = s >= t
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    return tp, fp, tn, fn


def test_threshold_metrics_match_hand_counts():
    y, s = noisy()
    t = 0.4
    m = threshold_metrics(y, s, t)
    tp, fp, tn, fn = direct(y, s, t)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert m["sensitivity"] == m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["accuracy"] == pytest.approx((tp + tn) / len(y))
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))
    assert m["threshold"] == t


def test_score_equal_to_threshold_is_abnormal():
    m = threshold_metrics([0, 1], [0.5, 0.7], 0.7)
    assert m["tp"] == 1 and m["fp"] == 0
    assert threshold_metrics([0, 0], [0.1, 0.2], 1.0)["precision"] == 0.0  # undefined -> 0


def test_balanced_threshold_on_separable_set():
    t = choose_threshold(SEPARABLE_Y, SEPARABLE_S, "balanced")
    m = threshold_metrics(SEPARABLE_Y, SEPARABLE_S, t)
    assert m["sensitivity"] == m["specificity"] == 1.0
    assert 0.35 < t <= 0.7


def test_balanced_threshold_minimises_the_gap():
    y, s = noisy()
    t = choose_threshold(y, s, "balanced")
    m = threshold_metrics(y, s, t)
    gaps = []
    for c in np.unique(s):
        tp, fp, tn, fn = direct(y, s, c)
        gaps.append(abs(tp / (tp + fn) - tn / (tn + fp)))
    assert abs(m["sensitivity"] - m["specificity"]) == pytest.approx(min(gaps))


def test_max_f1_threshold_is_the_best_f1():
    y, s = noisy(seed=1)
    t = choose_threshold(y, s, "max_f1")
    best = max(threshold_metrics(y, s, c)["f1"] for c in np.unique(s))
    assert threshold_metrics(y, s, t)["f1"] == pytest.approx(best)


def test_sensitivity_threshold():
    y, s = noisy(seed=2)
    t = choose_threshold(y, s, "sensitivity", target_sensitivity=0.9)
    m = threshold_metrics(y, s, t)
    assert m["sensitivity"] >= 0.9
    higher = [c for c in np.unique(s) if c > t]
    assert all(threshold_metrics(y, s, c)["sensitivity"] < 0.9 for c in higher)  # the highest such threshold


def test_threshold_errors():
    with pytest.raises(ScanomalyError, match="both normal and abnormal"):
        choose_threshold([1, 1], [0.1, 0.2])
    with pytest.raises(ScanomalyError, match="unknown threshold rule"):
        choose_threshold(SEPARABLE_Y, SEPARABLE_S, "youden-ish")
    with pytest.raises(ScanomalyError, match="labels must be 0"):
        choose_threshold([0, -1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ScanomalyError, match="NaN"):
        choose_threshold([0, 1], [0.1, np.nan])
    with pytest.raises(ScanomalyError, match="2 labels but 3"):
        choose_threshold([0, 1], [0.1, 0.2, 0.3])


def test_bootstrap_ci_contains_auroc():
    y, s = noisy()
    low, high = bootstrap_auroc_ci(y, s, n_bootstrap=300, seed=0)
    auc = roc_auc_score(y, s)
    assert low < auc < high and 0.5 < low and high <= 1.0
    assert (low, high) == bootstrap_auroc_ci(y, s, n_bootstrap=300, seed=0)  # seeded


def test_evaluate_matches_sklearn_and_flags_the_threshold_source():
    y, s = noisy()
    vy, vs = noisy(seed=9)
    m = evaluate(y, s, val_labels=vy, val_scores=vs, n_bootstrap=100)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["auprc"] == pytest.approx(average_precision_score(y, s))
    assert (m["n"], m["n_abnormal"], m["n_normal"]) == (120, 40, 80)
    assert m["threshold_source"] == "validation"
    assert m["threshold"] == choose_threshold(vy, vs, "balanced")
    assert m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"]
    oracle = evaluate(y, s, n_bootstrap=0)
    assert oracle["threshold_source"] == "oracle (same data)" and oracle["auroc_ci_low"] is None
    given = evaluate(y, s, threshold=0.0, n_bootstrap=0)
    assert given["threshold_source"] == "given" and given["threshold"] == 0.0
    with pytest.raises(ScanomalyError, match="both"):
        evaluate(y, s, val_labels=vy, n_bootstrap=0)


def test_patient_scores():
    s = [1.0, 3.0, 2.0, 10.0, 0.0, 5.0]
    ids = ["b", "b", "b", "a", "a", "a"]
    y = [0, 1, 0, 0, 0, 0]
    ps, py, pid = patient_scores(s, ids, y, "mean")
    assert pid == ["a", "b"] and py.tolist() == [0, 1]
    np.testing.assert_allclose(ps, [5.0, 2.0])
    np.testing.assert_allclose(patient_scores(s, ids, y, "max")[0], [10.0, 3.0])
    np.testing.assert_allclose(patient_scores(s, ids, y, "topk_mean", k=2)[0], [7.5, 2.5])
    with pytest.raises(ScanomalyError, match="patient id"):
        patient_scores([1.0], [None], [0])
    with pytest.raises(ScanomalyError, match="reduction"):
        patient_scores(s, ids, y, "median")


def test_format_metrics_table():
    y, s = noisy()
    table = format_metrics_table({"healthygan": evaluate(y, s, n_bootstrap=50), "patchcore": {"auroc": 0.5}})
    lines = table.splitlines()
    assert lines[0].startswith("| name") and "AUROC" in lines[0] and len(lines) == 4
    assert "healthygan" in table and "oracle (same data)" in table and f"{roc_auc_score(y, s):.3f} [" in table
    assert format_metrics_table({}) == "(no results)"
