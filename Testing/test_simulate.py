"""Kernel simulator: phantom, FBP physics, NPS ordering, fast-path calibration, DICOM output."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from simdata import SIM_PATIENTS, SIM_SIZE, make_sim_tree, shared_sim_tree
from skimage.transform import iradon

from TextureStarGANCore.volume_io import read_volume
from Training.simulate import main as simulate_main
from Training.simulator import kernels as K
from Training.simulator.nps import measure_nps, nps_2d, radial_nps
from Training.simulator.phantom import ChestPhantom, random_params
from Training.simulator.simulate import simulate


@pytest.fixture(scope="module")
def sim_tree():
    return shared_sim_tree()


def test_phantom_anatomy_and_smooth_z():
    z = np.arange(6) * 2.5
    p = random_params(np.random.default_rng(0), (0.0, 12.5))
    vol = ChestPhantom(p, z).slices(160, 2.4)
    assert vol.shape == (6, 160, 160) and vol.dtype == np.float32
    lung = ((vol > -950) & (vol < -700)).mean()
    assert 0.05 < lung < 0.4, lung  # lungs present
    assert (vol > 500).sum() > 20  # ribs / spine cortex
    assert ((vol > -150) & (vol < -50)).mean() > 0.03  # subcutaneous fat
    # Neighbouring slices are alike (smooth anatomy), another patient is not.
    other = ChestPhantom(random_params(np.random.default_rng(1), (0.0, 12.5)), z).slices(160, 2.4)
    near = np.corrcoef(vol[2].ravel(), vol[3].ravel())[0, 1]
    far = np.corrcoef(vol[2].ravel(), other[2].ravel())[0, 1]
    assert near > 0.9 and near > far + 0.05, (near, far)
    # Seeded: same parameters, same pixels.
    again = ChestPhantom(random_params(np.random.default_rng(0), (0.0, 12.5)), z).slices(160, 2.4)
    np.testing.assert_array_equal(vol, again)


def test_custom_ramp_filter_matches_scikit_image_ramp():
    ramp = K.KernelSpec("ramp", "x", "y", "R", 64.0, 10.0, ("gaussian", 1e9), None)
    img = K._cylinder(64, 1.0, 40.0)
    sino = K.project(img, 1.0, 64)
    ours = K.filtered_backprojection(sino, ramp, 1.0)
    ref = iradon(
        sino, np.linspace(0, 180, 64, endpoint=False), filter_name="ramp", circle=True, output_size=64
    )
    yy, xx = np.mgrid[:64, :64]
    inside = (yy - 32) ** 2 + (xx - 32) ** 2 < 28**2  # the rim pixels of iradon's circle differ
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-6)
    assert abs(ours[32, 32] - K.MU_WATER) < 0.05 * K.MU_WATER  # reconstructs water


def test_nps_integral_is_variance_and_white_noise_is_flat():
    rng = np.random.default_rng(0)
    rois = rng.normal(0, 10.0, (40, 32, 32))
    nps, freq = nps_2d(rois, 0.5)
    df = freq[1] - freq[0]
    assert abs(nps.sum() * df * df - 100.0) < 5.0
    f, r = radial_nps(rois, 0.5)
    assert r[1:].std() / r[1:].mean() < 0.15
    with pytest.raises(ValueError, match="square ROIs"):
        nps_2d(np.zeros((2, 3, 5)), 1.0)


@pytest.fixture(scope="module")
def calibrations():
    # Same 0.7 mm pixels for all kernels, so the ordering reflects the kernels alone.
    return {k.name: K.calibrate(k, 0.7, size=96, realizations=4, seed=1) for k in K.DEFAULT_KERNELS}


def test_nps_ordering_bone_standard_b30f(calibrations):
    def peak(c):
        sm = np.convolve(c.nps_full, np.ones(3) / 3, mode="same")
        return c.freq[int(np.argmax(sm))]

    def mean_freq(c):
        return float((c.freq * c.nps_full).sum() / c.nps_full.sum())

    b30, std, bone = calibrations["B30f"], calibrations["STANDARD"], calibrations["BONE"]
    assert peak(bone) > peak(std) > peak(b30), (peak(bone), peak(std), peak(b30))
    assert mean_freq(bone) > mean_freq(std) > mean_freq(b30)
    assert bone.mtf[len(bone.mtf) // 2] > std.mtf[len(std.mtf) // 2] > b30.mtf[len(b30.mtf) // 2]


def test_fast_path_reproduces_full_path_noise(calibrations):
    for name, c in calibrations.items():
        assert abs(c.sd_fast / c.sd_full - 1.0) < 0.12, name
        corr = np.corrcoef(c.nps_full, c.nps_fast)[0, 1]
        assert corr > 0.9, (name, corr)


def test_full_fbp_noise_levels_order_and_match_fast_path():
    """Noise of the full physics path on a water cylinder: B30f < STANDARD < BONE; fast path agrees."""
    size, px = 64, 2.0
    water = K.mu_to_hu(K._cylinder(size, px, 100.0))
    sds_full, sds_fast = {}, {}
    for spec in K.DEFAULT_KERNELS:
        spec = K.KernelSpec(**{**spec.__dict__, "fov_mm": size * px})
        cal = K.calibrate(spec, px, size=size, realizations=3, seed=2)
        rng = np.random.default_rng(5)
        noiseless = K.mu_to_hu(K.filtered_backprojection(K.project(K.hu_to_mu(water), px, size), spec, px))
        full = [K.reconstruct_fbp(water, spec, cal, rng) - noiseless for _ in range(3)]
        fast = [K.reconstruct_fast(water, spec, cal, rng, return_noise=True)[1] for _ in range(3)]
        c = size // 2
        sds_full[spec.name] = float(np.std([f[c - 10 : c + 10, c - 10 : c + 10] for f in full]))
        sds_fast[spec.name] = float(np.std([f[c - 10 : c + 10, c - 10 : c + 10] for f in fast]))
    assert sds_full["B30f"] < sds_full["STANDARD"] < sds_full["BONE"], sds_full
    for name in sds_full:
        assert abs(sds_fast[name] / sds_full[name] - 1.0) < 0.2, (name, sds_full, sds_fast)


def test_simulated_tree_is_realistic_dicom(sim_tree):
    info = json.loads((sim_tree / "simulation.json").read_text())
    assert [d["name"] for d in info["domains"]] == ["B30f", "BONE", "STANDARD"]
    assert len(info["patients"]) == SIM_PATIENTS
    for name in ("B30f", "BONE", "STANDARD"):
        assert (sim_tree / "nps" / f"{name}_nps.csv").is_file()
        assert (sim_tree / "nps" / f"{name}_nps.png").stat().st_size > 1000
    assert (sim_tree / "nps" / "calibration.png").is_file()
    patient = info["patients"][0]
    positions = []
    for s in patient["series"]:
        files = sorted((sim_tree / s["folder"]).glob("*.dcm"))
        assert len(files) == 3
        ds = pydicom.dcmread(files[0])
        spec = K.kernel_by_name(s["domain"])
        assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.Modality == "CT" and ds.ConvolutionKernel == spec.kernel
        assert ds.Manufacturer == spec.manufacturer and ds.ManufacturerModelName == spec.scanner_model
        assert float(ds.RescaleIntercept) == -1024 and ds.PixelRepresentation == 1
        assert float(ds.PixelSpacing[0]) == pytest.approx(spec.fov_mm / SIM_SIZE, rel=1e-5)
        assert ds.FrameOfReferenceUID == patient["frame_of_reference_uid"]
        vol = read_volume(sim_tree / s["folder"])  # the real-data reader takes it unchanged
        assert vol.hu.shape == (3, SIM_SIZE, SIM_SIZE)
        assert vol.hu.min() < -900 and vol.hu.max() > 200
        positions.append(vol.dicom.locations)
    # Paired ground truth: every kernel's series images the same z positions.
    for p in positions[1:]:
        np.testing.assert_allclose(p, positions[0])


def test_simulation_is_reproducible(sim_tree, tmp_path):
    """Same seed, same pixels and UIDs; a patient does not depend on how many others are simulated."""
    again = make_sim_tree(tmp_path / "again", patients=1)
    b = sorted(again.rglob("*.dcm"))
    first = b[0].relative_to(again).parts[0]
    a = sorted((sim_tree / first).rglob("*.dcm"))
    assert len(a) == len(b) == 9
    assert [p.relative_to(sim_tree) for p in a] == [p.relative_to(again) for p in b]
    for x, y in zip(a, b, strict=True):
        dx, dy = pydicom.dcmread(x), pydicom.dcmread(y)
        assert dx.SOPInstanceUID == dy.SOPInstanceUID
        assert dx.PixelData == dy.PixelData


def test_simulate_refuses_bad_arguments_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(ValueError, match="--patients"):
        simulate(tmp_path / "a", 0, 3, size=64)
    assert not (tmp_path / "a").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert simulate_main(["--out", str(busy), "--patients", "1", "--slices", "2", "--size", "64"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert (
        simulate_main(["--out", str(tmp_path / "k"), "--patients", "1", "--slices", "2", "--kernels", "XYZ"])
        == 2
    )
    assert not (tmp_path / "k").exists()


def test_measure_nps_reports_peak_and_sd():
    rng = np.random.default_rng(3)
    white = rng.normal(0, 5.0, (30, 32, 32))
    res = measure_nps(white, 1.0)
    assert res.noise_sd == pytest.approx(5.0, rel=0.05)
    assert 0 < res.peak_freq <= 0.5


def test_full_fbp_path_end_to_end(tmp_path):
    """--full-fbp: projection, Poisson noise and kernel FBP for every slice, written as the same DICOM."""
    bone = (K.kernel_by_name("BONE"),)
    full = simulate(tmp_path / "full", 1, 2, size=SIM_SIZE, seed=4, full_fbp=True, kernels=bone, plots=False)
    fast = simulate(tmp_path / "fast", 1, 2, size=SIM_SIZE, seed=4, kernels=bone, plots=False)
    assert full["path"] == "full_fbp" and fast["path"] == "fast_calibrated"
    a = read_volume(tmp_path / "full" / full["patients"][0]["series"][0]["folder"]).hu
    b = read_volume(tmp_path / "fast" / fast["patients"][0]["series"][0]["folder"]).hu
    assert a.shape == b.shape == (2, SIM_SIZE, SIM_SIZE)
    # Same anatomy through both physics paths: the images agree up to noise.
    inside = (a > -1500) & (b > -1500)
    assert np.corrcoef(a[inside], b[inside])[0, 1] > 0.9
    assert abs(float(np.median(a[inside] - b[inside]))) < 30.0
