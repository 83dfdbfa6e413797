"""HealthyGAN: what the attention masks M look like, on VALIDATION images (never the test split).

    python benchmarks/healthygan_masks.py RUN [RUN ...] [--snapshots]

For each run's saved model (with --snapshots: the EMA weights of each kept checkpoint) this prints,
over the validation images:
- mean M, and the share of pixels with M < 0.1 or M > 0.9 (binary-ness);
- total variation along rows (|M[i, j+1] − M[i, j]|) and along columns (|M[i+1, j] − M[i, j]|):
  vertical stripes, column by column, show as a row TV far above the column TV;
- the correlation of neighbouring columns' M (stripes alternating 0 / 1: near −1; coherent masks: near +1);
- the mean size, in pixels, of the connected regions of M > 0.5 (8-connectivity), and their count per image;
- border / inside: mean M over the outer 3 pixels of the image against the mean M inside; edge step: the
  largest, over the four edges, of mean M over the outer 3 lines minus mean M over the fourth line;
- on data with lesion masks (lgg_flair): the pixel AUROC of M, and of |x − healthy(x)|, against the
  lesion masks inside the head (`localization.pixel_auroc` with its foreground region);
- whether the pattern is tied to pixel positions rather than to the scan (`positional_stats`).

--unused (data with lesion masks): instead, the lesion slices the split left unused (in neither A, validation nor
test): the pixel AUROC inside the head of M, of |x − healthy(x)| and of the model's own heatmap (the profile's: the
nearest healthy patch), per run and their mean (docs/experiments.md, section 20).
--test-localization HEATMAP (once, after the choice): the test split's localization block as `run_method` writes it
(pixel AUROC, AUPRO and Dice inside the head, the Dice threshold chosen on validation) with the model's heatmap set
to HEATMAP ("nearest", "mask"), per run and the mean.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from scipy import ndimage

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.methods.healthygan import HealthyGAN
from scanomaly.localization import evaluate_localization, foreground_mask, pixel_auroc
from scanomaly.options import parse_set
from scanomaly.splits import read_split_manifest

BORDER = 3  # pixels the generator's 7 x 7 output convolution's padding reaches


def mask_stats(masks: np.ndarray) -> dict[str, float]:
    """masks [N, S, S] in [0, 1]."""
    binary = masks > 0.5
    border = np.ones(masks.shape[1:], bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    sizes, counts = [], []
    for b in binary:
        labels, n = ndimage.label(b, structure=np.ones((3, 3)))
        counts.append(n)
        if n:
            sizes += list(np.bincount(labels.ravel())[1:])
    a, b = masks[:, :, 1:].ravel(), masks[:, :, :-1].ravel()
    return {
        "mean M": float(masks.mean()),
        "binary share": float(((masks < 0.1) | (masks > 0.9)).mean()),
        "TV rows": float(np.abs(np.diff(masks, axis=2)).mean()),
        "TV cols": float(np.abs(np.diff(masks, axis=1)).mean()),
        "neighbour-column corr": float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan"),
        "region size px": float(np.mean(sizes)) if sizes else 0.0,
        "regions / image": float(np.mean(counts)),
        # the 7 x 7 output convolution's zero padding reaches BORDER pixels in; a frame warmer than the inside can be
        # the padding's (the demo's band) or taught (chest's neck and shoulders): docs/experiments.md, section 24
        "border / inside": float(masks[:, border].mean() / max(masks[:, ~border].mean(), 1e-12)),
        # the same band as a step: the outer BORDER lines of each edge against the line just inside them. A band the
        # padding keeps steps there (the demo's: about 0.5); a mask taught warmer towards an edge falls smoothly (the
        # full chest runs: about 0.01). The largest of the four edges (section 26)
        # (each edge's lines first: top, bottom, left, right)
        "edge step": float(max(lines[:BORDER].mean() - lines[BORDER].mean() for lines in (
            masks.transpose(1, 0, 2), masks[:, ::-1].transpose(1, 0, 2), masks.transpose(2, 0, 1), masks[:, :, ::-1].transpose(2, 0, 1)))),
    }


@torch.no_grad()
def masks_of(generator, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    generator.eval()
    outs = [generator(x[i : i + 64]) for i in range(0, len(x), 64)]
    healthy = torch.cat([o[0] for o in outs])
    masks = torch.cat([o[2] for o in outs])[:, 0].numpy()
    return masks, (x - healthy).abs().mean(1).numpy()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def positional_stats(generator, x: torch.Tensor, masks: np.ndarray) -> dict[str, float]:
    """Is the mask's pattern tied to the scan or to pixel positions?
    - shared pattern: the share of the masks' variance that the mean mask over images explains
      (a pattern drawn at fixed positions, whatever the scan: near 1);
    - period-2 power: the share of each row's (mean-removed) spectral power at the Nyquist frequency
      (alternating columns: near 1);
    - shift test: the scans shifted right by one column; the correlation of the new masks with the
      old masks shifted alike (the pattern follows the content) and with the old masks in place
      (the pattern stays at its pixel positions)."""
    mean_mask = masks.mean(0, keepdims=True)
    total = masks.var() + 1e-12
    rows = masks - masks.mean(2, keepdims=True)
    power = np.abs(np.fft.rfft(rows, axis=2)) ** 2
    shifted, _ = masks_of(generator, torch.roll(x, 1, dims=-1))
    inner = (slice(None), slice(None), slice(2, -2))
    return {
        "shared pattern": float(np.broadcast_to(mean_mask, masks.shape).var() / total),
        "period-2 power": float(power[..., -1].sum() / (power[..., 1:].sum() + 1e-12)),
        "shift: follows content": _corr(shifted[:, :, 3:-1], masks[:, :, 2:-2]),
        "shift: stays in place": _corr(shifted[inner], masks[inner]),
    }


def report(name, generator, val) -> dict:
    x = torch.as_tensor(val.images)
    masks, diffs = masks_of(generator, x)
    stats = mask_stats(masks)
    stats.update(positional_stats(generator, x, masks))
    if val.masks is not None and bool(val.masks.any()):
        lesions = val.masks.numpy().astype(bool)
        head = foreground_mask(val.images)
        stats["pixel AUROC of M (head)"] = pixel_auroc(masks, lesions, head)
        stats["pixel AUROC of |x-h| (head)"] = pixel_auroc(diffs, lesions, head)
    print(name, "  ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True)
    return stats


def unused_lesions(name, det, split) -> dict[str, float]:
    """Pixel AUROC inside the head on the split's unused lesion slices: the mask, the change, the model's heatmap."""
    lesioned = load_images([r for r in split.unused if r.label == 1], det.preprocessing, progress=False)
    if lesioned.masks is None:
        raise SystemExit(f"{name}: --unused needs data with lesion masks")
    x, lesions = torch.as_tensor(lesioned.images), lesioned.masks.numpy().astype(bool)
    head = foreground_mask(lesioned.images)
    masks, diffs = masks_of(det.scoring_generator, x)
    row = {"M": pixel_auroc(masks, lesions, head), "|x-h|": pixel_auroc(diffs, lesions, head),
           "heatmap": pixel_auroc(det.score(x)[1], lesions, head)}
    print(name, f"{len(x)} unused lesion slices:", "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return row


def test_localization(name, det, split, heatmap: str) -> dict[str, float]:
    """The test split's localization metrics inside the head with the model's heatmap set to `heatmap`."""
    det.config.heatmap = heatmap
    test, val = (load_images(records, det.preprocessing, progress=False) for records in (split.test, split.val))
    block = evaluate_localization(det.score(test.images)[1], test.masks.numpy().astype(bool), test.images.numpy(),
                                  det.score(val.images)[1], val.masks.numpy().astype(bool), val.images.numpy())
    row = {k: block[k] for k in ("pixel_auroc", "aupro", "dice")}
    print(name, f"test, heatmap={heatmap}:", "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--snapshots", action="store_true")
    ap.add_argument("--profile", default="cpu", help="the runs' profile, for runs still training (no model yet)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config of runs still training")
    ap.add_argument("--unused", action="store_true", help="pixel AUROC on the split's unused lesion slices (section 20)")
    ap.add_argument("--test-localization", metavar="HEATMAP", help="the test split's localization (once, after the choice)")
    args = ap.parse_args()
    if args.test_localization:
        rows = [test_localization(run.name, Detector.load(run / "model"), read_split_manifest(run / "split.csv"),
                                  args.test_localization) for run in args.runs]
        print("mean", "  ".join(f"{k} {np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows], ddof=1):.3f}" for k in rows[0]))
        return
    if args.unused:
        rows = [unused_lesions(run.name, Detector.load(run / "model"), read_split_manifest(run / "split.csv")) for run in args.runs]
        print("mean", "  ".join(f"{k} {np.mean([r[k] for r in rows]):.3f}" for k in rows[0]))
        return
    for run in args.runs:
        split = read_split_manifest(run / "split.csv")
        # a run still training has no model yet: its snapshots are read into the profile's networks
        det = Detector.load(run / "model") if (run / "model").is_dir() else HealthyGAN.from_profile(args.profile, parse_set(args.set))
        snaps = sorted(run.rglob("snapshots/step_*.safetensors"))
        val = load_images(split.val, det.preprocessing, progress=False)
        if args.snapshots:
            for snap in snaps:
                state = load_file(str(snap))
                det.scoring_generator.load_state_dict({k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")})
                report(f"{run.name} {snap.stem}", det.scoring_generator, val)
        else:
            report(f"{run.name} model", det.scoring_generator, val)


if __name__ == "__main__":
    main()
