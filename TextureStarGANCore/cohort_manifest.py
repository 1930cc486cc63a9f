"""The cohort's bookkeeping: ``manifest.csv`` (one row per input series), ``report.md``, and the merge of
shard manifests.

Every write is atomic (``fileio``), so a crash leaves the previous complete manifest. A run with
``--shard K/N`` writes ``manifest.shard-K-of-N.csv`` / ``report.shard-K-of-N.md``; ``merge`` joins the
shards into ``manifest.csv`` / ``report.md`` and refuses missing shards or a series listed twice.

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from .fileio import write_csv_atomic, write_text_atomic
from .volume_io import InputError

__all__ = ["COLUMNS", "STATUSES", "manifest_name", "read_manifest", "previous_rows", "write_manifest",
           "write_report", "merge"]

COLUMNS = ("path", "series_uid", "scanner", "source_kernel", "source_domain", "target", "status", "reason",
           "seconds", "slices", "output_path", "input_checksum", "model_id")
# pending: not done yet (in flight or not started when the manifest was written; a re-run does it).
STATUSES = ("done", "skipped", "failed", "pending")
_SHARD_FILE = re.compile(r"^manifest\.shard-(\d+)-of-(\d+)\.csv$")

Row = dict  # one manifest row: COLUMNS -> str


def manifest_name(shard: tuple[int, int] | None, stem: str = "manifest", suffix: str = ".csv") -> str:
    return f"{stem}{suffix}" if shard is None else f"{stem}.shard-{shard[0]}-of-{shard[1]}{suffix}"


def read_manifest(path: str | os.PathLike) -> list[Row]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("path", "series_uid", "status") if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(f"{path} is not a cohort manifest (no column {', '.join(missing)}).")
        return [{c: row.get(c) or "" for c in COLUMNS} for row in reader]


def row_key(row: Row) -> tuple[str, str]:
    return row["path"], row["series_uid"]


def previous_rows(output_root: Path) -> dict[tuple[str, str], Row]:
    """Rows of every manifest in ``output_root`` (earlier runs and shards); a 'done' row wins."""
    found: dict[tuple[str, str], Row] = {}
    for path in sorted(output_root.glob("manifest*.csv")):
        for row in read_manifest(path):
            key = row_key(row)
            if key not in found or row["status"] == "done":
                found[key] = row
    return found


def write_manifest(path: Path, rows: Iterable[Row]) -> None:
    write_csv_atomic(path, COLUMNS, ([r.get(c, "") for c in COLUMNS] for r in rows))


def _table(header: Sequence[str], lines: Iterable[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v).replace("|", "\\|") for v in line) + " |" for line in lines]
    return out


def write_report(path: Path, rows: Sequence[Row], facts: Sequence[tuple[str, str]] = ()) -> None:
    """``report.md``: counts by status and by scanner + kernel, the failures, the skip reasons."""
    status = Counter(r["status"] for r in rows)
    lines = ["# Cohort harmonization report", ""]
    lines += [f"- {k}: {v}" for k, v in facts]
    lines += [f"- series: {len(rows)} (" + ", ".join(f"{s} {status[s]}" for s in STATUSES if status[s]) + ")",
              ""]
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in rows:
        groups[(r["scanner"] or "unknown", r["source_kernel"] or "?")][r["status"]] += 1
    lines += ["## By scanner and kernel", ""]
    lines += _table(["scanner", "kernel", "series", *STATUSES],
                    [(s, k, sum(c.values()), *(c[x] for x in STATUSES))
                     for (s, k), c in sorted(groups.items())])
    failed = [r for r in rows if r["status"] == "failed"]
    lines += ["", f"## Failures ({len(failed)})", ""]
    failures = [(r["path"], r["series_uid"], r["reason"]) for r in failed]
    lines += _table(["path", "series UID", "reason"], failures) if failed else ["none"]
    reasons: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] == "skipped":
            reasons[r["reason"]].append(r["path"])
    lines += ["", f"## Skipped ({sum(len(v) for v in reasons.values())})", ""]
    shown = [(reason, len(paths), ", ".join(paths[:5]) + (" ..." if len(paths) > 5 else ""))
             for reason, paths in sorted(reasons.items(), key=lambda kv: -len(kv[1]))]
    lines += _table(["reason", "series", "paths"], shown) if shown else ["none"]
    write_text_atomic(path, "\n".join(lines) + "\n")


def merge(output_root: str | os.PathLike, manifests: Sequence[str | os.PathLike] = ()) -> list[Row]:
    """Join shard manifests into ``manifest.csv`` and ``report.md`` in ``output_root``; returns the rows.

    Without ``manifests`` it takes every ``manifest.shard-K-of-N.csv`` there and requires all N shards.
    Raises InputError for missing shards, mixed N, or a series in more than one manifest.
    """
    root = Path(output_root)
    if manifests:
        paths = [Path(p) for p in manifests]
    else:
        paths = sorted(p for p in root.glob("manifest.shard-*.csv") if _SHARD_FILE.match(p.name))
        shards = {tuple(int(v) for v in _SHARD_FILE.match(p.name).groups()) for p in paths}  # type: ignore
        counts = {n for _, n in shards}
        if not paths:
            raise InputError(f"no shard manifests (manifest.shard-K-of-N.csv) in {root}.")
        if len(counts) != 1:
            raise InputError(f"{root} holds shard manifests of different splits (N = {sorted(counts)}).")
        n = counts.pop()
        missing = sorted(set(range(1, n + 1)) - {k for k, _ in shards})
        if missing:
            raise InputError(f"shard(s) {', '.join(map(str, missing))} of {n} have no manifest in {root}; "
                             "run them first (or name the manifests to merge explicitly).")
    rows: dict[tuple[str, str], Row] = {}
    for p in paths:
        for row in read_manifest(p):
            if row_key(row) in rows:
                raise InputError(f"series {row['path']} ({row['series_uid'] or 'file'}) is in more than one "
                                 "manifest; were the shards run with different N?")
            rows[row_key(row)] = row
    merged = [rows[k] for k in sorted(rows)]
    write_manifest(root / "manifest.csv", merged)
    write_report(root / "report.md", merged, [("merged from", ", ".join(p.name for p in paths))])
    return merged
