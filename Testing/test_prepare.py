"""Data preparation: DICOM scan and kernel-domain grouping, patient split, canvas geometry, resume."""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from simdata import SIM_PATIENTS, SIM_SLICES, TINY_SPEC, shared_sim_tree

from TextureStarGANCore.preprocessing import PreprocessSpec
from TextureStarGANCore.volume_io import InputError
from Training.data.dicom_scan import group_domains, scan_tree
from Training.data.prepare import MANIFEST_COLUMNS, prepare
from Training.prepare import main

PATIENTS, SLICES = SIM_PATIENTS, SIM_SLICES


def _manifest(root: Path) -> list[dict]:
    with open(root / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A simulated tree plus the trouble real trees have: a broken series, an MR series, a coronal one."""
    root = tmp_path_factory.mktemp("tree") / "dicom"
    shutil.copytree(shared_sim_tree(), root)
    src = sorted((root / "SIM003-0000" / "02_BONE").glob("*.dcm"))
    for name, edit in (("BROKEN", "truncate"), ("MR", "mr"), ("CORONAL", "coronal")):
        folder = root / f"ZZ-{name}" / "s1"
        folder.mkdir(parents=True)
        uid = pydicom.uid.generate_uid(entropy_srcs=[name])
        for k, f in enumerate(src):
            ds = pydicom.dcmread(f)
            ds.PatientID = f"ZZ-{name}"
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[name, str(k)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            if edit == "mr":
                ds.Modality = "MR"
            if edit == "coronal":
                ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            ds.save_as(folder / f.name)
            if edit == "truncate" and k == 1:
                data = (folder / f.name).read_bytes()
                (folder / f.name).write_bytes(data[: len(data) - 3000])  # pixel data cut short
    (root / "ZZ-BROKEN" / "notes.txt").write_text("not DICOM")
    return root


@pytest.fixture(scope="module")
def dataset(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "dataset"
    prepare(tree, out, spec=TINY_SPEC, seed=7, workers=1)
    return out


def test_scan_groups_by_scanner_and_kernel_and_reports_skips(tree):
    records = scan_tree(tree)
    reasons = {r.patient: r.skip_reason for r in records if r.skip_reason}
    assert "not CT" in reasons["ZZ-MR"]
    assert "not axial" in reasons["ZZ-CORONAL"]
    groups = group_domains(records)
    assert [(g.domain.id, g.domain.name) for g in groups] == [(0, "B30f"), (1, "BONE"), (2, "STANDARD")]
    for g in groups:
        assert g.num_slices == PATIENTS * SLICES + (SLICES if g.domain.name == "BONE" else 0)
    # The broken series reads its headers fine; it fails only when its pixels are read (prepare skips it).
    assert "ZZ-BROKEN" in groups[1].patients
    high = group_domains(records, min_patients=PATIENTS + 2)
    assert not any(g.included for g in high) and "min-patients" in high[0].note


def test_manifest_counts_split_and_no_leakage(dataset):
    rows = _manifest(dataset)
    assert list(rows[0].keys()) == list(MANIFEST_COLUMNS)
    assert len(rows) == PATIENTS * 3 * SLICES  # the broken series is skipped, the others are all there
    split_of = defaultdict(set)
    for r in rows:
        split_of[r["patient"]].add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())  # no patient in two splits
    test = sorted(p for p, s in split_of.items() if s == {"test"})
    assert len(test) == 1 and len(split_of) == PATIENTS  # round(0.2 * 5)
    per_domain = defaultdict(int)
    for r in rows:
        per_domain[(r["domain"], r["domain_id"])] += 1
    assert per_domain == {("B30f", "0"): 15, ("BONE", "1"): 15, ("STANDARD", "2"): 15}
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["simulated"] is True and info["split"]["test_patients"] == test
    reasons = " ".join(s["reason"] for s in info["skipped"])
    assert "read error" in reasons and "not CT" in reasons and "not axial" in reasons
    report = (dataset / "domain_report.md").read_text()
    assert "| 1 | BONE | GE MEDICAL SYSTEMS LightSpeed QX/i | BONE | 5 | 5 | 15 |" in report
    assert "ZZ-BROKEN" in report
    domains = json.loads((dataset / "domains.json").read_text())["domains"]
    assert [d["name"] for d in domains] == ["B30f", "BONE", "STANDARD"]
    assert domains[1]["counts"]["slices"] == 15
    assert PreprocessSpec.from_dict(json.loads((dataset / "preprocessing.json").read_text())) == TINY_SPEC


def test_split_is_seeded_and_stratified(tree, tmp_path):
    from Training.data.prepare import split_patients

    groups = group_domains(scan_tree(tree))
    a = split_patients(groups, 0.2, seed=7)
    assert a == split_patients(groups, 0.2, seed=7)
    assert any(split_patients(groups, 0.2, seed=s) != a for s in range(1, 6))
    # ZZ-BROKEN has only BONE: its own stratum of one patient stays in train.
    assert a["ZZ-BROKEN"] == "train"


def test_canvas_geometry_and_pairing(dataset, tree):
    rows = _manifest(dataset)
    by_key = defaultdict(dict)
    for r in rows:
        arr = np.load(dataset / "arrays" / r["array"], mmap_mode="r")
        assert arr.dtype == np.float16 and arr.shape[1:] == (96, 96)
        by_key[(r["patient"], int(r["slice_index"]))][r["domain"]] = np.asarray(
            arr[int(r["row"])], np.float32
        )
    body_threshold = (-500 + 1024) / 3072 * 2 - 1
    offsets = []
    for (patient, k), imgs in by_key.items():
        masks = {d: img > body_threshold for d, img in imgs.items()}
        for d, img in imgs.items():
            assert img.min() >= -1.0 and img.max() <= 1.0
            assert img[0, 0] == pytest.approx(-1.0, abs=1e-3)  # -1024 HU background
            labels, n = ndimage.label(masks[d])
            body = labels == 1 + int(np.argmax(ndimage.sum_labels(masks[d], labels, range(1, n + 1))))
            rr, cc = np.nonzero(body)
            # Body centred on the canvas (bounding-box centre within 2 canvas pixels: 5.5 mm input pixels).
            assert abs((rr.min() + rr.max()) / 2 - 47.5) <= 2 and abs((cc.min() + cc.max()) / 2 - 47.5) <= 2
        # Paired slices line up: body centroids agree to a fraction of a canvas pixel across kernels.
        # (Before sub-pixel pairing they were off by up to ~1 pixel at this coarse scale.)
        centroids = np.array([ndimage.center_of_mass(m) for m in masks.values()])
        offsets.append(np.abs(centroids - centroids.mean(axis=0)))
        assert offsets[-1].max() < 0.5, (patient, k, centroids)
    assert np.mean(offsets) < 0.15
    # Physical scale: the area of dense tissue in mm^2 is the same on the DICOM and on the 4 mm canvas.
    for r0 in rows[:: SLICES * PATIENTS]:
        ds = pydicom.dcmread(tree / r0["source"])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        area_dicom = ((hu > -200) & (hu < 2000)).sum() * float(ds.PixelSpacing[0]) * float(ds.PixelSpacing[1])
        canvas = by_key[(r0["patient"], int(r0["slice_index"]))][r0["domain"]]
        hu_c = (canvas + 1.0) / 2.0 * 3072.0 - 1024.0
        area_canvas = ((hu_c > -200) & (hu_c < 2000)).sum() * TINY_SPEC.pixel_spacing_mm**2
        assert abs(area_canvas / area_dicom - 1.0) < 0.1, (r0["domain"], area_canvas, area_dicom)
    side = json.loads((dataset / "arrays" / rows[0]["array"].replace(".npy", ".json")).read_text())
    ds = pydicom.dcmread(tree / rows[0]["source"])
    assert side["placement"]["step_c"] == pytest.approx(
        TINY_SPEC.pixel_spacing_mm / float(ds.PixelSpacing[1])
    )


def test_resume_skips_finished_series_and_repairs_damaged(tree, dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    victim = sorted((copy / "arrays").glob("*.npy"))[0]
    before = np.load(victim).copy()
    victim.write_bytes(victim.read_bytes()[:200])  # an interrupted write
    info = prepare(tree, copy, spec=TINY_SPEC, seed=7)
    assert info["resumed_series"] == info["series"] - 1
    np.testing.assert_array_equal(np.load(victim), before)
    assert _manifest(copy) == _manifest(dataset)


def test_bad_inputs_write_nothing(tree, tmp_path, capsys):
    with pytest.raises(InputError, match="overlap"):
        prepare(tree, tree / "inside", spec=TINY_SPEC)
    assert not (tree / "inside").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(InputError, match="not a dataset"):
        prepare(tree, other, spec=TINY_SPEC)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--dicom-root", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no DICOM series" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_different_settings_refuse_to_resume(tree, dataset):
    with pytest.raises(InputError, match="different settings"):
        prepare(tree, dataset, spec=TINY_SPEC, seed=8)


def test_real_series_load_through_the_scanner(real_ct_dir, ct_small_path, tmp_path):
    root = tmp_path / "real"
    (root / "patientA").mkdir(parents=True)
    shutil.copytree(
        real_ct_dir, root / "patientA" / "series", ignore=shutil.ignore_patterns("LICENSE*", "*.txt")
    )
    (root / "patientB").mkdir()
    shutil.copy(ct_small_path, root / "patientB" / "ct_small.dcm")
    records = scan_tree(root)
    real = [r for r in records if r.num_slices == 28]
    small = [r for r in records if r.num_slices == 1]
    assert len(real) == 1 and real[0].usable
    assert real[0].kernel == "STD+" and real[0].gantry_tilt_deg == pytest.approx(18.5)
    assert small and "only 1 slice" in small[0].skip_reason
    out = tmp_path / "ds"
    info = prepare(root, out, spec=PreprocessSpec(canvas_size=256, pixel_spacing_mm=1.0))
    assert info["simulated"] is False and info["slices"] == 28
    rows = _manifest(out)
    z = np.array([float(r["z_mm"]) for r in rows])
    gaps = np.round(np.diff(z), 1)
    assert (gaps > 0).all() and len(set(gaps)) >= 2  # irregular spacing kept, slices sorted
    arr = np.load(out / "arrays" / rows[0]["array"])
    assert arr.shape == (28, 256, 256) and float(arr.max()) > 0.0
