"""HealthyGAN's two heatmaps on the same trained models: the critic's deficit map (heatmap="score") against the
nearest healthy patch on the critic's trunk (heatmap="nearest"), on lgg_flair's lesion masks. The rule that reads
these numbers is docs/experiments.md, section 12.

    python benchmarks/healthygan_nearest_heatmap.py RUN [RUN ...]           # validation only
    python benchmarks/healthygan_nearest_heatmap.py RUN [RUN ...] --test    # also the test split, once, after the choice

RUN: a `benchmarks/run_method.py` run of a critic="lite0", score="critic" profile (RUN/model, RUN/split.csv). The
bank of healthy patches is built from the run's B by `HealthyGAN.healthy_patch_bank`, the code `fit` runs: the trunk
is frozen, so the bank does not depend on the training and a model trained without it gets the same one. Image
scores do not change (checked). Prints, per run and as the mean over runs, the pixel AUROC inside the head (as
`run_method` computes it) for both maps; with --test, the test split's localisation block for both (pixel AUROC,
AUPRO, Dice at the threshold chosen on validation); and the seconds the bank took and the scoring speed with each map.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.localization import evaluate_localization, foreground_mask, pixel_auroc
from scanomaly.splits import read_split_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--test", action="store_true", help="also score the test split (once, after the choice)")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = ap.parse_args()
    table: dict[str, dict] = {}
    for run in args.runs:
        det = Detector.load(run / "model")
        if det.config.score != "critic" or det.config.critic != "lite0":
            raise SystemExit(f"{run}: needs a critic='lite0', score='critic' model")
        split = read_split_manifest(run / "split.csv")
        load = lambda records: load_images(records, det.preprocessing, progress=False)  # noqa: E731
        healthy, val = load(split.healthy), load(split.val)
        test = load(split.test) if args.test else None
        parts = {"val": val, **({"test": test} if test is not None else {})}
        n_scored = sum(len(images) for images in parts.values())
        t = time.perf_counter()
        before = {part: det.score(images) for part, images in parts.items()}  # (scores, maps)
        speed = {"score": n_scored / (time.perf_counter() - t)}
        det.config.heatmap = "nearest"
        t = time.perf_counter()
        det.healthy_patches = det.healthy_patch_bank(healthy.images)
        bank_seconds = time.perf_counter() - t
        t = time.perf_counter()
        after = {part: det.score(images) for part, images in parts.items()}
        speed["nearest"] = n_scored / (time.perf_counter() - t)
        for part in before:  # the heatmap option leaves every image score as it was
            np.testing.assert_array_equal(before[part][0], after[part][0])

        row: dict = {"bank": int(len(det.healthy_patches)), "B": len(healthy), "bank_seconds": round(bank_seconds, 1),
                     "images_per_second": {k: round(v, 1) for k, v in speed.items()}}
        lesions, head = val.masks.numpy().astype(bool), foreground_mask(val.images.numpy())
        for name, maps in (("score", before["val"][1]), ("nearest", after["val"][1])):
            row[f"val_pixel_auroc_{name}"] = pixel_auroc(maps, lesions, head)
        if test is not None:  # as run_method: the foreground region, Dice at the threshold chosen on validation
            for name, scored in (("score", before), ("nearest", after)):
                block = evaluate_localization(scored["test"][1], test.masks.numpy().astype(bool), test.images.numpy(),
                                              scored["val"][1], lesions, val.images.numpy(), region="foreground")
                row[f"test_{name}"] = {k: block[k] for k in ("pixel_auroc", "aupro", "dice", "all_pixels")}
        table[str(run)] = row
        print(run, json.dumps(row), flush=True)
    for key in ("val_pixel_auroc_score", "val_pixel_auroc_nearest"):
        print(f"mean {key}: {np.mean([r[key] for r in table.values()]):.3f}")
    if args.test:
        for name in ("score", "nearest"):
            v = [r[f"test_{name}"]["pixel_auroc"] for r in table.values()]
            print(f"test pixel AUROC inside the head, heatmap={name}: {' / '.join(f'{x:.3f}' for x in v)} "
                  f"-> {np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
