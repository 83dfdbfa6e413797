"""Scoring throughput and peak memory of a trained HealthyGAN run, in three runtimes.

    python benchmarks/scoring_throughput.py RUN [--n 10000] [--data ../shared/data/chest_xray_pneumonia/test]
                                                [--batch-size 64] [--workers 2] [--work DIR]

Scores N images, the chest X-ray official test split repeated up to N (through a manifest), with
`scanomaly.streaming.score_stream` (the path of `scanomaly score`: DataLoader workers decode and
preprocess, scores go to a CSV batch by batch), in three modes:

    torch-fp32          the saved detector, float32
    torch-bf16-compile  bf16 autocast and torch.compile of the scoring network (CPU)
    onnxruntime         the model exported to ONNX (exported into the work folder first)

Each mode runs in its own subprocess, so that a peak RSS (`ru_maxrss`) is that mode's alone: the
scoring process's own, and the largest of its DataLoader workers'. The driver itself imports
neither torch nor scanomaly (exporting and writing manifests run in a subprocess too), because
Linux carries a process's `ru_maxrss` over `exec`: a child started by a large parent would report
at least the parent's size. Each mode also runs at N/10:
streaming scoring should need the same memory for both. Model compilation and first-call costs are
paid on a warm-up batch (of each batch size the run will see) and not timed. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "torch-fp32": "PyTorch, float32",
    "torch-bf16-compile": "PyTorch, bf16 autocast + torch.compile",
    "onnxruntime": "ONNX Runtime, float32",
}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia" / "test"


def manifest_path(work: Path, n: int) -> Path:
    return work / f"manifest_{n}.csv"


def write_manifest(data: Path, n: int, path: Path) -> Path:
    """`path,label` rows: the images of `data`, repeated in order until there are n."""
    from scanomaly import discover

    records = discover(data)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i in range(n):
            rec = records[i % len(records)]
            w.writerow([rec.path, "abnormal" if rec.label == 1 else "normal"])
    return path


# ------------------------------------------------------------------------------------------
# one mode, in its own process
# ------------------------------------------------------------------------------------------
def make_scorer(mode: str, model_dir: Path, onnx_path: Path):
    from scanomaly.detector import Detector
    from scanomaly.export import OnnxScorer

    if mode == "onnxruntime":
        return OnnxScorer(onnx_path)
    if mode == "torch-bf16-compile":  # what `scanomaly score --precision bf16 --compile` does
        return Detector.load(model_dir, device="cpu", precision="bf16").compile()
    return Detector.load(model_dir, device="cpu")


def run_mode(args) -> None:
    import torch

    from scanomaly.streaming import score_stream

    scorer = make_scorer(args.mode, Path(args.model_dir), Path(args.onnx))
    prep = scorer.preprocessing
    n = sum(1 for _ in open(args.manifest)) - 1
    start = time.perf_counter()
    for size in sorted({args.batch_size, n % args.batch_size} - {0}):  # every batch shape the run will see
        scorer.score(torch.zeros(size, prep.channels, prep.image_size, prep.image_size), batch_size=size)
    warmup = time.perf_counter() - start
    summary = score_stream(scorer, Path(args.manifest), Path(args.out_csv), batch_size=args.batch_size,
                           workers=args.workers, overwrite=True, progress=False)
    print(json.dumps({
        "mode": args.mode,
        "n": summary.n_scored,
        "skipped": len(summary.skipped),
        "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
        "warmup_seconds": warmup,
        # Linux reports kilobytes
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def prepare(args) -> None:
    """Export the model to ONNX and write the manifests (in a subprocess: see the module docstring)."""
    from scanomaly.detector import Detector
    from scanomaly.export import export_onnx

    export_onnx(Detector.load(Path(args.model_dir)), Path(args.onnx))
    for n in (int(v) for v in args.sizes.split(",")):
        write_manifest(Path(args.data), n, manifest_path(args.work, n))


# ------------------------------------------------------------------------------------------
# the driver: standard library only
# ------------------------------------------------------------------------------------------
def child(task: str, **options) -> subprocess.CompletedProcess:
    cmd = [sys.executable, __file__, "--child", task]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.run(cmd, capture_output=True, text=True)


def measure(mode: str, manifest: Path, model_dir: Path, onnx_path: Path, work: Path, args) -> dict:
    done = child(mode, model_dir=model_dir, onnx=onnx_path, manifest=manifest,
                 out_csv=work / f"{mode}_{manifest.stem}.csv", batch_size=args.batch_size, workers=args.workers)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"mode": mode, "error": why}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: list[dict], batch_size: int, workers: int) -> str:
    lines = [f"batch {batch_size}, {workers} DataLoader worker(s)", "",
             "| mode | images | images/s | warm-up s | peak RSS, scoring process (MB) | peak RSS, a worker (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {MODES[r['mode']]} | | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {MODES[r['mode']]} | {r['n']:,} | {r['images_per_second']:.1f} | {r['warmup_seconds']:.1f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_worker_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="a trained HealthyGAN run (or model) folder")
    ap.add_argument("--n", type=int, default=10_000, help="images to score (also runs n/10)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="images to repeat up to n")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, help="scratch folder for manifests, CSVs and the ONNX file (default: a temp folder)")
    # the subprocesses: preparing, and one mode
    ap.add_argument("--child", choices=("prepare", *MODES), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--out-csv", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "prepare":
        prepare(args)
        return
    if args.child:
        args.mode = args.child
        run_mode(args)
        return
    if not args.run:
        ap.error("give a trained HealthyGAN run folder")

    run = Path(args.run)
    model_dir = run / "model" if (run / "model" / "model.json").is_file() else run
    work = args.work or Path(tempfile.mkdtemp(prefix="scoring_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / "model.onnx"
    sizes = [args.n, max(1, args.n // 10)]
    done = child("prepare", model_dir=model_dir, onnx=onnx_path, data=args.data, work=work,
                 sizes=",".join(map(str, sizes)))
    if done.returncode != 0:
        sys.exit(f"preparing failed:\n{done.stderr}")
    results = []
    for mode in MODES:
        for n in sizes:
            results.append(measure(mode, manifest_path(work, n), model_dir, onnx_path, work, args))
            print(f"  {mode} n={n}: {json.dumps(results[-1])}", file=sys.stderr)
    print(markdown(results, args.batch_size, args.workers))
    print()
    for mode in MODES:
        big, small = (r for r in results if r["mode"] == mode)
        if "error" not in big and "error" not in small:
            print(f"- {MODES[mode]}: peak RSS at {big['n']:,} images is {big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x "
                  f"that at {small['n']:,} (workers {big['peak_worker_rss_mb'] / max(small['peak_worker_rss_mb'], 1):.2f}x)")


if __name__ == "__main__":
    main()
