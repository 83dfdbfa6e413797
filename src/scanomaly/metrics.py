"""Evaluation: AUROC with a bootstrap interval, AUPRC, and metrics at a threshold.

Scores are "higher = more anomalous"; labels are 0 = normal, 1 = abnormal, and an image is predicted
abnormal when `score >= threshold`. All curves come from scikit-learn.

A threshold must be chosen on data other than the data it is reported on: `evaluate` picks it on the
validation scores when given (`threshold_source: "validation"`), and otherwise on the evaluated data
itself, flagged as `threshold_source: "oracle (same data)"`: optimistic, for reference only.

Threshold rules (`choose_threshold`):
- "balanced":    the ROC point where sensitivity ~= specificity (minimises |TPR - (1 - FPR)|)
- "max_f1":      the threshold of the best F1 on the precision-recall curve
- "sensitivity": the highest threshold whose sensitivity reaches `target_sensitivity`
"""

from __future__ import annotations

import math

import numpy as np
import sklearn
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from .errors import ScanomalyError

THRESHOLD_RULES = ("balanced", "max_f1", "sensitivity")
REDUCTIONS = ("mean", "max", "topk_mean")


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(y) != len(s):
        raise ScanomalyError(f"{len(y)} labels but {len(s)} scores")
    if len(y) == 0:
        raise ScanomalyError("no scores to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise ScanomalyError("labels must be 0 (normal) or 1 (abnormal); drop unlabeled images first")
    if not np.isfinite(s).all():
        raise ScanomalyError(f"{int((~np.isfinite(s)).sum())} score(s) are NaN or inf")
    return y.astype(np.int64), s


def _check_both_classes(y: np.ndarray, what: str) -> None:
    if y.min() == y.max():
        only = "abnormal" if y[0] == 1 else "normal"
        raise ScanomalyError(f"{what} needs both normal and abnormal images; all {len(y)} are {only}")


def choose_threshold(labels, scores, rule: str = "balanced", target_sensitivity: float = 0.95) -> float:
    """A decision threshold (one of the scores) chosen on labeled data by `rule`."""
    y, s = _check(labels, scores)
    _check_both_classes(y, "choosing a threshold")
    if rule == "balanced":
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
        fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # the first point is the +inf threshold
        gap = np.abs(tpr - (1.0 - fpr))
        best = np.flatnonzero(gap <= gap.min() + 1e-12)
        # ties: the best Youden index, then the highest threshold
        i = best[np.argmax(tpr[best] - fpr[best])]
        return float(thr[i])
    if rule == "max_f1":
        precision, recall, thr = precision_recall_curve(y, s)
        p, r = precision[:-1], recall[:-1]  # the last point has no threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        return float(thr[int(np.argmax(f1))])
    if rule == "sensitivity":
        if not 0.0 < target_sensitivity <= 1.0:
            raise ScanomalyError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
        ok = np.flatnonzero(tpr[1:] >= target_sensitivity - 1e-12) + 1  # thresholds are decreasing
        return float(thr[ok[0]])
    raise ScanomalyError(f"unknown threshold rule {rule!r}; use one of {THRESHOLD_RULES}")


def threshold_metrics(labels, scores, threshold: float) -> dict:
    """Confusion-matrix metrics when `score >= threshold` predicts abnormal (0 where undefined)."""
    y, s = _check(labels, scores)
    pred = (s >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())

    def ratio(a, b):
        return float(a / b) if b else 0.0

    precision, recall, specificity = ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {
        "threshold": float(threshold),
        "precision": precision,
        "recall": recall,
        "sensitivity": recall,
        "specificity": specificity,
        "f1": ratio(2 * precision * recall, precision + recall),
        "accuracy": ratio(tp + tn, len(y)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def bootstrap_auroc_ci(labels, scores, n_bootstrap: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the AUROC over stratified bootstrap resamples (each class resampled
    with replacement on its own, so every resample has both classes)."""
    y, s = _check(labels, scores)
    _check_both_classes(y, "AUROC")
    if n_bootstrap < 1:
        raise ScanomalyError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < alpha < 1.0:
        raise ScanomalyError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    yb = np.r_[np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)]
    aucs = np.empty(n_bootstrap)
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):  # inputs checked above
        for b in range(n_bootstrap):
            sb = np.r_[pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]]
            aucs[b] = roc_auc_score(yb, sb)
    low, high = np.quantile(aucs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def evaluate(
    labels,
    scores,
    threshold: float | None = None,
    rule: str = "balanced",
    val_labels=None,
    val_scores=None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    target_sensitivity: float = 0.95,
) -> dict:
    """AUROC (+ bootstrap CI), AUPRC, and threshold metrics.

    The threshold is `threshold` when given (source "given"), else chosen by `rule` on
    `val_labels` / `val_scores` (source "validation"), else on the evaluated data itself
    (source "oracle (same data)", optimistic)."""
    y, s = _check(labels, scores)
    _check_both_classes(y, "AUROC")
    out = {
        "n": int(len(y)),
        "n_abnormal": int(y.sum()),
        "n_normal": int(len(y) - y.sum()),
        "auroc": float(roc_auc_score(y, s)),
        "auprc": float(average_precision_score(y, s)),
    }
    if n_bootstrap and n_bootstrap > 0:
        out["auroc_ci_low"], out["auroc_ci_high"] = bootstrap_auroc_ci(y, s, n_bootstrap=n_bootstrap, seed=seed)
    else:
        out["auroc_ci_low"] = out["auroc_ci_high"] = None
    if threshold is not None:
        source = "given"
    elif val_labels is not None and val_scores is not None:
        threshold = choose_threshold(val_labels, val_scores, rule, target_sensitivity)
        source = "validation"
    elif (val_labels is None) != (val_scores is None):
        raise ScanomalyError("give both val_labels and val_scores, or neither")
    else:
        threshold = choose_threshold(y, s, rule, target_sensitivity)
        source = "oracle (same data)"
    out.update(threshold_metrics(y, s, threshold))
    out["threshold_rule"] = rule if source != "given" else None
    out["threshold_source"] = source
    return out


def patient_scores(scores, patient_ids, labels, reduce: str = "mean", k: int = 3):
    """Slice scores -> one score per patient (mean, max, or mean of the top k slices); a patient's
    label is the max of its slice labels. Returns (scores, labels, ids), ids sorted."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    ids = list(patient_ids)
    if not (len(s) == len(y) == len(ids)):
        raise ScanomalyError(f"{len(s)} scores, {len(y)} labels and {len(ids)} patient ids: lengths differ")
    if any(p is None or p == "" for p in ids):
        raise ScanomalyError("every image needs a patient id for patient-level scores")
    if reduce not in REDUCTIONS:
        raise ScanomalyError(f"unknown reduction {reduce!r}; use one of {REDUCTIONS}")
    if k < 1:
        raise ScanomalyError(f"k must be >= 1, got {k}")
    groups: dict = {}
    for i, p in enumerate(ids):
        groups.setdefault(str(p), []).append(i)
    out_ids = sorted(groups)
    out_s, out_y = [], []
    for p in out_ids:
        v = s[groups[p]]
        if reduce == "mean":
            out_s.append(v.mean())
        elif reduce == "max":
            out_s.append(v.max())
        else:
            out_s.append(np.sort(v)[::-1][:k].mean())
        out_y.append(y[groups[p]].max())
    return np.asarray(out_s), np.asarray(out_y, dtype=np.int64), out_ids


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------
_COLUMNS = (
    ("AUROC [95% CI]", "auroc"),
    ("AUPRC", "auprc"),
    ("sens", "sensitivity"),
    ("spec", "specificity"),
    ("prec", "precision"),
    ("F1", "f1"),
    ("acc", "accuracy"),
    ("threshold", "threshold"),
    ("n (abn)", "n"),
    ("threshold from", "threshold_source"),
)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_metrics_table(rows: dict[str, dict]) -> str:
    """A markdown table: one row per name, the metric columns present in any row."""
    if not rows:
        return "(no results)"
    cols = [(h, k) for h, k in _COLUMNS if any(k in m for m in rows.values())]
    header = ["name"] + [h for h, _ in cols]
    body = []
    for name, m in rows.items():
        cells = [str(name)]
        for _, k in cols:
            if k == "auroc" and m.get("auroc") is not None and m.get("auroc_ci_low") is not None:
                cells.append(f"{m['auroc']:.3f} [{m['auroc_ci_low']:.3f}, {m['auroc_ci_high']:.3f}]")
            elif k == "n" and "n" in m:
                cells.append(f"{m['n']} ({m.get('n_abnormal', '?')})")
            elif k == "threshold":
                cells.append(_fmt(m.get(k), 4))
            else:
                cells.append(_fmt(m.get(k)))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in body]
    return "\n".join(lines)
