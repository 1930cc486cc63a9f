"""Real CT slices as the simulator's object: denoised, de-blurred attenuation maps, re-reconstructed with
any set of catalogue kernels on one pixel grid (pixel-aligned pairs with real anatomy).

Object (``attenuation_map``), once per source slice:
1. noise SD of the source: high-pass SD in soft tissue (``measure.highpass_noise_sd``);
2. edge-preserving denoising: non-local means (scikit-image, fast mode, h = 1.5 SD; h = 0.8 SD left half
   of the high-pass noise), which averages similar patches and so keeps edges and structured texture
   while removing uncorrelated noise;
3. mild deconvolution of the source kernel: a Wiener filter M / (M^2 + 0.1) (normalised to 1 at zero
   frequency, capped at a gain of 2) with M the MTF the simulator gives the source kernel at the source
   pixel (catalogue entry matched on manufacturer, model and ConvolutionKernel; a Gaussian window with
   MTF50 0.35 /mm when the kernel is not in the catalogue). The cap keeps the residual noise from being
   amplified into false texture.

Reconstruction (``reconstruct_kernels``), once per output slice: the object is resampled (cubic, with
the augmentation's rotation and scale) onto the output grid, then for every kernel the fast path:
signal blurred by the kernel's MTF plus noise coloured by its NPS, scaled by the anatomy's variance map.
All kernels share ONE noise realisation filtered by each kernel, as reconstructions of one raw data set
do, so their noise is correlated like a real pair's; this also makes one FFT of the object and one of
the noise serve every kernel (one inverse FFT per kernel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from TextureStarGANCore.volume_io import CTVolume, InputError, list_dicom_series, read_volume
from Training.simulator import kernels as K

__all__ = [
    "AnatomySource",
    "find_anatomy",
    "attenuation_map",
    "CalibrationCache",
    "reconstruct_kernels",
    "REFERENCE_PHOTONS",
    "REFERENCE_THICKNESS_MM",
]

# Photons (sum over views, per detector bin) of dose 1.0 at REFERENCE_THICKNESS_MM: the dose at which the
# emulated Philips Brilliance 16 / B gives the real chest pair's soft-tissue high-pass noise (about 9 HU,
# 5 mm, CTDIvol 10.6 mGy); measured by ``python -m Training.simulator_realism`` (matched dose 0.91 of a
# first guess of 5.6e8, then 1.04 of 5.1e8 after the deconvolution used the simulated MTF).
REFERENCE_PHOTONS = 5.3e8
REFERENCE_THICKNESS_MM = 5.0
_WIENER_EPS = 0.1
_MAX_GAIN = 2.0


@dataclass
class AnatomySource:
    """One real CT series used as anatomy."""

    folder: Path
    series_uid: str
    manufacturer: str
    model: str
    kernel: str
    description: str
    files: int

    def load(self) -> CTVolume:
        return read_volume(self.folder, series_uid=self.series_uid)


def find_anatomy(path: str | Path) -> list[AnatomySource]:
    """Every CT series under ``path`` (a folder tree). Refuses a tree without CT images (e.g. MR only)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--anatomy {path} is not a folder; give a folder (tree) of DICOM CT series.")
    found = list_dicom_series(path)
    ct = [s for s in found if s.modality.strip().upper() == "CT" and s.has_pixels]
    if not ct:
        kinds = sorted({s.modality or "no modality" for s in found})
        raise InputError(
            f"--anatomy {path} holds no CT series ("
            + (f"found {len(found)} series of modality {', '.join(kinds)}" if found else "no DICOM files")
            + "); the anatomy must be CT in Hounsfield units."
        )
    out = []
    for s in sorted(ct, key=lambda s: str(s.files[0].parent)):
        out.append(
            AnatomySource(
                s.files[0].parent, s.series_uid, s.manufacturer, s.model, s.kernel, s.description, s.num_files
            )
        )
    return out


def source_window(source: AnatomySource) -> K.KernelSpec:
    """The catalogue kernel matching the source series (for its deconvolution), or a generic smooth one."""
    from Training.simulator.catalogue import match_kernel

    found = match_kernel(source.manufacturer, source.model, source.kernel)
    if found is not None:
        return found
    # MTF50 0.35 /mm: exp(-(f/a)^2) = 0.5 at f = a sqrt(ln 2).
    return K.KernelSpec("generic", "-", "-", "-", 1.0, 1.0, ("gaussian", 0.35 / math.sqrt(math.log(2))), None)


def attenuation_map(
    hu: np.ndarray, pixel_mm: float, source: K.KernelSpec, calibration: K.Calibration | None = None
) -> np.ndarray:
    """Noise-reduced, de-blurred HU slice (float32) from one real slice; see the module docstring.

    With the source kernel's ``calibration`` (at ``pixel_mm``) the deconvolved response is the MTF the
    simulator itself gives that kernel (so re-simulating the source kernel restores its sharpness);
    without, the kernel's window."""
    from scipy import fft
    from skimage.restoration import denoise_nl_means

    from Training.simulator.measure import highpass_noise_sd

    hu = np.asarray(hu, dtype=np.float32)
    sd = highpass_noise_sd(hu)
    if not np.isfinite(sd):  # no soft tissue in view (e.g. a phantom): the whole image's estimate
        from skimage.restoration import estimate_sigma

        sd = float(estimate_sigma(hu))
    den = denoise_nl_means(
        hu, h=1.5 * sd, sigma=sd, patch_size=5, patch_distance=5, fast_mode=True, preserve_range=True
    ).astype(np.float32)
    fy = np.fft.fftfreq(hu.shape[0]) / pixel_mm
    fx = np.fft.rfftfreq(hu.shape[1]) / pixel_mm
    fr = np.sqrt(fx[None, :] ** 2 + fy[:, None] ** 2)
    if calibration is not None:
        w = np.interp(fr, calibration.freq, calibration.mtf, right=calibration.mtf[-1])
    else:
        w = K.window_response(source, fr)
    gain = np.minimum(w * (1.0 + _WIENER_EPS) / (w * w + _WIENER_EPS), _MAX_GAIN)
    out = fft.irfft2(fft.rfft2(den + 1000.0) * gain, s=hu.shape) - 1000.0  # air stays air
    return np.clip(out, -1024.0, 3071.0).astype(np.float32)


class CalibrationCache:
    """Calibrations per (kernel, pixel size); ``pixel`` quantises sizes (``step_mm``) to bound them."""

    def __init__(self, step_mm: float = 0.0) -> None:
        self.step_mm = step_mm
        self._cals: dict[tuple[str, float], K.Calibration] = {}

    def pixel(self, pixel_mm: float) -> float:
        return round(round(pixel_mm / self.step_mm) * self.step_mm, 4) if self.step_mm else float(pixel_mm)

    def get(self, spec: K.KernelSpec, pixel_mm: float) -> K.Calibration:
        key = (spec.name, round(pixel_mm, 5))
        if key not in self._cals:
            self._cals[key] = K.calibrate(replace(spec, fov_mm=192 * pixel_mm), pixel_mm, size=192)
        return self._cals[key]

    def all(self) -> dict[tuple[str, float], K.Calibration]:
        return dict(self._cals)


def photons(dose: float, thickness_mm: float) -> float:
    """Photons per detector bin (all views) of a relative dose: noise variance ~ 1 / (dose x thickness)."""
    return REFERENCE_PHOTONS * dose * thickness_mm / REFERENCE_THICKNESS_MM


def reconstruct_kernels(
    hu: np.ndarray,
    pixel_mm: float,
    specs: Sequence[K.KernelSpec],
    cals: CalibrationCache,
    total_photons: float,
    rng: np.random.Generator,
    *,
    noise_scale: float = 1.0,
    scan_circle: bool = True,
) -> dict[str, np.ndarray]:
    """Every kernel's fast-path reconstruction of one HU slice on its own grid (pixel-aligned outputs).

    ``noise_scale`` multiplies the noise (1: the physics of ``total_photons``). ``scan_circle=False``
    keeps the corners (for comparing with a real image whose anatomy reaches beyond the circle)."""
    from scipy import fft

    size = hu.shape[0]
    circle = K.scan_circle_mask(size) if scan_circle else np.ones((size, size), dtype=bool)
    mu = np.where(circle, K.hu_to_mu(hu), 0.0).astype(np.float32)
    coarse, cpx = K.variance_map_coarse(mu, pixel_mm)
    var = np.maximum(K.resample_centered(coarse, cpx, size, pixel_mm), 1.0)
    white = rng.standard_normal((size, size), dtype=np.float32) * np.sqrt(var)
    f_obj = fft.rfft2((mu / K.MU_WATER - 1.0) * 1000.0)  # HU, so MTF and noise add in one spectrum
    f_noise = fft.rfft2(white)
    out = {}
    for spec in specs:
        cal = cals.get(spec, pixel_mm)
        mtf, noise_filter = K.radial_filters(cal, size)
        amp = noise_scale * math.sqrt(cal.noise_gain / total_photons)
        img = fft.irfft2(f_obj * mtf + f_noise * (noise_filter * np.float32(amp)), s=(size, size))
        img = np.where(circle, img, -1000.0).astype(np.float32)
        out[spec.name] = K.pad_outside(img, spec) if scan_circle else img
    return out
