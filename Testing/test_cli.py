"""`ctharmonize` end to end: DICOM/NRRD/NIfTI in and out, the figure, and every bad-input case."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from model_factory import make_model_file

from TextureStarGANCore import cli
from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.inference import HarmonizationCancelled, Harmonizer
from TextureStarGANCore.preprocessing import PreprocessSpec
from TextureStarGANCore.volume_io import read_volume

TINY = ModelConfig.small(img_size=64, base_width=8, max_width=32, style_dim=16, mapping_hidden=32)
SPEC = PreprocessSpec(canvas_size=64, pixel_spacing_mm=4.0)  # 256 mm field of view


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        # iterations > 0 marks the file as trained (its weights are still random: tests only).
        "trained": make_model_file(d / "trained.safetensors", config=TINY, spec=SPEC, iterations=10),
        "untrained": make_model_file(d / "untrained.safetensors", config=TINY, spec=SPEC, iterations=0),
    }


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run(*args: str | Path) -> int:
    return cli.main([str(a) for a in args])


def nrrd_volume(path: Path, shape=(3, 80, 90), spacing=(2.0, 2.0, 3.0), dtype=np.int16, value=None) -> Path:
    rng = np.random.default_rng(0)
    vol = np.full(shape, -1000.0)
    if len(shape) == 3:
        vol[:, 15:65, 15:75] = 30.0
    vol = vol + rng.normal(0, 20, shape)
    if value is not None:
        vol = np.full(shape, value)
    img = sitk.GetImageFromArray(vol.astype(dtype))
    img.SetSpacing(spacing[: img.GetDimension()])
    sitk.WriteImage(img, str(path))
    return path


def test_real_dicom_series_in_dicom_out(real_ct_dir, models, tmp_path, capsys):
    before = digest(real_ct_dir)
    out, png = tmp_path / "harmonized", tmp_path / "compare.png"
    rc = run("harmonize", real_ct_dir, "--target", "B30f", "--source", "STANDARD", "--output", out,
             "--model", models["trained"], "--device", "cpu", "--compare-png", png)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "tilt" in err and "irregular" in err and "wrote" in err
    assert digest(real_ct_dir) == before  # the input is never modified
    src, res = read_volume(real_ct_dir), read_volume(out)
    assert res.shape == src.shape and res.dicom.stored_dtype == src.dicom.stored_dtype
    # Every slice keeps its own position and orientation: gantry tilt and both slice spacings survive.
    np.testing.assert_allclose(res.dicom.positions, src.dicom.positions, atol=1e-6)
    np.testing.assert_allclose(res.dicom.orientations, src.dicom.orientations, atol=1e-7)
    np.testing.assert_allclose(res.dicom.gaps, src.dicom.gaps, atol=1e-6)
    assert res.dicom.gantry_tilt_deg == pytest.approx(18.5) and res.dicom.irregular
    assert res.dicom.series_uid != src.dicom.series_uid
    assert not {h.SOPInstanceUID for h in res.dicom.headers} & {h.SOPInstanceUID for h in src.dicom.headers}
    for h in res.dicom.headers:
        assert list(h.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "B30f" in h.SeriesDescription
        assert h.ConvolutionKernel == "STD+" and h.PatientID == src.tags["PatientID"]
    padding = src.hu == -1500.0
    assert padding.any() and (res.hu[padding] == -1500.0).all()  # outside the scan circle: untouched
    assert np.abs(res.hu - src.hu).max() > 1  # the model did change the image
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_ct_small_in_dicom_out_with_detected_source(ct_small_path, models, tmp_path, capsys):
    out = tmp_path / "o"
    assert run("harmonize", ct_small_path, "--target", "BONE", "--output", out, "--model",
               models["trained"]) == 0
    assert "STANDARD -> BONE" in capsys.readouterr().err  # detected from GE / STANDARD tags
    files = list(out.glob("*.dcm"))
    assert len(files) == 1
    ds, orig = pydicom.dcmread(files[0]), pydicom.dcmread(ct_small_path)
    assert ds.SeriesInstanceUID != orig.SeriesInstanceUID and ds.SOPInstanceUID != orig.SOPInstanceUID
    assert "DERIVED" in ds.ImageType and "BONE" in ds.SeriesDescription
    assert ds.ImagePositionPatient == orig.ImagePositionPatient and ds.PixelSpacing == orig.PixelSpacing


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_volume_files_in_and_out(models, tmp_path, suffix):
    src = nrrd_volume(tmp_path / f"in{suffix}")
    out = tmp_path / f"out{suffix}"
    assert run("harmonize", src, "--target", "2", "--source", "BONE", "--output", out, "--model",
               models["trained"], "--batch-size", "2") == 0
    a, b = read_volume(src), read_volume(out)
    assert b.shape == a.shape and b.stored_dtype == a.stored_dtype == np.int16
    assert b.spacing == pytest.approx(a.spacing) and b.origin == pytest.approx(a.origin)


def test_overwrite_replaces_and_series_picks(ct_small_path, models, tmp_path):
    root = tmp_path / "two"
    for name, kernel in (("a", "STANDARD"), ("b", "BONE")):
        (root / name).mkdir(parents=True)
        ds = pydicom.dcmread(ct_small_path)
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.ConvolutionKernel = kernel
        ds.save_as(root / name / "x.dcm", enforce_file_format=True)
    uid = pydicom.dcmread(root / "b" / "x.dcm").SeriesInstanceUID
    out = tmp_path / "o.nrrd"
    args = ["harmonize", root, "--target", "B30f", "--output", out, "--model", models["trained"]]
    assert run(*args, "--series", uid) == 0
    first = out.read_bytes()
    assert run(*args, "--series", uid) == cli.EXIT_BAD_INPUT  # exists
    assert out.read_bytes() == first
    assert run(*args, "--series", uid, "--overwrite", "--target", "STANDARD") == 0
    assert out.read_bytes() != first
    assert read_volume(out).tags["ConvolutionKernel"] == "BONE"


def _series_folder(tmp: Path, ct_small_path: Path, **changes) -> Path:
    folder = tmp / "dcm"
    folder.mkdir()
    ds = pydicom.dcmread(ct_small_path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(folder / "a.dcm", enforce_file_format=True)
    return folder


def _two_series(tmp: Path, ct_small_path: Path) -> Path:
    folder = _series_folder(tmp, ct_small_path)
    ds = pydicom.dcmread(ct_small_path)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesDescription = "second series"
    ds.save_as(folder / "b.dcm", enforce_file_format=True)
    return folder


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _junk(tmp: Path) -> Path:
    (tmp / "junk").mkdir()
    (tmp / "junk" / "readme.txt").write_text("hello")
    return tmp / "junk"


def _nan(tmp: Path) -> Path:
    path = nrrd_volume(tmp / "nan.nrrd", dtype=np.float32)
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = np.inf
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))
    return path


def _four_d(tmp: Path) -> Path:
    vol = sitk.ReadImage(str(nrrd_volume(tmp / "v.nrrd")))
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(tmp / "4d.nrrd"))
    (tmp / "v.nrrd").unlink()
    return tmp / "4d.nrrd"


# (input maker, extra args, expected message). The default output is OUT/out.nrrd.
BAD_CASES = {
    "mr-modality": (lambda t, c: _series_folder(t, c, Modality="MR"), [], "not CT"),
    "2d": (lambda t, c: nrrd_volume(t / "flat.nrrd", shape=(80, 90)), [], "2D image"),
    "4d": (lambda t, c: _four_d(t), [], "4 dimensions"),
    "nan": (lambda t, c: _nan(t), [], "NaN/Inf"),
    "not-hu": (lambda t, c: nrrd_volume(t / "mr.nrrd", value=300), [], "does not look like CT"),
    "empty-folder": (lambda t, c: _empty(t), [], "is empty"),
    "unreadable-folder": (lambda t, c: _junk(t), [], "no readable DICOM"),
    "missing-input": (lambda t, c: t / "nope.nrrd", [], "does not exist"),
    "several-series": (_two_series, [], "2 DICOM image series"),
    "unknown-target": (lambda t, c: c, ["--target", "B70f"], "unknown domain 'B70f'"),
    "unknown-source": (lambda t, c: c, ["--source", "LUNG"], "unknown domain 'LUNG'"),
    "no-source-tags": (lambda t, c: nrrd_volume(t / "v.nrrd"), ["--source", None], "carries no DICOM tags"),
    "dicom-out-from-nrrd": (lambda t, c: nrrd_volume(t / "v.nrrd"), ["--output", "OUT/dicom_dir"],
                            "needs a DICOM input"),
    "dcm-suffix-output": (lambda t, c: c, ["--output", "OUT/x.dcm"], "series folder"),
    "existing-output": (lambda t, c: c, ["--output", "OUT/exists.nrrd"], "already exists"),
    "existing-png": (lambda t, c: c, ["--compare-png", "OUT/exists.png"], "already exists"),
    "png-suffix": (lambda t, c: c, ["--compare-png", "OUT/figure.jpg"], "ending in .png"),
    "untrained-model": (lambda t, c: c, ["--model", "UNTRAINED"], "untrained"),
    "missing-model": (lambda t, c: c, ["--model", "OUT/none.safetensors"], "not found"),
    "pickle-model": (lambda t, c: c, ["--model", "OUT/model.pt"], "pickle"),
    "no-cuda": (lambda t, c: c, ["--device", "cuda"], "no CUDA GPU"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_nonzero_with_a_clear_message_and_writes_nothing(case, models, ct_small_path,
                                                                         tmp_path, capsys):
    if case == "no-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    make, extra, message = BAD_CASES[case]
    inputs, outdir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outdir.mkdir()
    (outdir / "exists.nrrd").write_text("keep")
    (outdir / "exists.png").write_text("keep")
    with (outdir / "model.pt").open("wb") as f:
        torch.save({"w": torch.zeros(1)}, f)
    src = make(inputs, ct_small_path)
    opts = {"--target": "B30f", "--output": "OUT/out.nrrd", "--model": str(models["trained"]),
            "--source": "STANDARD"}
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        opts[key] = value
    args = ["harmonize", str(src)]
    for key, value in opts.items():
        if value is None:
            continue
        value = value.replace("OUT", str(outdir)).replace("UNTRAINED", str(models["untrained"]))
        args += [key, value]
    before_in, before_out = digest(inputs), listing(outdir)
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT, err
    assert message in err and "nothing was written" in err
    assert listing(outdir) == before_out and (outdir / "exists.nrrd").read_text() == "keep"
    assert digest(inputs) == before_in


def test_missing_default_model_message(monkeypatch, ct_small_path, tmp_path, capsys):
    monkeypatch.setattr(cli, "DEFAULT_MODEL_PATH", tmp_path / "models" / "default.safetensors")
    rc = run("harmonize", ct_small_path, "--target", "B30f", "--output", tmp_path / "o.nrrd")
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT
    assert "the default model has not been trained yet" in err and "--model" in err
    assert listing(tmp_path) == []
    assert run("info") == cli.EXIT_BAD_INPUT
    assert "has not been trained yet" in capsys.readouterr().err


def test_allow_untrained_is_accepted_for_tests(models, ct_small_path, tmp_path):
    out = tmp_path / "o.nii.gz"
    assert run("harmonize", ct_small_path, "--target", "B30f", "--output", out, "--model",
               models["untrained"], "--allow-untrained", "--fine-detail", "drop") == 0
    assert out.exists()


def test_cancel_exits_130_and_writes_nothing(models, ct_small_path, tmp_path, monkeypatch, capsys):
    def cancelled(self, *args, **kwargs):
        kwargs["cancel"].set()  # what Ctrl-C does in the main thread
        raise HarmonizationCancelled("harmonization cancelled after 0 of 1 slices")

    monkeypatch.setattr(Harmonizer, "harmonize", cancelled)
    rc = run("harmonize", ct_small_path, "--target", "B30f", "--output", tmp_path / "o.nrrd", "--model",
             models["trained"], "--compare-png", tmp_path / "c.png")
    assert rc == cli.EXIT_CANCELLED
    assert "cancelled" in capsys.readouterr().err
    assert listing(tmp_path) == []


def test_info_prints_the_model_card(models, capsys):
    assert run("info", "--model", models["untrained"]) == 0
    out = capsys.readouterr().out
    assert "untrained" in out and "B30f" in out and '"format_version": 1' in out
    assert "canvas 64 px at 4 mm" in out


def test_output_inside_the_input_folder_is_refused(real_ct_dir, models, tmp_path, capsys):
    copy = tmp_path / "series"
    shutil.copytree(real_ct_dir, copy)
    before = digest(copy)
    rc = run("harmonize", copy, "--target", "B30f", "--source", "STANDARD", "--output", copy,
             "--overwrite", "--model", models["trained"])
    assert rc == cli.EXIT_BAD_INPUT and "input" in capsys.readouterr().err
    assert digest(copy) == before


@pytest.mark.slow  # starts a Python process with torch (tens of seconds on a busy machine)
def test_ctrl_c_cancels_a_real_run_cleanly(real_ct_dir, models, tmp_path):
    """A real SIGINT while slices are being harmonized: exit 130, no output, no temporary files."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "o.nrrd"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "TextureStarGANCore.cli", "harmonize", str(real_ct_dir), "--target", "B30f",
         "--source", "STANDARD", "--output", str(out), "--model", str(models["trained"]),
         "--batch-size", "1"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until harmonizing has started
        lines.append(line)
        if "->" in line or time.monotonic() > deadline:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == cli.EXIT_CANCELLED, err
    assert "cancelled; nothing was written" in err
    assert listing(tmp_path) == []
