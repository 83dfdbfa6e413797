"""Does HealthyGAN's critic learn disease or memorise its healthy set B? TRAINING-side data only.

    python benchmarks/healthygan_critic_memorisation.py runs/chest_xray_pneumonia runs/busi_breast_ultrasound ...

A run trained with `--set keep_snapshots=true` (as `healthygan_profile_choice.py` reads it). For every kept
snapshot the critic's deficit (the `score=critic` image score) is computed on four groups the run has seen or held
out before validation, and compared with AUROC:

- **B vs hold-out** (train B = 0, held-out healthy = 1): 0.5 when the critic judges unseen healthy scans as it judges
  B; towards 1 when it has memorised B, so that every scan it has not seen looks unhealthy.
- **B vs A's normal scans**: the same question for the healthy scans inside the mixed set A.
- **A's normal vs A's abnormal scans**: what the critic learned about disease on the images it trained on (A's
  labels are never used in training; they are read here only to measure).
- **validation** AUROC, for reference (the split's validation set; no test image is read).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.methods.healthygan import CriticDeficit
from scanomaly.splits import read_split_manifest


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


@torch.no_grad()
def deficits(deficit: CriticDeficit, x: torch.Tensor, batch: int = 128) -> np.ndarray:
    return torch.cat([deficit(x[i : i + batch])[0] for i in range(0, len(x), batch)]).numpy()


def evaluate_run(run: Path) -> list[dict]:
    split = read_split_manifest(run / "split.csv")
    det = Detector.load(run / "model")
    load = lambda records: load_images(records, det.preprocessing, progress=False)  # noqa: E731
    b = torch.as_tensor(load(split.healthy).images)
    hold = torch.as_tensor(load(split.healthy_holdout).images)
    a = load(split.unlabeled)
    a_x, a_y = torch.as_tensor(a.images), np.asarray(a.labels)
    val = load(split.val)
    v_x, v_y = torch.as_tensor(val.images), np.asarray(val.labels)
    critic = det.scoring["critic"]
    rows = []
    for snap in sorted((run / "snapshots").glob("step_*.safetensors")):
        state = load_file(str(snap))
        critic.load_state_dict({k[len("critic."):]: v for k, v in state.items() if k.startswith("critic.")})
        critic.eval()
        deficit = CriticDeficit(critic, det._critic_map(critic, b))
        d_b, d_hold, d_a, d_v = (deficits(deficit, x) for x in (b, hold, a_x, v_x))
        row = {"step": int(snap.stem.split("_")[1]),
               "B vs hold-out": auroc(d_b, d_hold),
               "B vs A normal": auroc(d_b, d_a[a_y == 0]),
               "A normal vs A abnormal": auroc(d_a[a_y == 0], d_a[a_y == 1]),
               "validation": float(roc_auc_score(v_y, d_v))}
        rows.append(row)
        print(run.name, "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()
    results = {run.name: evaluate_run(run) for run in args.runs}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
