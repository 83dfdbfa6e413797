"""HealthyGAN: two heatmaps that might point at disease where the mask does not (docs/experiments.md, section 28).

    python benchmarks/healthygan_heatmap_probes.py RUN [RUN ...] [--steps 10] [--rate 0.05] [--l1 0.0] [--window 1 3]

The cpu profile's heatmap is the generator's mask, which is taught by the nearest-patch memory (docs/experiments.md,
sections 19-20); on chest X-rays it warms at the body's outline, not over the lungs (section 27). Two probes, beside
the maps the model already draws (the mask, the memory's map, the critic's deficit map):

- "grad" and "proj": where the critic says a scan must change. The critic ranks chest scans best of all the parts
  (section 26) but spreads its own map evenly over the frame. Starting at x, `--steps` steps of gradient ascent on its
  mean verdict, each a normalised gradient (the largest pixel moves by `--rate`), then a soft threshold of the change
  towards x (`--l1`, an L1 price on changing a pixel); "proj" is |x_T − x|, "grad" the first step's gradient
  magnitude ("what had to change" to first order), both blurred (sigma 4 px).
- "window R": a memory that compares like regions: each patch's distance to its nearest patch of B (all of B's
  patches, no coreset) among those within R grid cells of its own position (16 x 16 grid), blurred as the memory's
  map. If the outline's warmth came from patches matched to B's patches elsewhere in the frame, this would remove it.

Data with lesion masks (lgg_flair): pixel AUROC inside the head on the split's unused lesion slices (the set section
20's rule used). Otherwise: where each map warms with disease on the validation split, by position (section 27's
regions, `healthygan_heatmap_placement.py`). No test scan is read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from healthygan_fused_score import open_run
from healthygan_heatmap_placement import regions, warmer_with_disease
from scanomaly.localization import foreground_mask, pixel_auroc
from scanomaly.methods import _patch_features as pf


def projected_change(critic, x: torch.Tensor, steps: int, rate: float, l1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(|first gradient|, |x_T − x|), each [N, S, S], unblurred."""
    delta = torch.zeros_like(x)
    first = None
    for _ in range(steps):
        delta.requires_grad_(True)
        verdict = critic((x + delta).clamp(-1, 1)).flatten(1).mean(1).sum()
        (grad,) = torch.autograd.grad(verdict, delta)
        if first is None:
            first = grad.abs()[:, 0]
        step = grad / grad.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]
        with torch.no_grad():
            delta = delta + rate * step
            delta = torch.sign(delta) * (delta.abs() - rate * l1).clamp_min(0)  # the L1 price's proximal step
    return first, delta.detach().abs()[:, 0]


def blur(maps: torch.Tensor, size: int) -> np.ndarray:
    return pf.to_anomaly_map(maps, size, 4.0).numpy()


def window_maps(det, healthy: torch.Tensor, x: torch.Tensor, radius: int) -> np.ndarray:
    """The nearest-patch map with each patch compared only with B's patches within `radius` grid cells of its position."""
    bank, f = (det.trunk_patches(v) for v in (healthy, x))  # [N·h·w, C], position by position within each scan
    side = int(round((len(f) / len(x)) ** 0.5))
    bank, f = bank.view(len(healthy), side, side, -1), f.view(len(x), side, side, -1)
    distance = torch.zeros(len(x), side, side)
    for i in range(side):
        for j in range(side):
            near = bank[:, max(0, i - radius) : i + radius + 1, max(0, j - radius) : j + radius + 1]
            distance[:, i, j] = torch.cdist(f[:, i, j], near.reshape(-1, f.shape[-1])).amin(1)
    return blur(distance, x.shape[-1])


def maps_of(det, healthy: torch.Tensor, x: torch.Tensor, args) -> dict[str, np.ndarray]:
    critic = det.scoring["critic"].eval()
    out: dict[str, list] = {"grad": [], "proj": []}
    for i in range(0, len(x), 32):
        g, p = projected_change(critic, x[i : i + 32], args.steps, args.rate, args.l1)
        out["grad"].append(blur(g, x.shape[-1]))
        out["proj"].append(blur(p, x.shape[-1]))
    result = {k: np.concatenate(v) for k, v in out.items()}
    for radius in args.window:
        result[f"window {radius}"] = window_maps(det, healthy, x, radius)
    for heatmap in ("mask", "nearest", "score"):
        det.config.heatmap = heatmap
        result[heatmap] = np.asarray(det.score(x)[1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--l1", type=float, default=0.0)
    ap.add_argument("--window", type=int, nargs="*", default=[1, 3], help="radii of the positional memory, in grid cells")
    ap.add_argument("--limit", type=int, default=0, help="at most this many scans (0: all)")
    args = ap.parse_args()
    for run in args.runs:
        det, split, load = open_run(run)
        lesioned = [r for r in split.unused if r.label == 1]
        t0 = time.perf_counter()
        if lesioned and load(lesioned[:1]).masks is not None:
            records = lesioned[: args.limit or None]
            data = load(records)
            x = torch.as_tensor(data.images)
            lesions, head = data.masks.numpy().astype(bool), foreground_mask(data.images)
            maps = maps_of(det, torch.as_tensor(load(split.healthy).images), x, args)
            print(f"{run} {len(x)} unused lesion slices, pixel AUROC inside the head:", "  ".join(
                f"{k} {pixel_auroc(v, lesions, head):.3f}" for k, v in maps.items()),
                f"({time.perf_counter() - t0:.0f} s)", flush=True)
        else:
            data = load(split.val)
            x, labels = torch.as_tensor(data.images), np.asarray(data.labels)
            maps = maps_of(det, torch.as_tensor(load(split.healthy).images), x, args)
            print(f"{run} validation ({int(labels.sum())} abnormal, {int((labels == 0).sum())} normal), area: " + ", ".join(
                f"{k} {m.mean():.2f}" for k, m in regions(x.shape[-1]).items()), f"({time.perf_counter() - t0:.0f} s)")
            for k, v in maps.items():
                print(f"  {k:8s} abnormal minus normal: {warmer_with_disease(v, labels)}", flush=True)


if __name__ == "__main__":
    main()
