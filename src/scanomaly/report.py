"""A self-contained HTML report of a benchmark (or of one run): one file, images embedded.

    build_report("bench")          # a benchmark folder: results.json + OUT/<method>/seed<k>/
    build_report("runs/padim")     # a single run folder (result.json, test_scores.csv, model/)

Sections: the settings and split; the summary tables (as in results.md: mean ± std over seeds, best
in bold; localisation and anatomy tables where the data has masks / slice positions); every run; ROC
curves of all methods on one plot; normal vs abnormal score histograms per method; a gallery of the
most and least anomalous test images (ranked by HealthyGAN's scores when it ran, else by the first
method's), each method's anomaly map over the scan and HealthyGAN's healthy translation beside it;
and, on data with pixel masks, a gallery of the same test slices for every method, its heatmap with
the ground-truth lesion outline drawn over it (from each run's localization_gallery.npz). The gallery loads each method's saved model (first successful seed)
and scores only those few images. Figures are drawn with matplotlib's Agg backend and embedded as
base64 PNG data URIs, so the file can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import ScanomalyError
from .suite import describe_settings, failures, load_results, run_record, seeds_text, summarize, summary_tables

REPORT_NAME = "report.html"
REFERENCE_METHOD = "healthygan"


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------
def _single_run_results(run_dir: Path) -> dict:
    if not (run_dir / "result.json").is_file():  # a run folder made by `train`
        from .runs import train_run_result

        result = train_run_result(run_dir)
    else:
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except json.JSONDecodeError as exc:
            raise ScanomalyError(f"{run_dir / 'result.json'}: corrupt result file ({exc})") from None
    method, seed = result.get("method", "?"), result.get("seed", 0)
    runs = [run_record(method, seed, ".", result)]
    return {
        "title": f"{method} on {Path(str(result.get('data', ''))).name}",
        "settings": {"data": result.get("data"), "profile": result.get("profile"), "seeds": [seed],
                     "split_seed": result.get("split_seed"), "precision": result.get("precision"),
                     "device": result.get("device")},
        "split": result.get("split"),
        "runs": runs,
        "summary": summarize(runs),
    }


def load_any(directory) -> tuple[dict, str]:
    """(results, kind) for a benchmark folder ("benchmark") or a single run folder ("run")."""
    d = Path(directory)
    if not d.is_dir():
        raise ScanomalyError(f"{d}: no such folder")
    if (d / "results.json").is_file():
        return load_results(d), "benchmark"
    if (d / "result.json").is_file() or (d / "train_summary.json").is_file():
        return _single_run_results(d), "run"
    raise ScanomalyError(f"{d}: neither a benchmark folder (results.json) nor a run folder (result.json, or "
                         "train_summary.json from `train`)")


def read_test_scores(path) -> list[dict]:
    """test_scores.csv (path,label,score) -> [{"path", "label", "score"}], in file order."""
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append({"path": row["path"], "label": int(row["label"]), "score": float(row["score"])})
            except (KeyError, TypeError, ValueError):
                raise ScanomalyError(f"{path}: not a test_scores.csv (path,label,score)") from None
    return rows


def _ok_runs(results: dict, method: str) -> list[dict]:
    return sorted((r for r in results["runs"] if r["method"] == method and r["status"] == "ok"), key=lambda r: r["seed"])


def _methods(results: dict) -> list[str]:
    return [m for m, s in results.get("summary", {}).items() if s["n_ok"] > 0]


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------
def _figure(width: float, height: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def roc_figure(curves: dict[str, list[tuple[int, list[dict]]]], summary: dict) -> str:
    """All methods' ROC curves on one plot: the first seed bold, further seeds faint."""
    from sklearn.metrics import roc_curve

    fig = _figure(6.0, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    handles, labels = [], []
    for color, (method, runs) in zip(_colors(len(curves)), curves.items()):
        for k, (seed, rows) in enumerate(runs):
            y = np.array([r["label"] for r in rows])
            s = np.array([r["score"] for r in rows])
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, s)
            if k == 0:
                auc = summary[method]["metrics"].get("auroc", {})
                label = f"{method} (AUROC {auc.get('mean', float('nan')):.3f}"
                label += f" ± {auc['std']:.3f})" if auc.get("std") is not None else ")"
                handles += ax.plot(fpr, tpr, color=color, lw=2)
                labels.append(label)
            else:
                ax.plot(fpr, tpr, color=color, lw=1, alpha=0.35)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.02)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC on the test split")
    if handles:  # explicit labels: matplotlib would hide names that start with "_"
        ax.legend(handles, labels, loc="lower right", fontsize=8)
    fig.tight_layout()
    return _png_data_uri(fig)


def histogram_figure(scores: dict[str, tuple[list[dict], float | None]]) -> str:
    """Per method: test scores of normal vs abnormal images, and the validation-chosen threshold."""
    n = len(scores)
    ncol = min(4, n)
    nrow = (n + ncol - 1) // ncol
    fig = _figure(3.2 * ncol, 2.6 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, (method, (rows, threshold)) in zip(axes, scores.items()):
        s = np.array([r["score"] for r in rows], dtype=np.float64)
        y = np.array([r["label"] for r in rows])
        edges = np.histogram_bin_edges(s, bins=20) if len(s) else 10
        ax.hist(s[y == 0], bins=edges, alpha=0.6, color="tab:blue", label=f"normal ({int((y == 0).sum())})")
        ax.hist(s[y == 1], bins=edges, alpha=0.6, color="tab:red", label=f"abnormal ({int((y == 1).sum())})")
        if threshold is not None and np.isfinite(threshold):
            ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("anomaly score", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return _png_data_uri(fig)


def _gray(x: np.ndarray) -> np.ndarray:
    """[C, S, S] in [-1, 1] -> [S, S] in [0, 1]."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(axis=0)
    return np.clip((a + 1.0) / 2.0, 0.0, 1.0)


def gallery_figure(rows: list[dict], columns: list[dict]) -> str:
    """rows: [{"label": row title}]; columns: [{"title", "kind": "scan" | "healthy" | "map",
    "images": [S,S] per row, "maps": per row (kind "map"), "scores": per row, "vmin", "vmax"}]."""
    nrow, ncol = len(rows), len(columns)
    fig = _figure(1.75 * ncol + 0.9, 1.75 * nrow + 0.4, dpi=90)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for j, col in enumerate(columns):
        for i in range(nrow):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            img = col["images"][i] if col.get("images") is not None else None
            if img is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                h, w = img.shape
                ax.imshow(img, cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="nearest")
                if col["kind"] == "map":
                    ax.imshow(col["maps"][i], cmap="jet", alpha=0.45, vmin=col["vmin"], vmax=col["vmax"],
                              extent=(0, w, h, 0), interpolation="bilinear")
                    ax.text(0.03, 0.97, f"{col['scores'][i]:.3g}", transform=ax.transAxes, va="top", ha="left",
                            fontsize=6, color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
            if i == 0:
                ax.set_title(col["title"], fontsize=8)
            if j == 0:
                ax.set_ylabel(rows[i]["label"], fontsize=6)
    fig.tight_layout(pad=0.3)
    return _png_data_uri(fig)


# ------------------------------------------------------------------------------------------
# gallery
# ------------------------------------------------------------------------------------------
def _records_for_rows(split_csv: Path | None, rows: list[dict], picked: list[int]):
    """The ImageRecord of each picked test_scores row. Rows are in test order; a file that holds
    several images (an .npz, a volume) appears once per image, so its k-th row is its k-th image."""
    from .data import ImageRecord

    test = []
    if split_csv is not None and split_csv.is_file():
        from .splits import read_split_manifest

        test = read_split_manifest(split_csv).test
    by_path: dict[str, list] = {}
    for r in test:
        by_path.setdefault(r.path, []).append(r)
    occurrence, rows_per_path = [], {}
    for row in rows:
        occurrence.append(rows_per_path.get(row["path"], 0))
        rows_per_path[row["path"]] = occurrence[-1] + 1
    out = []
    for i in picked:
        path, k = rows[i]["path"], occurrence[i]
        recs = by_path.get(path, [])
        if len(recs) > 1:
            rec = recs[k] if k < len(recs) else None
        elif len(recs) == 1:
            rec = recs[0] if rows_per_path[path] == 1 else replace(recs[0], index=k)
        else:
            rec = ImageRecord(path, rows[i]["label"], index=k if rows_per_path[path] > 1 else None)
        out.append(rec)
    return out


def _gallery(base: Path, results: dict, n: int, device: str) -> tuple[str | None, list[str]]:
    """(data URI, notes). Notes say what could not be shown and why."""
    from .data import load_images
    from .detector import Detector

    methods = _methods(results)
    if not methods or n < 1:
        return None, []
    ref = REFERENCE_METHOD if REFERENCE_METHOD in methods else methods[0]
    ref_run = _ok_runs(results, ref)[0]
    ref_dir = base / ref_run["dir"]
    rows = read_test_scores(ref_dir / "test_scores.csv")
    order = list(np.argsort(-np.array([r["score"] for r in rows]), kind="stable"))
    most = order[:n]
    least = [i for i in reversed(order) if i not in most][:n]
    split_csv = ref_dir / "split.csv" if (ref_dir / "split.csv").is_file() else base / "split.csv"
    records = _records_for_rows(split_csv, rows, most + least)
    titles = [f"most #{k + 1}" for k in range(len(most))] + [f"least #{k + 1}" for k in range(len(least))]
    keep = [i for i, r in enumerate(records) if r is not None]
    records, titles = [records[i] for i in keep], [titles[i] for i in keep]
    picked = [(most + least)[i] for i in keep]
    notes: list[str] = []

    loaded = {}
    for m in methods:
        run = _ok_runs(results, m)[0]
        try:
            det = Detector.load(base / run["dir"] / "model", device=device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                images = load_images(records, det.preprocessing, progress=False)
            if len(images) != len(records):
                raise ScanomalyError(f"{len(records) - len(images)} gallery image(s) unreadable")
            scores, maps = det.score(images)
            healthy = det.reconstruct(images) if m == REFERENCE_METHOD else None
            loaded[m] = (images, np.asarray(scores, dtype=np.float64), np.asarray(maps, dtype=np.float32), healthy)
        except Exception as exc:  # noqa: BLE001 - one model that cannot load must not sink the report
            notes.append(f"{m}: no heatmaps ({type(exc).__name__}: {exc})")
    if not loaded:
        return None, notes + ["gallery left out: no model could score the test images"]
    scan_method = ref if ref in loaded else next(iter(loaded))
    scan_images = loaded[scan_method][0].images.numpy()
    columns = [{"title": "scan", "kind": "scan", "images": [_gray(x) for x in scan_images]}]
    if REFERENCE_METHOD in loaded and loaded[REFERENCE_METHOD][3] is not None:
        columns.append({"title": "HealthyGAN healthy", "kind": "healthy",
                        "images": [_gray(x) for x in loaded[REFERENCE_METHOD][3]]})
    for m in methods:
        if m not in loaded:
            columns.append({"title": m, "kind": "scan", "images": None})
            continue
        images, scores, maps, _ = loaded[m]
        finite = maps[np.isfinite(maps)]
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
        columns.append({"title": m, "kind": "map", "images": [_gray(x) for x in images.images.numpy()],
                        "maps": [np.nan_to_num(mp) for mp in maps], "scores": scores,
                        "vmin": vmin, "vmax": vmax if vmax > vmin else vmin + 1e-6})
    labels = {0: "normal", 1: "abnormal"}
    row_info = [{"label": f"{t}\n{labels.get(rows[i]['label'], '?')}\n{ref} {rows[i]['score']:.3g}"}
                for t, i in zip(titles, picked)]
    notes.insert(0, f"ranked by {ref}'s test scores (seed {ref_run['seed']}); each column: that method's anomaly "
                    "map over the scan (one colour scale per column), its score in the corner")
    return gallery_figure(row_info, columns), notes


# ------------------------------------------------------------------------------------------
# localisation gallery (data with pixel masks)
# ------------------------------------------------------------------------------------------
def _outline(ax, mask: np.ndarray, color: str, style: str = "solid", width: float = 0.9) -> None:
    if mask is None or not np.asarray(mask).any():
        return
    h, w = mask.shape
    ax.contour(np.arange(w) + 0.5, np.arange(h) + 0.5, np.asarray(mask, dtype=np.float32), levels=[0.5],
               colors=[color], linewidths=width, linestyles=style)


def localization_gallery_figure(galleries: dict[str, dict]) -> str:
    """galleries: {method: localization.load_gallery(...)}, all of the same test slices (matched by
    path; a method without a slice shows n/a). Column 1: the scan with the ground-truth outline;
    then per method its anomaly map over the scan (colour range: its validation maps' 1st to 99.9th
    percentile), the ground-truth outline (green) and, dashed white, the region at or above the
    validation-chosen Dice threshold."""
    methods = list(galleries)
    first = galleries[methods[0]]
    paths = [str(p) for p in first["paths"]]
    nrow, ncol = len(paths), len(methods) + 1
    fig = _figure(1.8 * ncol + 0.3, 1.8 * nrow + 0.4, dpi=90)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    index = {m: {str(p): i for i, p in enumerate(g["paths"])} for m, g in galleries.items()}
    for i, path in enumerate(paths):
        img, mask = first["images"][i].astype(np.float32), first["masks"][i]
        h, w = img.shape
        ax = axes[i, 0]
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="nearest")
        _outline(ax, mask, "lime")
        label = "lesion" if int(first["labels"][i]) == 1 else "no lesion"
        ax.set_ylabel(f"{Path(path).stem[:28]}\n{label}", fontsize=6)
        for j, m in enumerate(methods, start=1):
            ax = axes[i, j]
            g = galleries[m]
            k = index[m].get(path)
            if k is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                im = g["images"][k].astype(np.float32)
                mp = g["maps"][k].astype(np.float32)
                gt, region = g["masks"][k], g["region"][k]
                lo, hi = (float(v) for v in g["display_range"])
                hh, ww = im.shape
                ax.imshow(im, cmap="gray", vmin=0, vmax=1, extent=(0, ww, hh, 0), interpolation="nearest")
                ax.imshow(np.nan_to_num(mp), cmap="jet", alpha=0.45, vmin=lo, vmax=hi, extent=(0, ww, hh, 0),
                          interpolation="bilinear")
                _outline(ax, gt, "lime")
                thr = float(g["threshold"])
                if np.isfinite(thr):
                    pred = (mp >= thr) & region
                    _outline(ax, pred, "white", "dashed", 0.8)
                    if gt.any():
                        tp = int((pred & gt & region).sum())
                        text = f"Dice {2 * tp / (int(pred.sum()) + int((gt & region).sum())):.2f}"
                    else:
                        text = f"flagged {pred.sum() / max(1, region.sum()):.0%}"
                    ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", ha="left", fontsize=6,
                            color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
            if i == 0:
                ax.set_title(m, fontsize=8)
        if i == 0:
            axes[0, 0].set_title("scan + lesion outline", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    return _png_data_uri(fig)


def _localization_section(base: Path, results: dict) -> list[str]:
    """HTML for the localisation gallery, or [] when no run stored one."""
    from .localization import GALLERY_FILE, load_gallery

    galleries, notes = {}, []
    for m in _methods(results):
        for run in _ok_runs(results, m):
            path = base / run["dir"] / GALLERY_FILE
            if path.is_file():
                try:
                    galleries[m] = load_gallery(path)
                except Exception as exc:  # noqa: BLE001 - one unreadable file must not sink the report
                    notes.append(f"{m}: {path} unreadable ({type(exc).__name__}: {exc})")
                break
    if not galleries:
        return []
    parts = ["<h2>Where the heatmaps point: test slices with the lesion outline</h2>"]
    try:
        parts.append(f'<img alt="localization gallery" src="{localization_gallery_figure(galleries)}">')
    except Exception as exc:  # noqa: BLE001
        notes.append(f"localisation gallery left out ({type(exc).__name__}: {exc})")
    parts.append('<p class="note">Slices chosen from the masks only, never from scores (one per patient, spread '
                 "from the largest lesion to the smallest; then lesion-free slices), the same for every method; first "
                 "successful seed of each method. Green: the ground-truth lesion outline; dashed white: where the map "
                 "is at or above the Dice threshold chosen on validation (inside the head foreground); colour scale per "
                 "method from its validation maps (1st to 99.9th percentile).</p>")
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    return parts


# ------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
td.err { text-align: left; color: #a00; font-family: monospace; font-size: 0.85em; }
img { max-width: 100%; } .note { color: #555; font-size: 0.9em; } .failed { color: #a00; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list[tuple[str, bool]]], classes: list[list[str]] | None = None) -> str:
    """An HTML table; cells are (text, bold); `classes`: a CSS class per cell (row by row), or None."""
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for j, (text, bold) in enumerate(row):
            cls = f' class="{classes[i][j]}"' if classes and classes[i][j] else ""
            cells.append(f"<td{cls}>" + (f"<b>{_e(text)}</b>" if bold else _e(text)) + "</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _runs_table(results: dict) -> str:
    header = ["Method", "Seed", "Status", "AUROC", "95% CI", "AUPRC", "F1 (balanced)", "F1 (max-F1)", "Train (s)",
              "Images/s", "Peak MiB", "Folder / error"]
    rows, classes = [], []
    for r in results["runs"]:
        classes.append([""] * 11 + ["err" if r.get("error") else ""])
        m = r.get("metrics", {})
        ci = f"[{_fmt(m.get('auroc_ci_low'))}, {_fmt(m.get('auroc_ci_high'))}]" if m.get("auroc_ci_low") is not None else "-"
        rows.append([(r["method"], False), (str(r["seed"]), False),
                     (r["status"] + (" (resumed)" if r.get("resumed") else ""), False),
                     (_fmt(m.get("auroc")), False), (ci, False), (_fmt(m.get("auprc")), False),
                     (_fmt(m.get("balanced_f1")), False), (_fmt(m.get("max_f1_f1")), False),
                     (_fmt(m.get("train_seconds"), 1), False), (_fmt(m.get("scoring_images_per_second"), 1), False),
                     (_fmt(m.get("peak_rss_mib"), 0), False), (r.get("error") or r["dir"], False)])
    return _table(header, rows, classes=classes)


def _split_table(split: dict | None) -> str:
    if not split:
        return ""
    roles = [k for k in ("healthy", "healthy_holdout", "unlabeled", "val_abnormal", "val", "test", "unused") if k in split]
    names = {"healthy": "B (known healthy)", "healthy_holdout": "healthy hold-out", "unlabeled": "A (unlabeled, mixed)",
             "val_abnormal": "validation abnormals", "val": "validation", "test": "test", "unused": "unused"}
    rows = [[(names[k], False), (str(split[k]["n"]), False), (str(split[k]["normal"]), False),
             (str(split[k]["abnormal"]), False)] for k in roles]
    return _table(["Role", "Images", "Normal", "Abnormal"], rows)


def render_html(results: dict, base: Path, n_gallery: int = 4, device: str = "cpu") -> str:
    title = results.get("title", "scanomaly report")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_e(title)}</title>\n"
             f"<style>{_CSS}</style>\n</head>\n<body>", f"<h1>{_e(title)}</h1>",
             f"<p>{_e(describe_settings(results).replace('`', ''))}</p>", "<h2>Split</h2>", _split_table(results.get("split"))]
    for t, header, rows in summary_tables(results):
        parts += [f"<h2>{_e(t)}</h2>", _table(header, rows)]
    parts.append('<p class="note">Mean ± standard deviation over seeds (no ± with one seed); best per column in bold. '
                 "AUROC 95% CI: stratified bootstrap interval on the test set (bounds averaged over seeds). "
                 "Thresholds are chosen on the validation split, never on test.</p>")
    try:
        from .localization import notes_for_results

        parts += [f'<p class="note">{_e(n)}</p>' for n in notes_for_results(results)]
    except Exception:  # noqa: BLE001 - notes are a courtesy
        pass
    failed = failures(results)
    if failed:
        parts.append("<h2>Failed</h2>\n<ul>" + "".join(
            f'<li class="failed"><b>{_e(m)}</b> ({_e(seeds_text(seeds))}): {_e(error)}</li>' for m, seeds, error in failed)
            + "</ul>")
    parts += ["<h2>Runs</h2>", _runs_table(results)]

    methods = _methods(results)
    curves, hists, notes = {}, {}, []
    for m in methods:
        runs = []
        for r in _ok_runs(results, m):
            path = base / r["dir"] / "test_scores.csv"
            if path.is_file():
                runs.append((r["seed"], read_test_scores(path)))
            else:
                notes.append(f"{m} seed {r['seed']}: {path} is missing")
        if runs:
            curves[m] = runs
            first = next(r for r in _ok_runs(results, m) if r["seed"] == runs[0][0])
            hists[m] = (runs[0][1], first.get("metrics", {}).get("balanced_threshold"))
    if curves:
        parts += ["<h2>ROC curves</h2>", f'<img alt="ROC curves" src="{roc_figure(curves, results["summary"])}">',
                  '<p class="note">Test split; bold: the first seed of each method, faint: further seeds.</p>']
        parts += ["<h2>Score distributions</h2>", f'<img alt="score histograms" src="{histogram_figure(hists)}">',
                  '<p class="note">Test scores of the first seed; dashed: the balanced threshold chosen on '
                  "validation.</p>"]
    if methods and n_gallery > 0:
        parts.append("<h2>Most and least anomalous test images</h2>")
        try:
            uri, gallery_notes = _gallery(base, results, n_gallery, device)
        except Exception as exc:  # noqa: BLE001 - the rest of the report is still worth having
            uri, gallery_notes = None, [f"gallery left out ({type(exc).__name__}: {exc})"]
        if uri:
            parts.append(f'<img alt="gallery" src="{uri}">')
        parts += [f'<p class="note">{_e(n)}</p>' for n in gallery_notes]
    if methods:
        try:
            parts += _localization_section(base, results)
        except Exception as exc:  # noqa: BLE001 - the rest of the report is still worth having
            parts.append(f'<p class="note">{_e(f"localisation gallery left out ({type(exc).__name__}: {exc})")}</p>')
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def build_report(directory, out=None, n_gallery: int = 4, device: str = "cpu") -> Path:
    """Write DIR/report.html (or `out`) for a benchmark folder or a single run folder; returns its path."""
    base = Path(directory)
    results, _ = load_any(base)
    text = render_html(results, base, n_gallery=n_gallery, device=device)
    path = Path(out) if out is not None else base / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
