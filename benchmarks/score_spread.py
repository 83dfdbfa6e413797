"""Mean and spread of a run's scores per class, on validation and on test (analysis only; chooses nothing).

    python benchmarks/score_spread.py bench_runs/hg_LR2_s0 3000     # the snapshot of iteration 3000

Shows whether the test cohort's normals score like the validation normals (the validation → test gap).
Images are prepared as the run prepared them (its result.json).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from scanomaly.data import load_images
from scanomaly.splits import read_split_manifest

from val_trajectory import run_detector  # builds the run's networks and preprocessing


def main(run: str, step: str, method: str = "healthygan", profile: str = "cpu", *options: str) -> None:
    """`options`: as for val_trajectory.py (the run's --set options as key=value)."""
    run = Path(run)
    torch.set_num_threads(1)
    det = run_detector(run, method, profile, options)
    det.load_state_tensors(load_file(str(run / "train" / "snapshots" / f"step_{int(step):07d}.safetensors")))
    manifest = read_split_manifest(run / "split.csv")
    for name in ("val", "test"):
        images = load_images(getattr(manifest, name), det.preprocessing, progress=False)
        scores, _ = det.score(images)
        labels = np.asarray(images.labels)
        normal, abnormal = scores[labels == 0], scores[labels == 1]
        print(f"{name}: normal {normal.mean():.3g} ± {normal.std():.2g}, abnormal {abnormal.mean():.3g} ± {abnormal.std():.2g}")


if __name__ == "__main__":
    main(*sys.argv[1:])
