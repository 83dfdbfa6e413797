"""`scanomaly demo`: HealthyGAN end to end on the bundled chest X-ray sample, in a few minutes on a CPU.

Splits the 360 bundled images by the HealthyGAN protocol (known-healthy B, mixed unlabeled A at 30%
abnormal, a validation set for the threshold, the official test images), trains the cpu profile
for a short run, prints the test metrics, and writes the scores (the columns of `scanomaly score`),
heatmap panels of the 4 most and 4 least anomalous test images on one colour scale, and report.html.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from .pipeline import run_method
from .data import load_images
from .detector import Detector
from .metrics import format_metrics_table
from .report import build_report
from .splits import read_split_manifest
from .streaming import HEATMAP_PERCENTILE
from .viz import save_heatmap_panel

DEMO_ITERATIONS = 300  # ~5 minutes on 2 cores at 64 px; the full cpu profile runs 1000


def demo_data_dir() -> Path:
    return Path(str(resources.files("scanomaly") / "demo_data" / "chest_xray"))


def run_demo(args) -> int:
    out = Path(args.out)
    iterations = args.iters or DEMO_ITERATIONS
    device = getattr(args, "device", "cpu") or "cpu"
    print(f"scanomaly demo: HealthyGAN (cpu profile, {iterations} iterations) on {demo_data_dir()}")
    print("  bundled sample of the Kermany pediatric chest X-rays (CC BY 4.0, see SOURCE.md there)")
    result = run_method(
        "healthygan",
        demo_data_dir(),
        out,
        profile="cpu",
        config_overrides={"iterations": iterations, "checkpoint_every": max(1, iterations // 3), "sample_every": iterations},
        device=device,
        progress=not getattr(args, "no_progress", False),
    )
    test = result["test"]["balanced"]
    print()
    print(format_metrics_table({"healthygan (demo)": test}))
    print(
        f"threshold chosen on validation data (sensitivity ≈ specificity); "
        f"trained {result['train_seconds']:.0f} s, scoring {result['scoring_images_per_second']:.0f} images/s"
    )
    n = _write_heatmaps(out)
    report = build_report(out)
    print(f"\nscores: {out / 'test_scores.csv'}\nheatmaps of the {n} most and {n} least anomalous test images "
          f"(one colour scale): {out / 'heatmaps'}\nreport: {report}")
    print(f"model: {out / 'model'} (score new images with: scanomaly score {out} IMAGES --out scores.csv --heatmaps DIR)")
    print("This is a short demo run on 360 images; see BENCHMARKS.md for the full cpu-profile numbers.")
    return 0


def _write_heatmaps(out: Path, per_end: int = 4) -> int:
    """Panels of the `per_end` most and `per_end` least anomalous test images; returns `per_end`."""
    det = Detector.load(out / "model")
    split = read_split_manifest(out / "split.csv")
    test = load_images(split.test, det.preprocessing, progress=False)
    scores, maps = det.score(test)
    healthy = det.reconstruct(test)
    # one colour scale for every panel (as `score --heatmaps`), so that a normal scan's noise does not look as hot
    # as disease: the test maps' minimum and 99.5th percentile
    vmin, vmax = float(maps.min()), float(np.percentile(maps, HEATMAP_PERCENTILE))
    order = np.argsort(scores)
    picks = list(order[::-1][:per_end]) + list(order[:per_end])  # most anomalous first, then least
    for rank, i in enumerate(picks):
        rec = test.records[i]
        kind = "most" if rank < per_end else "least"
        label = {0: "normal", 1: "abnormal"}.get(rec.label, "unknown")
        save_heatmap_panel(
            out / "heatmaps" / f"{kind}_{rank % per_end + 1}_{Path(rec.path).stem}.png",
            test.images[i],
            maps[i],
            healthy=None if healthy is None else healthy[i],
            title=f"{Path(rec.path).name} ({label}) score {scores[i]:.4f}",
            vmin=vmin,
            vmax=vmax,
        )
    return per_end
