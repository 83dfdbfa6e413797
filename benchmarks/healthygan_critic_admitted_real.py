"""HealthyGAN, exploratory (docs/experiments.md, section 16): does a critic whose real side also holds A's
healthy-looking scans learn B less, and rank unseen scans better? No test scan is read.

    OMP_NUM_THREADS=1 python benchmarks/healthygan_critic_admitted_real.py PROFILE_RUN OUT

PROFILE_RUN: the cpu profile's seed-0 run on the data set (`benchmarks/run_method.py`); its frozen trunk admits the
scans (the trunk is ImageNet's, the same before and after training) and its critic is the baseline. A's training
part (what fit trains on) is cut into two seeded folds as in `healthygan_memory_variants.py`; the scans of fold 1 that
`healthy_looking` admits join B on the critic's real side, and a new model of the profile trains (seed 0) on
real = B ∪ those, A as before, the same held-out healthy scans. Both critics' deficits are then scored on fold 0 ∪
the AUCp pool ∪ the held-out healthy scans ∪ the validation lesions ∪ the unused scans (at most 400 per label; fold 0
was A for both, as in section 14's wider sets), with their memorisation m of B (B's scans against the held-out ones).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from scanomaly.methods.healthygan import HealthyGAN, split_off_indices
from scanomaly.pipeline import without_labels

from healthygan_fused_score import open_run, per_label_sample
from healthygan_memory_variants import healthy_looking, two_folds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile_run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=400)
    args = ap.parse_args()
    profile, split, load = open_run(args.profile_run)
    c = profile.config
    x_b, hold = load(split.healthy).images, load(split.healthy_holdout).images
    a_kept, a_pool = split_off_indices(len(split.unlabeled), c.holdout_fraction, c.seed)  # as fit splits A
    a_train = load([split.unlabeled[i] for i in a_kept.tolist()])
    folds = two_folds(a_train.records, seed=c.seed)
    other = a_train.subset(np.flatnonzero(folds == 1))
    admitted, tau = healthy_looking(profile, x_b, other.images)
    real = torch.cat([x_b, other.images[admitted]])
    row = {"admitted": int(admitted.sum()), "admitted_lesions": int(np.asarray(other.labels)[admitted.numpy()].sum()),
           "of": len(other.images), "tau": tau}
    print(json.dumps(row), flush=True)

    model = HealthyGAN.from_profile("cpu", {"seed": c.seed})
    model.fit(real, load(without_labels(split.unlabeled)).images, holdout=hold, work_dir=args.out / "train")
    model.save(args.out / "model")

    pool = [split.unlabeled[i] for i in a_pool.tolist()][: c.aucp_pool]
    this = [r for r, f in zip(a_train.records, folds) if f == 0]
    others = list(split.healthy_holdout) + pool + list(split.val_abnormal) + list(split.unused)
    scored = load(per_label_sample(this + others, args.per_class, seed=c.seed))
    y = np.asarray(scored.labels)
    for name, det in {"profile": profile, "admitted_real": model}.items():
        det.config.score = "critic"  # the critic's deficit alone (the memory's bank does not enter it)
        row[name] = {"critic": float(roc_auc_score(y, det.score(scored.images)[0])),
                     "memorisation": det._critic_memorisation(x_b, hold)}
    row["n_scored"] = [int((y == 0).sum()), int((y == 1).sum())]
    print(args.profile_run, json.dumps(row), flush=True)
    (args.out / "result.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
