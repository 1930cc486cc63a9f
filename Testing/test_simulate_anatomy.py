"""Real anatomy as the simulator's object, the kernel catalogue, the realism measurements and real + simulated
data through prepare. A few small slices of the shared real CT (read-only; copied where a test writes)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SHARED
from scipy import ndimage
from simdata import ANATOMY_DOMAINS, shared_anatomy_sim

from TextureStarGANCore.volume_io import InputError
from Training.simulator import catalogue as C
from Training.simulator.measure import edge_width_mm, highpass_noise_sd, measure_slices, soft_tissue_mask

REAL = SHARED / "data" / "real_ct"
CHEST_B = REAL / "philips_brilliance16_chest_l_b_pair" / "B_smooth"
DOMAINS = ANATOMY_DOMAINS


def _need_real() -> None:
    if not CHEST_B.is_dir():
        pytest.skip(f"shared real CT not found at {REAL} (set CTH_SHARED_DIR)")


@pytest.fixture(scope="module")
def anatomy_tree() -> Path:
    """Three slices of the real Philips chest (B) with the series' licence files, as a user's anatomy tree."""
    _need_real()
    return shared_anatomy_sim(CHEST_B.parent)[0]


@pytest.fixture(scope="module")
def sim_tree(anatomy_tree) -> Path:
    return shared_anatomy_sim(CHEST_B.parent)[1]


def _series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(f) for f in folder.glob("*.dcm")), key=lambda d: float(d.SliceLocation))


def test_anatomy_series_are_pixel_aligned_pairs_of_the_same_anatomy(sim_tree):
    (patient,) = [p for p in sim_tree.iterdir() if p.is_dir()]
    folders = sorted(p for p in patient.iterdir())
    assert [f.name.split("_", 1)[1] for f in folders] == list(DOMAINS)
    series = [_series(f) for f in folders]
    ref = series[0]
    assert len(ref) == 3
    images = []
    for s in series:
        assert [d.ImagePositionPatient for d in s] == [d.ImagePositionPatient for d in ref]
        assert {d.FrameOfReferenceUID for d in s} == {ref[0].FrameOfReferenceUID}
        assert s[0].PixelSpacing == ref[0].PixelSpacing
        images.append(np.stack([d.pixel_array * 1.0 + float(d.RescaleIntercept) for d in s]))
    # Same anatomy: the kernels differ in noise and sharpness, not in what they show.
    smooth = [ndimage.gaussian_filter(im[0], 2.0) for im in images]
    body = smooth[0] > -500
    for other in smooth[1:]:
        assert np.corrcoef(smooth[0][body], other[body])[0, 1] > 0.95
        assert np.abs(smooth[0][body] - other[body]).mean() < 40.0
    # The sharp kernel is noisier than the smooth one at the same dose (shared acquisition); at these
    # ~2 mm test pixels (Nyquist 0.25 /mm) less so than at 0.84 mm (about 6x, SIMULATOR.md).
    tissue = soft_tissue_mask(smooth[0], 2)
    hp = [highpass_noise_sd(im[0], tissue) for im in images]
    assert hp[1] > 1.3 * hp[0]


def test_anatomy_series_carry_the_emulated_tags_and_the_source_licence(sim_tree):
    (patient,) = [p for p in sim_tree.iterdir() if p.is_dir()]
    for folder, name in zip(sorted(patient.iterdir()), DOMAINS, strict=True):
        spec = C.catalogue_kernel(name)
        ds = pydicom.dcmread(next(folder.glob("*.dcm")))
        assert ds.Modality == "CT" and ds.Manufacturer == spec.manufacturer
        assert ds.ManufacturerModelName == spec.scanner_model
        kernel = "\\".join(ds.ConvolutionKernel) if ds["ConvolutionKernel"].VM > 1 else ds.ConvolutionKernel
        assert kernel == spec.kernel
        assert "SIMULATED" in ds.ImageComments
    assert _series(sorted(patient.iterdir())[2])[0].ConvolutionKernel == ["I30f", "3"]  # SAFIRE strength 3
    record = json.loads((sim_tree / "simulation.json").read_text())
    assert record["path"] == "anatomy_fast_calibrated" and record["patients"][0]["slices"] == 3
    sources = (sim_tree / "SOURCES.md").read_text()
    assert "CC BY" in sources and "Lung-PET-CT-Dx" in sources


def test_anatomy_folder_that_is_not_ct_is_refused(tmp_path, ct_small_path, capsys):
    from Training.simulate import main
    from Training.simulator.anatomy import find_anatomy

    mr = tmp_path / "mr"
    mr.mkdir()
    ds = pydicom.dcmread(ct_small_path)
    ds.Modality = "MR"
    ds.save_as(mr / "mr.dcm")
    with pytest.raises(InputError, match="no CT series.*modality MR"):
        find_anatomy(mr)
    assert main(["--out", str(tmp_path / "out"), "--anatomy", str(mr)]) == 2
    assert "no CT series" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_catalogue_covers_three_vendors_smooth_to_sharp_and_iterative():
    by_vendor: dict[str, set[str]] = {}
    for e in C.CATALOGUE:
        by_vendor.setdefault(e.spec.manufacturer.split()[0].upper(), set()).add(e.sharpness.split(",")[0])
        assert e.source  # every entry says where its numbers come from
    for vendor in ("SIEMENS", "GE", "PHILIPS"):
        assert {"smooth", "medium", "sharp"} <= by_vendor[vendor], vendor
    iterative = [e.spec for e in C.CATALOGUE if e.spec.iterative]
    assert {s.manufacturer.split()[0].upper() for s in iterative} >= {"SIEMENS", "GE", "PHILIPS"}
    assert C.match_kernel("Philips", "Brilliance16", "L").name == "PHILIPS_L"
    with pytest.raises(ValueError, match="--list-domains"):
        C.select("NO_SUCH_KERNEL")


def test_iterative_model_lowers_noise_and_shifts_the_nps_down():
    fbp, ir = C.catalogue_kernel("SIEMENS_B30f"), C.catalogue_kernel("SIEMENS_I30f_3")
    a, b = (C.K.calibrate(s, 0.7, size=96, realizations=3) for s in (fbp, ir))
    assert b.sd_full == pytest.approx(0.70 * a.sd_full, rel=0.03)  # the modelled 30 % reduction

    def mean_freq(cal):
        return float((cal.freq * cal.nps_full).sum() / cal.nps_full.sum())

    assert mean_freq(b) < 0.9 * mean_freq(a)


def test_list_domains_json(capsys, monkeypatch):
    from Training.simulate import main

    # Two entries keep it fast; the command describes every entry the same way.
    monkeypatch.setattr(C, "CATALOGUE", C.CATALOGUE[:1] + C.CATALOGUE[15:16])
    assert main(["--list-domains", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["SIEMENS_B30f", "PHILIPS_L"]
    for r in rows:
        assert {
            "manufacturer",
            "scanner_model",
            "convolution_kernel",
            "mtf50_per_mm",
            "mtf10_per_mm",
            "nps_peak_per_mm",
            "source",
        } <= set(r)
    assert rows[0]["mtf50_per_mm"] < rows[1]["mtf50_per_mm"] or isinstance(rows[1]["mtf50_per_mm"], str)
    assert rows[1]["nps_peak_per_mm"] > 1.5 * rows[0]["nps_peak_per_mm"]
    assert "fitted on shared series" in rows[1]["source"]
    assert main(["--list-domains"]) == 0
    assert "PHILIPS_L" in capsys.readouterr().out


# ---- the realism measurements on inputs with known answers ----


def _disc(size: int = 160, value: float = 40.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    return np.where(xx**2 + yy**2 < (0.42 * size) ** 2, value, -1000.0).astype(np.float32)


def test_highpass_noise_of_white_noise_is_known():
    rng = np.random.default_rng(0)
    img = _disc() + rng.normal(0, 20.0, (160, 160)).astype(np.float32)
    # Var(x - g * x) = sigma^2 (1 - 2 g0 + sum g^2), Gaussian sigma 2 px: 0.970 sigma.
    assert highpass_noise_sd(img) == pytest.approx(0.970 * 20.0, rel=0.04)


def test_edge_width_of_a_gaussian_blurred_edge_is_known():
    img = ndimage.gaussian_filter(_disc(320), 2.0)  # sigma 2 px = 1 mm at 0.5 mm pixels
    assert edge_width_mm(img, 0.5) == pytest.approx(2.563 * 1.0, rel=0.08)  # 10-90 % = 2.563 sigma


def test_nps_peak_and_pair_ratio_of_filtered_noise_are_known():
    rng = np.random.default_rng(1)
    n, px = 4, 0.5
    f = np.fft.fftfreq(160) / px
    fr = np.sqrt(f[None, :] ** 2 + f[:, None] ** 2)
    band = np.exp(-(((fr - 0.4) / 0.08) ** 2))  # noise peaked at 0.4 /mm
    noise = np.stack(
        [np.real(np.fft.ifft2(np.fft.fft2(rng.normal(0, 1, (160, 160))) * band)) for _ in range(n)]
    )
    noise *= 10.0 / noise.std()
    base = np.stack([_disc()] * n)
    smooth, sharp = measure_slices(base + noise, px), measure_slices(base + 3.0 * noise, px, base + noise)
    assert smooth.nps_peak_per_mm == pytest.approx(0.4, abs=0.07)
    assert sharp.highpass_sd_hu / smooth.highpass_sd_hu == pytest.approx(3.0, rel=0.02)


# ---- real and simulated series through prepare ----


def test_prepare_mixes_real_and_simulated_with_origin_and_attribution(sim_tree, anatomy_tree, tmp_path):
    from simdata import TINY_SPEC

    from Training.data.dataset import CTSliceDataset
    from Training.data.prepare import prepare

    out = tmp_path / "ds"
    info = prepare([sim_tree, anatomy_tree], out, spec=TINY_SPEC, test_fraction=0.0)
    assert info["origins"] == {"real": 3, "simulated": 3 * len(DOMAINS)}
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    real = {r["domain"] for r in rows if r["origin"] == "real"}
    sim = {r["domain"] for r in rows if r["origin"] == "simulated"}
    assert real == {"Philips_Brilliance16_B"} and "Philips_Brilliance16_B" in sim  # one domain, both origins
    readme = (out / "README.md").read_text()
    assert "CC BY: attribution required" in readme and "Lung-PET-CT-Dx" in readme
    assert len(CTSliceDataset(out, split=None, origin="real")) == 3
    assert len(CTSliceDataset(out, split=None, origin="simulated")) == 3 * len(DOMAINS)


def test_trainer_config_origin_is_checked():
    from Training.trainer.config import ConfigError, load_config

    cfg = Path(__file__).resolve().parents[1] / "Training" / "configs" / "cpu_demo.yaml"
    assert load_config(cfg).data.origin is None
    assert load_config(cfg, ["data.origin=real"]).data.origin == "real"
    with pytest.raises(ConfigError, match="data.origin"):
        load_config(cfg, ["data.origin=both"])


@pytest.mark.slow
def test_realism_on_the_real_chest_pair_meets_the_targets(tmp_path):
    """The command's library end to end on the Philips chest pair (held-out second half, 4 slices)."""
    from Training.simulator_realism import main

    _need_real()
    root = tmp_path / "real_ct"
    root.mkdir()
    (root / CHEST_B.parent.name).symlink_to(CHEST_B.parent)
    assert main(["--out", str(tmp_path / "out"), "--real-root", str(root), "--slices", "4"]) == 0
    rows = json.loads((tmp_path / "out" / "realism.json").read_text())
    assert [r["domain"] for r in rows] == ["PHILIPS_B", "PHILIPS_L"]
    for r in rows:
        assert abs(r["nps_peak_error_pct"]) < 15.0
    assert abs(rows[1]["pair_ratio_error_pct"]) < 25.0
    assert 4.5 < rows[1]["pair_ratio_real"] < 7.5  # about 53 / 9 HU
    assert (tmp_path / "out" / "nps_chest_pair.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "nps_ratio_chest_pair.png").is_file()


def test_cropped_anatomy_is_skipped_with_its_reason(tmp_path):
    from Training.simulator.simulate_anatomy import simulate_anatomy

    crop = REAL / "ge_discovery_st_soft_standard_cropped" / "STS_008"
    if not crop.is_dir():
        pytest.skip(f"shared real CT not found at {crop}")
    tree = tmp_path / "crop"
    shutil.copytree(crop, tree)
    with pytest.raises(ValueError, match=r"no usable anatomy.*cropped \(137 x 141 px"):
        simulate_anatomy(tmp_path / "out", tree, C.select("GE_SOFT"))
    assert not (tmp_path / "out").exists()
