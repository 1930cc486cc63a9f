"""The residual feasibility check: it starts exactly at the linear filter, learns, and scores a real pair."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED
from scipy import ndimage

from Training.diagnostics import residual_check as rc
from Training.diagnostics.residual_check import ResidualNet, apply_residual, train_residual

CHEST = SHARED / "data" / "real_ct" / "philips_brilliance16_chest_l_b_pair"


def test_the_residual_starts_at_zero_so_training_starts_at_the_filter():
    rng = np.random.default_rng(0)
    src = rng.normal(0, 50, (2, 32, 32)).astype(np.float32)
    filtered = ndimage.gaussian_filter(src, (0, 1, 1)).astype(np.float32)
    assert np.array_equal(apply_residual(ResidualNet(8, 3), src, filtered), filtered)


def test_training_learns_what_a_linear_filter_cannot():
    # Target: a median filter (edge-preserving, non-linear) of a noisy disc; input filtered by a Gaussian.
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:96, :96]
    disc = np.where((yy - 48) ** 2 + (xx - 48) ** 2 < 40**2, 40.0, -1000.0)
    src = (disc + rng.normal(0, 60, (4, 96, 96))).astype(np.float32)
    target = ndimage.median_filter(src, size=(1, 5, 5)).astype(np.float32)
    filtered = ndimage.gaussian_filter(src, (0, 1.2, 1.2)).astype(np.float32)
    _, losses = train_residual([(src, filtered, target)], steps=301, width=16, depth=4, seed=0)
    assert losses[-1] < 0.9 * losses[0]


def test_the_check_scores_identity_filter_and_residual_on_a_real_pair(chest_pair, tmp_path, capsys):
    out = tmp_path / "out"
    rc_code = rc.main(["--pair", str(chest_pair / "L_sharp"), str(chest_pair / "B_smooth"), "--out", str(out),
                       "--fit-slices", "0:3", "--slices", "60:62", "--steps", "3", "--width", "8",
                       "--depth", "3"])
    assert rc_code == 0
    res = json.loads((out / "residual_check.json").read_text())
    rows = res["rmse_hu"]
    assert set(rows) == {"identity", "linear filter", "linear filter + residual"}
    assert rows["linear filter"] < 0.5 * rows["identity"]  # L -> B is close to linear
    assert res["evaluated_slices"] == [60, 62] and res["trained_on"][0].endswith("slices 0:3")
    assert "linear filter + residual" in capsys.readouterr().out


def test_overlapping_slices_are_refused(chest_pair, tmp_path):
    code = rc.main(["--pair", str(chest_pair / "L_sharp"), str(chest_pair / "B_smooth"), "--out",
                    str(tmp_path / "o"), "--fit-slices", "0:10", "--slices", "5:12", "--steps", "1"])
    assert code == 2 and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def chest_pair():
    if not CHEST.is_dir():
        pytest.skip(f"shared real CT pair missing at {CHEST}")
    return CHEST
