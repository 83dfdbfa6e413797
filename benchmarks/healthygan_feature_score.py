"""HealthyGAN: the paper's pixel score against feature-space scores of the same trained model, on
VALIDATION data only (held-out healthy vs validation abnormals; never the test split).

    python benchmarks/healthygan_feature_score.py RUN [--snapshots [--step N]] [--reference] [--controls] [--set KEY=VALUE]

RUN is a `scanomaly train healthygan --from-labeled ...` folder. For its saved model (and, with
--snapshots, for the EMA weights of every checkpoint kept with keep_snapshots=true) this prints the
validation AUROC of the pixel score and of `score=features` variants (backbone stages, input size,
mean / max pooling): how much of the gap to PatchCore is the score and how much the translation.
`--extra-abnormal N` adds N seeded abnormal images of the train cohort that the split left unused
(role `unused`) to the validation abnormals, for a less noisy comparison (the normals stay the
held-out healthy ones). `--reference` also fits PaDiM and PatchCore (cpu profiles) on the run's
healthy set and scores the same validation images. `--controls` scores the same variants with healthy(x)
replaced by the run's generator at its random initialisation and by a 3x3 blur of x: what the scores give
without a learned translation. `--critic` also ranks the images by the critic's own verdict (minus the mean of its
patch map), with the critic and the generator of the run's last checkpoint (checkpoint.pt): what the critic knows
beside what the translation shows.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import Detector, get_method
from scanomaly.methods.healthygan import HealthyGAN
from scanomaly.methods import _patch_features as pf
from scanomaly.methods.healthygan import paper_score
from scanomaly.options import parse_set
from scanomaly.splits import read_split_manifest
from scanomaly.training.loop import CHECKPOINT



VARIANTS = {  # name -> FeatureDistance settings (stages, input size, pool)
    "features s2+s3 @64 mean": (("stage2", "stage3"), 0, "mean"),
    "features s2+s3 @64 max": (("stage2", "stage3"), 0, "max"),
    "features s3 @64 mean": (("stage3",), 0, "mean"),
    "features s2+s3 @128 mean": (("stage2", "stage3"), 128, "mean"),
    "features s2+s3 @128 max": (("stage2", "stage3"), 128, "max"),
    "features s3 @128 mean": (("stage3",), 128, "mean"),
    "features s2+s3+s4 @128 mean": (("stage2", "stage3", "stage4"), 128, "mean"),
    "features s3+s5 @128 mean": (("stage3", "stage5"), 128, "mean"),
}


def distances(sigma: float) -> dict[str, pf.FeatureDistance | None]:
    out: dict[str, pf.FeatureDistance | None] = {"pixel (paper)": None}
    cache = {}
    for name, (stages, size, pool) in VARIANTS.items():
        if stages not in cache:
            cache[stages] = pf.build_extractor("efficientnet_lite0", "imagenet", stages, torch.device("cpu"))
        out[name] = pf.FeatureDistance(cache[stages], sigma, size, pool)
    return out


@torch.no_grad()
def val_aurocs(generator, x: torch.Tensor, y: np.ndarray, dists) -> dict[str, float]:
    if isinstance(generator, torch.nn.Module):
        generator.eval()
    healthy = torch.cat([generator(x[i : i + 64])[0] for i in range(0, len(x), 64)])
    out = {}
    for name, d in dists.items():
        if d is None:
            s = paper_score(x, healthy)
        else:
            s = torch.cat([d(x[i : i + 64], healthy[i : i + 64])[0] for i in range(0, len(x), 64)])
        out[name] = float(roc_auc_score(y, s.numpy()))
    return out


def _generator_of(state: dict, det: HealthyGAN):
    """The checkpoint's own (not EMA) generator, loaded into det's."""
    det.generator.load_state_dict(state["modules"]["generator"])
    return det.generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--extra-abnormal", type=int, default=0)
    ap.add_argument("--snapshots", action="store_true")
    ap.add_argument("--step", type=int, action="append", help="with --snapshots: only these steps")
    ap.add_argument("--profile", default="cpu", help="the run's profile, for a run still training (no model yet)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config of a run still training")
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--controls", action="store_true", help="also score an untrained generator and a blur (no translation)")
    ap.add_argument("--critic", action="store_true", help="also the verdict of the last checkpoint's critic")
    ap.add_argument("--sigma", type=float, default=4.0, help="blur of the feature map, in pixels of the image")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    split = read_split_manifest(args.run / "split.csv")
    # a run still training has no model yet: its snapshots are read into the profile's networks
    model = args.run / "model"
    det = Detector.load(model) if model.is_dir() else HealthyGAN.from_profile(args.profile, parse_set(args.set))
    records = list(split.val)
    extra = [r for r in split.unused if r.label == 1]
    random.Random(0).shuffle(extra)
    records += extra[: args.extra_abnormal]
    val = load_images(records, det.preprocessing, progress=False)
    x, y = torch.as_tensor(val.images), np.asarray(val.labels)
    print(f"validation: {len(y)} images ({int(y.sum())} abnormal, {len(extra[: args.extra_abnormal])} of them from 'unused')")
    dists = distances(args.sigma)
    results = {"run": str(args.run), "n": len(y), "n_abnormal": int(y.sum())}
    t = time.perf_counter()
    if model.is_dir():
        results["model"] = val_aurocs(det.scoring_generator, x, y, dists)
        print(f"saved model ({time.perf_counter() - t:.0f} s):")
        for k, v in results["model"].items():
            print(f"  {v:.3f}  {k}")
    if args.snapshots:
        results["snapshots"] = {}
        print("step", " | ".join(dists))
        for snap in sorted(args.run.rglob("snapshots/step_*.safetensors")):
            if args.step and int(snap.stem.split("_")[1]) not in args.step:
                continue
            state = load_file(str(snap))
            det.scoring_generator.load_state_dict({k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")})
            r = val_aurocs(det.scoring_generator, x, y, dists)
            results["snapshots"][snap.stem] = r
            print(snap.stem, " ".join(f"{v:.3f}" for v in r.values()), flush=True)
    if args.controls:
        # what the score gives without a trained translation: the untrained generator of the same
        # seed, and a 3x3 box blur standing in for healthy(x)
        untrained = HealthyGAN(det.config, det.preprocessing).generator
        results["untrained generator"] = val_aurocs(untrained, x, y, dists)
        blur = lambda z: (torch.nn.functional.avg_pool2d(z, 3, 1, 1, count_include_pad=False), None, None)  # noqa: E731
        results["blur instead of healthy(x)"] = val_aurocs(blur, x, y, dists)
        for name in ("untrained generator", "blur instead of healthy(x)"):
            print(name, " ".join(f"{v:.3f}" for v in results[name].values()), flush=True)
    if args.critic:
        state = torch.load(args.run / CHECKPOINT, map_location="cpu", weights_only=True)
        last = HealthyGAN(det.config, det.preprocessing)
        last.critic.load_state_dict(state["modules"]["critic"])
        with torch.no_grad():
            verdict = -torch.cat([last.critic(x[i : i + 64]).flatten(1).mean(1) for i in range(0, len(x), 64)])
        results["critic"] = {"step": state.get("step"), "critic's verdict": float(roc_auc_score(y, verdict.numpy())),
                             **val_aurocs(_generator_of(state, last), x, y, dists)}
        print(f"last checkpoint (step {state.get('step')}):", " ".join(f"{k} {v:.3f}" for k, v in results["critic"].items()
                                                                        if k != "step"), flush=True)
    if args.reference:
        for method in ("padim", "patchcore"):
            ref = get_method(method).from_profile("cpu")
            prep_val = load_images(records, ref.preprocessing, progress=False)
            train = load_images(split.healthy, ref.preprocessing, progress=False)
            t = time.perf_counter()
            ref.fit(train, progress=False)
            s, _ = ref.score(prep_val)
            results[method] = float(roc_auc_score(prep_val.labels, s))
            print(f"  {results[method]:.3f}  {method} (cpu profile, {ref.preprocessing.image_size} px, fit on the run's healthy set, {time.perf_counter() - t:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
