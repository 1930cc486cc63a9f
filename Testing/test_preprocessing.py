"""Preprocessing (paper III-A) and its exact inverse: canvas geometry, HU window, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from TextureStarGANCore.preprocessing import (
    PreprocessSpec,
    body_center,
    from_canvas,
    hu_to_unit,
    make_placement,
    to_canvas,
    unit_to_hu,
)


def phantom(n: int = 3, rows: int = 151, cols: int = 173, center=(80, 95), seed: int = 0) -> np.ndarray:
    """Ellipse of soft tissue with noise and a dense insert, air around, -2000 padding in the corners."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    vol = np.full((n, rows, cols), -1000.0, dtype=np.float32)
    body = ((yy - center[0]) / (rows * 0.3)) ** 2 + ((xx - center[1]) / (cols * 0.35)) ** 2 < 1
    vol[:, body] = 40.0
    vol[:, (yy - center[0]) ** 2 + (xx - center[1]) ** 2 < 36] = 900.0
    vol += rng.normal(0, 25, vol.shape).astype(np.float32)
    vol[:, :6, :6] = -2000.0
    return vol


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec(canvas_size=128, pixel_spacing_mm=2.5, hu_window=(-1000, 1500), background_hu=-1000)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["hu_window"] == [-1000.0, 1500.0]
    with pytest.raises(ValueError, match="missing field"):
        PreprocessSpec.from_dict({"canvas_size": 64})
    with pytest.raises(ValueError, match="low < high"):
        PreprocessSpec(hu_window=(100.0, -100.0))
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        PreprocessSpec(pixel_spacing_mm=0)
    with pytest.raises(ValueError, match="unknown field"):
        PreprocessSpec.from_dict({**spec.to_dict(), "extra": 1})


def test_hu_unit_maps_window_and_clips_numpy_and_torch():
    window = (-1024.0, 2048.0)
    hu = np.array([-3000.0, -1024.0, 512.0, 2048.0, 5000.0], dtype=np.float32)
    unit = hu_to_unit(hu, window)
    np.testing.assert_allclose(unit, [-1, -1, 0, 1, 1], atol=1e-6)
    np.testing.assert_allclose(unit_to_hu(unit, window), np.clip(hu, *window), atol=1e-3)
    t = hu_to_unit(torch.from_numpy(hu), window)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), unit, atol=1e-6)


@pytest.mark.parametrize(
    "shape, spacing_xy, spec",
    [
        ((151, 173), (0.7, 0.9), PreprocessSpec(canvas_size=128, pixel_spacing_mm=2.0)),  # anisotropic, odd
        ((97, 131), (2.0, 2.0), PreprocessSpec(canvas_size=64, pixel_spacing_mm=1.0)),  # canvas finer
        ((128, 128), (1.0, 1.0), PreprocessSpec(canvas_size=64, pixel_spacing_mm=1.0)),  # canvas smaller
    ],
)
def test_identity_generator_gives_input_back(shape, spacing_xy, spec):
    vol = phantom(rows=shape[0], cols=shape[1], center=(shape[0] // 2, shape[1] // 2))
    center = body_center(vol, spacing_xy)
    canvas, placement = to_canvas(vol, spacing_xy, spec, center)
    assert canvas.shape == (vol.shape[0], spec.canvas_size, spec.canvas_size)
    assert canvas.dtype == np.float32 and canvas.min() >= -1 and canvas.max() <= 1
    back = from_canvas(canvas, placement, vol)
    assert back.shape == vol.shape and back.dtype == np.float32
    assert np.abs(back - vol).max() <= 1.0


def test_outside_canvas_and_outside_window_voxels_keep_their_values():
    vol = phantom(rows=200, cols=220, center=(100, 110))
    vol[:, 100, 110] = 3000.0  # metal, above the HU window
    spec = PreprocessSpec(canvas_size=64, pixel_spacing_mm=2.0)  # 128 mm < 200 x 1 mm: part lies outside
    canvas, p = to_canvas(vol, (1.0, 1.0), spec, body_center(vol))
    out = from_canvas(canvas + 0.1, p, vol)  # a "generator" that brightens everything by 0.1 unit
    rows = (np.arange(200) - p.row0) / p.step_r
    cols = (np.arange(220) - p.col0) / p.step_c
    inside = ((rows >= 0) & (rows <= 63))[:, None] & ((cols >= 0) & (cols <= 63))[None, :]
    in_window = (vol >= -1024) & (vol <= 2048)
    changed = inside[None] & in_window
    assert (~inside).any() and changed.any()
    np.testing.assert_array_equal(out[:, ~inside], vol[:, ~inside])
    np.testing.assert_array_equal(out[~in_window], vol[~in_window])  # padding -2000 and metal untouched
    assert out[0, 100, 110] == 3000.0
    delta = (out - vol)[changed & (vol < 1900)]
    np.testing.assert_allclose(delta, 0.1 * 3072 / 2, atol=0.5)  # +0.1 unit = +153.6 HU everywhere inside


def test_canvas_geometry_puts_a_point_where_physics_says():
    rows, cols = 120, 100
    vol = np.full((1, rows, cols), -1000.0, dtype=np.float32)
    vol[0, 30, 70] = 1000.0  # a bright point
    spacing_xy = (0.5, 0.8)  # x: 0.5 mm between columns, y: 0.8 mm between rows
    spec = PreprocessSpec(canvas_size=128, pixel_spacing_mm=0.5)
    canvas, p = to_canvas(vol, spacing_xy, spec, center=(60.0, 50.0))
    r, c = np.unravel_index(np.argmax(canvas[0]), canvas[0].shape)
    # The canvas centre (63.5, 63.5) sits on the input's (60, 50) (snapped to the grid by < 1 pixel).
    assert abs((r - 63.5) * 0.5 - (30 - 60) * 0.8) <= 0.8
    assert abs((c - 63.5) * 0.5 - (70 - 50) * 0.5) <= 0.5
    # Outside the input's field of view the canvas holds the background (-1024 HU -> -1).
    assert canvas[0, 0, 0] == pytest.approx(-1.0)


def test_matches_scipy_bilinear_when_not_downsampling():
    img = np.fromfunction(lambda r, c: 400 * np.sin(r / 7.0) * np.cos(c / 11.0), (90, 110)).astype(np.float32)
    spec = PreprocessSpec(canvas_size=128, pixel_spacing_mm=0.6)
    canvas, p = to_canvas(img[None], (0.75, 0.8), spec, center=(45.2, 54.9))
    rr = p.row0 + np.arange(128) * p.step_r
    cc = p.col0 + np.arange(128) * p.step_c
    grid_r, grid_c = np.meshgrid(rr, cc, indexing="ij")
    ref = ndimage.map_coordinates(img, [grid_r, grid_c], order=1, mode="nearest")
    inside = (grid_r >= 0) & (grid_r <= 89) & (grid_c >= 0) & (grid_c <= 109)
    np.testing.assert_allclose(canvas[0][inside], hu_to_unit(ref, spec)[inside], atol=1e-5)


def test_downsampling_is_anti_aliased():
    # A checkerboard at the input's Nyquist frequency must not alias into a pattern on a 2x coarser canvas.
    rows = cols = 128
    checker = np.where((np.add.outer(np.arange(rows), np.arange(cols)) % 2) == 0, 300.0, -300.0)
    vol = checker.astype(np.float32)[None]
    spec = PreprocessSpec(canvas_size=64, pixel_spacing_mm=2.0)
    canvas, _ = to_canvas(vol, (1.0, 1.0), spec, center=(63.5, 63.5))
    hu = unit_to_hu(canvas[0, 4:-4, 4:-4], spec)
    assert hu.std() < 0.1 * 300  # plain subsampling would give +-300 HU


def test_body_center_finds_an_off_centre_body():
    vol = phantom(rows=160, cols=200, center=(100, 70))
    r, c = body_center(vol, (1.0, 1.0))
    assert abs(r - 100) <= 2 and abs(c - 70) <= 2
    empty = np.full((2, 40, 50), -1000.0, dtype=np.float32)
    assert body_center(empty) == (19.5, 24.5)


def test_torch_tensors_stay_tensors_and_match_numpy():
    vol = phantom(rows=96, cols=80, center=(48, 40))
    spec = PreprocessSpec(canvas_size=64, pixel_spacing_mm=1.5)
    canvas_np, p = to_canvas(vol, (0.9, 0.9), spec, (48.0, 40.0))
    canvas_t, _ = to_canvas(torch.from_numpy(vol), (0.9, 0.9), spec, (48.0, 40.0))
    assert isinstance(canvas_t, torch.Tensor)
    np.testing.assert_array_equal(canvas_t.numpy(), canvas_np)
    back = from_canvas(canvas_t, p, torch.from_numpy(vol))
    assert isinstance(back, torch.Tensor)
    np.testing.assert_array_equal(back.numpy(), vol)


def test_from_canvas_rejects_mismatched_shapes():
    vol = phantom(n=2, rows=64, cols=64, center=(32, 32))
    spec = PreprocessSpec(canvas_size=64, pixel_spacing_mm=1.0)
    canvas, p = to_canvas(vol, (1.0, 1.0), spec)
    with pytest.raises(ValueError, match="canvas must be"):
        from_canvas(canvas[:1], p, vol)
    with pytest.raises(ValueError, match="original_hu"):
        from_canvas(canvas, p, vol[:, :32])


def test_unsnapped_placement_keeps_the_exact_centre_and_still_round_trips():
    vol = phantom(rows=100, cols=90, center=(50, 45))
    spec = PreprocessSpec(canvas_size=64, pixel_spacing_mm=1.5)
    snapped = make_placement((100, 90), (0.8, 0.8), spec, (50.3, 44.6))
    exact = make_placement((100, 90), (0.8, 0.8), spec, (50.3, 44.6), snap=False)
    assert snapped.row0 == round(snapped.row0) and exact.row0 != round(exact.row0)
    assert exact.row0 + 31.5 * exact.step_r == pytest.approx(50.3)
    canvas, p = to_canvas(vol, (0.8, 0.8), spec, (50.3, 44.6), snap=False)
    assert p == exact
    np.testing.assert_array_equal(from_canvas(canvas, p, vol), vol)


def test_fine_detail_follows_the_generator_when_the_canvas_is_coarser():
    # 0.5 mm input with fine noise, 1 mm canvas; a "generator" that smooths (a sharp-to-smooth kernel).
    rng = np.random.default_rng(1)
    vol = np.full((2, 200, 200), -1000.0, dtype=np.float32)
    vol[:, 30:170, 30:170] = 40.0
    vol += rng.normal(0, 60, vol.shape).astype(np.float32)
    spec = PreprocessSpec(canvas_size=128, pixel_spacing_mm=1.0)
    canvas, p = to_canvas(vol, (0.5, 0.5), spec, (99.5, 99.5))
    smoothed = ndimage.gaussian_filter(canvas, (0, 1.5, 1.5))

    def fine_noise(img: np.ndarray) -> float:
        region = img[:, 60:140, 60:140]
        return float((region - ndimage.uniform_filter(region, (1, 3, 3))).std())

    outs = {mode: from_canvas(smoothed, p, vol, fine_detail=mode) for mode in ("keep", "scaled", "drop")}
    noise = {mode: fine_noise(out) for mode, out in outs.items()}
    assert noise["drop"] < noise["scaled"] < 0.5 * noise["keep"]
    # The identity keeps every voxel with "keep" and "scaled"; "drop" returns the canvas-resolution image.
    np.testing.assert_array_equal(from_canvas(canvas, p, vol, fine_detail="keep"), vol)
    np.testing.assert_array_equal(from_canvas(canvas, p, vol, fine_detail="scaled"), vol)
    assert np.abs(from_canvas(canvas, p, vol, fine_detail="drop") - vol).max() > 10
    with pytest.raises(ValueError, match="fine_detail"):
        from_canvas(canvas, p, vol, fine_detail="sharpen")
