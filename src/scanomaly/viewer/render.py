"""Pictures for the viewer: the scan as the model saw it, its healthy translation, its anomaly map in colour.

All three are PNGs of the model's input size (the browser scales them); the map is RGBA so it can lie
over the scan with any opacity. Without a model only the scan is drawn (cropped and resized the same way).
The map's colours use one scale per source: the run's `<scores>_heatmap_scale.json` when `score
--heatmaps` wrote one, else the first map drawn (its minimum and 99.5th percentile), kept from then on.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import read_image
from ..preprocess import Preprocessing, to_unit_range
from ..streaming import HEATMAP_PERCENTILE, heatmap_scale_path

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
    from matplotlib import colormaps

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


class Renderer:
    """(source, image) -> {"scan", "healthy", "heatmap"} PNGs and the score, with a small LRU cache."""

    def __init__(self, models: Models, cache_size: int = 256):
        self.models = models
        self._cache: OrderedDict = OrderedDict()
        self._scales: dict[int, tuple[float, float]] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def scale_for(self, source, maps: np.ndarray) -> tuple[float, float]:
        with self._lock:
            if source.id not in self._scales:
                saved = heatmap_scale_path(source.csv)
                if saved.is_file():
                    self._scales[source.id] = tuple(json.loads(saved.read_text())["heatmap_range"])
                else:
                    self._scales[source.id] = (float(maps.min()), float(np.percentile(maps, HEATMAP_PERCENTILE)))
            return self._scales[source.id]

    def images(self, source, path: str, index: int | None) -> dict:
        key = (source.id, path, index)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        arrays = read_image(path, index=index)
        out = self.draw(source, arrays[0])
        with self._lock:
            self._cache[key] = out
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def draw(self, source, image01: np.ndarray) -> dict:
        """One decoded image -> {"scan", "healthy" (or None), "heatmap" (or None), "score" (or None)}."""
        if source is None or source.model_dir is None:
            x = DEFAULT_PREPROCESSING.apply(image01)
            return {"scan": png(to_unit_range(x).mean(0).numpy()), "healthy": None, "heatmap": None, "score": None}
        detector = self.models.get(source.model_dir)
        x = detector.preprocessing.apply(image01)[None]
        with torch.no_grad():
            scores, maps, healthy = detector.score_and_reconstruct(x, batch_size=1)
        maps = np.asarray(maps, dtype=np.float32)
        return {
            "scan": png(to_unit_range(x[0]).mean(0).numpy()),
            "healthy": None if healthy is None else png(to_unit_range(torch.as_tensor(healthy[0])).mean(0).numpy()),
            "heatmap": png(colour_map(maps[0], self.scale_for(source, maps))),
            "score": float(np.asarray(scores)[0]),
        }
