"""The bundled default model: small, labelled as a simulated-data demo, loads safely, and harmonizes the
bundled sample (simulated BONE kernel) towards the smooth B30f kernel without moving the anatomy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from TextureStarGANCore.inference import Harmonizer
from TextureStarGANCore.model_file import DEFAULT_MODEL_PATH, load_model_file
from TextureStarGANCore.volume_io import read_volume

SAMPLE = Path(__file__).resolve().parents[1] / "TextureStarGANCore" / "samples" / "sim_bone_ct"


def test_default_model_is_bundled_small_trained_and_labelled() -> None:
    assert DEFAULT_MODEL_PATH.is_file(), "the bundled default model is missing"
    assert DEFAULT_MODEL_PATH.stat().st_size <= 25 * 2**20
    mf = load_model_file(DEFAULT_MODEL_PATH)
    assert mf.trained
    assert [d.name for d in mf.domains] == ["B30f", "BONE", "STANDARD"]
    assert mf.card["training"]["simulated_data"] is True
    assert "not for clinical use" in mf.card["intended_use"]
    assert mf.card["training"]["texture_loss"] is True


@pytest.fixture(scope="module")
def sample_and_result():
    vol = read_volume(SAMPLE)
    h = Harmonizer.from_checkpoint(device="cpu")
    before = vol.hu.copy()
    out = h.harmonize(vol.hu, vol.spacing, "B30f")
    np.testing.assert_array_equal(vol.hu, before)  # the input is never modified
    return vol, out


def _body(hu: np.ndarray) -> np.ndarray:
    # Soft tissue away from edges: where the kernel's noise, not anatomy, dominates the high-pass residual.
    tissue = (hu > -200) & (hu < 200)
    return ndimage.binary_erosion(tissue, iterations=4)


def test_bone_to_b30f_removes_noise_and_keeps_anatomy(sample_and_result) -> None:
    vol, out = sample_and_result
    assert out.shape == vol.hu.shape and np.isfinite(out).all()
    hf_before, hf_after, lp_diff = [], [], []
    for src, res in zip(vol.hu, out):  # noqa: B905 (shapes asserted above; runs on Python 3.9 too)
        smooth = ndimage.gaussian_filter(src, 4.0)
        mask = _body(smooth)
        assert mask.sum() > 1000
        hf_before.append((src - ndimage.gaussian_filter(src, 1.5))[mask].std())
        hf_after.append((res - ndimage.gaussian_filter(res, 1.5))[mask].std())
        lp_diff.append(np.abs(ndimage.gaussian_filter(res, 4.0) - smooth)[mask].mean())
    # BONE noise is several times B30f's: harmonizing must remove a large part of it ...
    assert np.mean(hf_after) < 0.7 * np.mean(hf_before)
    # ... while the low-pass image (anatomy, mean tissue values) stays within a few HU.
    assert np.mean(lp_diff) < 10.0


def test_bundled_filters_and_real_pair_table_are_in_the_card(tmp_path) -> None:
    """The card carries the fitted linear transfer filters (all six directions) and the real-pair
    validation table; ``--method filter`` smooths the bundled BONE sample towards B30f."""
    pytest.importorskip("tqdm", reason="the command line needs tqdm (not in Slicer's Python)")
    from TextureStarGANCore import cli

    mf = load_model_file(DEFAULT_MODEL_PATH)
    names = ["B30f", "BONE", "STANDARD"]
    assert sorted(mf.transfer_filter_pairs) == sorted((a, b) for a in names for b in names if a != b)
    assert {r["pair"] for r in mf.card["metrics"]["real_pairs"]["rows"]} == {
        "philips_brilliance16_chest_l_b_pair", "philips_ingenuity_head_phantom_ub_ya_pair"}
    out = tmp_path / "filtered.nrrd"
    args = ["harmonize", str(SAMPLE), "--target", "B30f", "--method", "filter", "--output", str(out)]
    assert cli.main(args) == 0
    src, res = read_volume(SAMPLE).hu, read_volume(out).hu
    mask = np.stack([_body(ndimage.gaussian_filter(s, 4.0)) for s in src])
    hp = [(v - ndimage.gaussian_filter(v, (0, 1.5, 1.5)))[mask].std() for v in (src, res)]
    assert hp[1] < 0.7 * hp[0]
