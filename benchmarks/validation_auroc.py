"""Validation vs test AUROC of finished benchmark runs: how far each method's in-distribution
separation carries over to the official test split.

    python benchmarks/validation_auroc.py bench_runs/chest healthygan fanogan ganomaly padim patchcore

Scores each run's validation images (held-out healthy + validation abnormals, all from the train
cohort) with its saved model and prints that AUROC beside the test AUROC already in result.json.
Nothing is chosen from this table; it only describes the shift between the two cohorts.
"""

import json
import sys
from pathlib import Path

from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.splits import read_split_manifest


def main() -> None:
    bench, methods = Path(sys.argv[1]), sys.argv[2:]
    print("| method | validation AUROC (train cohort) | test AUROC (official test split) | drop |")
    print("|---|---|---|---|")
    for method in methods:
        run = bench / method / "seed0"
        split = read_split_manifest(run / "split.csv")
        det = Detector.load(run / "model")
        val = load_images(split.val, det.preprocessing, progress=False)
        scores, _ = det.score(val)
        val_auroc = roc_auc_score(val.labels, scores)
        test_auroc = json.loads((run / "result.json").read_text())["test"]["balanced"]["auroc"]
        print(f"| {method} | {val_auroc:.3f} | {test_auroc:.3f} | {val_auroc - test_auroc:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
