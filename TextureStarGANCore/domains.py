"""Harmonization domains (scanner + reconstruction kernel) and how DICOM tags map onto them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

_WS = re.compile(r"\s+")
_FIELDS = ("id", "name", "display_name", "manufacturer", "scanner_model", "kernel")


class UnknownDomainError(ValueError):
    """A domain key that names no domain of the model, or several of them."""


@dataclass(frozen=True)
class Domain:
    """One harmonization domain. `name` is the unique key; `kernel` is the DICOM ConvolutionKernel."""

    id: int
    name: str
    display_name: str
    manufacturer: str
    scanner_model: str
    kernel: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Domain:
        """Build from a model card / dataset entry; ValueError naming the bad or missing field."""
        if not isinstance(d, dict):
            raise ValueError(f"domain entry must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _FIELDS if k not in d]
        if missing:
            raise ValueError(f"domain entry {d.get('name', d)!r}: missing field(s) {missing}")
        if not isinstance(d["id"], int) or isinstance(d["id"], bool) or d["id"] < 0:
            raise ValueError(
                f"domain entry {d.get('name')!r}: id must be a non-negative integer, got {d['id']!r}"
            )
        for key in ("name", "display_name", "manufacturer", "scanner_model", "kernel"):
            if not isinstance(d[key], str):
                raise ValueError(f"domain entry {d.get('name')!r}: {key} must be a string, got {d[key]!r}")
        if not d["name"].strip():
            raise ValueError(f"domain entry with id {d['id']}: name must not be empty")
        return cls(**{k: d[k] for k in _FIELDS})


DEFAULT_SIMULATED_DOMAINS: tuple[Domain, ...] = (
    Domain(0, "B30f", "SIEMENS Sensation 16 / B30f", "SIEMENS", "Sensation 16", "B30f"),
    Domain(1, "BONE", "GE LightSpeed QX/i / BONE", "GE MEDICAL SYSTEMS", "LightSpeed QX/i", "BONE"),
    Domain(2, "STANDARD", "GE LightSpeed 16 / STANDARD", "GE MEDICAL SYSTEMS", "LightSpeed 16", "STANDARD"),
)


def _clean(text: str) -> str:
    return _WS.sub(" ", text).strip().upper()


def kernel_components(value: Any) -> tuple[str, ...]:
    """The values of a (possibly multi-valued) ConvolutionKernel, cleaned and upper-cased.

    Accepts a string (DICOM multi-values are backslash-separated, e.g. 'B30f\\\\SOFT'), bytes, a list /
    tuple / pydicom MultiValue (e.g. ['BONE', 'AXIAL']) or None. Empty parts are dropped.
    """
    if value is None:
        return ()
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        parts: Iterable[Any] = value.split("\\")
    elif isinstance(value, Iterable):
        parts = value
    else:
        parts = [value]
    out: list[str] = []
    for part in parts:
        if isinstance(part, bytes):
            part = part.decode("latin-1")
        for sub in str(part).split("\\"):
            cleaned = _clean(sub)
            if cleaned:
                out.append(cleaned)
    return tuple(out)


def normalize_kernel(value: Any) -> str:
    """Canonical text of a ConvolutionKernel: upper case, single spaces, multi-values joined by '\\\\'."""
    return "\\".join(kernel_components(value))


def manufacturer_key(value: Any) -> str:
    # "GE MEDICAL SYSTEMS" vs "GE Healthcare", "SIEMENS" vs "Siemens Healthineers": the first word decides.
    text = _clean(str(value)) if value is not None else ""
    return text.split(" ")[0] if text else ""


def _check_domains(domains: Sequence[Domain]) -> None:
    if not domains:
        raise UnknownDomainError("the model defines no domains")


def describe_domains(domains: Sequence[Domain]) -> str:
    """'B30f (id 0, kernel B30f), BONE (id 1, kernel BONE), ...' for error messages and listings."""
    return ", ".join(f"{d.name} (id {d.id}, kernel {d.kernel}, {d.display_name})" for d in domains)


def resolve_domain(domains: Sequence[Domain], key: str | int) -> Domain:
    """Find the domain a user named by its name, kernel or id (case-insensitive, must be unambiguous).

    Names win over kernels, and kernels over ids, so a domain named 'STANDARD' is found even when another
    domain has that kernel. Raises UnknownDomainError listing the known domains.
    """
    _check_domains(domains)
    known = describe_domains(domains)
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise UnknownDomainError(f"domain must be given as a name, kernel or id, got {key!r}; known: {known}")
    text = _clean(str(key))
    if not text:
        raise UnknownDomainError(f"empty domain name; choose one of: {known}")
    tiers = (
        [d for d in domains if _clean(d.name) == text],
        [d for d in domains if normalize_kernel(d.kernel) == normalize_kernel(text)],
        [d for d in domains if text.isdigit() and d.id == int(text)],
    )
    for matches in tiers:
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(d.name for d in matches)
            raise UnknownDomainError(
                f"domain {key!r} is ambiguous: it matches {names}; name one of them exactly. Known: {known}"
            )
    raise UnknownDomainError(f"unknown domain {key!r}; this model knows: {known}")


def detect_domain(
    domains: Sequence[Domain], manufacturer: Any, scanner_model: Any, kernel: Any
) -> Domain | None:
    """The domain an input series belongs to, from its DICOM tags, or None when it cannot be told.

    The kernel must match (the whole multi-valued kernel, or one of its values, e.g. 'BONE' in
    ['BONE', 'AXIAL']); when both sides name a manufacturer they must agree. Several candidates are narrowed
    by scanner model; if still ambiguous, None (the caller must ask the user to name the source).
    """
    parts = kernel_components(kernel)
    if not parts or not domains:
        return None
    full = "\\".join(parts)
    manu = manufacturer_key(manufacturer)
    candidates = []
    for d in domains:
        dk = normalize_kernel(d.kernel)
        if not dk or (dk != full and dk not in parts):
            continue
        dm = manufacturer_key(d.manufacturer)
        if manu and dm and manu != dm:
            continue
        candidates.append(d)
    if len(candidates) > 1:
        # Prefer the exact multi-valued kernel, then the first value (the kernel proper; later values
        # are often modifiers such as an iterative strength), then the scanner model.
        for narrow in (
            lambda d: normalize_kernel(d.kernel) == full,
            lambda d: normalize_kernel(d.kernel) == parts[0],
            lambda d: scanner_model is not None and _clean(d.scanner_model) == _clean(str(scanner_model)),
        ):
            subset = [d for d in candidates if narrow(d)]
            if subset:
                candidates = subset
            if len(candidates) == 1:
                break
    return candidates[0] if len(candidates) == 1 else None


# How a harmonized output records what was done (DICOM DerivationDescription, volume-file metadata); the
# ConvolutionKernel tag keeps the kernel the scanner used, so this record is what tells a harmonized series.
_RECORD = re.compile(r"^Harmonized by ctharmonize to (?P<target>.+?) \(kernel (?P<target_kernel>[^)]*)\) "
                     r"from (?P<source>.*)$")


def harmonization_description(target: Domain, source: str) -> str:
    """'Harmonized by ctharmonize to B30f (kernel B30f) from BONE': the record of one harmonization.

    ``source`` describes the input: a domain name, or e.g. 'kernel B40f (not a training kernel)'."""
    return f"Harmonized by ctharmonize to {target.name} (kernel {target.kernel}) from {source}"


def harmonization_record(text: Any) -> dict[str, str] | None:
    """The target domain name, target kernel and source of a ``harmonization_description``; None when
    ``text`` is not one."""
    match = _RECORD.match(str(text or "").strip())
    return match.groupdict() if match else None
