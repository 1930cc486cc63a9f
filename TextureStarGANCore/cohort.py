"""Cohort harmonization: a whole tree of CT series in, a mirrored tree of harmonized series out.

    ctharmonize cohort INPUT_ROOT --target KERNEL --output OUTPUT_ROOT [--model M] [--workers N]
                [--device auto|cpu|cuda] [--include GLOB] [--exclude GLOB] [--source KERNEL]
                [--dry-run] [--retry-failed] [--shard K/N]
    ctharmonize cohort --merge OUTPUT_ROOT      (or: python -m TextureStarGANCore.cohort merge OUTPUT_ROOT)

1. Discover every series (``discovery``); non-CT series and series whose source kernel the model does not
   know are listed as skipped with the reason.
2. Plan: output path (mirrored tree), shard (stable hash of the series UID), resume (a series already done
   with the same input checksum, model and target is kept; failed ones are kept unless --retry-failed).
3. Run: one model per worker (``cohort_pool`` starts them, ``cohort_worker`` is one), series pulled
   dynamically from one queue; the manifest is rewritten atomically after every series, so a crash or
   Ctrl-C loses at most the series in flight.

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .cli_types import positive_int
from .cohort_manifest import STATUSES, manifest_name, merge, previous_rows, write_manifest, write_report
from .cohort_pool import execute, worker_slots
from .cohort_worker import Task, input_checksum
from .discovery import CohortSeries, discover, volume_suffix
from .domains import (
    Domain,
    UnknownDomainError,
    describe_domains,
    detect_domain,
    harmonization_description,
    resolve_domain,
)
from .fileio import TEMP_MARKER
from .kernel_families import family_domain
from .model_file import KIND_KERNEL_TRANSFER, ModelFile, ModelFileError, load_model_file
from .volume_io import InputError

__all__ = ["CohortRun", "add_arguments", "main", "model_id", "parse_shard", "run_cohort", "run_command",
           "shard_of"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


def shard_of(key: str, count: int) -> int:
    """The shard (1..count) of a series: a stable hash of its key (the series UID), the same everywhere."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) % count + 1


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' with 1 <= K <= N."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects K/N (e.g. 3/8), got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 1 <= K <= N")
    return k, n


def model_id(model: ModelFile) -> str:
    """Identity of the model file's content (what 'done with this model' means on resume)."""
    h = hashlib.sha256()
    with open(model.path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class CohortRun:
    """What a run did: every row of its manifest, and where the manifest and report are."""

    rows: list[dict]
    manifest: Path | None
    report: Path | None
    seconds: float = 0.0  # wall time of the harmonization phase
    ran: int = 0  # series harmonized (done or failed) in this run
    cancelled: bool = False
    plan_seconds: float = 0.0  # discovery + plan (checksums of earlier results included)
    manifest_seconds: float = 0.0  # manifest rewrites during the run

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


@dataclass
class _Item:
    series: CohortSeries
    row: dict
    action: str  # "run", "keep" (done or failed before, unchanged) or "skip"
    source: Domain | None = None
    output: Path | None = None
    notes: list[str] = field(default_factory=list)


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _output_paths(series: Sequence[CohortSeries]) -> dict[int, str]:
    """Relative output path per series id(): the input's relative path (mirrored tree).

    A DICOM series gets a sub-folder named by its UID (dots made '_', so no suffix is read into it) when
    its folder holds several CT series, lies directly in the root, or has another output below it: each
    output folder holds exactly one series, so its atomic replacement never touches another. Computed on
    the whole discovery (not a shard) so every shard and every re-run agree.
    """
    images = [s for s in series if not s.skip_reason]
    per_folder: dict[str, int] = {}
    for s in images:
        if s.kind == "dicom":
            per_folder[s.path] = per_folder.get(s.path, 0) + 1
    ancestors = set()
    for s in images:
        parts = s.path.split("/")
        ancestors.update("/".join(parts[:i]) for i in range(1, len(parts)))
    out = {}
    for s in images:
        own = s.kind == "dicom" and (s.path == "." or per_folder[s.path] > 1 or s.path in ancestors)
        if not own:
            out[id(s)] = s.path
        else:
            name = "series_" + s.series_uid.replace(".", "_")
            out[id(s)] = name if s.path == "." else f"{s.path}/{name}"
    return out


def _source(series: CohortSeries, domains: Sequence[Domain], fallback: Domain | None,
            family: bool = False) -> tuple[Domain | None, str]:
    """The series' source domain from its tags (else ``fallback``, else with ``family`` (kernel-transfer
    models, whose output depends on the source) the nearest of the kernel's family, noted), or None and
    why not."""
    found = detect_domain(domains, series.manufacturer, series.scanner_model, series.kernel)
    if found is not None:
        return found, ""
    if fallback is not None:
        return fallback, "source kernel from --source"
    nearest = family_domain(domains, series.manufacturer, series.kernel) if family else None
    if nearest is not None:
        return nearest, f"source kernel {nearest.name}: the nearest of the kernel family of {series.kernel!r}"
    if series.kernel:
        return None, (f"source kernel {series.kernel!r} ({series.scanner}) is not one the model knows "
                      f"({describe_domains(domains)}); pass --source KERNEL to harmonize such series anyway")
    return None, "no kernel tag (e.g. a NIfTI file); pass --source KERNEL to name the source kernel"


def _remove_temporaries(output: Path) -> None:
    """Leftovers of an interrupted atomic write of ``output`` (a crash mid-series): never a finished one."""
    stem = output.name[: len(output.name) - len(volume_suffix(output.name))] or output.name
    if not output.parent.is_dir():
        return
    for pattern in (f".{glob.escape(stem)}{TEMP_MARKER}*", f".{glob.escape(output.name)}.old-*"):
        for p in output.parent.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _plan(found: Sequence[CohortSeries], out_root: Path, in_root: Path, model: ModelFile, mid: str,
          target: Domain, fallback: Domain | None, shard: tuple[int, int] | None,
          retry_failed: bool) -> list[_Item]:
    outputs = _output_paths(found)
    previous = previous_rows(out_root) if out_root.is_dir() else {}
    items = []
    for s in found:
        if shard is not None and shard_of(s.key, shard[1]) != shard[0]:
            continue
        row = {"path": s.path, "series_uid": s.series_uid, "scanner": s.scanner, "source_kernel": s.kernel,
               "target": target.name, "status": "pending", "slices": str(s.slices), "model_id": mid}
        item = _Item(s, row, "run")
        items.append(item)
        reason = s.skip_reason
        if not reason:
            item.source, note = _source(s, model.domains, fallback, model.kind == KIND_KERNEL_TRANSFER)
            if item.source is None:
                reason = note
            elif note:
                item.notes.append(note)
        if reason:
            item.action, row["status"], row["reason"] = "skip", "skipped", reason
            continue
        assert item.source is not None
        row["source_domain"] = item.source.name
        row["output_path"] = outputs[id(s)]
        item.output = out_root / outputs[id(s)]
        if item.source.id == target.id:
            item.notes.append("already the target kernel")
        prev = previous.get((s.path, s.series_uid))
        if prev is None or (prev["model_id"], prev["target"]) != (mid, target.name) \
                or prev["status"] not in ("done", "failed") or (prev["status"] == "failed" and retry_failed):
            continue
        if prev["status"] == "done" and not item.output.exists():
            continue
        if input_checksum(s.files, in_root) == prev["input_checksum"]:  # unchanged since then: keep
            item.action = "keep"
            item.row = prev
    return items


def _print_plan(items: Sequence[_Item], out: TextIO) -> None:
    for it in items:
        s = it.series
        uid = f" [{s.series_uid}]" if s.series_uid else ""
        if it.action == "skip":
            print(f"skip  {s.path}{uid}: {it.row['reason']}", file=out)
            continue
        state = {"run": "run ", "keep": "done" if it.row["status"] == "done" else "fail"}[it.action]
        extra = f"; {', '.join(it.notes)}" if it.notes else ""
        if it.action == "keep" and it.row["status"] == "failed":
            extra += f"; failed before ({it.row['reason']}), --retry-failed retries it"
        source = it.source.name if it.source else "?"
        print(f"{state}  {s.path}{uid}: {s.slices} slices, {s.scanner}, kernel {s.kernel or '?'} -> source "
              f"{source} (known to the model) -> {it.row['output_path']}{extra}", file=out)
    counts = {a: sum(i.action == a for i in items) for a in ("run", "keep", "skip")}
    print(f"plan: {len(items)} series: {counts['run']} to harmonize, {counts['keep']} already done or failed "
          f"before (kept), {counts['skip']} skipped", file=out)


def run_cohort(input_root: str | os.PathLike, output_root: str | os.PathLike, target: str, *,
               model_path: str | os.PathLike | None = None, workers: int | None = None, device: str = "auto",
               include: Sequence[str] = (), exclude: Sequence[str] = (), source: str | None = None,
               dry_run: bool = False, retry_failed: bool = False, shard: tuple[int, int] | None = None,
               fine_detail: str = "scaled", allow_untrained: bool = False,
               err: TextIO | None = None) -> CohortRun:
    """Harmonize every CT series under ``input_root`` into ``output_root`` (see the module docstring).

    Raises InputError / UnknownDomainError / ModelFileError for bad arguments (nothing written).
    """
    err = err or sys.stderr
    in_root, out_root = Path(input_root).absolute(), Path(output_root).absolute()
    if not in_root.is_dir():
        raise InputError(f"input root {in_root} is not a folder.")
    if _inside(out_root, in_root) or _inside(in_root, out_root):
        raise InputError(f"output root {out_root} and input root {in_root} must not contain each other "
                         "(the input is never written to).")
    if out_root.exists() and not out_root.is_dir():
        raise InputError(f"output root {out_root} exists and is not a folder.")
    model = load_model_file(model_path)
    if not model.trained and not allow_untrained:
        raise InputError(f"model {model.path} has untrained (random) weights; train a model first.")
    tgt = resolve_domain(model.domains, target)
    fallback = resolve_domain(model.domains, source) if source is not None else None
    slots = worker_slots(device, workers) if not dry_run else []
    mid = model_id(model)

    t0 = time.perf_counter()
    found = discover(in_root, include, exclude)
    items = _plan(found.series, out_root, in_root, model, mid, tgt, fallback, shard, retry_failed)
    bookkeeping = time.perf_counter() - t0
    print(f"{in_root}: {len(found.series)} series ({len(items)} in this shard), "
          f"{len(found.ignored_files)} other file(s) ignored, {found.filtered_out} left out by "
          f"--include/--exclude; discovery and plan {bookkeeping:.1f} s", file=err)
    if dry_run:
        _print_plan(items, sys.stdout)  # the plan is the result: stdout, so it can be piped or saved
        return CohortRun([it.row for it in items], None, None)

    rows = [it.row for it in items]
    manifest = out_root / manifest_name(shard)
    report = out_root / manifest_name(shard, "report", ".md")
    run_items = [it for it in items if it.action == "run"]
    for it in run_items:
        _remove_temporaries(it.output)  # type: ignore[arg-type]
        it.row.update({"status": "pending", "reason": "; ".join(it.notes), "seconds": "",
                       "input_checksum": ""})
    out_root.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, rows)
    t_run = time.perf_counter()
    save_seconds = [0.0]

    def save() -> None:
        t = time.perf_counter()
        write_manifest(manifest, [it.row for it in items])
        save_seconds[0] += time.perf_counter() - t

    def record(k: int, fields: dict) -> None:
        row = run_items[k].row
        row.update({key: str(v) for key, v in fields.items()})
        row["seconds"] = f"{float(fields['seconds']):.2f}"
        save()

    tasks = [Task(k, it.series.kind, [str(f) for f in it.series.files], str(in_root / it.series.path),
                  str(in_root), str(it.output), tgt.name, it.source.name,  # type: ignore[union-attr]
                  harmonization_description(tgt, it.source.name))  # type: ignore[union-attr]
             for k, it in enumerate(run_items)]
    ran, cancelled = 0, False
    if run_items:
        ran, cancelled = execute(tasks, [it.series.path for it in run_items],
                                 [it.series.slices for it in run_items], model, device, slots, fine_detail,
                                 record, err)
    wall = time.perf_counter() - t_run
    rows = [it.row for it in items]
    write_manifest(manifest, rows)
    done_now = sum(it.row["status"] == "done" for it in run_items)
    rate = done_now * 3600 / max(wall, 1e-9)
    facts = [("input root", str(in_root)), ("output root", str(out_root)), ("target", tgt.name),
             ("model", f"{model.path} (id {mid})"),
             ("workers", f"{len(slots)} on {slots[0][0]}" if slots else "none (nothing to harmonize)"),
             ("shard", f"{shard[0]}/{shard[1]}" if shard else "all"),
             ("finished", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
             ("this run", f"{ran} series in {wall:.1f} s ({rate:.0f} series/hour); discovery + plan "
                          f"{bookkeeping:.2f} s, manifest writes {save_seconds[0]:.2f} s"
                          + ("; CANCELLED (pending series are done by a re-run)" if cancelled else ""))]
    write_report(report, rows, facts)
    counts = ", ".join(f"{s} {sum(r['status'] == s for r in rows)}" for s in STATUSES)
    print(f"wrote {manifest} and {report}: {counts}", file=err)
    return CohortRun(rows, manifest, report, wall, ran, cancelled, bookkeeping, save_seconds[0])


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cohort`` sub-command's options (``ctharmonize cohort``)."""
    p.add_argument("input_root", nargs="?", type=Path, help="folder tree of DICOM series and volume files")
    p.add_argument("--target", help="target kernel: a domain name, kernel or id of the model")
    p.add_argument("--output", "-o", type=Path,
                   help="output root: the mirrored tree, manifest.csv, report.md")
    p.add_argument("--model", type=Path, help="model file (.safetensors); default: the bundled model")
    p.add_argument("--workers", type=positive_int,
                   help="worker processes (default: 1 on CPU, one per GPU on CUDA); each loads the model "
                        "once")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only series whose relative path matches (repeatable; * also crosses folders)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave these series out")
    p.add_argument("--source", help="source kernel for series whose tags do not tell it (e.g. NIfTI files)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    p.add_argument("--retry-failed", action="store_true", help="retry series that failed in an earlier run")
    p.add_argument("--shard", type=parse_shard, metavar="K/N",
                   help="run only shard K of N (stable hash of the series UID); merge with --merge")
    p.add_argument("--fine-detail", choices=("scaled", "keep", "drop"), default="scaled",
                   help="detail finer than the model's pixels (as in `harmonize`)")
    p.add_argument("--merge", type=Path, metavar="OUTPUT_ROOT",
                   help="merge the shard manifests in OUTPUT_ROOT into manifest.csv and report.md, then stop")
    p.add_argument("--allow-untrained", action="store_true", help=argparse.SUPPRESS)


def run_command(args: argparse.Namespace) -> int:
    """Run ``ctharmonize cohort``; returns the exit code (0 all done or skipped, 1 some failed or not run,
    2 bad input, 130 cancelled)."""
    try:
        if args.merge is not None:
            rows = merge(args.merge)
            print(f"merged {len(rows)} series into {args.merge / 'manifest.csv'} and report.md",
                  file=sys.stderr)
            return EXIT_OK
        missing = [name for name, v in (("INPUT_ROOT", args.input_root), ("--target", args.target),
                                         ("--output", args.output)) if v is None]
        if missing:
            raise InputError(f"cohort needs {', '.join(missing)} (or --merge OUTPUT_ROOT).")
        run = run_cohort(args.input_root, args.output, args.target, model_path=args.model,
                         workers=args.workers, device=args.device, include=args.include,
                         exclude=args.exclude, source=args.source,
                         dry_run=args.dry_run, retry_failed=args.retry_failed, shard=args.shard,
                         fine_detail=args.fine_detail, allow_untrained=args.allow_untrained)
    except (InputError, UnknownDomainError, ModelFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cancelled before harmonizing started; nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED
    if run.cancelled:
        return EXIT_CANCELLED
    if args.dry_run:
        return EXIT_OK
    return EXIT_FAILED if run.count("failed") or run.count("pending") else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m TextureStarGANCore.cohort merge OUTPUT_ROOT [MANIFEST ...]``, or the ``cohort`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        p = argparse.ArgumentParser(prog="python -m TextureStarGANCore.cohort merge",
                                    description="Merge shard manifests into manifest.csv and report.md.")
        p.add_argument("output_root", type=Path)
        p.add_argument("manifests", nargs="*", type=Path,
                       help="default: every manifest.shard-K-of-N.csv there")
        a = p.parse_args(argv[1:])
        try:
            rows = merge(a.output_root, a.manifests)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"merged {len(rows)} series into {a.output_root / 'manifest.csv'}", file=sys.stderr)
        return EXIT_OK
    parser = argparse.ArgumentParser(prog="python -m TextureStarGANCore.cohort",
                                     description="Harmonize every CT series of a folder tree (as ctharmonize "
                                                 "cohort).")
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
