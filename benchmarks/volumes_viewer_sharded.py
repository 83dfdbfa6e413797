"""Speed of the researcher-facing outputs: heatmap volumes, the viewer's first page, sharded scoring.

    python benchmarks/volumes_viewer_sharded.py volumes  [--n 4] [--work DIR]
    python benchmarks/volumes_viewer_sharded.py viewer   [--rows 10000] [--work DIR]
    python benchmarks/volumes_viewer_sharded.py sharded  [--n 2000] [--procs 1 2] [--work DIR]

volumes: synthetic 240 x 240 x 155 NIfTI volumes (a BraTS grid, oblique, flipped axis; a noisy ellipsoid
  "head" on a zero background, as MRI has: gzip time depends on the content) and a 64-slice
  256 x 256 DICOM MR series, scored by an untrained HealthyGAN (cpu profile; weights do not change the
  cost); prints the time spent writing outputs per volume (`VolumeOutputs.seconds_writing`: mapping the
  slices back to the grid and saving the files), apart from scoring.
viewer: a scores CSV of N rows over the chest X-ray test images (repeated), with the same model beside
  it; `scanomaly view` started on it; headless Chromium (Playwright, the system's chromium) loads the
  page and waits until the first page's 20 rows and all their pictures (scan, translation, heatmap) are
  drawn. Prints the server start (reading and sorting the CSV) and the page load time.
sharded: `scanomaly score` on N chest X-rays, one process and under torchrun with 2 processes
  (OMP_NUM_THREADS=1 each, --workers 0: each process reads its own images); prints images per second.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia" / "test"


def _model(work: Path) -> Path:
    from scanomaly import get_method

    model = work / "model"
    if not (model / "model.json").is_file():
        get_method("healthygan").from_profile("cpu").save(model)
    return model


def bench_volumes(args, work: Path) -> None:
    import nibabel as nib

    from scanomaly import discover
    from scanomaly.detector import Detector
    from scanomaly.streaming import score_stream
    from scanomaly.volumes import VolumeOutputs

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_volumes import oblique_flipped_affine, write_mr_series

    det = Detector.load(_model(work))
    vols = work / "nifti"
    vols.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:155, 0:240, 0:240]
    head = ((z - 77) / 70.0) ** 2 + ((y - 120) / 90.0) ** 2 + ((x - 120) / 75.0) ** 2 < 1  # a head: zero background
    for i in range(args.n):
        affine = oblique_flipped_affine()
        data = np.where(head, 300 + 40 * rng.standard_normal(head.shape), 0).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), str(vols / f"v{i}.nii.gz"))
    for name, source in (("NIfTI 240x240x155", discover(vols)), ("DICOM series 64 x 256x256", None)):
        if source is None:
            write_mr_series(work / "series", n=64, rows=256, cols=256, lesion=(10, 100, 100))
            source = discover(work / "series")
        outputs = VolumeOutputs(det, source, work / f"heat_{len(name)}")
        t0 = time.perf_counter()
        summary = score_stream(det, source, work / f"s_{len(name)}.csv", batch_size=64, workers=0, overwrite=True,
                               heatmap_dir=work / f"heat_{len(name)}", progress=False, on_scored=outputs.add)
        outputs.finish(work / f"s_{len(name)}.csv")
        total = time.perf_counter() - t0
        print(f"{name}: {outputs.n_written} volume(s), writing {outputs.seconds_writing / outputs.n_written:.2f} s "
              f"per volume; whole run (scoring {summary.n_scored} slices, PNG panels, writing) {total:.1f} s")


def bench_viewer(args, work: Path) -> None:
    import socket
    import threading

    import uvicorn
    from playwright.sync_api import sync_playwright

    from scanomaly.viewer import build_app

    images = sorted(DATA.rglob("*.png"))
    run = work / "viewer_run"
    run.mkdir(exist_ok=True)
    model = _model(work)
    rng = np.random.default_rng(0)
    with open(run / "scores.csv", "w") as fh:
        fh.write("path,index,name,score,label,patient_id\n")
        for i in range(args.rows):
            p = images[i % len(images)]
            fh.write(f"{p},,{p.name},{rng.random()!r},{int(p.parent.name == 'abnormal')},\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    import matplotlib.pyplot  # noqa: F401  (imports the viewer pays once at start, timed apart)
    import sklearn.metrics  # noqa: F401

    import scanomaly.viewer.app  # noqa: F401

    imports_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    app = build_app(run / "scores.csv", model=model, workdir=work / "viewer_work")
    start_s = time.perf_counter() - t0
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        for attempt in ("cold", "warm (pictures cached)"):
            page = browser.new_page()
            t0 = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => { const im = [...document.querySelectorAll('tr.row img')];"
                                   " return im.length == 20 * 4 && im.every(i => i.complete && i.naturalWidth > 0); }",
                                   timeout=300_000)
            print(f"viewer, {args.rows} rows: imports {imports_s:.2f} s, then reading + sorting the CSV {start_s:.2f} s; "
                  f"first page, {attempt}, 20 rows with pictures: {time.perf_counter() - t0:.2f} s")
            page.close()
        browser.close()
    server.should_exit = True


def bench_sharded(args, work: Path) -> None:
    images = sorted(DATA.rglob("*.png"))
    manifest = work / "manifest.csv"
    with open(manifest, "w") as fh:
        fh.write("path,label\n")
        for i in range(args.n):
            p = images[i % len(images)]
            copy = work / "imgs" / f"{i:06d}.png"
            copy.parent.mkdir(exist_ok=True)
            if not copy.exists():
                os.link(p, copy) if hasattr(os, "link") else copy.write_bytes(p.read_bytes())
            fh.write(f"{copy},{p.parent.name}\n")
    model = _model(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for procs in args.procs:
        out = work / f"scores_{procs}.csv"
        score = ["-m", "scanomaly", "score", str(model), str(manifest), "--out", str(out), "--overwrite",
                 "--workers", "0", "--batch-size", "64", "--no-progress", "--device", "cpu"]
        cmd = [sys.executable, *score] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *score]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        print(f"{procs} process(es): {args.n / wall:.1f} images/s end to end ({wall:.1f} s, load before {load:.2f}); "
              f"{proc.stdout.strip().splitlines()[-1]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("volumes", "viewer", "sharded"))
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="scanomaly-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.what == "volumes":
        args.n = args.n or 4
        bench_volumes(args, work)
    elif args.what == "viewer":
        bench_viewer(args, work)
    else:
        args.n = args.n or 2000
        bench_sharded(args, work)


if __name__ == "__main__":
    main()
