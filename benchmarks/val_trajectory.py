"""Validation AUROC of every kept checkpoint of a benchmark run (development aid; never looks at test).

    python benchmarks/val_trajectory.py bench_runs/hg_v1
    python benchmarks/val_trajectory.py bench_runs/hg_L1 healthygan cpu lambda_id=1   # a run trained with --set
    python benchmarks/val_trajectory.py bench_runs/hg_P128EQ_s0 healthygan cpu image_size=128  # still training

Scores the run's validation set (held-out healthy + validation abnormals from split.csv) with each
snapshot in RUN/train/snapshots (run_method.py prints each one's label-free AUCp). Images are
prepared as the run prepared them (its result.json), e.g. at --image-size 128 or --intensity equalize. A run still
training has no result.json yet: pass its preprocessing options (image_size=128, intensity=...) too.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import Detector, get_method
from scanomaly.preprocess import Preprocessing
from scanomaly.splits import read_split_manifest

from scanomaly.options import parse_value  # the same KEY=VALUE reading as the runs' --set


def run_detector(run: Path, method: str, profile: str, options) -> Detector:
    """An untrained detector built as `run` was, to load its snapshots into. `options`: the run's --set options
    and preprocessing options as key=value strings; its result.json, once written, supplies the preprocessing."""
    options = {k: parse_value(v) for k, v in (o.split("=", 1) for o in options)}
    prep_keys = set(Preprocessing().to_dict())
    overrides = {k: v for k, v in options.items() if k not in prep_keys}
    result = run / "result.json"
    preprocessing = json.loads(result.read_text())["preprocessing"] if result.exists() else {}
    preprocessing = {**preprocessing, **{k: v for k, v in options.items() if k in prep_keys}}
    return get_method(method).from_profile(profile, overrides, preprocessing)


def main(run: str, method: str = "healthygan", profile: str = "cpu", *options: str) -> None:
    run = Path(run)
    torch.set_num_threads(1)
    det = run_detector(run, method, profile, options)
    val = load_images(read_split_manifest(run / "split.csv").val, det.preprocessing, progress=False)
    for snap in sorted((run / "train" / "snapshots").glob("step_*.safetensors")):
        det.load_state_tensors(load_file(str(snap)))
        scores, _ = det.score(val)
        print(f"{snap.stem}: val AUROC {roc_auc_score(val.labels, scores):.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
