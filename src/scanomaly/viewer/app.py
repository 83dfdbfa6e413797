"""The viewer's web app (Starlette): one inline page and a small JSON / PNG API.

    GET  /                                  the page (HTML, CSS and script inline; nothing from the internet)
    GET  /api/sources                       the scores CSVs, their size, labels and model
    GET  /api/rows?source=&page=&per_page=&label=&min=&max=
                                            one page of rows, highest score first, filtered by label and score
    GET  /api/roc?source=                   the ROC curve and the labelled scores (threshold slider)
    GET  /api/image/{source}/{row}/{kind}.png[?slice=k]
                                            scan / healthy / heatmap of a row (slice k of its volume)
    POST /api/score?source=&filename=       the request body is an image file: its score and pictures

Uploads are capped at `max_upload_bytes` (413 past it, before or while reading), written under the
viewer's own working folder only (a random name, the suffix taken from a fixed list), read with
`io.read_image` (415 with the reader's reason when it is not an image) and deleted after scoring.

A row's volume, for the slice scroller: the slices of its NIfTI file by index, or the DICOM series it
belongs to (the source's single-frame DICOM rows in its folder with its SeriesInstanceUID), ordered along
the slice normal as `volumes.find_volumes` orders them for the Parametric Map.
"""

from __future__ import annotations

import base64
import math
import os
import uuid
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..data import ImageRecord
from ..errors import ImageReadError, ScanomalyError
from ..io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, NPZ_SUFFIXES, RASTER_SUFFIXES, describe_file, suffix_of
from ..volumes import find_volumes
from .page import PAGE
from .render import Models, Renderer
from .sources import Source

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_PER_PAGE = 200
MAX_UPLOAD_IMAGES = 512  # slices of an uploaded volume scored at most
LABEL_FILTERS = {"all": None, "normal": 0, "abnormal": 1, "unknown": -1}
NOT_DICOM_SUFFIXES = RASTER_SUFFIXES | NIFTI_SUFFIXES | NPZ_SUFFIXES


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _float_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return None
    value = float(raw)  # ValueError -> 400 in the caller
    if not math.isfinite(value):
        raise ValueError(name)
    return value


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name, "").strip()
    return default if not raw else int(raw)


def create_app(sources: list[Source], workdir, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> Starlette:
    """The app over `sources`; uploads go to `workdir`/uploads (created), nowhere else."""
    workdir = Path(workdir).resolve()
    uploads = workdir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(Models())
    from sklearn.metrics import roc_auc_score, roc_curve  # imported with the app, not on the first request

    rocs: dict[int, dict] = {}
    volumes: dict[tuple, list] = {}  # (source id, path) -> the slices of its volume, [(path, index)]
    folders: dict[int, dict] = {}  # source id -> folder -> its rows that may be DICOM series slices

    def source_of(request: Request, value=None) -> Source:
        raw = value if value is not None else request.query_params.get("source", "0")
        try:
            i = int(raw)
        except (TypeError, ValueError):
            raise LookupError(f"no source {raw!r}") from None
        if not 0 <= i < len(sources):
            raise LookupError(f"no source {raw!r}")
        return sources[i]

    def nifti_slices(row: dict) -> list:
        try:
            n = int(describe_file(row["path"])["n_images"])
        except ImageReadError:
            n = 0
        return [(row["path"], k) for k in range(n)]

    def dicom_series(source: Source, row: dict) -> None:
        """Group the source's DICOM files in the row's folder into series (headers read once per folder)."""
        if source.id not in folders:
            by_folder: dict[str, list[str]] = {}
            for r in source.rows:
                if r["index"] is None and suffix_of(r["path"]) not in NOT_DICOM_SUFFIXES:
                    by_folder.setdefault(os.path.dirname(r["path"]), []).append(r["path"])
            folders[source.id] = by_folder
        files = folders[source.id].pop(os.path.dirname(row["path"]), [])
        for vol in find_volumes([ImageRecord(p) for p in files]):
            if vol.kind == "dicom":
                series = [(p, None) for p in vol.files]
                for p in vol.files:
                    volumes[(source.id, p)] = series

    def volume_of(source: Source, row: dict) -> list:
        """The slices of the row's volume in their order, [(path, index)]; [] for an image of its own."""
        key = (source.id, row["path"])
        if key not in volumes:
            suffix = suffix_of(row["path"])
            if row["index"] is not None and suffix in NIFTI_SUFFIXES:
                volumes[key] = nifti_slices(row)
            elif row["index"] is None and suffix not in NOT_DICOM_SUFFIXES:
                dicom_series(source, row)
            volumes.setdefault(key, [])
        return volumes[key]

    async def page(request: Request):
        return HTMLResponse(PAGE)

    async def api_sources(request: Request):
        return JSONResponse([{
            "id": s.id, "name": s.name, "n": len(s.rows), "has_labels": s.has_labels,
            "has_model": s.model_dir is not None, "model": None if s.model_dir is None else str(s.model_dir),
        } for s in sources])

    async def api_rows(request: Request):
        try:
            source = source_of(request)
            page_no = _int_param(request, "page", 0)
            per_page = _int_param(request, "per_page", 20)
            lo, hi = _float_param(request, "min"), _float_param(request, "max")
        except LookupError as exc:
            return _error(404, str(exc))
        except ValueError:
            return _error(400, "page and per_page must be integers, min and max numbers")
        label = request.query_params.get("label", "all")
        if label not in LABEL_FILTERS or page_no < 0 or not 1 <= per_page <= MAX_PER_PAGE:
            return _error(400, f"label must be one of {sorted(LABEL_FILTERS)}, page >= 0, per_page 1..{MAX_PER_PAGE}")
        keep = np.ones(len(source.rows), dtype=bool)
        if LABEL_FILTERS[label] is not None:
            keep &= source.labels == LABEL_FILTERS[label]
        if lo is not None:
            keep &= source.scores >= lo
        if hi is not None:
            keep &= source.scores <= hi
        selected = np.flatnonzero(keep)  # already in descending score order
        chosen = selected[page_no * per_page : (page_no + 1) * per_page]
        rows = []
        for i in chosen.tolist():
            r = source.rows[i]
            volume = volume_of(source, r)
            rows.append({"row": i, "name": Path(r["path"]).name + ("" if r["index"] is None else f"#{r['index']}"),
                         "index": r["index"], "score": r["score"],
                         "label": {0: "normal", 1: "abnormal"}.get(r["label"], "unknown"),
                         "slices": len(volume), "slice": volume.index((r["path"], r["index"])) if volume else None})
        # the page's pictures, drawn in one batch while the browser lays the rows out and asks for them
        prefetch = BackgroundTask(renderer.prefetch, source, [(source.rows[i]["path"], source.rows[i]["index"])
                                                              for i in chosen.tolist()])
        return JSONResponse({"total": int(len(selected)), "page": page_no, "per_page": per_page, "rows": rows,
                             "has_model": source.model_dir is not None}, background=prefetch)

    async def api_roc(request: Request):
        try:
            source = source_of(request)
        except LookupError as exc:
            return _error(404, str(exc))
        if not source.has_labels:
            return JSONResponse({"has_labels": False})
        if source.id not in rocs:
            known = source.labels >= 0
            y, s = source.labels[known], source.scores[known]
            fpr, tpr, _ = roc_curve(y, s)
            rocs[source.id] = {"has_labels": True, "auroc": float(roc_auc_score(y, s)),
                               "fpr": fpr.tolist(), "tpr": tpr.tolist(), "scores": s.tolist(), "labels": y.tolist()}
        return JSONResponse(rocs[source.id])

    async def api_image(request: Request):
        kind = request.path_params["kind"]
        try:
            source = source_of(request, request.path_params["source"])
            row_no = int(request.path_params["row"])
            if not 0 <= row_no < len(source.rows):
                raise LookupError(f"no row {row_no}")
            row = source.rows[row_no]
            path, index = row["path"], row["index"]
            if "slice" in request.query_params:
                k = int(request.query_params["slice"])
                volume = volume_of(source, row)
                if not 0 <= k < len(volume):
                    raise LookupError(f"no slice {k}")
                path, index = volume[k]
        except LookupError as exc:
            return _error(404, str(exc))
        except ValueError:
            return _error(400, "row and slice must be integers")
        if kind not in ("scan", "healthy", "heatmap"):
            return _error(404, f"no picture {kind!r}")
        try:
            images = await run_in_threadpool(renderer.images, source, path, index)
        except ScanomalyError as exc:
            return _error(422, str(exc))
        if images[kind] is None:
            return _error(404, f"no {kind} picture: " + ("the source has no model" if source.model_dir is None
                                                          else "the method gives no healthy translation"))
        return Response(images[kind], media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def api_score(request: Request):
        try:
            source = source_of(request)
        except LookupError as exc:
            return _error(404, str(exc))
        if source.model_dir is None:
            return _error(400, f"{source.name} has no model to score with")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            return _error(413, f"file too large: {int(declared)} bytes, the limit is {max_upload_bytes}")
        filename = request.query_params.get("filename", "")
        suffix = suffix_of(filename)
        suffix = suffix if suffix in IMAGE_SUFFIXES else ""
        target = uploads / f"{uuid.uuid4().hex}{suffix}"
        size = 0
        try:
            with open(target, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:
                        return _error(413, f"file too large: more than {max_upload_bytes} bytes")
                    fh.write(chunk)
            if size == 0:
                return _error(400, "empty upload: drop an image file")
            return await run_in_threadpool(_score_file, source, target, filename)
        finally:
            target.unlink(missing_ok=True)

    def _score_file(source: Source, path: Path, filename: str) -> JSONResponse:
        from ..io import read_image

        try:
            arrays = read_image(path)
        except ImageReadError as exc:
            return _error(415, f"not an image this tool reads ({exc.reason}); "
                               "upload PNG, JPEG, TIFF, BMP, DICOM or NIfTI")
        arrays = arrays[:MAX_UPLOAD_IMAGES]
        drawn = [d for start in range(0, len(arrays), 64) for d in renderer.draw_batch(source, arrays[start : start + 64])]
        best = int(np.argmax([d["score"] for d in drawn]))

        def uri(data):
            return None if data is None else "data:image/png;base64," + base64.b64encode(data).decode()

        return JSONResponse({"filename": filename, "score": drawn[best]["score"], "n_images": len(drawn),
                             "scores": [d["score"] for d in drawn], "shown": best,
                             "scan": uri(drawn[best]["scan"]), "healthy": uri(drawn[best]["healthy"]),
                             "heatmap": uri(drawn[best]["heatmap"])})

    return Starlette(routes=[
        Route("/", page),
        Route("/api/sources", api_sources),
        Route("/api/rows", api_rows),
        Route("/api/roc", api_roc),
        Route("/api/image/{source}/{row}/{kind}.png", api_image),
        Route("/api/score", api_score, methods=["POST"]),
    ])
