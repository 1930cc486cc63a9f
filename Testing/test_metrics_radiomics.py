"""The paper's 102 pyradiomics features on real CT slices, parallel extraction and the feature cache."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pydicom
import pytest

from TextureStarGANCore.masks import body_mask
from TextureStarGANCore.preprocessing import PreprocessSpec, hu_to_unit
from Training.evaluation.metrics import radiomics_features as rf

EXPECTED = {"firstorder": 18, "glcm": 24, "gldm": 14, "glrlm": 16, "glszm": 16, "ngtdm": 5, "shape2D": 9}


def _hu(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _check_features(values: np.ndarray) -> None:
    names = rf.feature_names()
    assert len(names) == 102 == len(values)
    assert Counter(n.split("_")[1] for n in names) == EXPECTED
    assert all(n.startswith("original_") for n in names)
    assert np.isfinite(values).all()


def test_102_named_features_on_ct_small(ct_small_path):
    ds = pydicom.dcmread(ct_small_path)
    hu = _hu(ds)
    values = rf.slice_features(hu, float(ds.PixelSpacing[0]))
    _check_features(values)
    names = rf.feature_names()
    mean = values[names.index("original_firstorder_Mean")]
    assert mean == pytest.approx(float(hu[body_mask(hu)].mean()), rel=1e-4)  # the body mask is the ROI


def test_102_named_features_on_the_real_ge_series(real_ct_dir):
    files = sorted(
        p for p in real_ct_dir.rglob("*") if p.is_file() and not p.name.upper().startswith("LICENSE")
    )
    dss = [d for d in (pydicom.dcmread(p, force=True) for p in files) if "PixelData" in d]
    ds = sorted(dss, key=lambda d: int(d.InstanceNumber))[len(dss) // 2]
    values = rf.slice_features(_hu(ds), float(ds.PixelSpacing[0]))
    _check_features(values)
    area = values[rf.feature_names().index("original_shape2D_PixelSurface")]
    assert 5_000 < area < 40_000  # a head section in mm^2 at 0.488 mm pixels


def test_empty_slice_gives_nan_row_not_an_error():
    values = rf.slice_features(np.full((64, 64), -1024.0, np.float32))
    assert values.shape == (102,) and np.isnan(values).all()


def test_parallel_matches_serial_and_cache_round_trip(tmp_path, ct_small_path):
    ds = pydicom.dcmread(ct_small_path)
    hu = _hu(ds)
    spec = PreprocessSpec(canvas_size=128, pixel_spacing_mm=1.0)
    canvases = np.stack([hu_to_unit(hu, spec), hu_to_unit(np.flipud(hu) + 30.0, spec)])
    serial = rf.extract_features(canvases, spec.hu_window, 1.0, workers=1)
    seen = []
    parallel = rf.extract_features(
        canvases, spec.hu_window, 1.0, workers=2, progress=lambda d, t: seen.append(d)
    )
    assert np.allclose(serial, parallel, equal_nan=True)
    assert seen == [1, 2]
    assert not np.allclose(serial[0], serial[1])
    # Cache: keyed by the dataset files + parameters; rows addressed by slice id.
    root = tmp_path / "ds"
    root.mkdir()
    (root / "manifest.csv").write_text("patient,domain\n")
    (root / "preprocessing.json").write_text("{}")
    cache = rf.FeatureCache(tmp_path / "cache", root)
    table, missing = cache.get(["a:0", "a:1"])
    assert missing == [0, 1] and np.isnan(table).all()
    cache.put(["a:0", "a:1"], serial)
    again = rf.FeatureCache(tmp_path / "cache", root)
    table, missing = again.get(["a:1", "b:0"])
    assert missing == [1] and np.allclose(table[0], serial[1])
    (root / "manifest.csv").write_text("patient,domain\nchanged\n")
    assert rf.FeatureCache(tmp_path / "cache", root).key != cache.key
