"""Benchmark one method on one data set (HealthyGAN protocol; thresholds from validation, test scored once).

    python benchmarks/run_method.py --method healthygan --data ../shared/data/chest_xray_pneumonia --profile cpu --seed 0

Writes OUT/result.json (all numbers), OUT/split.csv, OUT/test_scores.csv, OUT/model/, and prints a markdown row.
"""

import argparse
import json
import os
import sys

from scanomaly.detector import get_method
from scanomaly.options import parse_set, split_options
from scanomaly.pipeline import run_method
from scanomaly.results import markdown_row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--data", default="../shared/data/chest_xray_pneumonia")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--abnormal-fraction", type=float, default=0.3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config or preprocessing options (as `scanomaly train --set`)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--intensity", default=None, help="per-image intensity normalisation (preprocess.INTENSITY_MODES)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="32")
    ap.add_argument("--train-on", default="healthy", choices=["healthy", "all_normals"])
    args = ap.parse_args()
    overrides, prep = split_options(get_method(args.method), parse_set(args.set))
    prep = {**prep, **{k: v for k, v in (("image_size", args.image_size), ("intensity", args.intensity)) if v is not None}}
    out = args.out or os.path.join("bench_runs", f"{args.method}_{args.profile}_s{args.seed}")
    r = run_method(
        args.method, args.data, out, args.profile, args.seed, args.split_seed, args.abnormal_fraction,
        overrides, prep or None, args.device, args.precision, args.train_on, progress=sys.stderr.isatty(),
    )
    print(json.dumps({k: r[k] for k in ("split", "train_seconds", "scoring_images_per_second", "peak_rss_mib")}, indent=1))
    print("| method | profile | seed | AUROC [95% CI] | AUPRC | precision | recall | specificity | F1 | train min | img/s | peak MiB |")
    print(markdown_row(r))


if __name__ == "__main__":
    main()
