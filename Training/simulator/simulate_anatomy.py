"""Paired kernel series with real anatomy: ``python -m Training.simulate --anatomy PATH --domains ...``.

For each CT series under PATH and each of ``variants`` augmentations, every slice's object
(``anatomy.attenuation_map``, computed once per source slice) is resampled onto a fresh grid and
reconstructed with every requested kernel (``anatomy.reconstruct_kernels``). Output, like the phantom
path: ``DIR/<patient>/<NN_KERNEL>/IM*.dcm`` (same positions and frame of reference in every kernel of a
patient: pixel-aligned pairs), ``DIR/simulation.json`` and ``DIR/SOURCES.md`` (the source series and
their licence / attribution files, which derived data must carry).

Augmentation per variant (seeded): dose (log-uniform in ``dose_range``, relative to
``anatomy.REFERENCE_PHOTONS``), patient size (object scaled by 0.9-1.1), pixel spacing (uniform in
``pixel_range``, raised when the body would not fit the field of view; quantised to 0.05 mm so the
calibrations are shared), slice thickness (1-2 x the source's, noise variance ~ 1 / thickness) and an
in-plane rotation (+-``max_rotation_deg``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from TextureStarGANCore.fileio import atomic_output, write_text_atomic
from TextureStarGANCore.masks import body_mask
from Training.data.licences import attribution_section, licence_files
from Training.simulator import anatomy as A
from Training.simulator import kernels as K
from Training.simulator.simulate import SIMULATOR_VERSION, SimulationCancelled, _uid, write_ct_series

__all__ = ["simulate_anatomy", "resample_object", "MIN_SOURCE_PX"]

_CHUNK = 16  # slices reconstructed before they are written
MIN_SOURCE_PX = 256  # smaller series are crops (e.g. the shared GE thigh crops), not whole slices


def resample_object(
    hu: np.ndarray,
    src_px: float,
    centre_rc: tuple[float, float],
    size: int,
    px: float,
    angle_deg: float,
    scale: float,
) -> np.ndarray:
    """Cubic resampling of a source slice onto a size x size grid of ``px`` mm centred on ``centre_rc``,
    rotated by ``angle_deg`` and the anatomy scaled by ``scale``; outside the source: air."""
    from scipy import ndimage

    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    matrix = rot * (px / (src_px * scale))
    c_out = np.array([(size - 1) / 2.0, (size - 1) / 2.0])
    offset = np.asarray(centre_rc) - matrix @ c_out
    out = ndimage.affine_transform(
        hu, matrix, offset=offset, output_shape=(size, size), order=3, cval=-1000.0
    )
    return out.astype(np.float32)


def simulate_anatomy(
    out: str | Path,
    anatomy: str | Path,
    kernels: Sequence[K.KernelSpec],
    *,
    variants: int = 1,
    size: int = 512,
    seed: int = 0,
    dose_range: tuple[float, float] = (0.25, 2.0),
    pixel_range: tuple[float, float] = (0.4, 1.0),
    max_rotation_deg: float = 5.0,
    max_slices: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Write the paired series into ``out`` (must not exist or be empty); returns simulation.json's dict."""
    out, root = Path(out), Path(anatomy)
    _check_arguments(out, variants, size, dose_range, pixel_range)
    sources = A.find_anatomy(root)  # refuses a tree without CT
    specs = list(kernels)
    started = time.time()
    cals = A.CalibrationCache(step_mm=0.05)
    total = len(sources) * variants
    done = 0
    if out.is_dir():
        out.rmdir()
    patients = []
    with atomic_output(out, folder=True) as tmp:
        skipped = []
        for s_idx, src in enumerate(sources):
            prepared = _prepare_source(src, cals, max_slices)
            if isinstance(prepared, str):
                skipped.append({"source": str(src.folder), "reason": prepared})
                done += variants
                continue
            for v in range(variants):
                rng = np.random.default_rng([seed, s_idx, v])
                draw = _draw_variant(rng, prepared, size, cals, dose_range, pixel_range, max_rotation_deg)
                pid = f"ANAT{seed:03d}-{s_idx:03d}-{v:02d}"
                patients.append(_write_variant(tmp, pid, seed, src, prepared, draw, specs, cals, size, rng))
                done += 1
                if progress:
                    progress(done, total)
                if cancel is not None and cancel.is_set():
                    raise SimulationCancelled("simulation cancelled; nothing was written")
        if not patients:
            raise ValueError(f"no usable anatomy under {root}: " + "; ".join(x["reason"] for x in skipped))
        record = {
            "simulated": True,
            "simulator_version": SIMULATOR_VERSION,
            "path": "anatomy_fast_calibrated",
            "settings": {
                "anatomy": str(root.resolve()),
                "seed": seed,
                "size": size,
                "variants": variants,
                "dose_range": list(dose_range),
                "pixel_range": list(pixel_range),
                "max_rotation_deg": max_rotation_deg,
                "seconds": round(time.time() - started, 1),
            },
            "kernels": [s.to_dict() for s in specs],
            "calibration": [
                {"domain": name, "pixel_mm": px, **c.to_dict()} for (name, px), c in cals.all().items()
            ],
            "paired_ground_truth": "slice k of every series of a patient is the same object slice (same z, "
            "same frame of reference, same grid)",
            "patients": patients,
            "skipped_sources": skipped,
        }
        (tmp / "simulation.json").write_text(json.dumps(record, indent=1))
        write_text_atomic(tmp / "SOURCES.md", _sources_md(sources, root))
    return record


def _check_arguments(
    out: Path, variants: int, size: int, dose_range: tuple[float, float], pixel_range: tuple[float, float]
) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} already exists and is not an empty folder; choose a new --out path")
    if not out.parent.is_dir():
        raise ValueError(f"the parent folder of --out ({out.parent}) does not exist; create it first")
    if variants < 1 or not 32 <= size <= 1024:
        raise ValueError(f"--variants must be >= 1 and --size 32..1024 (got {variants}, {size})")
    if not (0 < dose_range[0] <= dose_range[1] and 0.1 <= pixel_range[0] <= pixel_range[1] <= 2.0):
        raise ValueError(f"bad --dose-range {dose_range} or --pixel-range {pixel_range}")


@dataclass
class _Source:
    """One anatomy series turned into objects: what every variant of it starts from."""

    vol: Any
    n: int
    src_px: float
    thick: float
    src_kernel: Any
    objects: list[np.ndarray]
    centre: tuple[float, float]
    extent_mm: float
    z: list[float]


def _prepare_source(src: Any, cals: Any, max_slices: int | None) -> _Source | str:
    """Attenuation maps of a source series' slices, or the reason it is skipped."""
    vol = src.load()
    if min(vol.hu.shape[1:]) < MIN_SOURCE_PX:  # a crop: its tissue would float in air
        return f"cropped ({vol.hu.shape[1]} x {vol.hu.shape[2]} px < {MIN_SOURCE_PX})"
    n = vol.hu.shape[0] if max_slices is None else min(max_slices, vol.hu.shape[0])
    src_px = float(vol.spacing[0])
    thick = float(vol.tags.get("SliceThickness") or vol.spacing[2] or 1.0)
    src_kernel = A.source_window(src)
    src_cal = cals.get(src_kernel, src_px)  # deconvolve the MTF the simulator gives the source kernel
    objects = [A.attenuation_map(vol.hu[k], src_px, src_kernel, src_cal) for k in range(n)]
    body = body_mask(vol.hu[n // 2])
    rr, cc = np.nonzero(body) if body.any() else (np.array([vol.hu.shape[1] / 2]),) * 2
    centre = (float(rr.mean()), float(cc.mean()))
    extent_mm = src_px * float(max(np.ptp(rr), np.ptp(cc)) + 1) if body.any() else 0.0
    z = [float(p[2]) for p in vol.dicom.positions[:n]] if vol.dicom else list(np.arange(n) * thick)
    return _Source(vol, n, src_px, thick, src_kernel, objects, centre, extent_mm, z)


def _draw_variant(
    rng: np.random.Generator, source: _Source, size: int, cals: Any, dose_range: tuple[float, float],
    pixel_range: tuple[float, float], max_rotation_deg: float,
) -> dict:
    """What varies between real scans: size, pixel spacing (body inside the field of view), dose, slice
    thickness, a small rotation."""
    scale = float(rng.uniform(0.9, 1.1))
    need = source.extent_mm * scale / (0.95 * size)
    lo = min(max(pixel_range[0], need), max(pixel_range[1], need))
    return {
        "scale": scale,
        "px": cals.pixel(float(rng.uniform(lo, max(lo, pixel_range[1])))),
        "dose": float(math.exp(rng.uniform(math.log(dose_range[0]), math.log(dose_range[1])))),
        "thickness": round(source.thick * float(rng.uniform(1.0, 2.0)), 2),
        "angle": float(rng.uniform(-max_rotation_deg, max_rotation_deg)),
    }


def _write_variant(
    tmp: Path, pid: str, seed: int, src: Any, source: _Source, draw: dict, specs: Sequence[K.KernelSpec],
    cals: Any, size: int, rng: np.random.Generator,
) -> dict:
    """Reconstruct one variant with every kernel and write one DICOM series per kernel; its record."""
    px, dose, thickness = draw["px"], draw["dose"], draw["thickness"]
    photons = A.photons(dose, thickness)
    study_uid, frame_uid = _uid(seed, pid, "study"), _uid(seed, pid, "frame")
    # Exposure tags follow the drawn dose; chunks of slices bound the memory (13 kernels x 512^2).
    emulated = [replace(sp, exposure_mas=max(1, round(sp.exposure_mas * dose))) for sp in specs]
    folders = [f"{k_idx + 1:02d}_{sp.name}" for k_idx, sp in enumerate(specs)]
    n, z = source.n, source.z
    for c0 in range(0, n, _CHUNK):
        ks = range(c0, min(n, c0 + _CHUNK))
        recon = {sp.name: np.empty((len(ks), size, size), np.float32) for sp in specs}
        for j, k in enumerate(ks):
            obj = resample_object(source.objects[k], source.src_px, source.centre, size, px, draw["angle"],
                                  draw["scale"])
            for name, img in A.reconstruct_kernels(obj, px, specs, cals, photons, rng).items():
                recon[name][j] = img
        for k_idx, spec in enumerate(emulated):
            write_ct_series(
                tmp / pid / folders[k_idx],
                recon[spec.name],
                pixel_mm=px,
                z_mm=z[c0 : c0 + len(ks)],
                spec=spec,
                patient_id=pid,
                study_uid=study_uid,
                series_uid=_uid(seed, pid, spec.name, "series"),
                frame_uid=frame_uid,
                series_number=k_idx + 1,
                description=_description(spec),
                uid_seed=(seed, pid, spec.name),
                slice_thickness_mm=thickness,
                study_description="SIMULATED FROM REAL ANATOMY",
                body_part=str(source.vol.tags.get("BodyPartExamined", "") or "UNKNOWN")[:16],
                institution="Simulated (ct-harmonization, real anatomy)",
                first_instance=c0,
            )
    return {
        "patient": pid,
        "source": str(src.folder),
        "source_series_uid": src.series_uid,
        "source_kernel": f"{src.manufacturer} {src.model} / {src.kernel}",
        "deconvolved_with": source.src_kernel.name,
        "slices": n,
        "pixel_mm": px,
        "dose_rel": round(dose, 3),
        "slice_thickness_mm": thickness,
        "rotation_deg": round(draw["angle"], 2),
        "size_scale": round(draw["scale"], 3),
        "z_mm": z,
        "series": [
            {"folder": f"{pid}/{f}", "domain": sp.name, "kernel": sp.kernel}
            for f, sp in zip(folders, specs, strict=True)
        ],
    }


def _sources_md(sources: Sequence[Any], root: Path) -> str:
    """SOURCES.md: every anatomy series used, with its licence (CC BY sources need attribution)."""
    lines = [
        "# Sources of the anatomy",
        "",
        "Simulated series derived from these real CT series; their "
        "licences apply to this data set and CC BY sources must be attributed wherever it is used.",
        "",
    ]
    for src in sources:
        lines += [f"## {src.folder}", "", f"{src.manufacturer} {src.model} / {src.kernel}, {src.files} files",
                  ""]
        lines += attribution_section(licence_files(src.folder, root)) or ["(no licence file found)", ""]
    return "\n".join(lines) + "\n"


def _description(spec: K.KernelSpec) -> str:
    # Vendors name the iterative reconstruction (and its level) in the description, e.g. "iDose (3)".
    label = f", {spec.iterative[3]}" if len(spec.iterative) > 3 else ""
    return f"SIM ANATOMY {spec.kernel.replace(chr(92), ' ')}{label}"
