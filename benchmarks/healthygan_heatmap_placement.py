"""HealthyGAN: where on a chest X-ray do its heatmaps put their weight? (BENCHMARKS.md, "`scanomaly demo` by profile")

    python benchmarks/healthygan_heatmap_placement.py RUN [--part test]

The chest sets here have no lesion annotations, so what a heatmap points at cannot be scored against lesions. This
measures it by position instead: each scan's map above its own median (the part of the map that stands out; the
memory's and the critic's maps have a floor everywhere) is normalised to sum 1, and its share is summed over three
regions of the frame: the outer fifth of the columns on either side (arms, chest wall, side markers), the top
seventh of the rows (neck, shoulders) and the middle (columns 20-80%, rows 15-85%: lungs and mediastinum on these
centred scans). Printed per label with the regions' share of the area (what a flat map gives), the share of
scans whose map peaks in the middle, and the same shares for where abnormal scans' mean map exceeds normal ones'
(the positive part of the difference of the two mean maps: where the heatmap warms with disease); for the three heatmaps a model can draw: the generator's mask ("mask", the cpu
profile's), the memory's nearest-patch map ("nearest") and the critic's deficit map ("score"). RUN: a run with
`model/` and `split.csv` (`benchmarks/run_method.py`, or the demo's run via `scanomaly.pipeline.run_method`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from healthygan_fused_score import open_run


def regions(size: int) -> dict[str, np.ndarray]:
    rows, cols = np.mgrid[0:size, 0:size] / size
    sides = (cols < 0.2) | (cols >= 0.8)
    top = (rows < 1 / 7) & ~sides
    middle = (cols >= 0.2) & (cols < 0.8) & (rows >= 0.15) & (rows < 0.85)
    return {"sides": sides, "top": top, "middle": middle}


def warmer_with_disease(maps: np.ndarray, labels: np.ndarray) -> str:
    """How the positive part of (abnormal scans' mean map − normal scans' mean map) divides among the regions."""
    warmer = np.clip(maps[labels == 1].mean(0) - maps[labels == 0].mean(0), 0, None)
    warmer = warmer / max(warmer.sum(), 1e-12)
    return ", ".join(f"{k} {warmer[m].sum():.2f}" for k, m in regions(maps.shape[-1]).items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--part", default="test", choices=["val", "test"])
    args = ap.parse_args()
    det, split, load = open_run(args.run)
    images = load(getattr(split, args.part))
    labels = np.asarray(images.labels)
    masks = regions(images.images.shape[-1])
    print(f"{args.run} {args.part}: {int(labels.sum())} abnormal, {int((labels == 0).sum())} normal; "
          "area: " + ", ".join(f"{k} {m.mean():.2f}" for k, m in masks.items()))
    for heatmap in ("mask", "nearest", "score"):
        det.config.heatmap = heatmap
        _, maps = det.score(images)
        maps = np.asarray(maps, dtype=np.float64)
        above = np.clip(maps - np.median(maps.reshape(len(maps), -1), axis=1)[:, None, None], 0, None)
        weights = above / np.maximum(above.reshape(len(maps), -1).sum(1), 1e-12)[:, None, None]
        flat_peak = maps.reshape(len(maps), -1).argmax(1)
        for label, name in ((1, "abnormal"), (0, "normal")):
            w, peaks = weights[labels == label], flat_peak[labels == label]
            shares = ", ".join(f"{k} {w[:, m].sum(1).mean():.2f}" for k, m in masks.items())
            in_middle = masks["middle"].reshape(-1)[peaks].mean()
            print(f"  {heatmap:8s} {name:9s} share of the map: {shares}; peak in the middle: {in_middle:.2f}", flush=True)
        print(f"  {heatmap:8s} abnormal minus normal, share: " + warmer_with_disease(maps, labels))


if __name__ == "__main__":
    main()
