"""HealthyGAN: is the critic's map limited by what its frozen trunk sees, or by the trained head? On VALIDATION
data with lesion masks (lgg_flair); no test image is read.

    python benchmarks/healthygan_critic_vs_knn.py RUN [--bank-fraction 1.0]      # RUN: a critic="lite0" run

The critic (`critic="lite0"`) is a frozen EfficientNet-Lite0 trunk under a trained head. This compares, on the
same trunk features of the same scans (the model's 64 px scans, enlarged x2 as the critic sees them):
- the critic's deficit map (the head's verdict against B's mean verdict), as the model scores;
- PatchCore's rule on those features: each patch's distance to its nearest patch among B's (a seeded random
  `bank_fraction` of them), upsampled and blurred (sigma 4 px) as PaDiM / PatchCore do;
and prints the pixel AUROC of both inside the head (`localization.pixel_auroc`), beside the image AUROC of each
map's mean. If the nearest-patch rule localises far better on the same features, the head is what loses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.localization import foreground_mask, pixel_auroc
from scanomaly.methods.healthygan import NearestHealthyPatch
from scanomaly.splits import read_split_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--bank-fraction", type=float, default=1.0)
    args = ap.parse_args()
    det = Detector.load(args.run / "model")
    split = read_split_manifest(args.run / "split.csv")
    load = lambda records: load_images(records, det.preprocessing, progress=False)  # noqa: E731
    b, val = torch.as_tensor(load(split.healthy).images), load(split.val)
    x, y = torch.as_tensor(val.images), np.asarray(val.labels)
    lesions, head = val.masks.numpy().astype(bool), foreground_mask(val.images)
    size = x.shape[-2:]

    critic = det.scoring["critic"].eval()
    reference = det._critic_map(critic, b)
    with torch.no_grad():
        deficit = torch.cat([reference - critic(x[i : i + 64]) for i in range(0, len(x), 64)])
    deficit_map = F.interpolate(deficit, size=size, mode="bilinear", align_corners=False)[:, 0]

    bank = det.trunk_patches(b)
    keep = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[: int(len(bank) * args.bank_fraction)]
    nearest = NearestHealthyPatch(critic, bank[keep])  # the model's heatmap="nearest", on this bank
    with torch.no_grad():
        knn_map = torch.cat([nearest(x[i : i + 64]) for i in range(0, len(x), 64)])

    for name, m in (("critic's deficit map", deficit_map), ("nearest B patch, same trunk features", knn_map)):
        m = m.numpy()
        print(f"{name}: pixel AUROC inside the head {pixel_auroc(m, lesions, head):.3f}, "
              f"image AUROC of its mean {roc_auc_score(y, m.reshape(len(m), -1).mean(1)):.3f}", flush=True)
    print(f"(bank: {len(keep)} of {len(bank)} patches of B's {len(b)} scans; {len(x)} validation scans)")


if __name__ == "__main__":
    main()
