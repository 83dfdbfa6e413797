"""viz: heatmap panels (matplotlib, Agg) and sample grids (PIL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from scanomaly.errors import ScanomalyError
from scanomaly.viz import heatmap_panel, sample_grid, save_heatmap_panel, save_sample_grid


def test_heatmap_panel_shapes():
    rng = np.random.default_rng(0)
    img, hm = rng.random((32, 32)), rng.random((8, 8))
    two = heatmap_panel(img, hm)
    three = heatmap_panel(torch.rand(1, 32, 32) * 2 - 1, torch.as_tensor(hm), healthy=rng.random((32, 32)), title="x")
    for panel in (two, three):
        assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3
    assert three.shape[1] > two.shape[1]  # one more column for the healthy translation
    assert len(np.unique(two.reshape(-1, 3), axis=0)) > 50  # colours, not a blank canvas


def test_heatmap_panel_constant_map_and_errors():
    panel = heatmap_panel(np.zeros((16, 16)), np.zeros((16, 16)), vmin=0, vmax=1)
    assert panel.shape[2] == 3
    with pytest.raises(ScanomalyError, match="2-D heatmap"):
        heatmap_panel(np.zeros((16, 16)), np.zeros((2, 3, 16, 16)))


def test_save_heatmap_panel(tmp_path):
    path = save_heatmap_panel(tmp_path / "deep" / "p.png", np.random.rand(16, 16), np.random.rand(16, 16))
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.width > im.height


def test_sample_grid_layout():
    rows = [
        ("input", torch.rand(5, 1, 16, 16) * 2 - 1),
        ("healthy", torch.rand(5, 3, 16, 16) * 2 - 1),
        ("mask", torch.rand(5, 1, 16, 16)),
        ("difference", torch.rand(5, 1, 8, 8) * 2),  # another size and above 1: resized, scaled
    ]
    grid = sample_grid(rows, pad=2, label_width=40)
    assert isinstance(grid, Image.Image) and grid.mode == "RGB"
    assert grid.size == (40 + 5 * 18 + 2, 4 * 18 + 2)
    assert sample_grid(rows, max_images=2).width < grid.width


def test_sample_grid_value_ranges():
    x = torch.full((1, 1, 4, 4), 0.5)
    a = np.asarray(sample_grid([("x", x)], label_width=0, pad=0))
    b = np.asarray(sample_grid([("x", x, "signed")], label_width=0, pad=0))
    assert a[0, 0, 0] == 128 and b[0, 0, 0] == 191  # 0.5 in [0,1] vs 0.5 in [-1,1] -> 0.75
    with pytest.raises(ScanomalyError, match="value_range"):
        sample_grid([("x", x, "log")])
    with pytest.raises(ScanomalyError, match="N, 1\\|3, H, W"):
        sample_grid([("x", torch.zeros(2, 2, 4, 4))])


def test_save_sample_grid(tmp_path):
    path = save_sample_grid(tmp_path / "g" / "s.png", [("in", np.zeros((2, 1, 8, 8)))])
    assert path.is_file()


def test_reused_figure_does_not_leak_between_panels():
    rng = np.random.default_rng(1)
    img, hm = rng.random((24, 24)), rng.random((24, 24))
    first = heatmap_panel(img, hm, title="a")
    other = heatmap_panel(rng.random((24, 24)), hm * 100, title="b")
    again = heatmap_panel(img, hm, title="a")
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
