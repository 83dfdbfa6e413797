"""Pictures: per-image heatmap panels (matplotlib, Agg) and training sample grids (PIL, fast).

Images may be numpy arrays or torch tensors, [H, W], [1|3, H, W] or [H, W, 3], in [0, 1] or in the
model range [-1, 1] (recognised by negative values).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import ScanomalyError


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float32)


def _to_gray01(image) -> np.ndarray:
    """An image in [-1, 1] or [0, 1], gray or RGB, channel-first or -last -> [H, W] in [0, 1]."""
    a = _to_numpy(image)
    if a.ndim == 3 and a.shape[0] in (1, 3):  # channel-first, as the models use
        a = a.mean(axis=0)
    elif a.ndim == 3 and a.shape[-1] in (1, 3, 4):  # channel-last (alpha ignored)
        a = a[..., :3].mean(axis=-1)
    if a.ndim != 2:
        raise ScanomalyError(f"expected a 2-D image (or 1/3 channels), got shape {a.shape}")
    a = np.nan_to_num(a)
    if a.min() < -1e-6:
        a = (a + 1.0) / 2.0
    return np.clip(a, 0.0, 1.0)


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    pil = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((shape[1], shape[0]), Image.BILINEAR), dtype=np.float32)


# ------------------------------------------------------------------------------------------
# heatmap panel (matplotlib)
# ------------------------------------------------------------------------------------------
_FIGURES: dict = {}  # layout -> a built figure, reused: building and laying out costs more than drawing
_MAX_FIGURES = 4


def _panel_figure(names: tuple[str, ...], shape: tuple[int, int], has_title: bool, cmap: str, alpha: float, dpi: int):
    key = (names, shape, has_title, cmap, alpha, dpi)
    if key in _FIGURES:
        return _FIGURES[key]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names) + 1
    fig = Figure(figsize=(2.6 * n + 0.5, 2.9 if has_title else 2.7), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    blank = np.zeros(shape, dtype=np.float32)
    panels = []
    for ax, name in zip(axes, names):
        panels.append(ax.imshow(blank, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest"))
        ax.set_title(name, fontsize=9)
    ax = axes[-1]
    base = ax.imshow(blank, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    # the layout is computed once: lay it out for wide tick labels, formatted short ("%.3g")
    overlay = ax.imshow(blank, cmap=cmap, vmin=0.0, vmax=88888.0, alpha=alpha, interpolation="bilinear")
    ax.set_title("anomaly map", fontsize=9)
    cbar = fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.03, format="%.3g")
    cbar.ax.tick_params(labelsize=7)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    title = fig.suptitle(" ", fontsize=9) if has_title else None
    fig.tight_layout()
    if len(_FIGURES) >= _MAX_FIGURES:
        _FIGURES.pop(next(iter(_FIGURES)))
    _FIGURES[key] = (fig, panels, base, overlay, cbar, title)
    return _FIGURES[key]


def heatmap_panel(
    image,
    heatmap,
    healthy=None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.45,
    cmap: str = "jet",
    dpi: int = 100,
) -> np.ndarray:
    """scan | healthy translation (if given) | heatmap over the scan, with a colour bar.

    `vmin` / `vmax` fix the colour scale (use the same for every image of a set to compare them);
    by default the heatmap's own range. Returns an RGB uint8 array [H, W, 3]."""
    img = _to_gray01(image)
    hm = np.nan_to_num(_to_numpy(heatmap))
    if hm.ndim == 3 and hm.shape[0] == 1:
        hm = hm[0]
    if hm.ndim != 2:
        raise ScanomalyError(f"expected a 2-D heatmap, got shape {hm.shape}")
    hm = _resize(hm, img.shape)
    lo = float(hm.min()) if vmin is None else float(vmin)
    hi = float(hm.max()) if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1e-6
    arrays = [("scan", img)]
    if healthy is not None:
        arrays.append(("healthy", _resize(_to_gray01(healthy), img.shape)))
    fig, panels, base, overlay, cbar, title_artist = _panel_figure(
        tuple(n for n, _ in arrays), img.shape, bool(title), cmap, alpha, dpi)
    for artist, (_, a) in zip(panels, arrays):
        artist.set_data(a)
    base.set_data(img)
    overlay.set_data(hm)
    overlay.set_clim(lo, hi)
    cbar.solids.set_alpha(1.0)  # the scale in full colour, not faded like the overlay
    if title_artist is not None:
        title_artist.set_text(title)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3]).astype(np.uint8)


def save_heatmap_panel(path, image, heatmap, healthy=None, title: str | None = None, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(heatmap_panel(image, heatmap, healthy=healthy, title=title, **kwargs)).save(path)
    return path


# ------------------------------------------------------------------------------------------
# sample grid (PIL / numpy only: called during training)
# ------------------------------------------------------------------------------------------
VALUE_RANGES = ("auto", "signed", "unit", "max")


def _row_to01(x, value_range: str = "auto") -> np.ndarray:
    """[N, 1|3, H, W] (or [N, H, W]) -> [N, H, W, 3] in [0, 1].

    value_range: "signed" maps [-1, 1] to [0, 1]; "unit" keeps [0, 1]; "max" divides by the maximum
    (difference maps); "auto" is "signed" when there are negative values, "max" when values exceed 1,
    else "unit"."""
    a = np.nan_to_num(_to_numpy(x))
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ScanomalyError(f"a sample-grid row must be [N, 1|3, H, W], got shape {a.shape}")
    if value_range not in VALUE_RANGES:
        raise ScanomalyError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
    if value_range == "auto" and a.size:
        value_range = "signed" if a.min() < -1e-6 else ("max" if a.max() > 1.0 + 1e-6 else "unit")
    if value_range == "signed":
        a = (a + 1.0) / 2.0
    elif value_range == "max" and a.size and a.max() > 0:
        a = a / a.max()
    a = np.clip(a, 0.0, 1.0)
    if a.shape[1] == 1:
        a = np.repeat(a, 3, axis=1)
    return a.transpose(0, 2, 3, 1)


def sample_grid(rows, max_images: int = 8, pad: int = 2, label_width: int = 64) -> Image.Image:
    """A grid with one row per (name, images) or (name, images, value_range) entry (e.g. input |
    healthy | mask | difference) and one column per image; see `_row_to01` for value ranges (pass
    "signed" for model images that may lack negative values). Rows of another image size are resized
    to the first row's."""
    rows = list(rows)
    if not rows:
        raise ScanomalyError("sample_grid needs at least one row")
    arrays = []
    for row in rows:
        if len(row) not in (2, 3):
            raise ScanomalyError("a sample-grid row is (name, images) or (name, images, value_range)")
        name, x = row[0], row[1]
        arrays.append((str(name), _row_to01(x, row[2] if len(row) == 3 else "auto")[:max_images]))
    h, w = arrays[0][1].shape[1:3]
    ncol = max(len(a) for _, a in arrays)
    width = label_width + ncol * (w + pad) + pad
    height = len(arrays) * (h + pad) + pad
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, (_, a) in enumerate(arrays):
        y = pad + r * (h + pad)
        for c in range(len(a)):
            tile = a[c]
            if tile.shape[:2] != (h, w):
                tile = np.asarray(
                    Image.fromarray((tile * 255).round().astype(np.uint8)).resize((w, h), Image.BILINEAR),
                    dtype=np.float32,
                ) / 255.0
            x = label_width + pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = (tile * 255.0).round().astype(np.uint8)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for r, (name, _) in enumerate(arrays):
        draw.text((3, pad + r * (h + pad) + max(0, h // 2 - 6)), name[:10], fill=(0, 0, 0), font=font)
    return img


def save_sample_grid(path, rows, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(rows, **kwargs).save(path)
    return path
