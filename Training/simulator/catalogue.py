"""The kernels the simulator emulates: scanner, DICOM tags, frequency response and each number's source.

Every entry is a ``KernelSpec`` (window = apodisation of the ramp filter, optional iterative-reconstruction
noise model) plus its provenance. Three kinds of source, stated per entry:

- "fitted on shared series X": the window was fitted (``Training.simulator.fit``) to the noise power
  spectrum of the real series X in ``shared/data/real_ct`` (first half of its slices; the second half and
  the other series are the held-out checks in ``SIMULATOR.md``);
- "estimated": chosen to sit where the kernel sits in its vendor's family (sharpness order, roughly
  the MTF50 range such kernels show); NOT verified against a published or real measurement;
- "published": none. We found no published MTF / NPS values we are sure enough of to quote here.

MTF50, MTF10 and NPS peak in ``--list-domains`` are computed by the simulator from these models
(``describe``), so they are "model" values whose trust is that of the entry's source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from Training.simulator import kernels as K

__all__ = ["CatalogueEntry", "CATALOGUE", "catalogue_kernel", "match_kernel", "describe", "select"]


@dataclass(frozen=True)
class CatalogueEntry:
    spec: K.KernelSpec
    sharpness: str  # smooth / medium / sharp (within the vendor's family)
    source: str  # where the window (and the iterative model) comes from
    note: str = ""


_CHEST_PAIR = "philips_brilliance16_chest_l_b_pair"
_HEAD_PAIR = "philips_ingenuity_head_phantom_ub_ya_pair"
_EST = "estimated (vendor family position; not verified against a measurement)"


def _s(name, manufacturer, model, kernel, fov, window, padding, sd=30.0, iterative=(), thickness=2.5):
    return K.KernelSpec(
        name,
        manufacturer,
        model,
        kernel,
        fov,
        sd,
        window,
        padding,
        slice_thickness_mm=thickness,
        iterative=iterative,
    )


# Fitted on the first 32 slices of each real pair (python -m Training.simulator_realism --fit).
PHILIPS_B_WINDOW = ("shaped", 0.322, 0.306, 1.5)
PHILIPS_L_WINDOW = ("shaped", 0.596, 4.0, 8.436)
PHILIPS_UB_WINDOW = ("shaped", 0.432, 0.079, 1.5)  # UB is iDose: an effective linear window
PHILIPS_YA_WINDOW = ("shaped", 0.805, 2.083, 3.745)

_SIEMENS, _GE, _PHILIPS = "SIEMENS", "GE MEDICAL SYSTEMS", "Philips"
CATALOGUE: tuple[CatalogueEntry, ...] = (
    # Siemens SOMATOM Definition AS: f-kernels (body), SAFIRE I-kernels (iterative).
    CatalogueEntry(
        _s("SIEMENS_B30f", _SIEMENS, "SOMATOM Definition AS", "B30f", 350, ("gaussian", 0.50), -1024.0),
        "smooth",
        _EST,
    ),
    CatalogueEntry(
        _s("SIEMENS_B40f", _SIEMENS, "SOMATOM Definition AS", "B40f", 350, ("gaussian", 0.62), -1024.0),
        "medium",
        _EST,
    ),
    CatalogueEntry(
        _s(
            "SIEMENS_B50f",
            _SIEMENS,
            "SOMATOM Definition AS",
            "B50f",
            350,
            ("shaped", 0.70, 0.4, 4.0),
            -1024.0,
        ),
        "medium-sharp",
        _EST,
    ),
    CatalogueEntry(
        _s(
            "SIEMENS_B70f",
            _SIEMENS,
            "SOMATOM Definition AS",
            "B70f",
            350,
            ("shaped", 0.95, 1.5, 6.0),
            -1024.0,
        ),
        "sharp",
        _EST,
    ),
    CatalogueEntry(
        _s(
            "SIEMENS_I30f_3",
            _SIEMENS,
            "SOMATOM Definition AS",
            "I30f\\3",
            350,
            ("gaussian", 0.50),
            -1024.0,
            iterative=("ir", 0.30, 0.25, "SAFIRE 3"),
        ),
        "smooth, iterative",
        _EST + "; SAFIRE strength 3 as a 30 % noise-SD reduction with the NPS shifted lower",
        "iterative model: noise only (signal as B30f); dose-dependent, non-linear effects not modelled",
    ),
    # GE LightSpeed VCT: SOFT / STANDARD / LUNG / BONE, ASiR 40 % (ConvolutionKernel stays STANDARD).
    CatalogueEntry(
        _s("GE_SOFT", _GE, "LightSpeed VCT", "SOFT", 360, ("gaussian", 0.45), -2000.0), "smooth", _EST
    ),
    CatalogueEntry(
        _s("GE_STANDARD", _GE, "LightSpeed VCT", "STANDARD", 360, ("hann", 1.2), -2000.0), "medium", _EST
    ),
    CatalogueEntry(
        _s("GE_LUNG", _GE, "LightSpeed VCT", "LUNG", 360, ("shaped", 0.80, 1.0, 6.0), -2000.0), "sharp", _EST
    ),
    CatalogueEntry(
        _s("GE_BONE", _GE, "LightSpeed VCT", "BONE", 360, ("boost", 0.85, 1.2, 0.45), -2000.0), "sharp", _EST
    ),
    CatalogueEntry(
        _s(
            "GE_STANDARD_ASIR40",
            _GE,
            "Discovery CT750 HD",
            "STANDARD",
            360,
            ("hann", 1.2),
            -2000.0,
            iterative=("ir", 0.30, 0.20, "ASIR 40%"),
        ),
        "medium, iterative",
        _EST + "; ASiR 40 % as a 30 % noise-SD reduction with the NPS shifted lower",
        "GE keeps ConvolutionKernel STANDARD (ASiR level in SeriesDescription); a scanner model other "
        "than GE_STANDARD's keeps prepare's domains apart",
    ),
    # GE scanners of the shared series (emulated for the realism check).
    CatalogueEntry(
        _s("GE_DST_SOFT", _GE, "Discovery ST", "SOFT", 500, ("gaussian", 0.45), -2000.0),
        "smooth",
        _EST + "; checked on shared series ge_discovery_st_soft_standard_cropped/STS_008",
    ),
    CatalogueEntry(
        _s("GE_DST_STANDARD", _GE, "Discovery ST", "STANDARD", 500, ("hann", 1.2), -2000.0),
        "medium",
        _EST + "; checked on shared series ge_discovery_st_soft_standard_cropped/STS_002",
    ),
    CatalogueEntry(
        _s("GE_HISPEED_STDPLUS", _GE, "HiSpeed Dual", "STD+", 250, ("hann", 1.4), -2000.0),
        "medium",
        _EST + "; checked on shared series ge_hispeed_dual_head_std_plus",
    ),
    # Philips Brilliance 16: B (standard body), C (sharper body, estimated), L (lung); fitted on the pair.
    CatalogueEntry(
        _s("PHILIPS_B", _PHILIPS, "Brilliance16", "B", 430, PHILIPS_B_WINDOW, -1024.0),
        "smooth",
        f"fitted on shared series {_CHEST_PAIR} (B_smooth + L_sharp, slices 1-32, joint dose)",
    ),
    CatalogueEntry(
        _s("PHILIPS_C", _PHILIPS, "Brilliance16", "C", 430, ("shaped", 0.45, 0.6, 3.0), -1024.0),
        "medium",
        _EST + " (between the fitted B and L)",
    ),
    CatalogueEntry(
        _s("PHILIPS_L", _PHILIPS, "Brilliance16", "L", 430, PHILIPS_L_WINDOW, -1024.0),
        "sharp",
        f"fitted on shared series {_CHEST_PAIR} (B_smooth + L_sharp, slices 1-32, joint dose)",
    ),
    CatalogueEntry(
        _s(
            "PHILIPS_BIGBORE_B_IDOSE3",
            _PHILIPS,
            "Brilliance Big Bore",
            "B",
            550,
            PHILIPS_B_WINDOW,
            -1024.0,
            iterative=("ir", 0.23, 0.20, "iDose (3)"),
        ),
        "smooth, iterative",
        f"window fitted on {_CHEST_PAIR} B; iDose level 3 as a 23 % noise-SD reduction: estimated; "
        "checked on shared series philips_bigbore_chest_abdomen_b_idose",
        "iterative model: noise only; Philips keeps ConvolutionKernel B, the iDose level is in "
        "SeriesDescription",
    ),
    # Philips Ingenuity CT head kernels; fitted on the head-phantom pair.
    CatalogueEntry(
        _s(
            "PHILIPS_UB_IDOSE",
            _PHILIPS,
            "Ingenuity CT",
            "UB",
            231,
            PHILIPS_UB_WINDOW,
            -1024.0,
            # r = 0: the fitted window already holds iDose's noise texture; the label goes to the
            # SeriesDescription.
            iterative=("ir", 0.0, 0.2, "iDose"),
            thickness=1.0,
        ),
        "smooth, iterative",
        f"fitted on shared series {_HEAD_PAIR} (UB_standard + YA_bone, slices 1-24, joint dose)",
        "the iDose series is fitted as an effective linear window (its own non-linearity not modelled)",
    ),
    CatalogueEntry(
        _s("PHILIPS_YA", _PHILIPS, "Ingenuity CT", "YA", 231, PHILIPS_YA_WINDOW, -1024.0, thickness=1.0),
        "sharp",
        f"fitted on shared series {_HEAD_PAIR} (UB_standard + YA_bone, slices 1-24, joint dose)",
    ),
    # The phantom demo's three LIDC-like domains (kernels.DEFAULT_KERNELS), kept for the bundled model.
    *(
        CatalogueEntry(k, s, "estimated (phantom demo domain of the bundled model)")
        for k, s in zip(K.DEFAULT_KERNELS, ("smooth", "sharp", "medium"), strict=True)
    ),
)


def catalogue_kernel(name: str) -> K.KernelSpec:
    for e in CATALOGUE:
        if e.spec.name.lower() == name.lower():
            return e.spec
    raise ValueError(
        f"unknown simulated domain {name!r}; python -m Training.simulate --list-domains shows the "
        f"{len(CATALOGUE)} known: {', '.join(e.spec.name for e in CATALOGUE)}"
    )


def select(names: str | Sequence[str]) -> tuple[K.KernelSpec, ...]:
    """Kernels by comma-separated or listed names (case-insensitive, no duplicates)."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    specs = tuple(dict.fromkeys(catalogue_kernel(n) for n in items))
    if not specs:
        raise ValueError("--domains names no kernel")
    return specs


def _key(text: str) -> str:
    return " ".join(str(text).upper().split())


def match_kernel(manufacturer: str, model: str, kernel: str, iterative: bool = False) -> K.KernelSpec | None:
    """The catalogue entry emulating this scanner + kernel (same manufacturer's first word, model and
    kernel; an iterative series prefers an iterative entry); else the same manufacturer + kernel; else
    None."""
    from TextureStarGANCore.domains import normalize_kernel

    man, mod, ker = _key(manufacturer).split(" ")[:1], _key(model), normalize_kernel(kernel)
    candidates = [
        e.spec
        for e in CATALOGUE
        if _key(e.spec.manufacturer).split(" ")[:1] == man and normalize_kernel(e.spec.kernel) == ker
    ]
    exact = [c for c in candidates if _key(c.scanner_model) == mod]
    for group in (exact, candidates):
        if group:
            return sorted(group, key=lambda c: bool(c.iterative) != iterative)[0]
    return None


def _crossing(freq: np.ndarray, mtf: np.ndarray, level: float) -> float:
    below = np.nonzero(mtf < level)[0]
    if below.size == 0:
        return float("nan")
    i = int(below[0])
    if i == 0:
        return float(freq[0])
    return float(freq[i - 1] + (level - mtf[i - 1]) * (freq[i] - freq[i - 1]) / (mtf[i] - mtf[i - 1]))


def describe(entry: CatalogueEntry, size: int = 512) -> dict:
    """The entry's tags and model figures at its own pixel size (FOV / size): MTF50, MTF10, NPS peak."""
    from Training.simulator.measure import smoothed_peak

    spec = entry.spec
    px = spec.pixel_mm(size)
    cal = K.calibrate(spec, px, size=192, realizations=4)

    def fmt(v: float) -> float | str:
        return round(v, 3) if math.isfinite(v) else f"above Nyquist ({0.5 / px:.2f})"

    return {
        "name": spec.name,
        "manufacturer": spec.manufacturer,
        "scanner_model": spec.scanner_model,
        "convolution_kernel": spec.kernel,
        "sharpness": entry.sharpness,
        "iterative": bool(spec.iterative),
        "pixel_mm": round(px, 4),
        "mtf50_per_mm": fmt(_crossing(cal.freq, cal.mtf, 0.5)),
        "mtf10_per_mm": fmt(_crossing(cal.freq, cal.mtf, 0.1)),
        "nps_peak_per_mm": round(smoothed_peak(cal.freq, cal.nps_full), 3),
        "source": entry.source,
        "note": entry.note,
        "window": list(spec.window),
        "iterative_model": list(spec.iterative),
    }


def with_fov(spec: K.KernelSpec, fov_mm: float) -> K.KernelSpec:
    """The same kernel reconstructed on another field of view (augmentation: pixel spacing)."""
    return replace(spec, fov_mm=float(fov_mm))
