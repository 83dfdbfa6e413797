"""Average several finished runs of one split (e.g. three seeds) into one score; validation and test metrics.

    python benchmarks/seed_ensemble.py bench_runs/hg_LR3_s0 bench_runs/hg_LR3_s1 bench_runs/hg_LR3_s2

A label-free way to spend more compute: each run's saved (AUCp-chosen) model scores every image; its scores are
standardised by the mean and standard deviation of its scores on the held-out *known-healthy* images (B's hold-out,
healthy by construction), so runs whose scores live on different scales weigh the same; the ensemble score is the
mean of those z-scores. The recipe is fixed here, not chosen from results. Thresholds come from validation, as in
run_method.py; the test split is scored once.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.metrics import evaluate
from scanomaly.splits import read_split_manifest


def main(*runs: str) -> None:
    if len(runs) < 2:
        sys.exit("give two or more run directories (made by run_method.py on the same split)")
    torch.set_num_threads(1)
    manifests = [read_split_manifest(Path(r) / "split.csv") for r in runs]
    first = manifests[0]
    for r, m in zip(runs[1:], manifests[1:]):
        if [x.path for x in m.test] != [x.path for x in first.test] or [x.path for x in m.val] != [x.path for x in first.val]:
            sys.exit(f"{r}: not the same split as {runs[0]}")
    z, labels, loaded = {"val": [], "test": []}, {}, {}
    for r in runs:
        det = Detector.load(Path(r) / "model")
        key = json.dumps(det.preprocessing.to_dict(), sort_keys=True)
        if key not in loaded:  # runs prepared alike (e.g. seeds of one profile) share the decoded images
            loaded[key] = {name: load_images(getattr(first, name), det.preprocessing, progress=False)
                           for name in ("healthy_holdout", "val", "test")}
        reference, _ = det.score(loaded[key]["healthy_holdout"])
        mu, sd = float(reference.mean()), float(reference.std()) or 1.0
        for name in z:
            images = loaded[key][name]
            scores, _ = det.score(images)
            z[name].append((scores - mu) / sd)
            labels[name] = np.asarray(images.labels)
        test_auroc = json.loads((Path(r) / "result.json").read_text())["test"]["balanced"]["auroc"]
        print(f"{r}: test AUROC alone {test_auroc:.3f}", flush=True)
    val_scores, test_scores = np.mean(z["val"], axis=0), np.mean(z["test"], axis=0)
    val = evaluate(labels["val"], val_scores, n_bootstrap=0)
    test = evaluate(labels["test"], test_scores, val_labels=labels["val"], val_scores=val_scores)
    print(f"ensemble of {len(runs)}: validation AUROC {val['auroc']:.3f}")
    print("ensemble test: " + ", ".join(f"{k} {v:.3f}" for k, v in test.items() if isinstance(v, float)))


if __name__ == "__main__":
    main(*sys.argv[1:])
