"""``python -m Training.validate_real``: pairing checks and refusals on real DICOM pairs, and the whole
run end to end on a few slices of the shared chest pair."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import SHARED

from Training.evaluation.metrics.clinical import NO_LUNGS_NOTE
from Training.evaluation.real_pairs import PairingError, load_pair, split_slices
from Training.validate_real import main

CHEST = SHARED / "data" / "real_ct" / "philips_brilliance16_chest_l_b_pair"
HEAD = SHARED / "data" / "real_ct" / "philips_ingenuity_head_phantom_ub_ya_pair"
PNG = b"\x89PNG\r\n\x1a\n"


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


# Model v1 (StarGAN v2, domains B30f / BONE / STANDARD): it has no domain for the pair's Philips kernels,
# which the refusal tests need; the bundled v2 model is checked on the pair in test_default_model.py.
V1 = (Path(__file__).resolve().parents[1] / "Training" / "baseline_models" / "stargan_v1" /
      "stargan_v1.safetensors")


def _run(chest_sharp: Path, chest_smooth: Path, out: Path, *extra: str) -> int:
    return main(["--pair", str(chest_sharp), str(chest_smooth), "--out", str(out), "--model", str(V1),
                 *extra])


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
    assert _run(*small_pair, out, "--target-smooth", "B30f", "--target-sharp", "B30f", "--slices", "2:3",
                "--fit-slices", "0:2") == 2
    assert "both series map to the model's domain B30f" in capsys.readouterr().err
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
    assert set(down["methods"]) == {"identity", "gaussian blur", "linear filter", "model stargan_v1"}
    assert set(up["methods"]) == {"identity", "linear filter", "model stargan_v1"}
    m = down["methods"]
    assert m["model stargan_v1"]["params"]["target_domain"] == "B30f"
    assert up["methods"]["model stargan_v1"]["params"]["target_domain"] == "BONE"
    # The classical baselines do what they must on a real same-scanner pair: far better than identity.
    assert m["linear filter"]["rmse_hu"] < m["gaussian blur"]["rmse_hu"] < 0.5 * m["identity"]["rmse_hu"]
    assert m["identity"]["hp_gap_closed"] == 0.0
    assert m["linear filter"]["hp_gap_closed"] > 0.8
    assert m["gaussian blur"]["params"]["sigma_px"] > 0.5
    assert m["identity"]["edge_width_10_90_mm"] < down["target"]["edge_width_10_90_mm"]  # L is sharper
    assert m["identity"]["lung_slices"] == 2
    assert up["methods"]["linear filter"]["nps_distance"] < up["methods"]["identity"]["nps_distance"]
    assert "best_baseline" in down["verdict"]
    # Effective transfer: the input passes everything (far from B's), the filter fitted on this pair is close.
    assert m["identity"]["transfer_gains"]["0.1"] == 1.0 and m["identity"]["transfer_low_error"] > 0.2
    assert abs(m["linear filter"]["transfer_low_error"]) < 0.05
    assert "calibrate_kernels" in down["verdict"]["model stargan_v1"]
    report = (out / "report.md").read_text()
    assert report.count("beats the best baseline") == 2
    assert "sigma_px=" in report and "max_gain=" in report and report.count("Effective transfer:") == 2
    header = (out / "table.csv").read_text().splitlines()[0]
    assert header.startswith("pair,direction,source_kernel,target_kernel,method")
    for d in ("sharp_to_smooth", "smooth_to_sharp"):
        for kind in ("images", "nps"):
            png = out / "philips_brilliance16_chest_l_b_pair" / f"{d}_{kind}.png"
            assert png.read_bytes()[:8] == PNG
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    _check_clinical(out, results, report, printed)


def _check_clinical(out: Path, results: dict, report: str, printed: str) -> None:
    """The clinical section of the chest run: lung quantities, Bland-Altman, CCC per class, PNGs."""
    assert results["clinical"] is True
    pair = results["pairs"][0]
    assert pair["seconds"]["clinical"] > 0
    for d, res in pair["directions"].items():
        clin, cs = res["clinical"], res["clinical_summary"]
        methods = list(res["methods"])
        assert clin["methods"] == methods and clin["target"] == "real target" and clin["slices"] == 2
        assert clin["lungs"]["slices_with_lungs"] == 2 and set(clin["lungs"]["bland_altman"]) == set(methods)
        assert set(clin["radiomics"]["regions"]) >= {"lung", "soft_tissue"}
        assert cs["best_baseline"] == res["verdict"]["best_baseline"] and cs["input"] == "identity"
        for m in [*methods, "real target"]:
            assert cs["methods"][m]["laa950"] is not None and cs["methods"][m]["pd15"] is not None
        for m in methods:
            assert 0 <= cs["methods"][m]["ccc_share_lung"] <= 1
            assert cs["methods"][m]["pd15_ba_mean_diff"] is not None
        stem = d.replace("->", "_to_")
        for f in ("clinical_bland_altman", "clinical_ccc_lung", "clinical_ccc_soft_tissue"):
            png = out / pair["pair"] / f"{stem}_{f}.png"
            assert png.read_bytes()[:8] == PNG
            assert f"({pair['pair']}/{png.name})" in report
    down = pair["directions"]["sharp->smooth"]["clinical_summary"]["methods"]
    # The sharp L kernel inflates the emphysema index; the fitted filter brings it back near B's.
    assert down["identity"]["laa950"] > 5 * down["real target"]["laa950"] + 1
    assert abs(down["linear filter"]["laa950_ba_mean_diff"]) < abs(down["identity"]["laa950_ba_mean_diff"])
    assert down["linear filter"]["ccc_share_soft_tissue"] > down["identity"]["ccc_share_soft_tissue"]
    assert report.count("#### Clinical quantities, ") == 2
    assert "Lung density per series" in report and "Bland-Altman per slice" in report
    assert "Radiomic reproducibility vs target" in report and "median glcm" in report
    assert "clinical, identity: %LAA-950" in printed


@pytest.mark.slow
def test_the_head_phantom_gets_the_no_lungs_note_and_ccc_only(tmp_path, capsys):
    if not HEAD.is_dir():
        pytest.skip(f"shared real CT pair missing at {HEAD} (set CTH_SHARED_DIR)")
    out = tmp_path / "head"
    rc = _run(HEAD / "YA_bone", HEAD / "UB_standard", out, "--fit-slices", "20:22", "--slices", "30:32",
              "--target-smooth", "B30f", "--target-sharp", "BONE")
    printed = capsys.readouterr().out
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    pair = results["pairs"][0]
    for d, res in pair["directions"].items():
        clin = res["clinical"]
        assert clin["lungs"] is None and NO_LUNGS_NOTE in clin["notes"]
        assert clin["radiomics"]["regions"]
        assert res["clinical_summary"]["methods"]["real target"]["laa950"] is None
        assert not (out / pair["pair"] / f"{d.replace('->', '_to_')}_clinical_bland_altman.png").exists()
        assert any(f.endswith(".png") and "_clinical_ccc_" in f for f in res["clinical_figures"])
    report = (out / "report.md").read_text()
    assert report.count(NO_LUNGS_NOTE) == 2 and "Lung density per series" not in report
    assert "Radiomic reproducibility vs target" in report
    assert f"clinical: {NO_LUNGS_NOTE}" in printed


@pytest.mark.slow
def test_no_clinical_skips_the_clinical_part(small_pair, tmp_path):
    out = tmp_path / "plain"
    assert _run(*small_pair, out, "--slices", "2:3", "--fit-slices", "0:2", "--target-smooth", "B30f",
                "--target-sharp", "BONE", "--no-clinical") == 0
    results = json.loads((out / "results.json").read_text())
    pair = results["pairs"][0]
    assert results["clinical"] is False and pair["seconds"]["clinical"] is None
    assert all("clinical" not in res for res in pair["directions"].values())
    assert not list(out.rglob("*clinical*"))
    assert "Skipped (--no-clinical)." in (out / "report.md").read_text()


def test_a_kernel_transfer_model_whose_curves_miss_is_told_to_calibrate(small_pair, tmp_path, capsys):
    """A kernel-transfer model whose transfer is the identity (log MTFs 0) loses to the blur with its curve
    far off the real B's at 0.1-0.3 cycles/mm: the report and the console say to calibrate it; model v1
    (StarGAN, no kernel curves) is never told to."""
    from model_factory import make_kernel_transfer_file

    kt = make_kernel_transfer_file(tmp_path / "kt.safetensors", iterations=10)
    out = tmp_path / "out"
    assert _run(*small_pair, out, "--compare", str(kt), "--slices", "3:4", "--fit-slices", "0:3",
                "--target-smooth", "B30f", "--target-sharp", "BONE", "--no-clinical") == 0
    printed = capsys.readouterr().out
    down = json.loads((out / "results.json").read_text())["pairs"][0]["directions"]["sharp->smooth"]
    assert down["verdict"]["model kt"]["calibrate_kernels"] is True
    assert down["methods"]["model kt"]["transfer_low_error"] > 0.5  # passes far too much
    assert down["verdict"]["model stargan_v1"]["calibrate_kernels"] is False
    line = next(x for x in printed.splitlines() if "L -> B: model kt beats" in x)
    assert "calibrate its kernels" in line
    assert not any("calibrate" in x for x in printed.splitlines() if "stargan_v1 beats" in x)
    assert "Training.calibrate_kernels --pair" in (out / "report.md").read_text()
