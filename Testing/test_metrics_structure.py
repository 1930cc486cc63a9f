"""Classical lung segmentation and the structure-preservation metric."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from TextureStarGANCore.masks import body_mask
from Training.evaluation.metrics.structure import lung_mask, mean_scores, structure_scores
from Training.simulator.phantom import ChestPhantom, random_params


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    rng = np.random.default_rng(0)
    z = np.array([0.0, 20.0])
    return ChestPhantom(random_params(rng, (0.0, 20.0)), z).slices(256, 2.0)[0]


def test_lungs_found_inside_the_body_and_outside_air_removed(chest):
    lungs = lung_mask(chest, spacing_mm=2.0)
    body = body_mask(chest)
    labels, n = ndimage.label(lungs)
    assert n == 2  # left and right lung
    assert lungs.sum() * 4.0 > 5_000  # mm^2
    assert not (lungs & ~body).any()
    assert not lungs[0].any() and not lungs[:, 0].any()  # the air around the patient is not lung
    # Vessels inside the lungs belong to the (hole-filled) lung mask.
    assert (chest[lungs] > -500).any()


def test_identity_harmonization_is_perfect(chest):
    s = structure_scores(chest, chest.copy(), spacing_mm=2.0)
    assert s.lung_pixels > 0
    assert s.lung_dice == 1.0 and s.structure_dice == 1.0 and s.structure_iou == 1.0
    assert s.ssim_lung == pytest.approx(1.0)


def test_structure_loss_is_detected(chest):
    rng = np.random.default_rng(1)
    noisy = chest + 20.0 * rng.standard_normal(chest.shape)  # kernel-like noise: structures survive
    blurred = ndimage.gaussian_filter(chest, 4.0)  # small vessels wiped out
    shifted = np.roll(chest, 6, axis=1)  # anatomy moved
    good = structure_scores(chest, noisy, 2.0)
    bad_blur = structure_scores(chest, blurred, 2.0)
    bad_shift = structure_scores(chest, shifted, 2.0)
    assert good.structure_dice > 0.8
    assert bad_blur.structure_dice < good.structure_dice
    assert bad_shift.structure_dice < good.structure_dice and bad_shift.ssim_lung < good.ssim_lung
    summary = mean_scores([good, bad_shift, structure_scores(np.full((64, 64), -1000.0), np.zeros((64, 64)))])
    assert summary["slices"] == 3 and summary["slices_with_lungs"] == 2
    assert summary["structure_dice"] == pytest.approx((good.structure_dice + bad_shift.structure_dice) / 2)


def test_no_lungs_gives_none_and_bad_shapes_raise():
    head = np.full((64, 64), -1000.0)
    head[16:48, 16:48] = 40.0
    s = structure_scores(head, head)
    assert s.lung_pixels == 0 and s.structure_dice is None
    with pytest.raises(ValueError, match="shapes differ"):
        structure_scores(head, head[:32])
    with pytest.raises(ValueError, match="2D"):
        lung_mask(np.zeros((2, 8, 8)))
