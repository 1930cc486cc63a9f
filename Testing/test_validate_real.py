"""``python -m Training.validate_real``: pairing checks and refusals on real DICOM pairs, and the whole
run end to end on a few slices of the shared chest pair."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import SHARED

from Training.evaluation.real_pairs import PairingError, load_pair, split_slices
from Training.validate_real import main

CHEST = SHARED / "data" / "real_ct" / "philips_brilliance16_chest_l_b_pair"


@pytest.fixture(scope="module")
def chest() -> Path:
    if not CHEST.is_dir():
        pytest.skip(f"shared real CT pair missing at {CHEST} (set CTH_SHARED_DIR)")
    return CHEST


@pytest.fixture(scope="module")
def small_pair(chest, tmp_path_factory) -> tuple[Path, Path]:
    """Four slices of each series: enough for the refusals, quick to read."""
    root = tmp_path_factory.mktemp("pair")
    return _copy(chest / "L_sharp", root / "L_sharp", 4), _copy(chest / "B_smooth", root / "B_smooth", 4)


def _copy(src: Path, dst: Path, count: int = 3, edit=None) -> Path:
    """The first ``count`` slices of a series, optionally edited (the shared data are never modified)."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir())[:count]:
        if edit is None:
            shutil.copy(f, dst / f.name)
        else:
            ds = pydicom.dcmread(f)
            edit(ds)
            ds.save_as(dst / f.name)
    return dst


def test_a_real_pair_loads_with_kernels_from_the_tags(chest, tmp_path):
    pair = load_pair(_copy(chest / "L_sharp", tmp_path / "a"), _copy(chest / "B_smooth", tmp_path / "b"))
    assert pair.kernels == ("L", "B")
    assert pair.slices == 3


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4"), "FrameOfReferenceUID"),
        (lambda ds: setattr(ds, "ImagePositionPatient", [float(v) + 2.0 for v in ds.ImagePositionPatient]),
         "slice positions differ"),
        (lambda ds: setattr(ds, "PixelSpacing", [0.9, 0.9]), "pixel spacing"),
        (lambda ds: setattr(ds, "ConvolutionKernel", "L"), "nothing to convert"),
    ],
    ids=["frame-of-reference", "positions", "pixel-grid", "same-kernel"],
)
def test_pairs_that_are_not_one_acquisition_on_one_grid_are_refused(chest, tmp_path, edit, message):
    sharp = _copy(chest / "L_sharp", tmp_path / "a")
    smooth = _copy(chest / "B_smooth", tmp_path / "b", edit=edit)
    with pytest.raises(PairingError, match=message):
        load_pair(sharp, smooth)


def test_different_slice_counts_are_refused(chest, tmp_path):
    with pytest.raises(PairingError, match="different grids"):
        load_pair(_copy(chest / "L_sharp", tmp_path / "a", 3), _copy(chest / "B_smooth", tmp_path / "b", 2))


def test_slice_ranges_default_to_halves_and_must_not_overlap():
    fit, ev = split_slices(64, None, None)
    assert (fit.start, fit.stop, ev.start, ev.stop) == (0, 32, 32, 64)
    fit, ev = split_slices(10, "-2:", ":2")
    assert list(ev) == [8, 9] and list(fit) == [0, 1]
    with pytest.raises(PairingError, match="overlap"):
        split_slices(10, "4:8", "0:5")
    with pytest.raises(PairingError, match="A:B"):
        split_slices(10, "4-8", None)
    with pytest.raises(PairingError, match="selects no slices"):
        split_slices(10, "8:8", None)


def _run(chest_sharp: Path, chest_smooth: Path, out: Path, *extra: str) -> int:
    return main(["--pair", str(chest_sharp), str(chest_smooth), "--out", str(out), *extra])


def test_unknown_kernels_without_target_options_are_refused_listing_the_domains(small_pair, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _run(*small_pair, out, "--slices", "2:3", "--fit-slices", "0:2")
    err = capsys.readouterr().err
    assert rc == 2
    assert "--target-smooth" in err and "B30f" in err and "BONE" in err and "STANDARD" in err
    assert not out.exists()  # nothing written on failure


def test_bad_input_gives_a_clear_error_and_writes_nothing(small_pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(small_pair[0], tmp_path / "missing", out) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run(*small_pair, out, "--slices", "0:3") == 2
    assert "overlap" in capsys.readouterr().err
    assert _run(*small_pair, out, "--target-smooth", "B31", "--target-sharp", "BONE", "--slices", "2:3",
                "--fit-slices", "0:2") == 2
    assert "B31" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_end_to_end_on_a_few_slices_of_the_chest_pair(chest, tmp_path, capsys):
    out = tmp_path / "validation"
    rc = _run(chest / "L_sharp", chest / "B_smooth", out, "--fit-slices", "28:31", "--slices", "31:33",
              "--target-smooth", "B30f", "--target-sharp", "BONE")
    printed = capsys.readouterr().out
    assert rc == 0
    assert "beats the best baseline" in printed
    results = json.loads((out / "results.json").read_text())
    pair = results["pairs"][0]
    assert pair["fit_slices"] == [28, 31] and pair["evaluated_slices"] == [31, 33]
    down, up = pair["directions"]["sharp->smooth"], pair["directions"]["smooth->sharp"]
    assert (down["source_kernel"], down["target_kernel"]) == ("L", "B")
    assert set(down["methods"]) == {"identity", "gaussian blur", "linear filter", "model default"}
    assert set(up["methods"]) == {"identity", "linear filter", "model default"}
    m = down["methods"]
    assert m["model default"]["params"]["target_domain"] == "B30f"
    assert up["methods"]["model default"]["params"]["target_domain"] == "BONE"
    # The classical baselines do what they must on a real same-scanner pair: far better than identity.
    assert m["linear filter"]["rmse_hu"] < m["gaussian blur"]["rmse_hu"] < 0.5 * m["identity"]["rmse_hu"]
    assert m["identity"]["hp_gap_closed"] == 0.0
    assert m["linear filter"]["hp_gap_closed"] > 0.8
    assert m["gaussian blur"]["params"]["sigma_px"] > 0.5
    assert m["identity"]["edge_width_10_90_mm"] < down["target"]["edge_width_10_90_mm"]  # L is sharper
    assert m["identity"]["lung_slices"] == 2
    assert up["methods"]["linear filter"]["nps_distance"] < up["methods"]["identity"]["nps_distance"]
    assert "best_baseline" in down["verdict"]
    report = (out / "report.md").read_text()
    assert report.count("beats the best baseline") == 2
    assert "sigma_px=" in report and "max_gain=" in report
    header = (out / "table.csv").read_text().splitlines()[0]
    assert header.startswith("pair,direction,source_kernel,target_kernel,method")
    for d in ("sharp_to_smooth", "smooth_to_sharp"):
        for kind in ("images", "nps"):
            png = out / "philips_brilliance16_chest_l_b_pair" / f"{d}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
