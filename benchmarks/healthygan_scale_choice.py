"""HealthyGAN: can the unlabeled set choose the memory's patch scale without labels? (docs/experiments.md, section 25)

    python benchmarks/healthygan_scale_choice.py RUN [RUN ...]

For each scale (single trunk patches; patches averaged over 3 x 3 neighbourhoods), B is cross-fitted in five seeded
folds (each fold's scans scored by the maximum of their nearest-patch map against a 10% coreset of the other four
folds' patches) and every scan of A's training part is scored against the bank of one fold, drawn at random, so both
sides meet banks of the same size. With A a mixture of healthy and diseased scans, the AUROC of A against B is
(1 − π) / 2 + π · AUROC(disease against health) in expectation: a label-free estimate of which scale ranks disease
better, from all of B and A rather than AUCp's few held-out scans. Printed beside each scale's AUROC on section 14's
wider non-test set (labels read, for the comparison only). No test scan is read.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from scanomaly.methods.healthygan import NEAREST_CORESET_FRACTION, NearestHealthyPatch
from scanomaly.methods.patchcore import greedy_coreset

from healthygan_fused_score import NeighbourhoodTrunk, map_maxima, open_run, unseen_records
from healthygan_memory_variants import a_as_fit_splits_it

N_FOLDS = 5


@torch.no_grad()
def bank(trunk, images: torch.Tensor, seed: int) -> torch.Tensor:
    feats = torch.cat([trunk.features(images[i : i + 64]).float().permute(0, 2, 3, 1).flatten(0, 2)
                       for i in range(0, len(images), 64)])
    return feats[greedy_coreset(feats, math.ceil(NEAREST_CORESET_FRACTION * len(feats)), seed=seed)].contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--per-class", type=int, default=400)
    args = ap.parse_args()
    for run in args.runs:
        det, split, load = open_run(run)
        seed = det.config.seed
        x_b = load(split.healthy).images
        x_a = load(a_as_fit_splits_it(split, det.config)[0]).images
        wider = load(unseen_records(split, args.per_class))
        rng = np.random.default_rng(seed)
        fold_b, fold_a = rng.permutation(len(x_b)) % N_FOLDS, rng.integers(0, N_FOLDS, len(x_a))
        critic = det.scoring["critic"].eval()
        for name, trunk in (("single", critic), ("3x3", NeighbourhoodTrunk(critic).eval())):
            s_b, s_a = np.zeros(len(x_b)), np.zeros(len(x_a))
            for k in range(N_FOLDS):
                nearest = NearestHealthyPatch(trunk, bank(trunk, x_b[torch.as_tensor(fold_b != k)], seed))
                s_b[fold_b == k] = map_maxima(nearest, x_b[torch.as_tensor(fold_b == k)])
                if (fold_a == k).any():
                    s_a[fold_a == k] = map_maxima(nearest, x_a[torch.as_tensor(fold_a == k)])
            auc_ab = roc_auc_score(np.r_[np.zeros(len(s_b)), np.ones(len(s_a))], np.r_[s_b, s_a])
            full = NearestHealthyPatch(trunk, bank(trunk, x_b, seed))
            auc_wider = roc_auc_score(wider.labels, map_maxima(full, wider.images))
            print(f"{run.name} {name}: A against cross-fitted B {auc_ab:.3f} (B {len(s_b)}, A {len(s_a)}); "
                  f"wider set {auc_wider:.3f}", flush=True)


if __name__ == "__main__":
    main()
