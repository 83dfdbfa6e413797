"""HealthyGAN: the pre-registered profile choice (docs/experiments.md, "Pre-registered selection rule"), on
VALIDATION data only. One training gives two candidates: the paper's pixel score and the critic's deficit
(`score=critic`), each at the checkpoint its own AUCp picks.

    OMP_NUM_THREADS=1 scanomaly train healthygan --from-labeled ../shared/data/DATA --profile cpu --iters 1000 \\
        --seed 0 --set score=critic --set upsample=nearest --set checkpoint_every=100 --set keep_snapshots=true \\
        --out runs/DATA
    python benchmarks/healthygan_profile_choice.py runs/chest_xray_pneumonia runs/lgg_flair ... --json out.json

For every kept snapshot (the EMA generator and the critic of a checkpoint) this computes, as training did,
AUCp of both scores (the run's held-out healthy scans against the seeded held-out unlabeled pool), then the
validation AUROC of both scores; on data with lesion masks (lgg_flair) the pixel AUROC inside the head of
both heatmaps (|x − healthy(x)| and the critic's deficit map); and the rule's mask conditions (mean M,
neighbour-column correlation of M). Each candidate is read at its AUCp's pick, never at the best
validation step. Nothing here touches a test split.

--heatmaps (after the choice; not part of it): on data with lesion masks, other maps of the critic at the
critic's pick, for what to try next: the gradient of the deficit (|d deficit / dx|, blurred), the deficit
map computed on shifted copies of the scan (a 4x finer grid), the critic's verdict without B's reference map
(negated), |x − healthy(x)| weighted by the deficit, the drop of the deficit when a 12 px square is replaced
by B's mean image (occlusion, stride 4), and, as the reference every map should beat, the scan's own
intensity (FLAIR lesions are bright).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from healthygan_masks import mask_stats, masks_of
from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.localization import foreground_mask, pixel_auroc
from scanomaly.methods.healthygan import CriticDeficit, HealthyScorer, _split_off
from scanomaly.pipeline import without_labels
from scanomaly.splits import read_split_manifest

CANDIDATES = ("pixel", "critic")


@torch.no_grad()
def scores_and_maps(scorer: HealthyScorer, x: torch.Tensor, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        healthy, s, *heatmap = scorer(xb)
        scores.append(s)
        maps.append(heatmap[0] if heatmap else (xb - healthy).abs().mean(1))
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum())[None, None]
    m = nn.functional.conv2d(nn.functional.pad(maps[:, None], (r, r, 0, 0), mode="replicate"), k[..., None, :])
    return nn.functional.conv2d(nn.functional.pad(m, (0, 0, r, r), mode="replicate"), k[..., :, None])[:, 0]


def occlusion_map(deficit: CriticDeficit, x: torch.Tensor, fill: torch.Tensor, size: int = 12,
                  stride: int = 4) -> torch.Tensor:
    """Per pixel: the mean drop of the scan's deficit over the squares that, replaced by `fill`, cover it."""
    s = x.shape[-1]
    base, acc, count = deficit(x)[0], torch.zeros(len(x), s, s), torch.zeros(s, s)
    for y0 in range(0, s - size + 1, stride):
        for x0 in range(0, s - size + 1, stride):
            occluded = x.clone()
            occluded[..., y0 : y0 + size, x0 : x0 + size] = fill[..., y0 : y0 + size, x0 : x0 + size]
            acc[:, y0 : y0 + size, x0 : x0 + size] += (base - deficit(occluded)[0])[:, None, None]
            count[y0 : y0 + size, x0 : x0 + size] += 1
    return acc / count.clamp(min=1)


def other_critic_maps(generator, deficit: CriticDeficit, x: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
    out = {"the scan's own intensity (no model)": x.mean(1).numpy()}
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(deficit(xg)[0].sum(), xg)
    out["gradient of the deficit, blurred (sigma 2)"] = gaussian_blur(grad.abs().mean(1), 2.0).numpy()
    with torch.no_grad():
        size = x.shape[-1]
        step = size // (4 * deficit.reference.shape[-1])  # four shifts per critic patch and axis
        acc, n = torch.zeros(len(x), size, size), 0
        for dy in range(0, 4 * step, step):
            for dx in range(0, 4 * step, step):
                shifted = torch.roll(x, (dy, dx), dims=(-2, -1))
                acc += torch.roll(deficit(shifted)[1], (-dy, -dx), dims=(-2, -1))
                n += 1
        out["deficit on 16 shifted copies"] = (acc / n).numpy()
        healthy = torch.cat([generator(x[i : i + 64])[0] for i in range(0, len(x), 64)])
        verdict = deficit.critic(x)
        out["the critic's verdict alone, negated"] = -nn.functional.interpolate(
            verdict, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()
        out["|x - h| x deficit"] = ((x - healthy).abs().mean(1) * deficit(x)[1].clamp(min=0)).numpy()
        out["occlusion by B's mean image"] = occlusion_map(deficit, x, b.mean(0, keepdim=True)).numpy()
    return out


def load_snapshot(path: Path, generator: nn.Module, critic: nn.Module) -> None:
    """A kept checkpoint (the EMA generator and the critic, keys "generator.*" / "critic.*") into the two nets, eval mode."""
    state = load_file(str(path))
    for name, net in (("generator", generator), ("critic", critic)):
        net.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
        net.eval()


def evaluate_run(run: Path, heatmaps: bool = False) -> dict:
    split = read_split_manifest(run / "split.csv")
    det = Detector.load(run / "model")
    c, prep = det.config, det.preprocessing
    load = lambda records: load_images(records, prep, progress=False)  # noqa: E731
    b = torch.as_tensor(load(split.healthy).images)
    hold = torch.as_tensor(load(split.healthy_holdout).images)
    # the AUCp pool exactly as fit() drew it: a seeded share of A, capped at aucp_pool
    pool = _split_off(torch.as_tensor(load(without_labels(split.unlabeled)).images), c.holdout_fraction, c.seed)[1]
    pool = pool[: c.aucp_pool]
    val = load(split.val)
    x, y = torch.as_tensor(val.images), np.asarray(val.labels)
    lesions = val.masks.numpy().astype(bool) if val.masks is not None and bool(val.masks.any()) else None
    head = foreground_mask(val.images) if lesions is not None else None

    generator, critic = det.scoring["generator"], det.scoring["critic"]
    rows = []
    for snap in sorted((run / "snapshots").glob("step_*.safetensors")):
        load_snapshot(snap, generator, critic)
        reference = det._critic_map(critic, b)
        row = {"step": int(snap.stem.split("_")[1])}
        for score in CANDIDATES:
            scorer = HealthyScorer(generator, None, CriticDeficit(critic, reference) if score == "critic" else None)
            s_hold, _ = scores_and_maps(scorer, hold)
            s_pool, _ = scores_and_maps(scorer, pool)
            row[f"aucp {score}"] = float(roc_auc_score(np.r_[np.zeros(len(s_hold)), np.ones(len(s_pool))],
                                                       np.r_[s_hold, s_pool]))
            s_val, maps = scores_and_maps(scorer, x)
            row[f"val {score}"] = float(roc_auc_score(y, s_val))
            if lesions is not None:
                row[f"val pixel auroc {score}"] = pixel_auroc(maps, lesions, head)
        stats = mask_stats(masks_of(generator, x)[0])
        row["mean M"], row["neighbour-column corr"] = stats["mean M"], stats["neighbour-column corr"]
        rows.append(row)
        print(run.name, "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)

    picks = {}
    for score in CANDIDATES:
        best = max(rows, key=lambda r: (r[f"aucp {score}"], -r["step"]))  # ties: the earlier one, as the loop
        picks[score] = {"step": best["step"], "val": best[f"val {score}"],
                        "val pixel auroc": best.get(f"val pixel auroc {score}"),
                        "mean M": best["mean M"], "neighbour-column corr": best["neighbour-column corr"]}
    if heatmaps and lesions is not None:
        step = picks["critic"]["step"]
        load_snapshot(run / "snapshots" / f"step_{step:07d}.safetensors", generator, critic)
        deficit = CriticDeficit(critic, det._critic_map(critic, b))
        picks["critic"]["other maps"] = {name: pixel_auroc(m, lesions, head)
                                         for name, m in other_critic_maps(generator, deficit, x, b).items()}
        print(run.name, "critic's pick, B's mean verdict per patch:", deficit.reference[0, 0].numpy().round(2).tolist())
        print(run.name, "critic's pick, pixel AUROC (head) of other maps:", picks["critic"]["other maps"], flush=True)
    saved = json.loads((run / "model" / "model.json").read_text()).get("extra", {})
    return {"run": run.name,
            "model_selected_step": saved.get("selected_step"), "snapshots": rows, "picks": picks}


def criterion(results: list[dict], score: str) -> tuple[float | None, list[float]]:
    """The rule's criterion: the mean of five validation AUROCs (chest, lgg image, lgg pixel, brain, BUSI)."""
    parts = []
    for r in results:
        pick = r["picks"][score]
        parts.append(pick["val"])
        if pick["val pixel auroc"] is not None:
            parts.append(pick["val pixel auroc"])
    return (float(np.mean(parts)) if len(parts) == 5 else None), parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--heatmaps", action="store_true", help="other maps of the critic (after the choice)")
    args = ap.parse_args()
    results = [evaluate_run(run, args.heatmaps) for run in args.runs]
    print("\n| candidate | " + " | ".join(r["run"] for r in results) + " | criterion |")
    print("|---|" + "---|" * (len(results) + 1))
    for score in CANDIDATES:
        mean, _ = criterion(results, score)
        cells = []
        for r in results:
            p = r["picks"][score]
            pix = f" / pixel {p['val pixel auroc']:.3f}" if p["val pixel auroc"] is not None else ""
            cells.append(f"{p['val']:.3f}{pix} (step {p['step']}; M {p['mean M']:.2f}, "
                         f"corr {p['neighbour-column corr']:.2f})")
        print(f"| {score} | " + " | ".join(cells) + f" | {'n/a' if mean is None else f'{mean:.3f}'} |")
    for r in results:
        print(f"{r['run']}: the saved model (score=critic) was chosen at step {r['model_selected_step']}; "
              f"here critic AUCp picks step {r['picks']['critic']['step']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
