"""A local web viewer of scored scans: `scanomaly view SCORES.csv | RUN | BENCHMARK`.

The scans sorted by score with paging; each with the scan, the healthy translation and the heatmap over
the scan (opacity control); filters by label and score range; with labels, a threshold slider showing
sensitivity, specificity and the point on the ROC curve; a slice scroller for volumes; and scoring of a
dropped-in image with the source's model. Bound to 127.0.0.1 unless told otherwise; it writes only
under its working folder (a fresh temporary folder unless --workdir names one).

Needs the `viewer` extra (starlette, uvicorn).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import ScanomalyError


def _require():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ScanomalyError("the viewer needs starlette and uvicorn: pip install 'scanomaly[viewer]'") from None


def build_app(target, model=None, workdir=None, max_upload_bytes=None):
    """The Starlette app over `target` (a scores CSV, run or benchmark folder)."""
    _require()
    from .app import DEFAULT_MAX_UPLOAD_BYTES, create_app
    from .sources import find_sources

    sources = find_sources(target, model)
    return create_app(sources, workdir, max_upload_bytes or DEFAULT_MAX_UPLOAD_BYTES)


def serve(target, model=None, host: str = "127.0.0.1", port: int = 8765, workdir=None,
          max_upload_bytes: int | None = None) -> None:
    _require()
    import uvicorn

    own = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="scanomaly-view-")) if own else Path(workdir)
    try:
        app = build_app(target, model, folder, max_upload_bytes)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: serving on {host}: anyone who can reach this machine can see these scans")
        print(f"scanomaly viewer on http://{host}:{port}/ (Ctrl-C to stop)")
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)
