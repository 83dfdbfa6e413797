"""Pictures for the viewer: the scan as the model saw it, its healthy translation, its anomaly map in colour.

All three are PNGs of the model's input size (the browser scales them); the map is RGBA so it can lie
over the scan with any opacity. Without a model only the scan is drawn (cropped and resized the same way).
The map's colours use one scale per source: the run's `<scores>_heatmap_scale.json` when `score
--heatmaps` wrote one, else the first map drawn (its minimum and 99.5th percentile), kept from then on.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from ..io import read_image
from ..preprocess import Preprocessing, to_unit_range
from ..streaming import HEATMAP_PERCENTILE, saved_scale

DEFAULT_PREPROCESSING = Preprocessing(image_size=256)
COLORMAP = "inferno"


def png(array01: np.ndarray) -> bytes:
    """[H, W] gray in [0, 1] or [H, W, 4] RGBA uint8 -> PNG bytes."""
    a = np.asarray(array01)
    if a.ndim == 2:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def colour_map(values: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    lo, hi = scale
    t = np.clip((np.asarray(values, np.float64) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return (colormaps[COLORMAP](t) * 255).round().astype(np.uint8)


class Models:
    """Detectors loaded on first use, one per model folder (CPU, thread-safe)."""

    def __init__(self):
        self._models: dict[Path, object] = {}
        self._lock = threading.Lock()

    def get(self, model_dir: Path):
        from ..detector import Detector

        with self._lock:
            if model_dir not in self._models:
                self._models[model_dir] = Detector.load(model_dir, device="cpu")
            return self._models[model_dir]


class _Pending:
    """The result of a drawing in progress, for the threads that asked for it meanwhile."""

    def __init__(self):
        self._event = threading.Event()
        self._result = self._error = None

    def done(self, result) -> None:
        self._result = result
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    def wait(self):
        self._event.wait()
        if self._error is not None:
            raise self._error
        return self._result


class Renderer:
    """(source, image) -> {"scan", "healthy", "heatmap"} PNGs and the score, with a small LRU cache."""

    def __init__(self, models: Models, cache_size: int = 256):
        self.models = models
        self._cache: OrderedDict = OrderedDict()
        self._scales: dict[int, tuple[float, float]] = {}
        self._cache_size = cache_size
        self._pending: dict = {}  # key -> _Pending, while one thread draws it
        self._lock = threading.Lock()

    def scale_for(self, source, maps: np.ndarray) -> tuple[float, float]:
        with self._lock:
            if source.id not in self._scales:
                self._scales[source.id] = (saved_scale(source.csv)
                                           or (float(maps.min()), float(np.percentile(maps, HEATMAP_PERCENTILE))))
            return self._scales[source.id]

    def images(self, source, path: str, index: int | None) -> dict:
        """The pictures of one image (drawn once: a row's scan, translation and heatmap requests arrive
        together, and wait for one drawing)."""
        return self.prefetch(source, [(path, index)])[0].wait()

    def prefetch(self, source, items: list[tuple[str, int | None]]) -> list[_Pending]:
        """Draw the images of `items` not drawn or being drawn yet, in one batch through the model (a page
        of rows at once); returns what to wait on, per item. Errors are kept for whoever waits."""
        claimed, waits = [], []
        with self._lock:
            for path, index in items:
                key = (source.id, path, index)
                if key in self._cache:
                    self._cache.move_to_end(key)
                    ready = _Pending()
                    ready.done(self._cache[key])
                    waits.append(ready)
                elif key in self._pending:
                    waits.append(self._pending[key])
                else:
                    self._pending[key] = pending = _Pending()
                    claimed.append((key, path, index))
                    waits.append(pending)
        if claimed:
            self._draw_claimed(source, claimed)
        return waits

    def _draw_claimed(self, source, claimed) -> None:
        arrays, keys = [], []
        for key, path, index in claimed:
            try:
                arrays.append(read_image(path, index=index)[0])
                keys.append(key)
            except Exception as exc:  # an unreadable file: its requests get the reason
                self._finish(key, error=exc)
        try:
            drawn = self.draw_batch(source, arrays) if arrays else []
        except Exception as exc:
            for key in keys:
                self._finish(key, error=exc)
            return
        for key, pictures in zip(keys, drawn):
            self._finish(key, result=pictures)

    def _finish(self, key, result=None, error=None) -> None:
        with self._lock:
            pending = self._pending.pop(key)
            if error is None:
                self._cache[key] = result
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if error is None:
            pending.done(result)
        else:
            pending.fail(error)

    def draw(self, source, image01: np.ndarray) -> dict:
        """One decoded image -> {"scan", "healthy" (or None), "heatmap" (or None), "score" (or None)}."""
        return self.draw_batch(source, [image01])[0]

    def draw_batch(self, source, images01: list[np.ndarray]) -> list[dict]:
        if source is None or source.model_dir is None:
            return [{"scan": png(to_unit_range(DEFAULT_PREPROCESSING.apply(a)).mean(0).numpy()), "healthy": None,
                     "heatmap": None, "score": None} for a in images01]
        detector = self.models.get(source.model_dir)
        x = torch.stack([detector.preprocessing.apply(a) for a in images01])
        with torch.no_grad():
            scores, maps, healthy = detector.score_and_reconstruct(x, batch_size=len(x))
        maps = np.asarray(maps, dtype=np.float32)
        scale = self.scale_for(source, maps)
        return [{
            "scan": png(to_unit_range(x[j]).mean(0).numpy()),
            "healthy": None if healthy is None else png(to_unit_range(torch.as_tensor(healthy[j])).mean(0).numpy()),
            "heatmap": png(colour_map(maps[j], scale)),
            "score": float(np.asarray(scores)[j]),
        } for j in range(len(x))]
