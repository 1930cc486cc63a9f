"""Turn a DICOM tree into the training dataset (layout in TextureStarGANCore/DESIGN.md).

    python -m Training.prepare --dicom-root DIR --out DATASET [--min-patients N] [--workers W] [--seed S]

1. Scan the tree (``data.dicom_scan``), group usable series by scanner + kernel into domains and write
   the domain report (patients, series, slices per domain, like the paper's section III-A) as
   ``domain_report.csv`` and ``domain_report.md``.
2. Split by patient (default 80/20, seeded, stratified by the set of domains a patient has; a patient is
   never in two splits).
3. Preprocess every series as the paper and the model do (``TextureStarGANCore.preprocessing.to_canvas``:
   HU window to [-1, 1], 1 mm pixels, body-centred 512 x 512 canvas with -1024 HU background) and store
   it as ``arrays/<series_uid>.npy`` (float16, memory-mappable) with one manifest row per slice.

Series of one patient that share a DICOM frame of reference get the same canvas centre in patient
coordinates (taken from the body of the first of them), so paired slices of simulated data line up on the
canvas to within half an input pixel. Slices stay slices (in-plane resampling only, as the 2D model sees
them). Parallel workers; progress bar; resumable: a series whose array and sidecar are complete is not
redone; a series that cannot be read is reported in the domain report and dataset.json and skipped.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from TextureStarGANCore.fileio import atomic_output, write_text_atomic
from TextureStarGANCore.preprocessing import PreprocessSpec
from TextureStarGANCore.volume_io import InputError
from Training.data.dicom_scan import DomainGroup, SeriesRecord, group_domains, scan_tree

__all__ = ["prepare", "split_patients", "PrepareCancelled", "MANIFEST_COLUMNS", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MANIFEST_COLUMNS = (
    "patient",
    "series_uid",
    "domain",
    "domain_id",
    "split",
    "slice_index",
    "z_mm",
    "source",
    "array",
    "row",
    "origin",  # real / simulated; added in format 1 without a version change (readers default it)
)
_STATE = "prepare_settings.json"
_CHUNK = 16  # slices per to_canvas call (bounded memory for long series)


class PrepareCancelled(RuntimeError):
    """Cancelled by the caller; finished series are kept and a re-run resumes."""


def split_patients(groups: Sequence[DomainGroup], test_fraction: float, seed: int) -> dict[str, str]:
    """Patient -> 'train' | 'test'. Strata = the set of domains a patient has series in; within each,
    a seeded shuffle puts round(test_fraction * n) patients in test (none when a stratum has one)."""
    domains_of: dict[str, set[str]] = defaultdict(set)
    for g in groups:
        if g.included:
            for s in g.series:
                domains_of[s.patient].add(g.domain.name)
    strata: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for patient, doms in domains_of.items():
        strata[tuple(sorted(doms))].append(patient)
    rng = np.random.default_rng(seed)
    split = {}
    for key in sorted(strata):
        patients = sorted(strata[key])
        rng.shuffle(patients)
        n_test = int(round(test_fraction * len(patients))) if len(patients) > 1 else 0
        for i, p in enumerate(patients):
            split[p] = "test" if i < n_test else "train"
    return split


# ------------------------------------------------------------------------------------------------------
# Per-series work (runs in worker processes)
# ------------------------------------------------------------------------------------------------------


def _sidecar_ok(arrays: Path, uid: str, spec: PreprocessSpec, n_files: int) -> dict | None:
    side = arrays / f"{_safe(uid)}.json"
    npy = arrays / f"{_safe(uid)}.npy"
    if not side.is_file() or not npy.is_file():
        return None
    try:
        info = json.loads(side.read_text())
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    s = spec.canvas_size
    if (
        info.get("spec") != spec.to_dict()
        or info.get("n_files") != n_files
        or arr.shape != (info.get("slices"), s, s)
        or arr.dtype != np.float16
    ):
        return None
    return info


def _safe(uid: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in uid)


def _process_series(task: dict) -> dict:
    """Read one series, put it on the canvas, write arrays/<uid>.npy + sidecar; returns the sidecar dict."""
    import torch

    from TextureStarGANCore.preprocessing import body_center, make_placement, to_canvas
    from TextureStarGANCore.volume_io import read_dicom_files

    torch.set_num_threads(1)
    root, arrays = Path(task["root"]), Path(task["arrays"])
    spec = PreprocessSpec.from_dict(task["spec"])
    uid = task["series_uid"]
    done = _sidecar_ok(arrays, uid, spec, len(task["files"]))
    if done is not None and (
        task["centre_mm"] is None or np.allclose(done["centre_mm"], task["centre_mm"], atol=1.0)
    ):
        return {**done, "resumed": True}
    try:
        vol = read_dicom_files([root / f for f in task["files"]], where=str(root / task["folder"]))
    except InputError as exc:
        return {"series_uid": uid, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a broken file must not abort the whole run
        return {"series_uid": uid, "error": f"{type(exc).__name__}: {exc}"}
    hu = vol.hu
    sx, sy = vol.spacing[0], vol.spacing[1]
    ipp0 = np.asarray(vol.dicom.positions[0], dtype=np.float64)
    row_dir = np.asarray(vol.dicom.orientations[0][:3], dtype=np.float64)
    col_dir = np.asarray(vol.dicom.orientations[0][3:], dtype=np.float64)
    n, s = hu.shape[0], spec.canvas_size
    # A series paired to an anchor keeps the anchor's exact (sub-pixel) centre so paired slices line up;
    # snapping to the input grid is kept when the input already has the canvas spacing (no resampling).
    resampled = abs(spec.pixel_spacing_mm / sx - 1.0) > 1e-3 or abs(spec.pixel_spacing_mm / sy - 1.0) > 1e-3
    if task["centre_mm"] is None:
        r, c = body_center(hu)
        snap = True
    else:
        d = np.asarray(task["centre_mm"], dtype=np.float64) - ipp0
        c, r = float(d @ row_dir) / sx, float(d @ col_dir) / sy
        snap = not resampled
    placement = make_placement(hu.shape[1:], (sx, sy), spec, (r, c), snap=snap)
    # The centre actually used (after snapping) is what paired series must reproduce.
    r = placement.row0 + (s - 1) / 2.0 * placement.step_r
    c = placement.col0 + (s - 1) / 2.0 * placement.step_c
    centre_mm = ipp0 + c * sx * row_dir + r * sy * col_dir
    name = f"{_safe(uid)}.npy"
    with atomic_output(arrays / name) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, s, s))
        for k in range(0, n, _CHUNK):
            canvas, _ = to_canvas(hu[k : k + _CHUNK], (sx, sy), spec, center=(r, c), snap=False)
            out[k : k + _CHUNK] = canvas.astype(np.float16)
        out.flush()
        del out
    files = [os.path.relpath(f, root) for f in vol.dicom.files]
    normal = np.cross(row_dir, col_dir)
    info = {
        "series_uid": uid,
        "array": name,
        "slices": n,
        "n_files": len(task["files"]),
        "spec": spec.to_dict(),
        "centre_mm": [float(v) for v in centre_mm],
        "centre_rc": [float(r), float(c)],
        "placement": {
            "row0": placement.row0,
            "col0": placement.col0,
            "step_r": placement.step_r,
            "step_c": placement.step_c,
            "input_shape": list(placement.input_shape),
        },
        "spacing_mm": [float(sx), float(sy), float(vol.spacing[2])],
        "z_mm": [float(p @ normal) for p in np.asarray(vol.dicom.positions, dtype=np.float64)],
        "sources": files,
        "notes": list(vol.notes),
    }
    write_text_atomic(arrays / f"{_safe(uid)}.json", json.dumps(info))
    return info


def _run_tasks(
    tasks: list[dict], pool, on_result: Callable[[dict], None], cancel: threading.Event | None
) -> None:
    """Run tasks in ``pool`` (a multiprocessing pool) or, when it is None, in this process."""
    if not tasks:
        return
    if pool is None:
        for t in tasks:
            if cancel is not None and cancel.is_set():
                raise PrepareCancelled("cancelled; finished series are kept, re-run to resume")
            on_result(_process_series(t))
        return
    for res in pool.imap_unordered(_process_series, tasks):
        on_result(res)
        if cancel is not None and cancel.is_set():
            pool.terminate()
            raise PrepareCancelled("cancelled; finished series are kept, re-run to resume")


@contextlib.contextmanager
def _worker_pool(workers: int):
    """One pool for both phases of the run."""
    if workers <= 1:
        yield None
        return
    import multiprocessing as mp

    # fork where available (as torch's DataLoader does): workers start at once instead of re-importing
    # Python + torch (tens of seconds on a loaded machine); the parent has run no torch op yet.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(processes=workers) as pool:
        yield pool


# ------------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------------


def _domain_rows(groups: Sequence[DomainGroup], split: dict[str, str], done: dict[str, dict]) -> list[dict]:
    rows = []
    for g in groups:
        series = [s for s in g.series if not g.included or s.series_uid in done]
        row = {
            "domain": g.domain.name,
            "domain_id": g.domain.id if g.included else "",
            "manufacturer": g.domain.manufacturer,
            "scanner_model": g.domain.scanner_model,
            "kernel": g.domain.kernel,
            "included": g.included,
            "patients": len({s.patient for s in series}),
            "series": len(series),
            "slices": sum(
                done[s.series_uid]["slices"] if s.series_uid in done else s.num_slices for s in series
            ),
        }
        for part in ("train", "test"):
            ss = [s for s in series if split.get(s.patient) == part]
            row[f"{part}_patients"] = len({s.patient for s in ss})
            row[f"{part}_slices"] = sum(done[s.series_uid]["slices"] for s in ss if s.series_uid in done)
        thick = [s.slice_thickness for s in series if s.slice_thickness]
        px = [s.pixel_spacing[0] for s in series if s.pixel_spacing[0]]
        row["slice_thickness_mm"] = f"{min(thick):g}-{max(thick):g}" if thick else ""
        row["pixel_spacing_mm"] = f"{min(px):.3f}-{max(px):.3f}" if px else ""
        row["note"] = g.note
        rows.append(row)
    return rows


def _write_reports(out: Path, rows: list[dict], skipped: list[dict], source: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["domain"])
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "domain_report.csv", buf.getvalue())
    lines = [
        f"# Domain report: {source}",
        "",
        "Domains are scanner + reconstruction kernel groups (paper section III-A: k1 = SIEMENS Sensation 16 "
        "/ B30f, k2 = GE LightSpeed QX/i / BONE, k3 = GE LightSpeed 16 / STANDARD).",
        "",
        "| id | domain | scanner | kernel | patients | series | slices | train pat. / slices | "
        "test pat. / slices | thickness mm | pixel mm | included |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['domain_id']} | {r['domain']} | {r['manufacturer']} {r['scanner_model']} | "
            f"{r['kernel']} | {r['patients']} | {r['series']} | {r['slices']} | "
            f"{r['train_patients']} / {r['train_slices']} | "
            f"{r['test_patients']} / {r['test_slices']} | {r['slice_thickness_mm']} | "
            f"{r['pixel_spacing_mm']} | {'yes' if r['included'] else 'no: ' + r['note']} |"
        )
    lines.append("")
    for r in rows:
        if r["included"]:
            lines.append(
                f"- k{r['domain_id'] + 1} = {r['manufacturer']} {r['scanner_model']} / {r['kernel']} "
                f"({r['slices']} slices, {r['patients']} patients)"
            )
    lines += ["", f"## Skipped series ({len(skipped)})", ""]
    if skipped:
        reasons: dict[str, int] = defaultdict(int)
        for s in skipped:
            reasons[s["reason"].split(" (")[0][:80]] += 1
        lines += ["| reason | series |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]
        lines += ["", "| patient | folder | reason |", "|---|---|---|"]
        lines += [
            f"| {s['patient']} | {s['folder']} | {s['reason'].replace('|', '/')} |" for s in skipped[:200]
        ]
        if len(skipped) > 200:
            lines.append(f"| ... | {len(skipped) - 200} more in dataset.json | |")
    else:
        lines.append("None.")
    write_text_atomic(out / "domain_report.md", "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------------
# Main entry
# ------------------------------------------------------------------------------------------------------


def _check_paths(root: Path, out: Path, settings: dict) -> bool:
    """Validate input/output; True when ``out`` holds an earlier run with the same settings (resume)."""
    if not root.is_dir():
        raise InputError(f"--dicom-root {root} is not a folder.")
    r, o = root.resolve(), out.resolve()
    if o == r or r in o.parents or o in r.parents:
        raise InputError(
            f"--out {out} and --dicom-root {root} overlap; put the dataset in a separate folder "
            "(the DICOM tree is never modified)."
        )
    if not out.exists():
        if not out.parent.is_dir():
            raise InputError(f"the parent folder of --out ({out.parent}) does not exist; create it first.")
        return False
    if not out.is_dir():
        raise InputError(f"--out {out} exists and is a file; give a folder path.")
    if not any(out.iterdir()):
        return False
    state = out / _STATE
    if not state.is_file():
        raise InputError(
            f"--out {out} exists, is not empty and is not a dataset written by Training.prepare; "
            "choose a new folder."
        )
    try:
        old = json.loads(state.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{state} is unreadable ({exc}); delete {out} or choose a new folder.") from None
    if old != settings:
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        raise InputError(
            f"--out {out} holds a dataset prepared with different settings ({', '.join(diff)}); "
            "use the same settings to resume, or choose a new folder."
        )
    return True


def _scan_roots(roots: Sequence[Path], progress) -> tuple[Path, list[SeriesRecord]]:
    """Scan each root and express every record relative to their common folder (one root for the rest)."""
    common = Path(os.path.commonpath([str(r.resolve()) for r in roots]))
    records = []
    for root in roots:
        for rec in scan_tree(root, progress=progress):
            rebase = os.path.relpath(root.resolve(), common)
            rec.folder = os.path.normpath(os.path.join(rebase, rec.folder))
            rec.files = [os.path.normpath(os.path.join(rebase, f)) for f in rec.files]
            records.append(rec)
    records.sort(key=lambda r: (r.patient, r.study_uid, r.series_uid))
    return common, records


def _write_readme(out: Path, roots: Sequence[Path], common: Path, used: Sequence[SeriesRecord]) -> None:
    """README.md of the dataset: what it holds, real vs simulated, and the sources' licences / attribution."""
    from Training.data.licences import attribution_section, licence_files

    n_real = sum(1 for s in used if s.origin == "real")
    lines = [
        "# CT kernel dataset (written by Training.prepare)",
        "",
        f"Sources: {', '.join(str(r) for r in roots)}. Series: {len(used)} ({n_real} real, "
        f"{len(used) - n_real} simulated); manifest.csv's `origin` column tells them apart.",
        "",
        "## Licences and attribution of the source data",
        "",
        "Data under CC BY must be attributed wherever this dataset or a model trained on it is described.",
        "",
    ]
    files = []
    for s in used:
        folder = common / s.folder
        root = next(
            (r for r in roots if r.resolve() in (folder.resolve(), *folder.resolve().parents)), common
        )
        files += licence_files(folder, root)
    lines += attribution_section(files) or [
        "No licence or README file was found beside the source series.",
        "",
    ]
    write_text_atomic(out / "README.md", "\n".join(lines) + "\n")


def prepare(
    dicom_root: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    min_patients: int = 1,
    workers: int = 1,
    seed: int = 0,
    test_fraction: float = 0.2,
    spec: PreprocessSpec | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Build (or resume) the dataset in ``out`` from ``dicom_root``; returns the dataset.json dict.

    ``progress(stage, done, total)`` with stage 'scan' or 'preprocess'. Raises InputError for bad
    arguments or a tree without usable CT series (nothing written), PrepareCancelled on cancel.
    """
    roots = [Path(dicom_root)] if isinstance(dicom_root, str | Path) else [Path(r) for r in dicom_root]
    out = Path(out)
    spec = spec or PreprocessSpec()
    settings = _settings(roots, spec, min_patients, workers, seed, test_fraction)
    resuming = any([_check_paths(r, out, settings) for r in roots])
    started = time.time()
    root, records = _scan_roots(roots, (lambda d, t: progress("scan", d, t)) if progress else None)
    groups = group_domains(records, min_patients=min_patients)
    included = [g for g in groups if g.included]
    if not included:
        reasons = sorted({r.skip_reason for r in records if r.skip_reason})[:5]
        raise InputError(
            f"no usable CT series under {root} ({len(records)} series found; reasons: "
            f"{'; '.join(reasons) or 'none'}). Check --dicom-root and --min-patients."
        )
    split = split_patients(groups, test_fraction, seed)
    out.mkdir(exist_ok=True)
    (out / "arrays").mkdir(exist_ok=True)
    if not resuming:
        write_text_atomic(out / _STATE, json.dumps(settings, indent=2))
    series = sorted(
        (s for g in included for s in g.series), key=lambda s: (s.patient, s.frame_uid, s.series_uid)
    )
    done, errors = _preprocess_all(series, root, out / "arrays", spec, workers, progress, cancel)
    rows = _manifest_rows(included, done, split)
    if not rows:
        raise InputError(
            f"none of the {len(series)} usable series under {root} could be read; see the errors: "
            + "; ".join(list(errors.values())[:3])
        )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "manifest.csv", buf.getvalue())
    skipped = [
        {"patient": r.patient, "folder": r.folder, "series_uid": r.series_uid, "reason": r.skip_reason}
        for r in records
        if r.skip_reason
    ] + [
        {"patient": s.patient, "folder": s.folder, "series_uid": s.series_uid,
         "reason": f"read error: {errors[s.series_uid]}"}
        for s in series
        if s.series_uid in errors
    ]
    domain_rows = _domain_rows(groups, split, done)
    _write_readme(out, roots, root, [s for s in series if s.series_uid in done])
    _write_reports(out, domain_rows, skipped, root)
    _write_domains(out, groups, domain_rows)
    write_text_atomic(out / "preprocessing.json", json.dumps(spec.to_dict(), indent=2))
    dataset = _dataset_record(roots, root, rows, done, split, skipped, seed, test_fraction, started)
    write_text_atomic(out / "dataset.json", json.dumps(dataset, indent=2))
    return dataset


def _settings(
    roots: list[Path], spec: PreprocessSpec, min_patients: int, workers: int, seed: int, test_fraction: float
) -> dict:
    """Check the arguments; the settings a resumed run must share (written to the state file)."""
    if not roots:
        raise InputError("give at least one --dicom-root")
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if min_patients < 1:
        raise InputError(f"--min-patients must be at least 1, got {min_patients}")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    return {
        "format_version": FORMAT_VERSION,
        "dicom_root": str(roots[0].resolve()) if len(roots) == 1 else [str(r.resolve()) for r in roots],
        "seed": seed,
        "test_fraction": test_fraction,
        "min_patients": min_patients,
        "preprocessing": spec.to_dict(),
    }


def _preprocess_all(
    series: list[SeriesRecord], root: Path, arrays: Path, spec: PreprocessSpec, workers: int,
    progress: Callable[[str, int, int], None] | None, cancel: threading.Event | None,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Canvases of every series: (sidecar per done series, error per failed series).

    Anchors (the first series of each patient + frame of reference) run first: their canvas centre is
    then reused by the other series of the same frame, so paired series stay pixel-aligned.
    """
    anchors: dict[tuple[str, str], SeriesRecord] = {}
    for s in series:
        if s.frame_uid:
            anchors.setdefault((s.patient, s.frame_uid), s)

    def task(s: SeriesRecord, centre=None) -> dict:
        return {"root": str(root), "arrays": str(arrays), "spec": spec.to_dict(),
                "series_uid": s.series_uid, "files": s.files, "folder": s.folder, "centre_mm": centre}

    done: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def on_result(res: dict) -> None:
        if "error" in res:
            errors[res["series_uid"]] = res["error"]
        else:
            done[res["series_uid"]] = res
        if progress:
            progress("preprocess", len(done) + len(errors), len(series))

    first = [s for s in series if not s.frame_uid or anchors.get((s.patient, s.frame_uid)) is s]
    first_uids = {s.series_uid for s in first}
    with _worker_pool(workers) as pool:
        _run_tasks([task(s) for s in first], pool, on_result, cancel)
        rest = []
        for s in series:
            if s.series_uid in first_uids:
                continue
            anchor = anchors[(s.patient, s.frame_uid)]
            centre = done[anchor.series_uid]["centre_mm"] if anchor.series_uid in done else None
            rest.append(task(s, centre))
        _run_tasks(rest, pool, on_result, cancel)
    return done, errors


def _manifest_rows(
    included: Sequence[DomainGroup], done: dict[str, dict], split: dict[str, str]
) -> list[dict]:
    """One row per slice, ordered by domain, patient, series, slice."""
    rows = []
    for g in included:
        for s in g.series:
            info = done.get(s.series_uid)
            if info is None:
                continue
            for k in range(info["slices"]):
                rows.append(
                    {
                        "patient": s.patient,
                        "series_uid": s.series_uid,
                        "domain": g.domain.name,
                        "domain_id": g.domain.id,
                        "split": split[s.patient],
                        "slice_index": k,
                        "z_mm": f"{info['z_mm'][k]:.3f}",
                        "source": info["sources"][k],
                        "array": info["array"],
                        "row": k,
                        "origin": s.origin,
                    }
                )
    return rows


_COUNT_KEYS = (
    "patients", "series", "slices", "train_patients", "test_patients", "train_slices", "test_slices"
)


def _write_domains(out: Path, groups: Sequence[DomainGroup], domain_rows: list[dict]) -> None:
    counts = {r["domain"]: {k: r[k] for k in _COUNT_KEYS} for r in domain_rows}
    domains_json = {
        "domains": [{**g.domain.to_dict(), "counts": counts[g.domain.name]} for g in groups if g.included],
        "excluded": [{"name": g.domain.name, "note": g.note} for g in groups if not g.included],
    }
    write_text_atomic(out / "domains.json", json.dumps(domains_json, indent=2))


def _dataset_record(
    roots: list[Path], root: Path, rows: list[dict], done: dict[str, dict], split: dict[str, str],
    skipped: list[dict], seed: int, test_fraction: float, started: float,
) -> dict:
    """dataset.json: provenance, split, counts."""
    from TextureStarGANCore import __version__

    sims = [r / "simulation.json" for r in roots if (r / "simulation.json").is_file()]
    simulation = json.loads(sims[0].read_text()) if sims else None
    patients = sorted({r["patient"] for r in rows})
    return {
        "format_version": FORMAT_VERSION,
        "source_root": str(root.resolve()),
        "source_roots": [str(r.resolve()) for r in roots],
        "simulated": simulation is not None,
        "origins": {o: sum(1 for r in rows if r["origin"] == o) for o in ("real", "simulated")},
        "simulation": (
            {k: simulation.get(k) for k in ("simulator_version", "path", "settings")} if simulation else None
        ),
        "seed": seed,
        "split": {
            "method": "by patient, stratified by the set of domains per patient",
            "test_fraction": test_fraction,
            "train_patients": sorted(p for p in patients if split[p] == "train"),
            "test_patients": sorted(p for p in patients if split[p] == "test"),
        },
        "slices": len(rows),
        "series": len(done),
        "skipped": skipped,
        "code_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "resumed_series": sum(1 for v in done.values() if v.get("resumed")),
        "notes": "slices stay slices (in-plane resampling to the canvas pixel spacing only); paired slices "
        "(simulated data) share patient and slice_index",
    }
