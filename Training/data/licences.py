"""Licence and attribution files that travel with CT data (README, LICENSE, Citations, SOURCES.md).

Derived data (a simulated series made from real anatomy, a prepared dataset) must carry the attribution
of CC BY sources; these helpers find the files beside a series and quote them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["LICENCE_FILES", "licence_files", "attribution_section"]

LICENCE_FILES = ("README.md", "README", "LICENSE", "Citations", "SOURCES.md")


def licence_files(folder: Path, root: Path) -> list[Path]:
    """Licence files in ``folder`` and its parents up to ``root`` (when ``root`` is the series folder itself,
    up to two levels above it: a shared series keeps its licence one level up)."""
    folder, root = Path(folder).resolve(), Path(root).resolve()
    stop = root if folder != root else root.parent.parent
    out, cur = [], folder
    while True:
        out += [cur / n for n in LICENCE_FILES if (cur / n).is_file()]
        if cur == stop or stop not in cur.parents:
            return out
        cur = cur.parent


def attribution_section(files: Iterable[Path]) -> list[str]:
    """Markdown lines quoting each file once, CC BY ones flagged."""
    lines, seen = [], set()
    for f in files:
        if f in seen:
            continue
        seen.add(f)
        text = f.read_text(errors="replace").strip()
        cc_by = "CC BY" in text or "Creative Commons Attribution" in text
        head = f"### {f}" + (" (CC BY: attribution required)" if cc_by else "")
        lines += [head, "", "```", text, "```", ""]
    return lines
