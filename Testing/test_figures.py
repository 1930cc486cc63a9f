"""Before/after figure: automatic ROIs land in lung and soft tissue; the PNG is written atomically."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from TextureStarGANCore.figures import LUNG_WINDOW, ROI, SOFT_TISSUE_WINDOW, choose_rois, save_comparison_png


def chest_slice(n: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] / n
    img = np.full((n, n), -1000.0)
    img[((xx - 0.5) / 0.42) ** 2 + ((yy - 0.52) / 0.3) ** 2 < 1] = 40.0
    lungs = np.zeros((n, n), bool)
    for cx in (0.32, 0.68):
        lungs |= ((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.2) ** 2 < 1
    img[lungs] = -860.0
    vessels = ndimage.binary_dilation(rng.random((n, n)) < 0.003, iterations=1) & lungs
    img[vessels] = 30.0
    img += rng.normal(0, 20, (n, n))
    img[(xx - 0.5) ** 2 + (yy - 0.5) ** 2 > 0.25] = -2000.0
    return img.astype(np.float32)


def test_automatic_rois_pick_lung_and_soft_tissue():
    img = chest_slice()
    rois = choose_rois(img, pixel_spacing=(1.4, 1.4))
    assert [r.label for r in rois] == ["1 lung", "2 soft tissue"]
    lung, soft = rois
    assert lung.window == LUNG_WINDOW and soft.window == SOFT_TISSUE_WINDOW
    assert lung.size == round(40 / 1.4)
    assert np.mean(lung.crop(img) < -500) > 0.9
    assert np.mean(np.abs(soft.crop(img)) < 150) > 0.95
    # No overlap between the boxes.
    assert (abs(lung.row - soft.row) >= lung.size) or (abs(lung.col - soft.col) >= lung.size)


def test_comparison_png_is_written_with_several_panels(tmp_path):
    before = chest_slice()
    after = ndimage.gaussian_filter(before, 1.0)
    out = save_comparison_png(tmp_path / "cmp.png", before, [after, after + 5], titles=["Before", "A", "B"],
                              pixel_spacing=(1.4, 1.4), difference=True, suptitle="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cmp.png"]  # no temporary file left


def test_bad_figure_arguments_are_refused(tmp_path):
    img = chest_slice(128)
    with pytest.raises(ValueError, match="titles"):
        save_comparison_png(tmp_path / "x.png", img, img, titles=["only one"])
    with pytest.raises(ValueError, match="does not fit"):
        save_comparison_png(tmp_path / "x.png", img, img, rois=[ROI(100, 100, 40)])
    with pytest.raises(ValueError, match="differs"):
        save_comparison_png(tmp_path / "x.png", img, img[:64])
    assert list(tmp_path.iterdir()) == []
