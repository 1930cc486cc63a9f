"""The hostile-input battery of issue 13: each case on small files made here, so none can come back.

Cancellation (Ctrl-C, SIGTERM), truncated and non-finite volume files, --overwrite onto foreign folders,
implausible spacing, write failures, stale temporaries, non-axial volumes, --compare-png inside the input,
the harmonization record of an output, int32 extremes, Python API types, and the small messages.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from model_factory import make_model_file
from test_cli import SPEC, TINY, digest, listing, nrrd_volume, run

from TextureStarGANCore import cli, preprocessing, volume_io
from TextureStarGANCore.inference import Harmonizer, detect_source
from TextureStarGANCore.model_file import load_model_file
from TextureStarGANCore.volume_io import InputError, cast_clipped, read_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py
REPO = Path(cli.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model_file(tmp_path_factory.mktemp("models") / "m.safetensors", config=TINY, spec=SPEC,
                           iterations=10)


def harmonize(src: Path, out: Path, model: Path, *extra: str | Path) -> int:
    return run("harmonize", src, "--target", "B30f", "--output", out, "--model", model, "--source", "BONE",
               *extra)


def dicom_series(folder: Path, ct_small_path: Path, count: int = 3, **changes) -> Path:
    """``count`` slices of pydicom's CT_small (GE, STANDARD) 5 mm apart, as one series."""
    folder.mkdir(parents=True)
    uid = pydicom.uid.generate_uid()
    for i in range(count):
        ds = pydicom.dcmread(ct_small_path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, pydicom.uid.generate_uid(), i + 1
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [5.0 * i]
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.save_as(folder / f"s{i}.dcm", enforce_file_format=True)
    return folder


def never_called(*args, **kwargs):
    raise AssertionError("harmonization ran although the run should have been refused before it")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------------------------
# 1, 7, 13: cancellation by Ctrl-C and SIGTERM
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a real run with the bundled model on the bundled 512 x 512 sample (the repro)
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, cli.EXIT_CANCELLED), (signal.SIGTERM, 143)])
def test_signal_during_a_real_run_exits_cleanly(sig, code, tmp_path):
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "TextureStarGANCore.cli", "harmonize",
         str(REPO / "TextureStarGANCore" / "samples" / "sim_bone_ct"), "--target", "B30f",
         "--output", str(out), "--device", "cpu"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines = []
    for line in proc.stderr:  # wait until harmonizing has started
        lines.append(line)
        if "->" in line:
            break
    time.sleep(1.0)  # inside a torch convolution of the first batch
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=300)
    err = "".join(lines) + rest
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == code, err  # was -6 (abort: "terminate called without an active exception")
    assert "cancelled; nothing was written" in err and "terminate called" not in err
    assert listing(tmp_path) == []


@pytest.mark.slow  # starts Python with torch
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # -X importtime reports every import when it completes: numpy is the first module main() imports.
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "TextureStarGANCore.cli", "harmonize", str(tmp_path / "x"),
         "--target", "B30f", "--output", str(tmp_path / "o.nrrd"), "--model", str(model)],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.split("|")[-1].strip() == "numpy":
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    assert proc.returncode == cli.EXIT_CANCELLED, err
    assert "Traceback" not in err and "cancelled; nothing was written" in err


def _signal_in_batch(monkeypatch, *signals: int) -> list[int]:
    """Make the first batch of a real run send ``signals`` to this process (what Ctrl-C / kill do)."""
    batches: list[int] = []
    real = Harmonizer._batch

    def batch(self, slices, *args, **kwargs):
        batches.append(len(slices))
        if len(batches) == 1:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real(self, slices, *args, **kwargs)

    monkeypatch.setattr(Harmonizer, "_batch", batch)
    return batches


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_harmonizing_finishes_the_batch_and_stops(sig, code, model, tmp_path, monkeypatch,
                                                                  capsys):
    src = nrrd_volume(tmp_path / "in.nrrd", shape=(4, 80, 90))
    out = tmp_path / "out"
    out.mkdir()
    batches = _signal_in_batch(monkeypatch, sig)
    assert harmonize(src, out / "o.nrrd", model, "--batch-size", "1") == code
    assert "cancelled; nothing was written" in capsys.readouterr().err
    assert batches == [1] and listing(out) == []  # the batch under way finished; no further batch


def test_a_second_ctrl_c_stops_at_once(model, tmp_path, monkeypatch, capsys):
    src = nrrd_volume(tmp_path / "in.nrrd", shape=(4, 80, 90))
    _signal_in_batch(monkeypatch, signal.SIGINT, signal.SIGINT)
    assert harmonize(src, tmp_path / "o.nrrd", model) == cli.EXIT_CANCELLED
    assert "press Ctrl-C again" in capsys.readouterr().err
    assert not (tmp_path / "o.nrrd").exists()


def test_sigterm_while_writing_a_dicom_series_leaves_nothing(ct_small_path, model, tmp_path, monkeypatch):
    src = dicom_series(tmp_path / "in", ct_small_path, count=3)
    real = pydicom.dataset.Dataset.save_as
    written = []

    def save_as(ds, path, *args, **kwargs):
        real(ds, path, *args, **kwargs)
        written.append(path)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # killed half-way through the series

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", save_as)
    out = tmp_path / "out"
    assert harmonize(src, out / "series", model) == 143
    assert len(written) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no hidden .series.tmp-* folder


def test_a_later_run_removes_stale_temporaries_of_dead_runs_only(model, tmp_path):
    src = nrrd_volume(tmp_path / "in.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    stale_file = out / f".o.tmp-{dead_pid()}-0123abcd.nrrd"
    stale_file.write_bytes(b"partial")
    stale_dir = out / f".o.old-{dead_pid()}-89abcdef"
    stale_dir.mkdir()
    (stale_dir / "0001.dcm").write_bytes(b"partial")
    running = out / ".o.tmp-1-fedcba98.nrrd"  # pid 1 is alive: a writer that may still be running
    running.write_bytes(b"in progress")
    other = out / ".other.tmp-999999-0123abcd.nrrd"  # another output's: not ours to judge
    other.write_bytes(b"x")
    assert harmonize(src, out / "o.nrrd", model) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([running.name, other.name, "o.nrrd"])


# ----------------------------------------------------------------------------------------------------------
# 2, 4, 13: truncated and non-finite volume files, truncated DICOM, FIFOs
# ----------------------------------------------------------------------------------------------------------

def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("suffix, message", [(".nii", "is truncated"), (".nii.gz", "truncated or damaged"),
                                             (".mha", "truncated or damaged"), (".nrrd", "truncated")])
def test_a_truncated_volume_file_is_refused(suffix, message, model, tmp_path, capsys):
    src = tmp_path / f"in{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(nrrd_volume(tmp_path / "v.nrrd", shape=(6, 80, 90)))), str(src),
                    useCompression=suffix != ".mha")
    _truncate(src)
    assert harmonize(src, tmp_path / "o.nrrd", model) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "No such file" not in err  # MHA said "No such file or directory"
    assert not (tmp_path / "o.nrrd").exists()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_refused_in_every_format(suffix, bad, tmp_path):
    arr = np.full((3, 40, 40), -1000.0, np.float32)
    arr[:, 10:30, 10:30] = 40.0
    arr[1, 5, 5] = bad
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"v{suffix}"))
    with pytest.raises(InputError, match="1 NaN/Inf voxel"):  # NIfTI: SimpleITK reads NaN as 0
        read_volume(tmp_path / f"v{suffix}")


def test_a_truncated_dicom_file_is_called_truncated(ct_small_path, tmp_path):
    src = dicom_series(tmp_path / "in", ct_small_path, count=2)
    _truncate(src / "s1.dcm", keep=0.8)
    with pytest.raises(InputError, match="truncated") as info:
        read_volume(src)
    assert "decompress" not in str(info.value)


def read_volume_error(path: Path) -> str:
    try:
        read_volume(path)
    except InputError as exc:
        return str(exc)
    return "accepted"


def test_a_fifo_input_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "in.nrrd"
    os.mkfifo(fifo)
    result = []
    worker = threading.Thread(target=lambda: result.append(read_volume_error(fifo)), daemon=True)
    worker.start()
    worker.join(30)  # on a regression the daemon thread stays blocked and the assertion fails
    assert result and "not a regular file or a folder" in result[0]  # it hung before


def test_spacing_messages_print_plain_numbers(ct_small_path, tmp_path):
    src = dicom_series(tmp_path / "in", ct_small_path, count=1, PixelSpacing=[0.0, 0.5])
    with pytest.raises(InputError, match=r"PixelSpacing \[0, 0.5\]") as info:
        read_volume(src)
    assert "np.float64" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# 3: --overwrite replaces only a previous output
# ----------------------------------------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_holding_other_files(ct_small_path, model, tmp_path, capsys):
    src = dicom_series(tmp_path / "in", ct_small_path)
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "scan.nrrd").write_text("mine too")
    before = digest(out)
    assert harmonize(src, out, model, "--overwrite") == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "did not write" in err and "notes.txt" in err and "sub/" in err
    assert digest(out) == before and listing(out) == ["notes.txt", "sub", "sub/scan.nrrd"]


def test_overwrite_replaces_a_previous_output_series(ct_small_path, model, tmp_path):
    src = dicom_series(tmp_path / "in", ct_small_path)
    out = tmp_path / "results"
    assert harmonize(src, out, model) == 0
    first = {p.name: pydicom.dcmread(p).SeriesInstanceUID for p in out.iterdir()}
    assert harmonize(src, out, model, "--overwrite") == 0
    second = {p.name: pydicom.dcmread(p).SeriesInstanceUID for p in out.iterdir()}
    assert first.keys() == second.keys() and set(first.values()).isdisjoint(second.values())
    pydicom.dcmread(src / "s0.dcm").save_as(out / "0004.dcm")  # a DICOM file this tool did not write
    assert harmonize(src, out, model, "--overwrite") == cli.EXIT_BAD_INPUT
    assert (out / "0004.dcm").exists()


def test_output_cannot_be_the_current_folder(ct_small_path, model, tmp_path, monkeypatch, capsys):
    src = dicom_series(tmp_path / "in", ct_small_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    assert harmonize(src, ".", model, "--overwrite") == cli.EXIT_BAD_INPUT
    assert "current folder" in capsys.readouterr().err
    assert listing(work) == ["keep.txt"]


# ----------------------------------------------------------------------------------------------------------
# 5: implausible spacing; resampling cost
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing, hint", [(0.000645, "metres"), (645.0, "micrometres"), (1e-6, "")])
def test_implausible_in_plane_spacing_is_refused_at_once(spacing, hint, model, tmp_path, monkeypatch, capsys):
    src = nrrd_volume(tmp_path / "in.nrrd", spacing=(spacing, spacing, 2.0))
    monkeypatch.setattr(Harmonizer, "harmonize", never_called)
    t0 = time.perf_counter()
    assert harmonize(src, tmp_path / "o.nrrd", model) == cli.EXIT_BAD_INPUT
    assert time.perf_counter() - t0 < 10  # 1e-6 mm took 123 s per slice
    err = capsys.readouterr().err
    assert "in-plane pixel spacing" in err and f"{spacing:g} mm" in err and hint in err


def test_python_api_refuses_implausible_spacing(model):
    harmonizer = Harmonizer(load_model_file(model), device="cpu")
    vol = np.full((2, 40, 40), -1000.0, np.float32)
    vol[:, 10:30, 10:30] = 40.0
    with pytest.raises(ValueError, match="looks like metres"):
        harmonizer.harmonize(vol, (0.0007, 0.0007, 2.0), "B30f")


def test_resampling_cost_does_not_grow_with_the_spacing_ratio():
    spec = preprocessing.PreprocessSpec(canvas_size=64, pixel_spacing_mm=1.0)
    x = np.full((1, 128, 128), -1000.0, np.float32)
    for spacing in (1e-4, 1e-6, 1e-9):  # 1e-4 took 1.6 s, 1e-6 about 160 s (a loop over 6 sigma offsets)
        preprocessing._MATRIX_CACHE.clear()
        t0 = time.perf_counter()
        canvas, _ = preprocessing.to_canvas(x, (spacing, spacing), spec)
        assert time.perf_counter() - t0 < 3 and np.isfinite(canvas).all()


def test_blur_matrix_folding_matches_the_direct_sum():
    """The folded blur equals the sum over mirrored offsets it replaces (and is a weighted average)."""
    for n, sigma in ((2, 0.5), (5, 0.7), (20, 3.0), (7, 30.0)):
        radius = int(np.ceil(3 * sigma))
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel /= kernel.sum()
        expected = np.zeros((n, n))
        period = 2 * (n - 1)
        for i in range(n):
            for off, w in zip(offsets, kernel):  # noqa: B905 - same length by construction
                j = (i + off) % period
                expected[i, period - j if j >= n else j] += w
        got = preprocessing._blur_matrix(n, sigma).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-12)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# 6: write failures
# ----------------------------------------------------------------------------------------------------------

def test_an_unwritable_output_folder_is_refused_before_computing(model, tmp_path, monkeypatch, capsys):
    src = nrrd_volume(tmp_path / "in.nrrd")
    monkeypatch.setattr(Harmonizer, "harmonize", never_called)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")  # a read-only folder (root ignores modes)

    monkeypatch.setattr(volume_io.tempfile, "mkstemp", refuse)
    assert harmonize(src, tmp_path / "o.nrrd", model) == cli.EXIT_BAD_INPUT
    assert "cannot write in" in capsys.readouterr().err and not (tmp_path / "o.nrrd").exists()


def test_a_full_disk_is_refused_before_computing(model, tmp_path, monkeypatch, capsys):
    src = nrrd_volume(tmp_path / "in.nrrd")
    monkeypatch.setattr(Harmonizer, "harmonize", never_called)
    monkeypatch.setattr(volume_io.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    assert harmonize(src, tmp_path / "o.nrrd", model) == cli.EXIT_BAD_INPUT
    assert "not enough free space" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd"]


def test_a_failed_write_is_a_clear_error_with_nothing_left(model, tmp_path, monkeypatch, capsys):
    src = nrrd_volume(tmp_path / "in.nrrd")

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"half a volume")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(volume_io, "_write_sitk", disk_full)
    out = tmp_path / "out" / "o.nrrd"
    assert harmonize(src, out, model, "--compare-png", tmp_path / "c.png") == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd"]  # no volume, figure or folder


def test_a_figure_that_cannot_be_written_leaves_no_volume(model, tmp_path, monkeypatch, capsys):
    src = nrrd_volume(tmp_path / "in.nrrd")
    import TextureStarGANCore.figures as figures

    def broken(path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(figures, "save_comparison_png", broken)
    assert harmonize(src, tmp_path / "o.nrrd", model, "--compare-png", tmp_path / "c.png") == 2
    assert "Input/output error" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd"]


# ----------------------------------------------------------------------------------------------------------
# 8: sagittal, coronal and oblique volumes
# ----------------------------------------------------------------------------------------------------------

def _axial_volume() -> np.ndarray:
    rng = np.random.default_rng(1)
    vol = np.full((20, 48, 40), -1000.0)
    vol[:, 8:40, 6:34] = 40.0
    return (vol + rng.normal(0, 25, vol.shape)).astype(np.int16)


def _write(path: Path, arr: np.ndarray, spacing, direction) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetDirection([float(v) for v in np.asarray(direction, dtype=float).T.ravel()])
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_non_axial_volumes_are_harmonized_in_the_axial_plane(plane, model, tmp_path, capsys):
    axial = _axial_volume()  # (z, y, x): 20 slices of 48 x 40
    sx, sy, sz = 0.8, 0.7, 2.5
    ref = _write(tmp_path / "axial.nrrd", axial, (sx, sy, sz), np.eye(3))
    if plane == "sagittal":  # slices along x; rows head to foot; columns anterior to posterior
        arr = axial.transpose(2, 0, 1)[:, ::-1, :]
        axes = ([0, 1, 0], [0, 0, -1], [1, 0, 0])
        spacing = (sy, sz, sx)
    else:  # coronal: slices along y; rows head to foot; columns right to left
        arr = axial.transpose(1, 0, 2)[:, ::-1, :]
        axes = ([1, 0, 0], [0, 0, -1], [0, 1, 0])
        spacing = (sx, sz, sy)
    src = _write(tmp_path / f"{plane}.nrrd", np.ascontiguousarray(arr), spacing, axes)
    assert harmonize(src, tmp_path / "o.nrrd", model) == 0
    assert "not axial" in capsys.readouterr().err
    assert harmonize(ref, tmp_path / "ref.nrrd", model) == 0
    out, expected = read_volume(tmp_path / "o.nrrd"), read_volume(tmp_path / "ref.nrrd")
    assert out.direction == pytest.approx(read_volume(src).direction) and out.shape == arr.shape
    back = out.hu[:, ::-1, :].transpose((1, 2, 0) if plane == "sagittal" else (1, 0, 2))
    np.testing.assert_array_equal(back, expected.hu)  # the same as harmonizing the axial volume
    assert np.abs(expected.hu - axial).max() > 1


def test_an_oblique_volume_is_refused(model, tmp_path, capsys):
    c, s = np.cos(np.radians(50)), np.sin(np.radians(50))
    src = _write(tmp_path / "oblique.nrrd", _axial_volume(), (0.8, 0.7, 2.5),
                 ([1, 0, 0], [0, c, s], [0, -s, c]))
    assert harmonize(src, tmp_path / "o.nrrd", model) == cli.EXIT_BAD_INPUT
    assert "oblique" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# 9: --compare-png inside the input folder
# ----------------------------------------------------------------------------------------------------------

def test_compare_png_inside_the_input_folder_is_refused(ct_small_path, model, tmp_path, capsys):
    src = dicom_series(tmp_path / "in", ct_small_path)
    before = digest(src)
    assert harmonize(src, tmp_path / "o.nrrd", model, "--compare-png", src / "c.png") == cli.EXIT_BAD_INPUT
    assert "input" in capsys.readouterr().err
    assert digest(src) == before and not (tmp_path / "o.nrrd").exists()


# ----------------------------------------------------------------------------------------------------------
# 10 and foreign kernels: the harmonization record
# ----------------------------------------------------------------------------------------------------------

def test_a_harmonized_series_records_it_and_is_detected_as_its_target(ct_small_path, model, tmp_path, capsys):
    src = dicom_series(tmp_path / "in", ct_small_path, ConvolutionKernel="BONE")
    out = tmp_path / "o"
    assert run("harmonize", src, "--target", "B30f", "--output", out, "--model", model) == 0
    assert "BONE -> B30f" in capsys.readouterr().err
    ds = pydicom.dcmread(sorted(out.iterdir())[0])
    assert ds.ConvolutionKernel == "BONE"  # the kernel the scanner used
    assert ds.DerivationDescription == "Harmonized by ctharmonize to B30f (kernel B30f) from BONE"
    assert ds.DerivationCodeSequence[0].CodingSchemeDesignator == "99CTHARM"
    assert "B30f" in ds.SeriesDescription and "Harmonized" in ds.ImageComments
    models_domains = load_model_file(model).domains
    assert detect_source(read_volume(out), models_domains).name == "B30f"
    assert run("harmonize", out, "--target", "STANDARD", "--output", tmp_path / "again.nrrd", "--model",
               model) == 0
    assert "B30f -> STANDARD" in capsys.readouterr().err  # was "BONE -> STANDARD"
    again = read_volume(tmp_path / "again.nrrd")
    assert again.tags["DerivationDescription"].endswith("to STANDARD (kernel STANDARD) from B30f")
    assert detect_source(again, models_domains).name == "STANDARD"


@pytest.mark.parametrize("manufacturer, kernel", [("SIEMENS", "B40f"), ("Philips", "L")])
def test_a_kernel_the_model_was_not_trained_on_is_accepted_with_a_note(manufacturer, kernel, ct_small_path,
                                                                       model, tmp_path, capsys):
    src = dicom_series(tmp_path / "in", ct_small_path, Manufacturer=manufacturer, ConvolutionKernel=kernel)
    out = tmp_path / "o"
    assert run("harmonize", src, "--target", "B30f", "--output", out, "--model", model) == 0
    err = capsys.readouterr().err
    assert f"kernel is {kernel} ({manufacturer}" in err and "not one of this model's training kernels" in err
    assert "less reliable" in err
    ds = pydicom.dcmread(sorted(out.iterdir())[0])
    assert ds.DerivationDescription.endswith(f"from kernel {kernel} (not a training kernel of the model)")
    assert ds.ConvolutionKernel == kernel


# ----------------------------------------------------------------------------------------------------------
# 11, 12: dtype extremes and Python API types
# ----------------------------------------------------------------------------------------------------------

def test_int32_extremes_do_not_wrap(model, tmp_path):
    arr = np.full((3, 40, 40), -1000, np.int32)
    arr[:, 10:30, 10:30] = 40
    arr[0, 0, 0], arr[0, 0, 1] = np.iinfo(np.int32).max, np.iinfo(np.int32).min
    src = tmp_path / "in.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(src))
    assert harmonize(src, tmp_path / "o.nrrd", model) == 0
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o.nrrd")))
    assert out.dtype == np.int32 and out[0, 0, 0] == np.iinfo(np.int32).max  # was INT32_MIN
    assert out[0, 0, 1] == np.iinfo(np.int32).min


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64, np.int16])
def test_cast_clipped_saturates_at_both_ends(dtype):
    info = np.iinfo(dtype)
    values = np.array([-1e30, float(info.min), float(info.max), 1e30, 7.4], dtype=np.float64)
    got = cast_clipped(values, dtype)
    assert got.dtype == dtype and got[0] == got[1] == info.min and got[4] == 7
    # The top saturates (float64 cannot hold 2**63 - 1 exactly: the next float below it) and never wraps.
    assert got[3] == got[2] and info.max - 2048 <= int(got[2]) <= info.max
    assert cast_clipped(np.float32([np.iinfo(np.int32).max]), np.int32)[0] == np.iinfo(np.int32).max


@pytest.mark.parametrize("volume, message", [
    (np.zeros((2, 40, 40), np.complex64) - 1000, "complex"),
    (np.full((2, 40, 40), "-1000", dtype=object), "not numbers"),
    (np.full((2, 40, 40), "-1000"), "not numbers"),
    (np.zeros((2, 40, 40), bool), "mask"),
])
def test_python_api_refuses_arrays_that_are_not_real_numbers(volume, message, model):
    harmonizer = Harmonizer(load_model_file(model), device="cpu")
    with pytest.raises(ValueError, match=message):
        harmonizer.harmonize(volume, (0.7, 0.7, 2.0), "B30f")


def test_python_api_refuses_a_boolean_batch_size(model):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Harmonizer(load_model_file(model), device="cpu", batch_size=True)
    harmonizer = Harmonizer(load_model_file(model), device="cpu")
    vol = np.full((2, 40, 40), -1000.0, np.float32)
    vol[:, 10:30, 10:30] = 40.0
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        harmonizer.harmonize(vol, (0.7, 0.7, 2.0), "B30f", batch_size=True)
