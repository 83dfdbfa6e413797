"""HealthyGAN without its unlabeled set: train on B alone (A = B), on VALIDATION data only.

    scanomaly train healthygan --from-labeled DATA --profile cpu --seed 0 --out RUN_AB   # A + B, as usual
    python benchmarks/healthygan_unlabeled_set.py RUN_AB --out RUN_B [--profile cpu] [--seed 0] [--set K=V] [--device cuda]

HealthyGAN's claim is that the mixed, unlabeled set A helps: the critic sees A's abnormal scans turned
healthy and B's real ones, so the generator learns what to change. This trains the same method, profile,
seed, budget and AUCp hold-out as RUN_AB (read from its split.csv) with A replaced by B, and writes
RUN_B/split.csv (RUN_AB's, for the analysis scripts), RUN_B/model and RUN_B/val_scores.csv. It prints
the validation AUROC of both runs (RUN_AB's from its own val_scores.csv). No test image is read.
`benchmarks/healthygan_masks.py` and `benchmarks/healthygan_feature_score.py` take RUN_B like any run.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.methods.healthygan import HealthyGAN
from scanomaly.options import parse_set, split_options
from scanomaly.pipeline import VAL_SCORES
from scanomaly.scores_csv import read_scores_csv, write_scores_csv
from scanomaly.splits import read_split_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_ab", type=Path, help="a `scanomaly train healthygan --from-labeled` run (A + B)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as given to RUN_AB's train")
    args = ap.parse_args()

    split = read_split_manifest(args.run_ab / "split.csv")
    config, prep = split_options(HealthyGAN, parse_set(args.set))
    det = HealthyGAN.from_profile(args.profile, {**config, "seed": args.seed}, prep, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.run_ab / "split.csv", args.out / "split.csv")

    healthy = load_images(split.healthy, det.preprocessing, desc="B (healthy)")
    holdout = load_images(split.healthy_holdout, det.preprocessing, desc="healthy hold-out")
    t0 = time.perf_counter()
    det.fit(healthy, healthy, holdout=holdout, work_dir=args.out)  # A = B: no unlabeled scan reaches training
    print(f"trained {time.perf_counter() - t0:.0f} s", flush=True)
    det.save(args.out / "model")

    val = load_images(split.val, det.preprocessing, desc="validation")
    scores, _ = det.score(val)
    write_scores_csv(args.out / VAL_SCORES, val.records, scores)
    y = val.labels
    print(f"validation AUROC, B alone (A = B): {roc_auc_score(y, scores):.3f}")
    ab = args.run_ab / VAL_SCORES
    if ab.is_file():
        rows = read_scores_csv(ab)
        y_ab = np.array([r["label"] for r in rows], dtype=float)
        s_ab = np.array([r["score"] for r in rows], dtype=float)
        print(f"validation AUROC, A + B ({args.run_ab}): {roc_auc_score(y_ab, s_ab):.3f}")


if __name__ == "__main__":
    main()
