"""HealthyGAN: the unlabeled set in the memory's score, as a density ratio. A patch of a scan is anomalous when it is
far from B's patches *and* near A's: with A a mixture (1 − π) healthy + π diseased, p_A / p_B = (1 − π) + π p_D / p_B
is monotone in the likelihood ratio of disease, what the critic (B against healthy(A)) is meant to learn, here
estimated without training from nearest-patch distances on the critic's frozen trunk. No test scan is read.

    python benchmarks/healthygan_contrast_memory.py RUN [RUN ...] [--per-class 400] [--json OUT]

Cross-fitted as section 16's U (`healthygan_memory_variants.py`): A's training part in two seeded folds (whole
patients where ids exist); for each fold, the A bank is the 10% coreset of the *other* fold's trunk patches, and the
scored set is this fold ∪ the AUCp pool ∪ held-out healthy ∪ validation lesions ∪ unused scans (at most --per-class
of each label). d_B, d_A: the blurred nearest-patch maps against B's bank and the A bank. Parts (image score = the
maximum over the map): memory d_B (the profile's), diff d_B − d_A, ratio d_B / d_A; and W with each as the memory's
part (σ over held-out healthy ∪ the AUCp pool, as fit does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from healthygan_fused_score import per_label_sample
from healthygan_memory_variants import nearest_maps, open_for_memory, two_folds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    table = {}
    for run in args.runs:
        opened = open_for_memory(run)
        det, split, load, c = opened.det, opened.split, opened.load, opened.det.config
        x_b, a_train, pool, unseen_for_sigma = opened.x_b, opened.a_train, opened.pool, opened.unseen_for_sigma
        deficit, weight, sigma_critic = opened.deficit, opened.weight, opened.sigma_critic
        bank_b = det.healthy_patch_bank(x_b)
        folds = two_folds(a_train.records, seed=c.seed)
        others = list(split.healthy_holdout) + pool + list(split.val_abnormal) + list(split.unused)
        row = {"w": weight}
        for k in (0, 1):
            this = [r for r, f in zip(a_train.records, folds) if f == k]
            bank_a = det.healthy_patch_bank(a_train.images[torch.as_tensor(folds != k)])
            scored = load(per_label_sample(this + others, args.per_class, seed=c.seed + k))
            y, critic_part = np.asarray(scored.labels), deficit(scored.images)

            def parts(images):
                d_b, d_a = nearest_maps(det, images, bank_b), nearest_maps(det, images, bank_a)
                return {"memory": d_b.flatten(1).amax(1).numpy(), "diff": (d_b - d_a).flatten(1).amax(1).numpy(),
                        "ratio": (d_b / d_a.clamp_min(1e-6)).flatten(1).amax(1).numpy()}

            scored_parts, sigma_parts = parts(scored.images), parts(unseen_for_sigma)
            fold = {"n": [int((y == 0).sum()), int((y == 1).sum())], "bank_a": len(bank_a), "bank_b": len(bank_b)}
            for name, s in scored_parts.items():
                w_score = weight * critic_part / sigma_critic + s / sigma_parts[name].std(ddof=1)
                fold[name] = float(roc_auc_score(y, s))
                fold[f"W {name}"] = float(roc_auc_score(y, w_score))
            fold["critic"] = float(roc_auc_score(y, critic_part))
            row[f"fold{k}"] = fold
            print(run.name, k, json.dumps({kk: round(v, 3) if isinstance(v, float) else v for kk, v in fold.items()}), flush=True)
        row["mean"] = {m: float(np.mean([row[f"fold{k}"][m] for k in (0, 1)]))
                       for m in row["fold0"] if isinstance(row["fold0"][m], float)}
        print(run.name, "mean", json.dumps({kk: round(v, 3) for kk, v in row["mean"].items()}), flush=True)
        table[str(run)] = row
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
