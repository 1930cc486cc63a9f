"""Reading and writing CT volumes: real DICOM (tilt, irregular spacing), volume files, every refusal."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from TextureStarGANCore import volume_io
from TextureStarGANCore.fileio import atomic_output
from TextureStarGANCore.volume_io import (
    InputError,
    _standard_file_format,
    list_dicom_series,
    read_volume,
    write_volume,
)


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def real_volume(real_ct_dir):
    return read_volume(real_ct_dir)


def synthetic_hu(shape=(4, 40, 48), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[:, 8:32, 10:40] = 40.0
    return (vol + rng.normal(0, 20, shape)).round().astype(np.float32)


def write_sitk(path: Path, arr: np.ndarray, spacing=(0.8, 0.9, 2.5), **meta) -> Path:
    img = sitk.GetImageFromArray(arr)
    if img.GetDimension() == 3:
        img.SetSpacing(spacing)
        img.SetOrigin((-10.0, 5.0, 30.0))
    for k, v in meta.items():
        img.SetMetaData(k, v)
    sitk.WriteImage(img, str(path))
    return path


def copy_ct_small(ct_small_path: Path, folder: Path, count: int = 1, **changes) -> Path:
    """Copies of CT_small.dcm as a series of ``count`` slices 5 mm apart, with tag changes."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = pydicom.uid.generate_uid()
    for i in range(count):
        ds = pydicom.dcmread(ct_small_path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + 5.0 * i]
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.save_as(folder / f"slice{i:02d}.dcm", **_standard_file_format())
    return folder


# ------------------------------------------------------------------------------------------------
# Real DICOM
# ------------------------------------------------------------------------------------------------
def test_real_series_reads_sorted_in_hu_with_geometry(real_volume, real_ct_dir):
    v = real_volume
    assert v.format == "dicom" and v.shape == (28, 512, 512)
    assert v.hu.dtype == np.float32 and v.stored_dtype == np.int16
    assert v.spacing[0] == pytest.approx(0.4882812) and v.spacing[1] == pytest.approx(0.4882812)
    d = v.dicom
    assert d is not None and len(d.headers) == 28 and "PixelData" not in d.headers[0]
    assert np.all(np.diff(d.locations) > 0)  # sorted along the slice normal
    assert d.irregular
    assert d.gaps.min() == pytest.approx(1.081, abs=0.01) and d.gaps.max() == pytest.approx(7.0, abs=0.01)
    assert d.gantry_tilt_deg == pytest.approx(18.5)
    assert v.tags["ConvolutionKernel"] == "STD+" and v.tags["Modality"] == "CT"
    assert any("tilt" in n for n in v.notes) and any("irregular" in n for n in v.notes)
    # Padding (-1500 stored, slope 1, intercept 0) is kept as stored.
    assert v.hu.min() == -1500.0
    ds = pydicom.dcmread(d.files[0])
    np.testing.assert_array_equal(v.hu[0], ds.pixel_array.astype(np.float32))
    assert [s.series_uid for s in list_dicom_series(real_ct_dir)] == [v.tags["SeriesInstanceUID"]]


def test_slices_sorted_by_position_not_by_file_name(real_ct_dir, real_volume, tmp_path):
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted(real_ct_dir.glob("*.dcm"))
    for i, f in enumerate(files):
        shutil.copy(f, shuffled / f"img{(i * 7919) % 97:03d}.dcm")
    v = read_volume(shuffled)
    np.testing.assert_array_equal(v.hu, real_volume.hu)
    np.testing.assert_allclose(v.dicom.positions, real_volume.dicom.positions)


def test_dicom_round_trip_preserves_every_slice_geometry_and_tags(real_volume, real_ct_dir, tmp_path):
    before = tree_digest(real_ct_dir)
    out = tmp_path / "derived"
    hu = real_volume.hu.copy()
    hu[:, 200:220, 200:220] += 7.0
    write_volume(out, real_volume, hu, description="Harmonized to B30f (kernel B30f)")
    assert tree_digest(real_ct_dir) == before  # input untouched
    back = read_volume(out)
    np.testing.assert_array_equal(back.hu, hu)
    np.testing.assert_allclose(back.dicom.positions, real_volume.dicom.positions, atol=1e-6)
    np.testing.assert_allclose(back.dicom.orientations, real_volume.dicom.orientations, atol=1e-7)
    np.testing.assert_allclose(back.dicom.gaps, real_volume.dicom.gaps, atol=1e-6)
    old_sops = {str(h.SOPInstanceUID) for h in real_volume.dicom.headers}
    new_sops = {str(h.SOPInstanceUID) for h in back.dicom.headers}
    assert len(new_sops) == 28 and not (new_sops & old_sops)
    assert back.dicom.series_uid != real_volume.dicom.series_uid
    for old, new in zip(real_volume.dicom.headers, back.dicom.headers):  # noqa: B905 (3.9)
        assert list(new.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert list(new.ImageType)[2:] == list(old.ImageType)[2:]
        assert "B30f" in new.SeriesDescription
        assert new.SourceImageSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID
        assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
        for tag in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "GantryDetectorTilt",
                    "ConvolutionKernel", "InstanceNumber", "SliceLocation", "PixelPaddingValue",
                    "RescaleSlope", "RescaleIntercept", "WindowCenter"):
            assert new.get(tag) == old.get(tag), tag
        assert new[0x0043, 0x1064].value == old[0x0043, 0x1064].value  # a GE private tag


def test_dicom_write_clips_to_the_stored_range(ct_small_path, tmp_path):
    v = read_volume(ct_small_path)
    hu = v.hu.copy()
    hu[0, :4, :4] = 1e6  # beyond int16 after the -1024 intercept
    hu[0, 4:8, :4] = -1e6
    write_volume(tmp_path / "out", v, hu, description="clip test")
    ds = pydicom.dcmread(next((tmp_path / "out").glob("*.dcm")))
    px = ds.pixel_array
    assert px[0, 0] == 32767 and px[5, 0] == -32768
    np.testing.assert_array_equal(px[10:], (v.hu[0, 10:] + 1024).astype(np.int16))


def test_rescale_slope_intercept_and_multivalued_kernel(ct_small_path, tmp_path):
    folder = copy_ct_small(ct_small_path, tmp_path / "s", count=2, RescaleSlope="2", RescaleIntercept="-1000",
                           ConvolutionKernel=["BONE", "AXIAL"])
    v = read_volume(folder)
    stored = pydicom.dcmread(ct_small_path).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(v.hu[0], stored * 2 - 1000)
    assert v.tags["ConvolutionKernel"] == "BONE\\AXIAL"
    assert v.spacing[2] == pytest.approx(5.0)
    out = tmp_path / "o"
    write_volume(out, v, v.hu, description="x")
    np.testing.assert_array_equal(read_volume(out).hu, v.hu)


def test_ct_small_single_file(ct_small_path):
    v = read_volume(ct_small_path)
    assert v.shape == (1, 128, 128) and v.spacing[2] == pytest.approx(5.0)
    assert v.tags["ConvolutionKernel"] == "STANDARD"


# ------------------------------------------------------------------------------------------------
# Volume files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, dtype", [(".nrrd", np.int16), (".nii.gz", np.float32), (".mha", np.int16)])
def test_volume_file_round_trip_keeps_geometry_and_dtype(tmp_path, suffix, dtype):
    arr = synthetic_hu().astype(dtype)
    src = write_sitk(tmp_path / f"in{suffix}", arr)
    v = read_volume(src)
    assert v.stored_dtype == dtype and v.shape == arr.shape
    assert v.spacing == pytest.approx((0.8, 0.9, 2.5)) and v.origin == pytest.approx((-10.0, 5.0, 30.0))
    out = tmp_path / f"out{suffix}"
    write_volume(out, v, v.hu + 10.4, description="harmonized")
    back = read_volume(out)
    assert back.stored_dtype == dtype
    assert back.spacing == pytest.approx(v.spacing) and back.origin == pytest.approx(v.origin)
    expected = np.rint(v.hu + 10.4) if np.issubdtype(dtype, np.integer) else v.hu + 10.4
    np.testing.assert_allclose(back.hu, expected, atol=1e-4)


def test_dicom_to_nrrd_uses_hu_int16(ct_small_path, tmp_path):
    v = read_volume(ct_small_path)
    write_volume(tmp_path / "o.nrrd", v, v.hu, description="x")
    back = read_volume(tmp_path / "o.nrrd")
    assert back.stored_dtype == np.int16
    np.testing.assert_array_equal(back.hu, v.hu)
    assert back.tags["ConvolutionKernel"] == "STANDARD"


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------
def test_several_series_listed_and_selectable(ct_small_path, tmp_path):
    root = tmp_path / "mixed"
    copy_ct_small(ct_small_path, root / "a", count=2, SeriesDescription="soft", ConvolutionKernel="STANDARD")
    copy_ct_small(ct_small_path, root / "b", count=3, SeriesDescription="sharp", ConvolutionKernel="BONE")
    series = list_dicom_series(root)
    assert [s.num_files for s in series] == [3, 2]
    with pytest.raises(InputError) as err:
        read_volume(root)
    msg = str(err.value)
    assert "2 DICOM image series" in msg and "--series" in msg
    for s in series:
        assert s.series_uid in msg
    assert "BONE" in msg and "sharp" in msg and "3 file(s)" in msg
    picked = read_volume(root, series_uid=series[1].series_uid)
    assert picked.shape[0] == 2 and picked.tags["ConvolutionKernel"] == "STANDARD"
    assert read_volume(root, series_uid=series[0].series_uid[:-3]).shape[0] == 3  # unique prefix
    with pytest.raises(InputError, match="is not in this folder"):
        read_volume(root, series_uid="1.2.3.4")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, ct: copy_ct_small(ct, d / "mr", Modality="MR"), "not CT"),
        (lambda d, ct: (d / "empty").mkdir() or d / "empty", "is empty"),
        (lambda d, ct: _text_folder(d), "no readable DICOM"),
        (lambda d, ct: d / "missing.nrrd", "does not exist"),
        (lambda d, ct: write_sitk(d / "2d.nrrd", synthetic_hu()[0]), "2D image"),
        (lambda d, ct: _four_d(d), "4 dimensions"),
        (lambda d, ct: write_sitk(d / "rgb.nrrd", np.stack([synthetic_hu()] * 3, axis=-1)), "components"),
        (lambda d, ct: write_sitk(d / "nan.nrrd", _with_nan()), "NaN"),
        (lambda d, ct: write_sitk(d / "mr.nrrd", np.abs(synthetic_hu()) / 1000), "does not look like CT"),
        (lambda d, ct: write_sitk(d / "tagged.nrrd", synthetic_hu(), Modality="MR"), "not CT"),
        (lambda d, ct: _truncated(d), "cannot read"),
        (lambda d, ct: _duplicate_positions(d, ct), "same position"),
        (lambda d, ct: _plain_file(d), "not a DICOM file"),
    ],
)
def test_bad_inputs_raise_clear_input_errors(tmp_path, ct_small_path, make, message):
    path = make(tmp_path, ct_small_path)
    with pytest.raises(InputError, match=message):
        read_volume(path)


def _text_folder(d: Path) -> Path:
    (d / "txt").mkdir()
    (d / "txt" / "notes.txt").write_text("not dicom")
    return d / "txt"


def _four_d(d: Path) -> Path:
    vol = sitk.GetImageFromArray(synthetic_hu())
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(d / "4d.nrrd"))
    return d / "4d.nrrd"


def _with_nan() -> np.ndarray:
    arr = synthetic_hu()
    arr[1, 3, 3] = np.nan
    return arr


def _truncated(d: Path) -> Path:
    full = write_sitk(d / "full.nrrd", synthetic_hu().astype(np.int16))
    data = full.read_bytes()
    (d / "cut.nrrd").write_bytes(data[: len(data) // 2])
    return d / "cut.nrrd"


def _duplicate_positions(d: Path, ct: Path) -> Path:
    folder = copy_ct_small(ct, d / "dup", count=2, ImagePositionPatient=[0.0, 0.0, 0.0])
    return folder


def _plain_file(d: Path) -> Path:
    (d / "scan.bin").write_bytes(b"\x00" * 1000)
    return d / "scan.bin"


def test_existing_output_needs_overwrite_and_input_is_protected(ct_small_path, real_volume, real_ct_dir,
                                                                 tmp_path):
    v = read_volume(ct_small_path)
    out = tmp_path / "out.nrrd"
    out.write_text("old")
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        write_volume(out, v, v.hu, description="x")
    assert out.read_text() == "old"
    write_volume(out, v, v.hu, description="x", overwrite=True)
    assert read_volume(out).shape == v.shape
    folder = tmp_path / "dcm"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        write_volume(folder, v, v.hu, description="x")
    # --overwrite replaces only a series this module wrote: anything else in the folder is never deleted.
    with pytest.raises(InputError, match="did not write.*keep.txt"):
        write_volume(folder, v, v.hu, description="x", overwrite=True)
    assert (folder / "keep.txt").read_text() == "x"
    (folder / "keep.txt").unlink()
    write_volume(folder, v, v.hu, description="x")
    write_volume(folder, v, v.hu, description="y", overwrite=True)
    assert [read_volume(folder).dicom.headers[0].DerivationDescription] == ["y"]
    with pytest.raises(InputError, match="input"):
        write_volume(real_ct_dir / "sub", real_volume, real_volume.hu, description="x", overwrite=True)
    with pytest.raises(InputError, match="needs a DICOM input"):
        nrrd = read_volume(out)
        write_volume(tmp_path / "dicom_from_nrrd", nrrd, nrrd.hu, description="x")
    with pytest.raises(InputError, match="is not a folder"):  # missing folders are created, files are not
        write_volume(out / "such" / "o2.nrrd", v, v.hu, description="x")  # out is a file
    with pytest.raises(InputError, match="unknown output format"):
        write_volume(tmp_path / "o.png", v, v.hu, description="x")


def test_failed_write_leaves_nothing_behind(ct_small_path, tmp_path, monkeypatch):
    v = read_volume(copy_ct_small(ct_small_path, tmp_path / "in", count=3))

    def broken(folder, volume, hu, description):
        (folder / "0001.dcm").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(volume_io, "_write_dicom", broken)
    with pytest.raises(InputError, match="writing .* failed \\(disk full\\)"):
        write_volume(tmp_path / "out", v, v.hu, description="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_missing_output_folders_are_created_and_removed_again_on_failure(tmp_path):
    nested = tmp_path / "out" / "sub" / "a.nrrd"
    assert volume_io.check_output_path(nested) == "nrrd"  # a missing folder is no reason to refuse
    assert not (tmp_path / "out").exists()  # checking writes nothing
    with pytest.raises(RuntimeError), atomic_output(nested) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []  # the folders it created are gone again
    with atomic_output(nested) as tmp:
        tmp.write_text("done")
    assert nested.read_text() == "done"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        volume_io.check_output_path(tmp_path / "file" / "a.nrrd")
