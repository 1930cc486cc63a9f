"""Scanner + reconstruction-kernel models and CT acquisition physics for the simulator.

Full path (``reconstruct_fbp``): parallel-beam projection of the phantom (scikit-image ``radon``), Poisson
counting noise at the scanner's dose, log transform, filtering of every projection with the kernel's own
filter (discrete ramp x apodisation window, applied here in the Fourier domain) and back-projection with
``iradon(filter_name=None)``.

Fast path (``reconstruct_fast``): image-domain emulation for bulk data. The noiseless image is blurred by
the kernel's modulation transfer function and noise is added that is coloured to the kernel's noise power
spectrum and scaled by a per-pixel variance map, because FBP noise variance at a pixel is proportional to
the mean over views of 1/counts along the rays through it (large patients and the lateral direction are
noisier). MTF and NPS shape and the noise gain are measured on the full path (``calibrate``), so the fast
path reproduces it; ``Training.simulate`` writes the calibration curves of both paths.

Units: attenuation in 1/mm; HU = 1000 * (mu / mu_water - 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from skimage.transform import iradon, radon

MU_WATER = 0.0195  # 1/mm, water at ~70 keV effective energy (120 kVp beam)
CAL_WATER_DIAMETER_MM = 250.0  # noise targets refer to the centre of a 250 mm water cylinder (QA convention)

__all__ = [
    "KernelSpec",
    "DEFAULT_KERNELS",
    "kernel_by_name",
    "window_response",
    "iterative_noise_response",
    "fbp_filter",
    "hu_to_mu",
    "mu_to_hu",
    "project",
    "add_poisson_noise",
    "filtered_backprojection",
    "reconstruct_fbp",
    "Calibration",
    "calibrate",
    "reconstruct_fast",
    "variance_map",
    "variance_map_coarse",
    "resample_centered",
    "radial_filters",
    "scan_circle_mask",
    "pad_outside",
]


@dataclass(frozen=True)
class KernelSpec:
    """One simulated domain: scanner, reconstruction kernel and acquisition settings.

    ``window`` is the apodisation of the ramp filter: ("gaussian", a) -> exp(-(f/a)^2);
    ("hann", fc) -> 0.5 (1 + cos(pi f / fc)) below fc; ("boost", a, beta, f0) -> (1 + beta (f/f0)^2)
    exp(-(f/a)^6), an edge-enhancing bone kernel; ("shaped", a, beta, n) -> (1 + beta (f/a)^2)
    exp(-(f/a)^n), the family fitted to real kernels. f in cycles/mm.

    ``iterative`` models an iterative reconstruction's effect on noise as ("ir", r, fc): the noise (not
    the signal) passes a low-pass blend G(f) = 1 - s (1 - exp(-(f/fc)^2)), with s chosen at calibration so
    the noise SD falls by the fraction r; this lowers the noise and shifts the NPS to lower frequencies.
    """

    name: str
    manufacturer: str
    scanner_model: str
    kernel: str
    fov_mm: float  # reconstruction diameter; pixel spacing = fov / matrix size
    noise_sd_water_hu: float  # noise SD at the centre of a 250 mm water cylinder (sets the dose)
    window: tuple
    padding_hu: float | None  # value outside the reconstruction circle (GE: -2000 padding; Siemens: -1024)
    kvp: float = 120.0
    tube_current_ma: int = 200
    exposure_mas: int = 150
    slice_thickness_mm: float = 2.5
    iterative: tuple = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window)
        d["iterative"] = list(self.iterative)
        return d

    def pixel_mm(self, size: int) -> float:
        return self.fov_mm / size


# Named like the paper's LIDC-IDRI groups (DESIGN.md domains). Noise targets refer to 250 mm of water
# (a low-dose level, as many LIDC chest scans); in the simulated chests (lungs, ~170 mm water-equivalent
# paths) they give soft-tissue noise of about 11 (B30f), 17 (STANDARD) and 90 HU (BONE). Sharpness order
# B30f < STANDARD < BONE, noise likewise; the scanners also differ in field of view (pixel spacing)
# and padding.
DEFAULT_KERNELS: tuple[KernelSpec, ...] = (
    KernelSpec(
        "B30f",
        "SIEMENS",
        "Sensation 16",
        "B30f",
        350.0,
        30.0,
        ("gaussian", 0.50),
        -1024.0,
        tube_current_ma=160,
        exposure_mas=120,
        slice_thickness_mm=2.0,
    ),
    KernelSpec(
        "BONE",
        "GE MEDICAL SYSTEMS",
        "LightSpeed QX/i",
        "BONE",
        330.0,
        260.0,
        ("boost", 0.85, 1.2, 0.45),
        -2000.0,
        tube_current_ma=160,
        exposure_mas=128,
        slice_thickness_mm=2.5,
    ),
    KernelSpec(
        "STANDARD",
        "GE MEDICAL SYSTEMS",
        "LightSpeed 16",
        "STANDARD",
        380.0,
        48.0,
        ("hann", 1.2),
        -2000.0,
        tube_current_ma=250,
        exposure_mas=125,
        slice_thickness_mm=2.5,
    ),
)


def kernel_by_name(name: str, kernels: tuple[KernelSpec, ...] = DEFAULT_KERNELS) -> KernelSpec:
    for k in kernels:
        if k.name.lower() == name.lower():
            return k
    raise ValueError(f"unknown simulated kernel {name!r}; known: {', '.join(k.name for k in kernels)}")


def window_response(spec: KernelSpec, f_mm: np.ndarray) -> np.ndarray:
    """Apodisation window W(f) of the kernel at spatial frequencies f (cycles/mm)."""
    f = np.abs(np.asarray(f_mm, dtype=np.float64))
    kind = spec.window[0]
    if kind == "gaussian":
        return np.exp(-((f / spec.window[1]) ** 2))
    if kind == "hann":
        fc = spec.window[1]
        return np.where(f < fc, 0.5 * (1.0 + np.cos(np.pi * f / fc)), 0.0)
    if kind == "boost":
        a, beta, f0 = spec.window[1:]
        return (1.0 + beta * (f / f0) ** 2) * np.exp(-((f / a) ** 6))
    if kind == "shaped":
        a, beta, n = spec.window[1:]
        return (1.0 + beta * (f / a) ** 2) * np.exp(-((f / a) ** n))
    raise ValueError(
        f"kernel {spec.name}: unknown window type {kind!r} (use gaussian, hann, boost or shaped)"
    )


def iterative_noise_response(spec: KernelSpec, f_mm: np.ndarray, strength: float) -> np.ndarray:
    """Noise transfer G(f) of the kernel's iterative-reconstruction model (1 for plain FBP)."""
    if not spec.iterative:
        return np.ones_like(np.asarray(f_mm, dtype=np.float64))
    fc = spec.iterative[2]
    return 1.0 - strength * (1.0 - np.exp(-((np.asarray(f_mm, dtype=np.float64) / fc) ** 2)))


def _ir_strength(spec: KernelSpec, nps2d: np.ndarray, fr: np.ndarray) -> float:
    """Blend s giving the noise-SD reduction r: var ratio = 1 - 2 s a + s^2 b is quadratic in s."""
    r = spec.iterative[1]
    d = 1.0 - np.exp(-((fr / spec.iterative[2]) ** 2))
    total = float(nps2d.sum())
    a, b = float((nps2d * d).sum()) / total, float((nps2d * d * d).sum()) / total
    target = (1.0 - r) ** 2
    disc = a * a - b * (1.0 - target)
    if disc < 0:  # unreachable reduction: the strongest blend
        return 1.0
    return float(min(1.0, (a - math.sqrt(disc)) / b))


def _filter_image(img: np.ndarray, response2d: np.ndarray) -> np.ndarray:
    return np.real(np.fft.ifft2(np.fft.fft2(img) * response2d))


def _padded_length(n_det: int) -> int:
    # Zero-pad to at least twice the detector length (no circular convolution wrap-around).
    return max(64, 1 << int(math.ceil(math.log2(2 * n_det))))


def fbp_filter(spec: KernelSpec, n_det: int, pixel_mm: float) -> np.ndarray:
    """Frequency response (length of the padded projection) = discrete ramp x kernel window.

    The ramp is the band-limited Ram-Lak filter built in the spatial domain (h[0] = 1/4, h[n odd] =
    -1/(pi n)^2, in detector units) so its DC term is right; scaled to match ``iradon``'s normalisation.
    """
    n = _padded_length(n_det)
    k = np.concatenate([np.arange(1, n // 2 + 1, 2), np.arange(n // 2 - 1, 0, -2)])
    h = np.zeros(n)
    h[0] = 0.25
    h[1::2] = -1.0 / (np.pi * k) ** 2
    ramp = 2.0 * np.real(np.fft.fft(h))
    f_mm = np.fft.fftfreq(n) / pixel_mm
    return ramp * window_response(spec, f_mm)


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    return np.clip(MU_WATER * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0, None)


def mu_to_hu(mu: np.ndarray) -> np.ndarray:
    return (1000.0 * (np.asarray(mu) / MU_WATER - 1.0)).astype(np.float32)


def _angles(n_angles: int) -> np.ndarray:
    return np.linspace(0.0, 180.0, n_angles, endpoint=False)


def scan_circle_mask(size: int) -> np.ndarray:
    # The reconstruction circle exactly as scikit-image's radon/iradon define it (circle=True).
    c, r = size // 2, size // 2
    yy, xx = np.ogrid[:size, :size]
    return ((yy - c) ** 2 + (xx - c) ** 2) <= r * r


def project(mu: np.ndarray, pixel_mm: float, n_angles: int) -> np.ndarray:
    """Line integrals (dimensionless, sinogram (n_det, n_angles)) of an attenuation image in 1/mm."""
    # The scan circle: radon(circle=True) needs zeros outside.
    img = np.where(scan_circle_mask(mu.shape[0]), mu, 0.0)
    return radon(img, _angles(n_angles), circle=True) * pixel_mm


def add_poisson_noise(line_integrals: np.ndarray, photons_per_view: float, rng: np.random.Generator):
    """Transmission counts ~ Poisson(I0 exp(-p)); returns the noisy line integrals -log(N / I0)."""
    expected = photons_per_view * np.exp(-line_integrals)
    counts = np.maximum(rng.poisson(expected), 0.5)  # zero counts would be infinite attenuation
    return -np.log(counts / photons_per_view)


def filtered_backprojection(sino: np.ndarray, spec: KernelSpec, pixel_mm: float) -> np.ndarray:
    """Attenuation image (1/mm) from line integrals, with the kernel's own filter."""
    n_det, n_angles = sino.shape
    n = _padded_length(n_det)
    padded = np.zeros((n, n_angles))
    padded[:n_det] = sino / pixel_mm  # back to per-pixel units, as radon/iradon expect
    filt = fbp_filter(spec, n_det, pixel_mm)
    filtered = np.real(np.fft.ifft(np.fft.fft(padded, axis=0) * filt[:, None], axis=0))[:n_det]
    return iradon(filtered, _angles(n_angles), output_size=n_det, filter_name=None, circle=True)


def photons_per_view(spec: KernelSpec, calibration: Calibration, n_angles: int) -> float:
    """Incident photons per detector bin and view that give the kernel's target noise level."""
    total = calibration.noise_gain * math.exp(MU_WATER * CAL_WATER_DIAMETER_MM) / spec.noise_sd_water_hu**2
    return total / n_angles


def reconstruct_fbp(
    hu: np.ndarray,
    spec: KernelSpec,
    calibration: Calibration,
    rng: np.random.Generator,
    n_angles: int | None = None,
) -> np.ndarray:
    """Full physics: project, Poisson noise, kernel FBP. ``hu`` on the kernel's grid; returns HU."""
    size = hu.shape[0]
    pixel = spec.pixel_mm(size)
    n_angles = n_angles or size
    sino = project(hu_to_mu(hu), pixel, n_angles)
    noisy = add_poisson_noise(sino, photons_per_view(spec, calibration, n_angles), rng)
    out = mu_to_hu(filtered_backprojection(noisy, spec, pixel))
    if spec.iterative:  # the IR model filters the noise only: FBP is linear, noise = noisy - noiseless
        clean = mu_to_hu(filtered_backprojection(sino, spec, pixel))
        f = np.fft.fftfreq(size) / pixel
        fr = np.sqrt(f[None, :] ** 2 + f[:, None] ** 2)
        g = iterative_noise_response(spec, fr, calibration.ir_strength)
        out = (clean + _filter_image(out - clean, g)).astype(np.float32)
    return pad_outside(out, spec)


def pad_outside(hu: np.ndarray, spec: KernelSpec) -> np.ndarray:
    if spec.padding_hu is not None:
        hu = np.where(scan_circle_mask(hu.shape[-1]), hu, np.float32(spec.padding_hu)).astype(np.float32)
    return hu


@dataclass
class Calibration:
    """Full-path measurements the fast path reproduces, on a grid of ``pixel_mm``.

    ``freq`` (cycles/mm) with ``mtf`` (signal transfer) and ``nps_shape`` (radial NPS normalised to unit
    variance); ``noise_gain``: noise variance = gain * mean-over-views(exp(p)) / total photons per bin.
    """

    kernel: str
    pixel_mm: float
    freq: np.ndarray
    mtf: np.ndarray
    nps_shape: np.ndarray
    noise_gain: float
    nps_full: np.ndarray  # measured NPS of the full path on the calibration cylinder (HU^2 mm^2)
    nps_fast: np.ndarray | None = None  # the same measured on the fast path (filled by calibrate)
    sd_full: float = 0.0
    sd_fast: float = 0.0
    diameter_mm: float = 0.0  # calibration water cylinder
    # Measured 2D NPS of the full path (fftshifted, symmetrised) and its frequency axis: the fast path's
    # noise filter, so power beyond the radial Nyquist (the corners, large for sharp kernels) is kept.
    nps2d: np.ndarray | None = None
    freq2d: np.ndarray | None = None
    ir_strength: float = 0.0  # blend s of the iterative-reconstruction noise model (0: plain FBP)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "kernel": self.kernel,
            "pixel_mm": self.pixel_mm,
            "noise_gain": self.noise_gain,
            "cylinder_diameter_mm": self.diameter_mm,
            "sd_full_hu": self.sd_full,
            "sd_fast_hu": self.sd_fast,
            "ir_strength": self.ir_strength,
        }


def _radial_profile(values2d: np.ndarray, fr: np.ndarray, edges: np.ndarray) -> np.ndarray:
    idx = np.digitize(fr.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    sums = np.bincount(idx[ok], weights=values2d.ravel()[ok], minlength=len(edges) - 1)
    counts = np.bincount(idx[ok], minlength=len(edges) - 1)
    return sums / np.maximum(counts, 1)


def resample_centered(img: np.ndarray, src_pixel_mm: float, size: int, dst_pixel_mm: float) -> np.ndarray:
    """Bilinear resampling between two grids centred on the isocentre (separable sparse matrices:
    much faster than a general map_coordinates for axis-aligned grids); edge values extend outwards."""
    n = img.shape[-1]
    W = _interp_matrix(n, src_pixel_mm, size, dst_pixel_mm)
    return np.asarray(W @ (W @ img).T).T.astype(np.float32)


def _interp_matrix(n: int, src_px: float, size: int, dst_px: float):
    from scipy import sparse

    pos = (np.arange(size) - (size - 1) / 2.0) * dst_px / src_px + (n - 1) / 2.0
    pos = np.clip(pos, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(pos).astype(int), n - 2) if n > 1 else np.zeros(size, int)
    w1 = pos - i0
    rows = np.repeat(np.arange(size), 2)
    cols = np.stack([i0, np.minimum(i0 + 1, n - 1)], axis=1).ravel()
    vals = np.stack([1.0 - w1, w1], axis=1).ravel()
    return sparse.csr_matrix((vals, (rows, cols)), shape=(size, n))


def variance_map_coarse(mu: np.ndarray, pixel_mm: float, coarse: int = 64) -> tuple[np.ndarray, float]:
    """Mean over views of exp(line integral) along the rays through each pixel, on a coarse grid.

    FBP noise variance at a pixel scales with this (counts ~ I0 exp(-p), var(p) ~ exp(p) / I0). It is
    smooth, so 64 x 64 pixels and 48 views suffice. Returns (map, its pixel size in mm)."""
    size = mu.shape[0]
    coarse = min(coarse, size)
    cpx = pixel_mm * size / coarse
    small = resample_centered(mu, pixel_mm, coarse, cpx) if coarse != size else mu
    n_angles = 48
    p = project(small, cpx, n_angles)
    # Unfiltered back-projection = (pi / (2 n_angles)) * sum over views; rescale to the mean.
    back = iradon(np.exp(p), _angles(n_angles), output_size=coarse, filter_name=None, circle=True)
    mean = np.where(scan_circle_mask(coarse), back * (2.0 / np.pi), 1.0)
    return np.maximum(mean, 1.0), cpx


def variance_map(mu: np.ndarray, pixel_mm: float) -> np.ndarray:
    """``variance_map_coarse`` brought back to the grid of ``mu``."""
    coarse, cpx = variance_map_coarse(mu, pixel_mm)
    return np.maximum(resample_centered(coarse, cpx, mu.shape[0], pixel_mm), 1.0)


def radial_filters(cal: Calibration, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(MTF, sqrt of the unit-variance NPS shape) on the rfft2 grid of a size x size image; cached."""
    key = ("filters", size)
    if key not in cal.cache:
        fy = np.fft.fftfreq(size) / cal.pixel_mm
        fx = np.fft.rfftfreq(size) / cal.pixel_mm
        fr = np.sqrt(fx[None, :] ** 2 + fy[:, None] ** 2)
        mtf = np.interp(fr, cal.freq, cal.mtf, right=cal.mtf[-1])
        if cal.nps2d is not None:
            from scipy.interpolate import RegularGridInterpolator

            interp = RegularGridInterpolator(
                (cal.freq2d, cal.freq2d), cal.nps2d, bounds_error=False, fill_value=None
            )
            yy, xx = np.meshgrid(fy, fx, indexing="ij")
            shape = np.maximum(interp(np.stack([yy.ravel(), xx.ravel()], axis=1)).reshape(fr.shape), 0.0)
        else:
            shape = np.interp(fr, cal.freq, cal.nps_shape, right=0.0)
        # Unit variance for unit white noise (rfft half-plane: interior columns count twice).
        weights = np.full(fr.shape[1], 2.0)
        weights[0] = 1.0
        if size % 2 == 0:
            weights[-1] = 1.0
        mean = float((shape * weights[None, :]).sum()) / (size * size)
        cal.cache[key] = (mtf.astype(np.float32), np.sqrt(shape / max(mean, 1e-12)).astype(np.float32))
    return cal.cache[key]


def reconstruct_fast(
    hu: np.ndarray,
    spec: KernelSpec,
    calibration: Calibration,
    rng: np.random.Generator,
    *,
    variance: np.ndarray | None = None,
    return_noise: bool = False,
):
    """Image-domain emulation of ``reconstruct_fbp`` (same kernel grid, calibrated on the full path).

    ``variance``: the ``variance_map`` of this slice when already computed (it depends on the anatomy
    only, so the simulator computes it once per slice for all kernels)."""
    from scipy import fft

    size = hu.shape[0]
    circle = scan_circle_mask(size)
    mu = np.where(circle, hu_to_mu(hu), 0.0).astype(np.float32)
    mtf, noise_filter = radial_filters(calibration, size)
    blurred = fft.irfft2(fft.rfft2(mu) * mtf, s=mu.shape)
    white = rng.standard_normal((size, size), dtype=np.float32)
    colored = fft.irfft2(fft.rfft2(white) * noise_filter, s=white.shape)
    if variance is None:
        variance = variance_map(mu, spec.pixel_mm(size))
    noise = colored * np.sqrt(calibration.noise_gain * variance / photons_per_view(spec, calibration, 1))
    out = np.where(circle, mu_to_hu(blurred) + noise, -1000.0).astype(np.float32)
    out = pad_outside(out, spec)
    return (out, noise.astype(np.float32)) if return_noise else out


def _cylinder(size: int, pixel_mm: float, diameter_mm: float) -> np.ndarray:
    c = (np.arange(size) - (size - 1) / 2.0) * pixel_mm
    r = np.sqrt(c[None, :] ** 2 + c[:, None] ** 2)
    return np.clip(0.5 - (r - diameter_mm / 2.0) / pixel_mm, 0.0, 1.0) * MU_WATER


def _symmetrize(nps: np.ndarray) -> np.ndarray:
    """Average an fftshifted square 2D NPS over its 8 symmetries (x/y flips about zero, transpose): FBP
    noise is symmetric, and averaging cuts the estimation noise of a few ROIs by ~3x."""

    def flip(a: np.ndarray, axis: int) -> np.ndarray:
        # About frequency zero (index n // 2 of an fftshifted axis of even length), not the array centre.
        return np.roll(np.flip(a, axis), 1 if a.shape[axis] % 2 == 0 else 0, axis)

    variants = []
    for a in (nps, nps.T):
        variants += [a, flip(a, 0), flip(a, 1), flip(flip(a, 0), 1)]
    return np.mean(variants, axis=0)


def calibrate(
    spec: KernelSpec,
    pixel_mm: float,
    *,
    size: int = 192,
    n_angles: int | None = None,
    realizations: int = 6,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Measure the full path's MTF, NPS and noise gain for ``spec`` at ``pixel_mm`` on a water cylinder.

    FBP is linear, so the noise image is the FBP of the sinogram noise alone (exactly the difference of
    a noisy and a noiseless reconstruction), which costs one back-projection per realisation.
    """
    from Training.simulator.nps import noise_rois as nps_rois
    from Training.simulator.nps import nps_2d, radial_nps

    n_angles = n_angles or size
    rng = np.random.default_rng(seed)
    diameter = 0.8 * size * pixel_mm
    water = _cylinder(size, pixel_mm, diameter)
    sino = project(water, pixel_mm, n_angles)
    steps = realizations * 2 + 1
    done = 0
    # MTF: cross-spectrum of the noiseless reconstruction with the truth over the truth's power.
    recon = filtered_backprojection(sino, spec, pixel_mm)
    done += 1
    if progress:
        progress(done, steps)
    F_t, F_r = np.fft.fft2(water), np.fft.fft2(recon)
    f = np.fft.fftfreq(size) / pixel_mm
    fr = np.sqrt(f[None, :] ** 2 + f[:, None] ** 2)
    edges = np.linspace(0.0, 0.5 / pixel_mm, size // 2 + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    cross = _radial_profile(np.real(F_r * np.conj(F_t)), fr, edges)
    power = _radial_profile(np.abs(F_t) ** 2, fr, edges)
    mtf = cross / np.maximum(power, 1e-12 * power.max())
    mtf = mtf / mtf[0]
    # Noise: photons chosen so the noise is well above float error; the gain normalises it out.
    total = 1e7
    expected_var = np.exp(sino) / (total / n_angles)  # var(p) per view for Poisson counts
    roi = max(16, size // 4)
    # Five ROIs (centre and four around it, all well inside the cylinder) per realisation.
    off = roi // 2 + 2
    centers = [
        (size // 2 + dr, size // 2 + dc)
        for dr, dc in ((0, 0), (-off, -off), (-off, off), (off, -off), (off, off))
    ]
    c0 = size // 2 - roi // 2
    noise_imgs = []
    for _ in range(realizations):
        noise_sino = rng.standard_normal(sino.shape) * np.sqrt(expected_var)
        noise_imgs.append(mu_to_hu(filtered_backprojection(noise_sino, spec, pixel_mm) + MU_WATER))
        done += 1
        if progress:
            progress(done, steps)
    ir_strength = 0.0
    if spec.iterative:
        base2d, f2d = nps_2d(np.concatenate([nps_rois(n, centers, roi) for n in noise_imgs]), pixel_mm)
        ir_strength = _ir_strength(spec, base2d, np.sqrt(f2d[None, :] ** 2 + f2d[:, None] ** 2))
        g = iterative_noise_response(spec, fr, ir_strength)
        noise_imgs = [_filter_image(n, g) for n in noise_imgs]
    noise_rois = [nps_rois(n, centers, roi) for n in noise_imgs]
    full_var = [float(n[c0 : c0 + roi, c0 : c0 + roi].var()) for n in noise_imgs]
    # Ring bins as wide as the ROI's frequency step (narrower rings would be empty).
    freq, nps_full = radial_nps(np.concatenate(noise_rois), pixel_mm, bins=roi // 2)
    centre_mean_exp = math.exp(MU_WATER * diameter)
    gain = float(np.mean(full_var)) * total / centre_mean_exp
    shape = nps_full / max(float(nps_full.sum()), 1e-12)
    nps2d, freq2d = nps_2d(np.concatenate(noise_rois), pixel_mm)
    cal = Calibration(
        spec.name,
        pixel_mm,
        freq,
        np.interp(freq, centres, mtf),
        shape,
        gain,
        nps_full,
        sd_full=float(np.sqrt(np.mean(full_var))),
        diameter_mm=diameter,
        nps2d=_symmetrize(nps2d),
        freq2d=freq2d,
        ir_strength=ir_strength,
    )
    # Check the fast path on the same cylinder and measure its NPS the same way.
    fast_rois, fast_var = [], []
    for _ in range(realizations):
        white = rng.standard_normal((size, size))
        colored = np.fft.irfft2(np.fft.rfft2(white) * radial_filters(cal, size)[1], s=white.shape)
        noise = colored * np.sqrt(gain * variance_map(water, pixel_mm) / total)
        fast_rois.append(nps_rois(noise, centers, roi))
        fast_var.append(float(noise[c0 : c0 + roi, c0 : c0 + roi].var()))
        done += 1
        if progress:
            progress(done, steps)
    _, cal.nps_fast = radial_nps(np.concatenate(fast_rois), pixel_mm, bins=roi // 2)
    cal.sd_fast = float(np.sqrt(np.mean(fast_var)))
    return cal
