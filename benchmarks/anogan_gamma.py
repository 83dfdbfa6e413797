"""AnoGAN: test AUROC and scoring speed as a function of the search length Γ.

    python benchmarks/anogan_gamma.py bench_runs/chest/anogan/seed0 --gammas 50,200,500

Rescores the test images of a finished AnoGAN benchmark run (its split.csv and model/) with Γ
fixed-length Adam steps per image (no early stop, so Γ is exactly the work done), and prints
AUROC with its bootstrap CI and images/s per Γ. Γ is not chosen from this table: the cpu profile's
Γ = 200 with early stop was fixed beforehand on training images (see anogan.py); this only shows
what the search length buys. With --fanogan RUN, f-AnoGAN's saved model scores the same test images
in the same process (same threads, same load) for the speed ratio.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.metrics import evaluate
from scanomaly.splits import read_split_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="an AnoGAN run folder of the benchmark (split.csv, model/)")
    ap.add_argument("--gammas", default="50,200,500")
    ap.add_argument("--fanogan", type=Path, default=None, help="an f-AnoGAN run folder (model/) for the speed ratio")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    split = read_split_manifest(args.run / "split.csv")
    det = Detector.load(args.run / "model")
    test = load_images(split.test, det.preprocessing, progress=False)
    labels = test.labels
    fanogan_speed = None
    if args.fanogan:
        fanogan = Detector.load(args.fanogan / "model")
        fanogan.score(test, batch_size=args.batch_size)  # warm-up
        t0 = time.perf_counter()
        fanogan_scores, _ = fanogan.score(test, batch_size=args.batch_size)
        fanogan_speed = len(test) / (time.perf_counter() - t0)
        m = evaluate(labels, np.asarray(fanogan_scores, dtype=np.float64))
        print(json.dumps({"fanogan_auroc": m["auroc"], "images_per_second": fanogan_speed}), flush=True)
    rows = []
    for gamma in (int(g) for g in args.gammas.split(",")):
        det.config = dataclasses.replace(det.config, search_steps=gamma, search_tol=0.0)
        t0 = time.perf_counter()
        scores, _ = det.score(test, batch_size=args.batch_size)
        speed = len(test) / (time.perf_counter() - t0)
        scores = np.asarray(scores, dtype=np.float64)
        m = evaluate(labels, scores)  # AUROC and its bootstrap CI; no threshold is used here
        auroc, lo, hi = m["auroc"], m["auroc_ci_low"], m["auroc_ci_high"]
        rows.append((gamma, auroc, lo, hi, speed))
        print(json.dumps({"gamma": gamma, "auroc": auroc, "ci": [lo, hi], "images_per_second": speed}), flush=True)
    print(f"\n{len(test)} test images ({int(labels.sum())} abnormal), model {args.run / 'model'}")
    print("| Γ (fixed steps) | test AUROC [95% CI] | scoring img/s |" + (" f-AnoGAN is × faster |" if fanogan_speed else ""))
    print("|---|---|---|" + ("---|" if fanogan_speed else ""))
    for gamma, auroc, lo, hi, speed in rows:
        ratio = f" {fanogan_speed / speed:.0f} |" if fanogan_speed else ""
        print(f"| {gamma} | {auroc:.3f} [{lo:.3f}, {hi:.3f}] | {speed:.2f} |{ratio}")


if __name__ == "__main__":
    main()
