"""HealthyGAN: how the per-image score is pooled from the difference image, judged on VALIDATION data.

    python benchmarks/healthygan_score_variants.py bench_runs/chest/healthygan/seed0

The paper's score is the mean of |x − healthy(x)| over all pixels. A development question: does
another pooling of the same difference image separate classes better? This prints the validation
AUROC of each pooling (held-out healthy vs validation abnormals; never the test split), so that any
change of the default is chosen on validation. `--test VARIANT` then scores the test split once
with the variant chosen here.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.splits import read_split_manifest


def poolings(x: torch.Tensor, healthy: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    diff = (x - healthy).mean(1)  # signed: > 0 where the translation made the scan darker (removed opacity)
    absd = diff.abs()
    s = x.shape[-1]
    b = s // 8  # the outer eighth on each side: film borders, labels, arms
    flat = absd.flatten(1)
    k = max(1, flat.shape[1] // 100)
    return {
        "paper: mean |x - x'|": absd.flatten(1).mean(1),
        "mean of (x - x')+ (brightness removed)": diff.clamp(min=0).flatten(1).mean(1),
        "mean |x - x'|, centre (borders dropped)": absd[:, b:-b, b:-b].flatten(1).mean(1),
        "mean of top 1% |x - x'|": flat.topk(k, dim=1).values.mean(1),
        "mean of top 10% |x - x'|": flat.topk(max(1, flat.shape[1] // 10), dim=1).values.mean(1),
        "mean |blur(x - x')| (3x3 box: pixel noise cancels)": torch.nn.functional.avg_pool2d(diff[:, None], 3, 1, 1).abs().flatten(1).mean(1),
        "mean mask M": mask.flatten(1).mean(1),
    }


def score_all(det, images, batch_size=64) -> dict[str, np.ndarray]:
    gen = det.scoring_generator.eval()
    out: dict[str, list] = {}
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images.images[i : i + batch_size]
            healthy, _, mask = gen(x)
            for k, v in poolings(x, healthy, mask).items():
                out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--test", metavar="VARIANT", help="score the test split with this one variant (after choosing it on validation)")
    args = ap.parse_args()
    split = read_split_manifest(args.run / "split.csv")
    det = Detector.load(args.run / "model")
    val = load_images(split.val, det.preprocessing, progress=False)
    print(f"validation: {len(val)} images ({int(val.labels.sum())} abnormal)")
    for name, s in score_all(det, val).items():
        print(f"  {roc_auc_score(val.labels, s):.3f}  {name}")
    if args.test:
        test = load_images(split.test, det.preprocessing, progress=False)
        s = score_all(det, test)[args.test]
        print(f"test ({len(test)} images): AUROC {roc_auc_score(test.labels, s):.3f}  {args.test}")


if __name__ == "__main__":
    main()
