"""Kernel simulator: random chest phantoms reconstructed with every scanner + kernel, written as DICOM.

    python -m Training.simulate --out DIR --patients N --slices S [--size PX] [--seed K] [--full-fbp]

Each simulated patient's phantom (``Training.simulator.phantom``) is reconstructed with every kernel of
``kernels.DEFAULT_KERNELS`` (B30f on SIEMENS Sensation 16, BONE on GE LightSpeed QX/i, STANDARD on
GE LightSpeed 16), so the same slice exists in every domain: paired ground truth. Output:

    DIR/<patient>/<series>/IM0001.dcm ...   one CT series per patient and kernel (realistic tags)
    DIR/simulation.json                     settings, domains, calibration figures, patients and series
    DIR/nps/<kernel>_nps.csv / .png         per kernel: NPS of the full FBP path and of the fast path, MTF
    DIR/nps/calibration.png / .csv          all kernels: full vs fast NPS curves, peaks and noise SDs

The default is the fast image-domain path, calibrated on the full FBP path at the start of every run
(the calibration is what DIR/nps shows); ``--full-fbp`` runs the projection / Poisson / FBP physics for
every slice (about 100x slower). Everything derives from ``--seed``: the same command writes the same
pixels and UIDs. The output folder appears only when complete (written beside it, then renamed).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from Training.simulator import kernels as K
from Training.simulator.measure import smoothed_peak
from Training.simulator.nps import NPSResult, plot_nps, write_nps_csv
from Training.simulator.phantom import ChestPhantom, random_params

__all__ = ["SimulationCancelled", "simulate", "write_ct_series", "SIMULATOR_VERSION"]

SIMULATOR_VERSION = "1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root; our UIDs are derived from the seed under it
DEFAULT_SLICE_SPACING_MM = 2.5


class SimulationCancelled(RuntimeError):
    """The cancel event was set; nothing was written."""


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=_UID_ROOT, entropy_srcs=["ct-harmonization-sim", *map(str, parts)]))


@dataclass(frozen=True)
class SeriesInfo:
    patient: str
    folder: str
    series_uid: str
    domain: str
    kernel: str
    pixel_mm: float
    slices: int


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    pixel_mm: float,
    z_mm: Sequence[float],
    spec: K.KernelSpec,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    series_number: int,
    description: str,
    uid_seed: Sequence[object],
    study_date: str = "20260101",
    slice_thickness_mm: float | None = None,
    study_description: str = "SIMULATED CHEST",
    body_part: str = "CHEST",
    institution: str = "Simulated (ct-harmonization phantom)",
    first_instance: int = 0,
) -> None:
    """Write (N, R, C) HU slices as a new single-frame CT Image Storage series (int16, intercept -1024).

    Tags: the emulated Manufacturer / ManufacturerModelName / ConvolutionKernel (multi-valued when the
    kernel has a strength, e.g. Siemens "I30f\\3"), ReconstructionDiameter = matrix x pixel, and
    ImageComments "SIMULATED" (with InstitutionName, how ``prepare`` tells simulated from real series).
    ``first_instance``: index of the first slice, to write a long series in chunks."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = hu.shape
    stored = np.clip(np.rint(hu + 1024.0), -32768, 32767).astype(np.int16)
    x0 = -(cols - 1) / 2.0 * pixel_mm
    y0 = -(rows - 1) / 2.0 * pixel_mm
    for k in range(n):
        g = first_instance + k  # the slice's index in the whole series
        sop_uid = _uid(*uid_seed, "sop", g)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = "100000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = spec.manufacturer
        ds.InstitutionName = institution
        ds.ImageComments = "SIMULATED by the ct-harmonization kernel simulator"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = description
        ds.ManufacturerModelName = spec.scanner_model
        ds.PatientName = f"SIM^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = body_part
        ds.SliceThickness = f"{slice_thickness_mm or spec.slice_thickness_mm:g}"
        ds.KVP = f"{spec.kvp:g}"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = f"{cols * pixel_mm:.1f}"
        ds.GantryDetectorTilt = "0"
        ds.XRayTubeCurrent = spec.tube_current_ma
        ds.Exposure = spec.exposure_mas
        ds.ConvolutionKernel = spec.kernel.split("\\") if "\\" in spec.kernel else spec.kernel
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = g + 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{float(z_mm[k]):.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(z_mm[k]):.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [f"{pixel_mm:.6f}", f"{pixel_mm:.6f}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if spec.padding_hu is not None and spec.padding_hu < -1024.0:  # a true padding value (GE style)
            ds.PixelPaddingValue = int(round(spec.padding_hu + 1024.0))
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1600"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"IM{g + 1:04d}.dcm", enforce_file_format=True)


def _write_calibration(
    nps_dir: Path, cals: dict[str, K.Calibration], specs: Sequence[K.KernelSpec], plots: bool = True
) -> list[dict]:
    """Per-kernel NPS CSV/PNG and the all-kernel calibration figure; NPS scaled to each kernel's dose
    (noise at the centre of a 250 mm water cylinder), so curves compare across kernels."""
    rows = []
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    styles: dict[str, str] = {}
    for spec in specs:
        cal = cals[spec.name]
        # Shape measured on the calibration cylinder; amplitude referred to the kernel's dose at the
        # centre of 250 mm water (the integral of the NPS is then the kernel's noise variance there).
        scale = spec.noise_sd_water_hu**2 / max(cal.sd_full**2, 1e-12)
        full, fast = cal.nps_full * scale, cal.nps_fast * scale
        write_nps_csv(
            nps_dir / f"{spec.name}_nps.csv",
            cal.freq,
            {"nps_full_fbp": full, "nps_fast": fast, "mtf_full_fbp": cal.mtf},
        )
        if plots:
            plot_nps(
                nps_dir / f"{spec.name}_nps.png",
                {f"{spec.name} full FBP": (cal.freq, full), f"{spec.name} fast path": (cal.freq, fast)},
                title=f"{spec.scanner_model} / {spec.kernel}: NPS "
                f"({cal.pixel_mm:.3f} mm pixels, 250 mm water)",
                styles={f"{spec.name} full FBP": "-", f"{spec.name} fast path": "--"},
            )
        # The overview normalises each kernel to its full-path peak: shapes and fast/full agreement show
        # although the kernels' noise levels differ ~100x in power.
        peak = max(float(full.max()), 1e-12)
        curves[f"{spec.name} full"] = (cal.freq, full / peak)
        curves[f"{spec.name} fast"] = (cal.freq, fast / peak)
        styles[f"{spec.name} fast"] = "--"
        res_full = NPSResult(cal.freq, full, float(math.sqrt(max(float(full.sum()), 0.0))))
        rows.append(
            {
                "domain": spec.name,
                "scanner": f"{spec.manufacturer} {spec.scanner_model}",
                "kernel": spec.kernel,
                "pixel_mm": round(cal.pixel_mm, 4),
                "nps_peak_full_per_mm": round(smoothed_peak(cal.freq, full), 3),
                "nps_peak_fast_per_mm": round(smoothed_peak(cal.freq, fast), 3),
                "nps_mean_freq_full_per_mm": round(res_full.mean_freq, 3),
                "nps_mean_freq_fast_per_mm": round(NPSResult(cal.freq, fast, 0.0).mean_freq, 3),
                "noise_sd_water250_full_hu": round(spec.noise_sd_water_hu, 2),
                "noise_sd_ratio_fast_over_full": round(cal.sd_fast / max(cal.sd_full, 1e-12), 4),
                "mtf50_per_mm": round(_mtf50(cal.freq, cal.mtf), 3),
            }
        )
    if plots:
        plot_nps(
            nps_dir / "calibration.png",
            curves,
            styles=styles,
            title="Calibration: full FBP (solid) vs fast path (dashed)",
            ylabel="NPS / peak of the kernel's full-path NPS",
        )
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    (nps_dir / "calibration.csv").write_text(buf.getvalue())  # inside the temporary output folder
    return rows


def format_mtf(value: float) -> str:
    return "above Nyquist" if math.isnan(value) else f"{value:.2f}/mm"


def _mtf50(freq: np.ndarray, mtf: np.ndarray) -> float:
    below = np.nonzero(mtf < 0.5)[0]
    if below.size == 0:
        return float("nan")
    i = int(below[0])
    if i == 0:
        return float(freq[0])
    f0, f1, m0, m1 = freq[i - 1], freq[i], mtf[i - 1], mtf[i]
    return float(f0 + (0.5 - m0) * (f1 - f0) / (m1 - m0))


def _validate(out: Path, patients: int, slices: int, size: int, n_angles: int | None) -> None:
    if patients < 1:
        raise ValueError(f"--patients must be at least 1, got {patients}")
    if slices < 1:
        raise ValueError(f"--slices must be at least 1, got {slices}")
    if not 32 <= size <= 1024:
        raise ValueError(f"--size must be between 32 and 1024 pixels, got {size}")
    if n_angles is not None and n_angles < 16:
        raise ValueError(f"--angles must be at least 16, got {n_angles}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} already exists and is not an empty folder; choose a new --out path")
    if not out.parent.is_dir():
        raise ValueError(f"the parent folder of --out ({out.parent}) does not exist; create it first")


def simulate(
    out: str | Path,
    patients: int,
    slices: int,
    *,
    size: int = 512,
    seed: int = 0,
    full_fbp: bool = False,
    n_angles: int | None = None,
    slice_spacing_mm: float = DEFAULT_SLICE_SPACING_MM,
    kernels: Sequence[K.KernelSpec] = K.DEFAULT_KERNELS,
    patient_offset: int = 0,
    calibration_size: int = 192,
    plots: bool = True,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Simulate ``patients`` x ``slices`` slices per kernel into ``out``; returns the simulation.json dict.

    ``plots=False`` skips the PNGs (the CSVs are always written). ``patient_offset`` numbers patients
    from that index (held-out samples use a disjoint range with a
    seed never used for training). Raises ValueError on bad arguments (nothing written) and
    SimulationCancelled when ``cancel`` is set (the partial output is removed).
    """
    from TextureStarGANCore.fileio import atomic_output

    out = Path(out)
    _validate(out, patients, slices, size, n_angles)
    specs = list(kernels)
    started = time.time()
    total_steps = len(specs) + patients * len(specs)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total_steps)
        if cancel is not None and cancel.is_set():
            raise SimulationCancelled("simulation cancelled; nothing was written")

    if out.is_dir():
        out.rmdir()  # empty (checked above): atomic_output puts the finished folder in its place
    with atomic_output(out, folder=True) as tmp:
        cals: dict[str, K.Calibration] = {}
        for i, spec in enumerate(specs):
            cals[spec.name] = K.calibrate(
                spec, spec.pixel_mm(size), size=min(calibration_size, size), seed=seed * 1000 + i
            )
            tick()
        nps_dir = tmp / "nps"
        nps_dir.mkdir()
        cal_rows = _write_calibration(nps_dir, cals, specs, plots=plots)
        # One common grid fine enough for the smallest pixel and wide enough for the largest FOV.
        common_px = min(s.pixel_mm(size) for s in specs)
        common_n = int(math.ceil(max(s.fov_mm for s in specs) / common_px))
        z = (np.arange(slices) - (slices - 1) / 2.0) * slice_spacing_mm
        patient_records = [
            _simulate_patient(
                tmp, p_idx, seed, z, specs, cals, size, (common_n, common_px), full_fbp, n_angles, tick
            )
            for p_idx in range(patient_offset, patient_offset + patients)
        ]
        record = _record(
            specs,
            cal_rows,
            cals,
            patient_records,
            seed=seed,
            size=size,
            slices=slices,
            full_fbp=full_fbp,
            n_angles=n_angles or size,
            slice_spacing_mm=slice_spacing_mm,
            patient_offset=patient_offset,
            seconds=time.time() - started,
        )
        (tmp / "simulation.json").write_text(json.dumps(record, indent=2))
    return record


def _simulate_patient(
    tmp: Path, p_idx: int, seed: int, z: np.ndarray, specs: Sequence[K.KernelSpec],
    cals: dict[str, K.Calibration], size: int, grid: tuple[int, float], full_fbp: bool, n_angles: int | None,
    tick: Callable[[], None],
) -> dict:
    """One phantom patient reconstructed with every kernel, written as one DICOM series per kernel."""
    common_n, common_px = grid
    slices = len(z)
    pid = f"SIM{seed:03d}-{p_idx:04d}"
    rng = np.random.default_rng([seed, p_idx, 0])
    z_table = float(rng.uniform(-300.0, -100.0))  # table position: z varies between patients
    params = random_params(rng, (float(z[0]), float(z[-1])))
    truth = ChestPhantom(params, z).slices(common_n, common_px)
    # Noise variance map per slice is anatomy-only (same rays whatever the kernel).
    var_coarse = [K.variance_map_coarse(K.hu_to_mu(s), common_px) for s in truth]
    study_uid = _uid(seed, pid, "study")
    frame_uid = _uid(seed, pid, "frame")
    series = []
    for k_idx, spec in enumerate(specs):
        px = spec.pixel_mm(size)
        srng = np.random.default_rng([seed, p_idx, 1 + k_idx])
        recon = np.empty((slices, size, size), dtype=np.float32)
        for s in range(slices):
            hu = K.resample_centered(truth[s], common_px, size, px)
            if full_fbp:
                recon[s] = K.reconstruct_fbp(hu, spec, cals[spec.name], srng, n_angles=n_angles)
            else:
                coarse, cpx = var_coarse[s]
                vmap = np.maximum(K.resample_centered(coarse, cpx, size, px), 1.0)
                recon[s] = K.reconstruct_fast(hu, spec, cals[spec.name], srng, variance=vmap)
        series_uid = _uid(seed, pid, spec.name, "series")
        folder_name = f"{k_idx + 1:02d}_{spec.kernel.replace('/', '_').replace(chr(92), '_')}"
        write_ct_series(
            tmp / pid / folder_name,
            recon,
            pixel_mm=px,
            z_mm=z + z_table,
            spec=spec,
            patient_id=pid,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            series_number=k_idx + 1,
            description=f"SIM CHEST {spec.kernel} {'FBP' if full_fbp else 'FAST'}",
            uid_seed=(seed, pid, spec.name),
        )
        info = SeriesInfo(pid, f"{pid}/{folder_name}", series_uid, spec.name, spec.kernel, px, slices)
        series.append(info.__dict__)
        tick()
    return {
        "patient": pid,
        "study_uid": study_uid,
        "frame_of_reference_uid": frame_uid,
        "z_mm": [float(v) for v in z + z_table],
        "series": series,
    }


def _record(specs, cal_rows, cals, patient_records, **settings) -> dict:
    from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS

    known = {d.name: d for d in DEFAULT_SIMULATED_DOMAINS}
    domains = []
    for i, spec in enumerate(specs):
        d = known.get(spec.name)
        domains.append(
            d.to_dict()
            if d is not None
            else {
                "id": i,
                "name": spec.name,
                "display_name": f"{spec.manufacturer} {spec.scanner_model} / {spec.kernel}",
                "manufacturer": spec.manufacturer,
                "scanner_model": spec.scanner_model,
                "kernel": spec.kernel,
            }
        )
    return {
        "simulated": True,
        "simulator_version": SIMULATOR_VERSION,
        "path": "full_fbp" if settings["full_fbp"] else "fast_calibrated",
        "settings": settings,
        "domains": domains,
        "kernels": [s.to_dict() for s in specs],
        "calibration": cal_rows,
        "calibration_details": {name: c.to_dict() for name, c in cals.items()},
        "paired_ground_truth": "slice k of every series of a patient images the same phantom slice "
        "(same z, same frame of reference)",
        "patients": patient_records,
    }
