"""Test AUROC of every kept checkpoint of a finished run, beside its label-free AUCp: how well does AUCp pick?

    OMP_NUM_THREADS=1 scanomaly benchmark --data ../shared/data/brain_tumor_small --methods healthygan --profile cpu \
        --seeds 1 --set healthygan.keep_snapshots=true --out bench_runs/brain_snapshots
    python benchmarks/checkpoint_analysis.py bench_runs/brain_snapshots/healthygan/seed0

Analysis only, after the run: it does not change which checkpoint the run reports. Each snapshot in
RUN/train/snapshots is loaded into the saved model and scores the run's test split (from RUN/split.csv).
"""

import json
import sys
from pathlib import Path

from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.splits import read_split_manifest


def checkpoint_analysis(run: Path) -> list[dict]:
    """[{"step", "aucp", "test_auroc"}] for every snapshot of the run, in step order."""
    run = Path(run)
    det = Detector.load(run / "model")
    test = load_images(read_split_manifest(run / "split.csv").test, det.preprocessing, progress=False)
    extra = json.loads((run / "result.json").read_text()).get("extra", {})
    aucp = {h["step"]: h["metric"] for h in extra.get("aucp_history", [])}
    rows = []
    for snap in sorted((run / "train" / "snapshots").glob("step_*.safetensors")):
        step = int(snap.stem.split("_")[1])
        det.load_state_tensors(load_file(str(snap)))
        scores, _ = det.score(test)
        rows.append({"step": step, "aucp": aucp.get(step), "test_auroc": float(roc_auc_score(test.labels, scores))})
    return rows


if __name__ == "__main__":
    for row in checkpoint_analysis(Path(sys.argv[1])):
        print(row)
