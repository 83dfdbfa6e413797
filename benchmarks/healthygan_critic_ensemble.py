"""HealthyGAN: do several critics together rank a small set better than one? (docs/experiments.md, section 28)

    python benchmarks/healthygan_critic_ensemble.py RUN RUN [RUN ...]

The runs are seeds of one profile on the same split (`benchmarks/run_method.py --seed N`, the split fixed). On
brain_tumor_small and BUSI a critic's ranking varies from seed to seed (section 17: 0.40-0.76 on brain_tumor_small);
if that spread were variance, the mean of several critics (bagging) would rank better than each, and a critic with
several heads would be a design to try. For each run: the critic's memorisation m and weight w, and on section 14's
wider non-test set the AUROC of the critic's deficit, of the memory and of W; then the critics' deficits, each over
its spread on the unseen scans fit uses (σ_critic), averaged: that mean alone, and W with it in place of one critic's
part (the three w's averaged). No test scan is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from healthygan_fused_score import as_parts, components, open_run, unseen_records
from scanomaly.methods.healthygan import critic_weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--per-class", type=int, default=400)
    args = ap.parse_args()
    critics, memories, weights, labels = [], [], [], None
    for run in args.runs:
        det, split, load = open_run(run)
        _, b_train, hold, sigma_scans = as_parts(det, split, load)
        sigma = components(det, sigma_scans).std(0, ddof=1)
        m = det._critic_memorisation(b_train, hold)
        images = load(unseen_records(split, args.per_class))
        y = np.asarray(images.labels)
        if labels is not None and not np.array_equal(y, labels):
            raise SystemExit("the runs must share one split (the same wider set)")
        labels = y
        parts = components(det, images) / sigma
        critics.append(parts[:, 0])
        memories.append(parts[:, 1])
        weights.append(critic_weight(m))
        print(f"{run}: m {m:.3f}, w {weights[-1]:.2f}; wider set ({int(y.sum())} + {int((y == 0).sum())}): critic "
              f"{roc_auc_score(y, parts[:, 0]):.3f}, memory {roc_auc_score(y, parts[:, 1]):.3f}, "
              f"W {roc_auc_score(y, weights[-1] * parts[:, 0] + parts[:, 1]):.3f}", flush=True)
    together = np.mean(critics, 0)
    print(f"{len(critics)} critics averaged: {roc_auc_score(labels, together):.3f}; W with them (w {np.mean(weights):.2f}, "
          f"the first run's memory): {roc_auc_score(labels, np.mean(weights) * together + memories[0]):.3f}")


if __name__ == "__main__":
    main()
