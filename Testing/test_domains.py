"""Domains: kernel normalisation, user-named domains, and detection from real DICOM tags."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from TextureStarGANCore.domains import (
    DEFAULT_SIMULATED_DOMAINS,
    Domain,
    UnknownDomainError,
    detect_domain,
    kernel_components,
    normalize_kernel,
    resolve_domain,
)

DOMAINS = list(DEFAULT_SIMULATED_DOMAINS)
GE = "GE MEDICAL SYSTEMS"


def test_default_domains_match_the_design_table() -> None:
    assert [(d.id, d.name, d.manufacturer, d.scanner_model, d.kernel) for d in DOMAINS] == [
        (0, "B30f", "SIEMENS", "Sensation 16", "B30f"),
        (1, "BONE", "GE MEDICAL SYSTEMS", "LightSpeed QX/i", "BONE"),
        (2, "STANDARD", "GE MEDICAL SYSTEMS", "LightSpeed 16", "STANDARD"),
    ]
    assert all(Domain.from_dict(d.to_dict()) == d for d in DOMAINS)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("B30f", "B30F"),
        ("  b30f ", "B30F"),
        ("B30f\\SOFT", "B30F\\SOFT"),
        (["BONE", "AXIAL"], "BONE\\AXIAL"),
        (("Br40d", "3"), "BR40D\\3"),
        (b"STANDARD ", "STANDARD"),
        ("LUNG  ENHANCED", "LUNG ENHANCED"),
        (["B30f\\X", " "], "B30F\\X"),
        (None, ""),
        ("", ""),
    ],
)
def test_normalize_kernel(value, expected: str) -> None:
    assert normalize_kernel(value) == expected


def test_normalize_pydicom_multivalue() -> None:
    ds = pydicom.Dataset()
    ds.ConvolutionKernel = ["BONE", "AXIAL"]
    assert type(ds.ConvolutionKernel).__name__ == "MultiValue"
    assert kernel_components(ds.ConvolutionKernel) == ("BONE", "AXIAL")
    assert normalize_kernel(ds.ConvolutionKernel) == "BONE\\AXIAL"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("B30f", "B30f"), ("b30F", "B30f"), ("bone", "BONE"), (1, "BONE"), ("2", "STANDARD"),
        (" standard ", "STANDARD"),
    ],
)
def test_resolve_domain(key, name: str) -> None:
    assert resolve_domain(DOMAINS, key).name == name


def test_resolve_unknown_lists_the_known_domains() -> None:
    with pytest.raises(UnknownDomainError) as info:
        resolve_domain(DOMAINS, "LUNG")
    msg = str(info.value)
    assert "unknown domain 'LUNG'" in msg
    assert all(d.name in msg for d in DOMAINS)
    for bad in ("", 7, None, True):
        with pytest.raises(UnknownDomainError):
            resolve_domain(DOMAINS, bad)
    assert issubclass(UnknownDomainError, ValueError)


def test_resolve_prefers_names_and_reports_ambiguity() -> None:
    domains = [
        Domain(0, "GE_LS16_STANDARD", "GE LightSpeed 16 / STANDARD", GE, "LightSpeed 16", "STANDARD"),
        Domain(1, "GE_HISPEED_STANDARD", "GE HiSpeed / STANDARD", GE, "HiSpeed", "STANDARD"),
        Domain(2, "BONE", "Siemens B70f called BONE", "SIEMENS", "Sensation 16", "B70f"),
        Domain(3, "X", "GE / BONE", "GE MEDICAL SYSTEMS", "LightSpeed 16", "BONE"),
    ]
    with pytest.raises(UnknownDomainError, match="ambiguous.*GE_LS16_STANDARD, GE_HISPEED_STANDARD"):
        resolve_domain(domains, "standard")
    assert resolve_domain(domains, "ge_hispeed_standard").id == 1
    assert resolve_domain(domains, "BONE").id == 2  # a name beats another domain's kernel
    assert resolve_domain(domains, "b70f").id == 2


def test_detect_from_real_dicom_tags(ct_small_path: Path, real_ct_dir: Path) -> None:
    ds = pydicom.dcmread(ct_small_path, stop_before_pixels=True)
    # CT_small: GE, model RHAPSODE, kernel STANDARD -> the GE STANDARD domain (model differs, kernel decides).
    found = detect_domain(DOMAINS, ds.Manufacturer, ds.get("ManufacturerModelName"), ds.ConvolutionKernel)
    assert found is not None and found.name == "STANDARD"
    # The real GE HiSpeed series uses kernel STD+, which no simulated domain has: the caller must ask.
    first = sorted(real_ct_dir.glob("*.dcm"))[0]
    real = pydicom.dcmread(first, stop_before_pixels=True)
    assert normalize_kernel(real.ConvolutionKernel) == "STD+"
    tags = (real.Manufacturer, real.get("ManufacturerModelName"), real.ConvolutionKernel)
    assert detect_domain(DOMAINS, *tags) is None


@pytest.mark.parametrize(
    ("manufacturer", "model", "kernel", "expected"),
    [
        ("GE MEDICAL SYSTEMS", "LightSpeed QX/i", ["BONE", "AXIAL"], "BONE"),
        ("GE Healthcare", None, "bone", "BONE"),
        ("SIEMENS", "Sensation 16", "B30f\\SOFT", "B30f"),
        ("Siemens Healthineers", "Emotion", "  b30f ", "B30f"),
        (None, None, "STANDARD", "STANDARD"),  # no manufacturer tag: the kernel alone decides
        ("SIEMENS", "Sensation 16", "STANDARD", None),  # GE kernel name on a Siemens scanner: not ours
        ("PHILIPS", "Brilliance", "B", None),
        ("GE MEDICAL SYSTEMS", "LightSpeed 16", "LUNG", None),
        ("GE MEDICAL SYSTEMS", "LightSpeed 16", None, None),
        ("GE MEDICAL SYSTEMS", "LightSpeed 16", "", None),
    ],
)
def test_detect_domain(manufacturer, model, kernel, expected: str | None) -> None:
    found = detect_domain(DOMAINS, manufacturer, model, kernel)
    assert (found.name if found else None) == expected


def test_detect_narrows_by_scanner_model_or_gives_up() -> None:
    domains = [
        Domain(0, "LS16_STD", "GE LightSpeed 16 / STANDARD", GE, "LightSpeed 16", "STANDARD"),
        Domain(1, "HISPEED_STD", "GE HiSpeed / STANDARD", "GE MEDICAL SYSTEMS", "HiSpeed", "STANDARD"),
        Domain(2, "FORCE_BR40", "Siemens Force / Br40d 3", "SIEMENS", "SOMATOM Force", "Br40d\\3"),
        Domain(3, "FORCE_BR40_ANY", "Siemens Force / Br40d", "SIEMENS", "SOMATOM Force", "Br40d"),
    ]
    assert detect_domain(domains, "GE MEDICAL SYSTEMS", "HiSpeed", "STANDARD").id == 1
    assert detect_domain(domains, "GE MEDICAL SYSTEMS", "lightspeed 16", "STANDARD").id == 0
    assert detect_domain(domains, "GE MEDICAL SYSTEMS", "Revolution", "STANDARD") is None  # ambiguous
    assert detect_domain(domains, "GE MEDICAL SYSTEMS", None, "STANDARD") is None
    # The exact multi-valued kernel wins over a match on its first value alone.
    assert detect_domain(domains, "SIEMENS", "SOMATOM Force", ["Br40d", "3"]).id == 2
    assert detect_domain(domains, "SIEMENS", "SOMATOM Force", ["Br40d", "2"]).id == 3
