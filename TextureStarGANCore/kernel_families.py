"""Kernel families: the model domain closest to a reconstruction kernel the model was not trained on.

A scanner's ConvolutionKernel that names none of the model's kernels is placed on its vendor's sharpness
scale and matched to the model's domain of the same vendor nearest on that scale:

- Siemens: the two-digit number of B30f, Br40d, Hr38h, I30f\\3, Qr36d\\3 ... (higher = sharper); a leading
  I or Q, or an iterative strength as a second value (Br40d\\3), marks an iterative reconstruction, which
  prefers an iterative domain (a mismatch counts as 5 steps on the scale);
- GE: SOFT < STANDARD < STD+ < DETAIL = CHEST < LUNG < BONE < BONEPLUS < EDGE = ULTRA ("HD" prefix
  dropped);
- Philips: A < B < C < D < E = L (lung) < YA < YB < ... YF, the head kernels UA, UB, UC each just above
  A, B, C;

Other vendors (Canon / Toshiba FC.., United Imaging ..) and names outside these patterns get no family:
the caller falls back to the image-based estimate or asks the user. The scales are the vendors' published
orderings, not measurements: a family match is an approximation, reported as such; a paired acquisition
calibrates the real kernels (``Training.calibrate_kernels``).

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .domains import Domain, kernel_components, manufacturer_key

__all__ = ["family_domain", "kernel_position"]

ITERATIVE_MISMATCH = 5.0  # scale steps a reconstruction-type mismatch costs (Siemens numbers: 10 per class)
_SIEMENS = re.compile(r"^([A-Z]{1,2})(\d{2})([A-Z]?)$")
_GE = {"SOFT": 1.0, "STANDARD": 2.0, "STND": 2.0, "STD": 2.0, "STD+": 2.5, "DETAIL": 3.0, "CHEST": 3.0,
       "LUNG": 4.0, "BONE": 5.0, "BONEPLUS": 5.5, "BONE PLUS": 5.5, "EDGE": 6.0, "ULTRA": 6.0}
_PHILIPS_SINGLE = {"A": 1.0, "B": 2.0, "C": 3.0, "D": 4.0, "E": 5.0, "L": 5.0}
# Manufacturer keys (first word of the tag, upper case) of the vendors that have a scale.
_VENDORS = {"SIEMENS": "siemens", "GE": "ge", "PHILIPS": "philips"}

Position = tuple[str, float, bool]  # (vendor, place on its sharpness scale, iterative)


def kernel_position(manufacturer: Any, kernel: Any) -> Position | None:
    """Where a kernel sits on its vendor's sharpness scale, or None (unknown vendor or name pattern)."""
    vendor = _VENDORS.get(manufacturer_key(manufacturer))
    parts = kernel_components(kernel)
    if vendor is None or not parts:
        return None
    name = parts[0]
    if vendor == "siemens":
        m = _SIEMENS.match(name)
        if m is None:
            return None
        iterative = m.group(1)[0] in "IQ" or (len(parts) > 1 and parts[1].isdigit())
        return vendor, float(m.group(2)), iterative
    if vendor == "ge":
        name = re.sub(r"^HD\s*", "", name)
        return (vendor, _GE[name], False) if name in _GE else None
    if name in _PHILIPS_SINGLE:
        return vendor, _PHILIPS_SINGLE[name], False
    if len(name) == 2 and name[0] in "UY" and "A" <= name[1] <= "F":
        rank = ord(name[1]) - ord("A") + 1.0
        # U: just above the body letter of its rank (UB nearer UB than B); Y: above L, YA the softest.
        return vendor, (rank + 0.1) if name[0] == "U" else (5.0 + rank), False
    return None


def family_domain(domains: Sequence[Domain], manufacturer: Any, kernel: Any) -> Domain | None:
    """The model domain of the same vendor nearest to ``kernel`` on the vendor's sharpness scale (ties: the
    first), or None when the kernel or no domain of that vendor has a place on a scale, or when several
    domains sit exactly at the kernel's place (``domains.detect_domain`` leaves that choice to the user)."""
    pos = kernel_position(manufacturer, kernel)
    if pos is None:
        return None
    vendor, place, iterative = pos
    scored = []
    for d in domains:
        dp = kernel_position(d.manufacturer, d.kernel)
        if dp is not None and dp[0] == vendor:
            scored.append((abs(dp[1] - place) + (ITERATIVE_MISMATCH if dp[2] != iterative else 0.0), d))
    if not scored:
        return None
    cost = min(c for c, _ in scored)
    if cost == 0 and sum(c == 0 for c, _ in scored) > 1:
        return None  # the same place twice (one kernel on two scanner models): the user must choose
    return next(d for c, d in scored if c == cost)
