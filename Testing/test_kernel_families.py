"""Kernel families: a kernel the model has no domain for goes to the nearest domain of its vendor's scale."""

from __future__ import annotations

import numpy as np
import pytest

from TextureStarGANCore.domains import Domain
from TextureStarGANCore.inference import detect_family
from TextureStarGANCore.kernel_families import family_domain, kernel_position

_S, _G, _P = "SIEMENS", "GE MEDICAL SYSTEMS", "Philips"
# The bundled model's vendors and kernels (its file is read in the inference test below).
DOMAINS = tuple(
    Domain(i, name, name, manu, "", kernel)
    for i, (name, manu, kernel) in enumerate([
        ("SIEMENS_B30f", _S, "B30f"), ("SIEMENS_B40f", _S, "B40f"), ("SIEMENS_B50f", _S, "B50f"),
        ("SIEMENS_B70f", _S, "B70f"), ("SIEMENS_I30f_3", _S, "I30f\\3"), ("GE_SOFT", _G, "SOFT"),
        ("GE_STANDARD", _G, "STANDARD"), ("GE_LUNG", _G, "LUNG"), ("GE_BONE", _G, "BONE"),
        ("GE_HISPEED_STDPLUS", _G, "STD+"),
        ("PHILIPS_B", _P, "B"), ("PHILIPS_C", _P, "C"), ("PHILIPS_L", _P, "L"),
        ("PHILIPS_UB_IDOSE", _P, "UB"), ("PHILIPS_YA", _P, "YA"),
    ])
)


@pytest.mark.parametrize("manufacturer, kernel, expected", [
    ("SIEMENS", "Br40d", "SIEMENS_B40f"),
    ("Siemens Healthineers", "Br64d", "SIEMENS_B70f"),
    ("SIEMENS", "Hr38h", "SIEMENS_B40f"),
    ("SIEMENS", "Bl57d", "SIEMENS_B50f"),
    ("SIEMENS", "Br36d\\3", "SIEMENS_I30f_3"),  # an iterative strength: the iterative domain
    ("SIEMENS", "I26f\\3", "SIEMENS_I30f_3"),
    ("SIEMENS", "Qr40d\\3", "SIEMENS_B40f"),  # iterative, but 10 steps from I30f: the number wins
    ("GE Healthcare", "HD STANDARD", "GE_STANDARD"),
    ("GE MEDICAL SYSTEMS", "BONEPLUS", "GE_BONE"),
    ("GE MEDICAL SYSTEMS", ["EDGE", "AXIAL"], "GE_BONE"),
    ("GE MEDICAL SYSTEMS", "DETAIL", "GE_HISPEED_STDPLUS"),  # 3: half a step from STD+ (2.5)
    ("GE MEDICAL SYSTEMS", "STND", "GE_STANDARD"),
    ("Philips", "A", "PHILIPS_B"),
    ("Philips", "UC", "PHILIPS_C"),  # UC sits just above C
    ("Philips", "UB", "PHILIPS_UB_IDOSE"),  # exact, for a model that has it: the same place
    ("Philips", "YC", "PHILIPS_YA"),
    ("Philips", "E", "PHILIPS_L"),
])
def test_a_foreign_kernel_goes_to_the_nearest_domain_of_its_vendor(manufacturer, kernel, expected):
    assert family_domain(DOMAINS, manufacturer, kernel).name == expected


@pytest.mark.parametrize("manufacturer, kernel", [
    ("TOSHIBA", "FC13"),  # a vendor without a scale
    ("CANON MEDICAL SYSTEMS", "FC08"),
    ("SIEMENS", "SMOOTH"),  # not the vendor's pattern
    ("Philips", "EC"),
    ("GE MEDICAL SYSTEMS", "SOFTEST"),
    (None, "B30f"),  # no manufacturer: the vendor cannot be told
    ("SIEMENS", None),
])
def test_no_family_when_the_vendor_or_the_name_has_no_scale(manufacturer, kernel):
    assert family_domain(DOMAINS, manufacturer, kernel) is None


def test_the_list_above_is_the_bundled_models():
    from TextureStarGANCore.model_file import load_model_file

    bundled = load_model_file(None).domains
    assert [(d.name, d.kernel) for d in bundled] == [(d.name, d.kernel) for d in DOMAINS]
    assert [d.manufacturer.split()[0].upper() for d in bundled] == [
        d.manufacturer.split()[0].upper() for d in DOMAINS]


def test_two_domains_at_the_kernels_exact_place_leave_the_choice_to_the_user():
    two = (Domain(0, "GE_STANDARD_A", "", _G, "LightSpeed 16", "STANDARD"),
           Domain(1, "GE_STANDARD_B", "", _G, "HiSpeed", "STANDARD"),
           Domain(2, "GE_BONE", "", _G, "", "BONE"))
    assert family_domain(two, _G, "HD STANDARD") is None  # both at 2: ambiguous, as detect_domain says
    assert family_domain(two, _G, "BONEPLUS").name == "GE_BONE"
    assert family_domain(two, _G, "SOFT").name == "GE_STANDARD_A"  # one step from both: the first


def test_a_vendor_the_model_has_no_domain_of_gets_none():
    siemens_only = DOMAINS[:5]
    assert family_domain(siemens_only, "GE MEDICAL SYSTEMS", "STANDARD") is None
    assert kernel_position("GE MEDICAL SYSTEMS", "STANDARD") == ("ge", 2.0, False)
    assert kernel_position("SIEMENS", "I30f\\3") == ("siemens", 30.0, True)


def test_the_engine_uses_the_family_for_an_unknown_kernel_and_says_so():
    from TextureStarGANCore.inference import Harmonizer

    h = Harmonizer.from_checkpoint(None, device="cpu")  # the bundled model
    tags = {"Manufacturer": "SIEMENS", "ManufacturerModelName": "SOMATOM Force", "ConvolutionKernel": "Br64d"}
    assert h.detect_source(tags) is None and h.detect_family(tags).name == "SIEMENS_B70f"
    x = np.full((1, 64, 64), -1000.0, np.float32)  # air around a noisy disc of soft tissue
    yy, xx = np.mgrid[:64, :64]
    x[0][(yy - 32) ** 2 + (xx - 32) ** 2 < 24 ** 2] = 40.0
    x += np.random.default_rng(0).normal(0.0, 30.0, x.shape).astype(np.float32)
    h.harmonize(x, (0.7, 0.7, 1.0), target="SIEMENS_B30f", tags=tags, noise=False)
    assert h.last_run["source"] == "SIEMENS_B70f" and "kernel family" in h.last_run["source_from"]
    # A series this tool harmonized is not placed by its kernel tag.
    done = {**tags, "DerivationDescription": "Harmonized by ctharmonize to X (kernel Y) from Z"}
    assert h.detect_family(done) is None and detect_family(done, DOMAINS) is None
