"""Evaluate harmonization models on a prepared dataset's test split: the paper's protocol and more.

``python -m Training.evaluate --dataset DATASET [--model MODEL] [--compare MODEL2] --out DIR
[--metrics fid,radiomics,structure,frd,paired,clinical] [--max-slices N] [--workers W]
[--inception-weights PATH]``

For every kernel pair, both directions (paper III-B, IV): FID before/after (Table I), % of differing
radiomic features aligned (Table II), structure preservation inside the lungs, Frechet Radiomic Distance,
and on simulated data PSNR/SSIM/NPS and clinical quantities (lung density, radiomic CCC,
``metrics.clinical``) against the true target-kernel slice. Writes ``table_fid.csv``,
``table_radiomics.csv``, ``structure.csv`` (+ ``table_frd.csv``, ``paired.csv``), ``report.md``,
``fig_comparison.png`` (paper Fig. 4 style), NPS curves and ``results.json`` (every number, provenance).

The work streams source slices in chunks (harmonize -> every metric) so memory stays bounded on the
paper's ~9700 test slices. ``quick_evaluate`` is the cheap subset the trainer calls periodically.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations, permutations
from pathlib import Path
from typing import Any

import numpy as np

from TextureStarGANCore.fileio import write_json_atomic

ALL_METRICS = ("fid", "radiomics", "structure", "frd", "paired", "clinical")
PAIRED_METRICS = ("paired", "clinical")  # need the true target-kernel slice (simulated data)
CHUNK = 32  # source slices harmonized and measured at a time
UNTRAINED = "UNTRAINED (pipeline test only)"
ProgressFn = Callable[[int, int], None]


class EvaluationError(ValueError):
    """Bad input to the evaluation (dataset, model, metric list): the message says what to do."""


def pair_name(a: str, b: str) -> str:
    return f"{a}<->{b}"


def direction_name(s: str, t: str) -> str:
    return f"{s}->{t}"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ct-harmonization" / "radiomics"


def parse_metrics(value: str | Sequence[str] | None) -> tuple[list[str], bool]:
    """(metrics, explicit): the selected metrics in canonical order and whether the user chose them."""
    if value is None:
        return list(ALL_METRICS), False
    items = [m.strip().lower() for m in (value.split(",") if isinstance(value, str) else value) if m.strip()]
    unknown = [m for m in items if m not in ALL_METRICS]
    if unknown or not items:
        raise EvaluationError(f"unknown metric(s) {unknown or value!r}; choose from {','.join(ALL_METRICS)}")
    return [m for m in ALL_METRICS if m in items], True


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "numpy",
        "scipy",
        "scikit-image",
        "pyradiomics-bhklab",
        "pytorch-fid",
        "frd-score",
        "SimpleITK",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _model_labels(harmonizers: list) -> list[str]:
    labels = []
    for h in harmonizers:
        tex = h.model_file.card.get("training", {}).get("texture_loss")
        kind = {True: "texture-aware", False: "baseline"}.get(tex, "")
        label = f"{h.path.stem} ({kind})" if kind else h.path.stem
        if not h.trained:
            label += " [untrained]"
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


class _Timer:
    """Seconds and slices per stage (results.json 'timing'): where an evaluation spends its time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.slices: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str, n: int) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        self.slices[stage] = self.slices.get(stage, 0) + n

    def to_dict(self) -> dict:
        return {
            k: {
                "seconds": round(v, 3),
                "slices": self.slices[k],
                "seconds_per_slice": round(v / max(self.slices[k], 1), 4),
            }
            for k, v in self.seconds.items()
        }


class _Progress:
    def __init__(self, total: int, fn: ProgressFn | None, cancel: threading.Event | None) -> None:
        self.done, self.total, self.fn, self.cancel = 0, total, fn, cancel

    def step(self, n: int) -> None:
        self.done += n
        if self.fn is not None:
            self.fn(min(self.done, self.total), self.total)
        self.check()

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise InterruptedError(f"evaluation cancelled after {self.done} of {self.total} slice steps")


@dataclass
class _Run:
    """What one evaluation holds while it streams slices: the inputs and every per-direction accumulator."""

    ts: Any  # metrics.testset.TestSet
    chosen: list[str]
    harmonizers: list
    labels: list[str]
    notes: list[str]
    fidnet: Any = None
    fid_window: tuple[float, float] | None = None
    names: list[str] = field(default_factory=list)
    cache: Any = None
    real_act: dict[str, np.ndarray] = field(default_factory=dict)
    real_feat: dict[str, np.ndarray] = field(default_factory=dict)
    harm_act: dict[tuple[int, str, str], list[np.ndarray]] = field(default_factory=dict)
    harm_feat: dict[tuple[int, str, str], list[np.ndarray]] = field(default_factory=dict)
    struct: dict[tuple[int, str, str], list] = field(default_factory=dict)
    paired: dict[tuple[int, str, str], Any] = field(default_factory=dict)
    clinical: dict[tuple[int, str, str], Any] = field(default_factory=dict)  # ClinicalComparison objects
    clinical_res: dict[tuple[int, str, str], dict] = field(default_factory=dict)
    baselines: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # classical, per direction
    examples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    timer: _Timer = field(default_factory=_Timer)

    @property
    def need_feats(self) -> bool:
        return "radiomics" in self.chosen or "frd" in self.chosen

    @property
    def need_truth(self) -> bool:
        return any(m in self.chosen for m in PAIRED_METRICS)


def evaluate(
    dataset: str | Path,
    models: Sequence[str | Path | None] = (None,),
    out_dir: str | Path | None = None,
    *,
    metrics: str | Sequence[str] | None = None,
    max_slices_per_domain: int | None = None,
    workers: int = 1,
    inception_weights: str | Path | None = None,
    fid_dims: int = 2048,
    fid_window: tuple[float, float] | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    figures: bool = True,
) -> dict:
    """Evaluate ``models`` (None = the bundled model) on ``dataset``'s test split; returns results.json's
    content and, with ``out_dir``, writes every table, report.md, figures and results.json there."""
    from Training.evaluation.metrics import radiomics_features as rf

    run = _open_run(dataset, models, metrics, max_slices_per_domain, device, batch_size)
    run.fid_window = fid_window
    if "fid" in run.chosen:
        from Training.evaluation.metrics.fid import InceptionWeightsMissing, build_inception

        try:
            run.fidnet = build_inception(inception_weights, dims=fid_dims, device=device)
        except InceptionWeightsMissing as exc:
            raise EvaluationError(str(exc)) from None
    if run.need_feats:
        run.names = list(rf.feature_names())
        run.cache = rf.FeatureCache(cache_dir or default_cache_dir(), run.ts.root)
    ts = run.ts
    total = sum(len(v) for v in ts.slices.values()) * (1 + len(run.harmonizers) * (len(ts.domains) - 1))
    prog = _Progress(total, progress, cancel)
    prog.check()
    t_start = time.perf_counter()
    with rf.feature_pool(workers if run.need_feats or "clinical" in run.chosen else 1) as pool:
        _stream_real(run, pool, prog, cancel)
        _stream_harmonized(run, pool, prog, cancel)
        with run.timer("clinical_radiomics", sum(c.n_slices for c in run.clinical.values())):
            run.clinical_res = _clinical_results(run.clinical, pool, cache_dir or default_cache_dir(), cancel)
    if "paired" in run.chosen:
        with run.timer("baselines", 1):
            run.baselines = _paired_baselines(run.ts, run.notes)
    t_stats = time.perf_counter()
    results = _results(run)
    # Statistics: per pair and direction a 2048-d matrix square root (FID) and the Welch tests; a fixed
    # cost that does not grow with the number of slices.
    results["timing"] = {
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "statistics_seconds": round(time.perf_counter() - t_stats, 3),
        "stages": run.timer.to_dict(),
    }
    results["provenance"] = _provenance(run, max_slices_per_domain)
    if any(not h.trained for h in run.harmonizers):
        results["notes"].append(f"model(s) marked {UNTRAINED}: numbers exercise the pipeline, not the method")
    if run.fidnet is not None and not run.fidnet.comparable:
        from Training.evaluation.metrics.fid import NOT_COMPARABLE

        results["notes"].append(f"FID values are {NOT_COMPARABLE}")
    if out_dir is not None:
        from Training.evaluation.metrics.report import write_outputs

        write_outputs(Path(out_dir), results, run.examples if figures else {})
    return results


def _open_run(
    dataset: str | Path,
    models: Sequence[str | Path | None],
    metrics: str | Sequence[str] | None,
    max_slices_per_domain: int | None,
    device: str,
    batch_size: int,
) -> _Run:
    """Validate the request and load the test set and every model; nothing is computed yet."""
    from TextureStarGANCore.model_file import DEFAULT_MODEL_PATH, ModelFileError
    from Training.evaluation.metrics.harmonize import CanvasHarmonizer
    from Training.evaluation.metrics.testset import load_test_set

    chosen, explicit = parse_metrics(metrics)
    if not models:
        raise EvaluationError("no model given")
    try:
        ts = load_test_set(dataset, max_slices_per_domain)
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluationError(str(exc)) from None
    if len(ts.domains) < 2:
        raise EvaluationError(
            f"the test split of {dataset} holds one domain ({ts.domains}); kernel pairs need at least two"
        )
    notes: list[str] = []
    for name in [m for m in PAIRED_METRICS if m in chosen and not ts.simulated]:
        if explicit:
            raise EvaluationError(
                f"'{name}' needs a simulated dataset (paired ground truth); this dataset is "
                f"real (dataset.json simulated: false). Leave '{name}' out of --metrics."
            )
        chosen.remove(name)
        notes.append(f"{name} ground-truth metrics skipped: real (unpaired) data")
    harmonizers = []
    for m in models:
        if m is None and not DEFAULT_MODEL_PATH.is_file():
            raise EvaluationError(f"no bundled model at {DEFAULT_MODEL_PATH}; pass --model MODEL.safetensors")
        try:
            h = CanvasHarmonizer(m, device=device, batch_size=batch_size)
            h.check_compatible(ts.spec, ts.domains)
        except (ModelFileError, ValueError) as exc:
            raise EvaluationError(str(exc)) from None
        harmonizers.append(h)
    return _Run(ts, chosen, harmonizers, _model_labels(harmonizers), notes)


def _chunks(refs: Sequence) -> Iterator[tuple[int, Sequence]]:
    for start in range(0, len(refs), CHUNK):
        yield start, refs[start : start + CHUNK]


def _stream_real(run: _Run, pool: Any, prog: _Progress, cancel: threading.Event | None) -> None:
    """Real images of every domain: radiomic features (cached where possible), Inception activations."""
    from Training.evaluation.metrics import fid as fidmod
    from Training.evaluation.metrics import radiomics_features as rf

    ts, timer = run.ts, run.timer
    for d in ts.domains:
        acts, feats = [], []
        for _, chunk in _chunks(ts.slices[d]):
            canv = ts.canvases(chunk)
            if run.fidnet is not None:
                with timer("fid_real", len(chunk)):
                    unit = fidmod.to_unit(canv, ts.spec.hu_window, run.fid_window)
                    acts.append(fidmod.activations(run.fidnet, unit, cancel=cancel))
            if run.cache is not None:
                ids = [ts.slice_id(i) for i in chunk]
                table, missing = run.cache.get(ids)
                if missing:
                    with timer("radiomics_real", len(missing)):
                        table[missing] = rf.extract_features(
                            canv[missing], ts.spec.hu_window, ts.spec.pixel_spacing_mm, pool=pool,
                            cancel=cancel,
                        )
                    run.cache.put([ids[i] for i in missing], table[missing])
                feats.append(table)
            prog.step(len(chunk))
        if acts:
            run.real_act[d] = np.concatenate(acts)
        if feats:
            run.real_feat[d] = np.concatenate(feats)


def _stream_harmonized(run: _Run, pool: Any, prog: _Progress, cancel: threading.Event | None) -> None:
    """Every model and direction: harmonize the source slices chunk by chunk and feed every metric."""
    for mi, h in enumerate(run.harmonizers):
        for s, t in permutations(run.ts.domains, 2):
            key = (mi, s, t)
            run.harm_act[key], run.harm_feat[key], run.struct[key] = [], [], []
            if "paired" in run.chosen:
                from Training.evaluation.metrics.paired import PairedDirection

                run.paired[key] = PairedDirection(run.ts.spec.pixel_spacing_mm, run.ts.spec.hu_window)
            if "clinical" in run.chosen:
                from Training.evaluation.metrics.clinical import ClinicalComparison

                run.clinical[key] = ClinicalComparison(run.ts.spec.pixel_spacing_mm, target="true target")
            for start, chunk in _chunks(run.ts.slices[s]):
                src = run.ts.canvases(chunk)
                with run.timer("harmonize", len(chunk)):
                    out = h(src, t, cancel=cancel, source=s, spec=run.ts.spec)
                if start == 0:
                    ex = run.examples.setdefault(direction_name(s, t), {"before": run.ts.to_hu(src[0])})
                    ex[run.labels[mi]] = run.ts.to_hu(out[0])
                _measure_chunk(run, key, chunk, src, out, pool, cancel)
                prog.step(len(chunk))


def _measure_chunk(
    run: _Run, key: tuple[int, str, str], chunk: Sequence, src: np.ndarray, out: np.ndarray, pool: Any,
    cancel: threading.Event | None,
) -> None:
    """One chunk of harmonized slices into each chosen metric's accumulator for direction ``key``."""
    from Training.evaluation.metrics import fid as fidmod
    from Training.evaluation.metrics import radiomics_features as rf
    from Training.evaluation.metrics.structure import structure_scores

    ts, timer, t = run.ts, run.timer, key[2]
    spacing, window = ts.spec.pixel_spacing_mm, ts.spec.hu_window
    if run.fidnet is not None:
        with timer("fid_harmonized", len(chunk)):
            unit = fidmod.to_unit(out, window, run.fid_window)
            run.harm_act[key].append(fidmod.activations(run.fidnet, unit, cancel=cancel))
    if run.need_feats:
        with timer("radiomics_harmonized", len(chunk)):
            run.harm_feat[key].append(rf.extract_features(out, window, spacing, pool=pool, cancel=cancel))
    if "structure" not in run.chosen and not run.need_truth:
        return
    src_hu, out_hu = ts.to_hu(src), ts.to_hu(out)
    if "structure" in run.chosen:
        with timer("structure", len(chunk)):
            run.struct[key] += [structure_scores(a, b, spacing) for a, b in zip(src_hu, out_hu, strict=True)]
    truths = _true_targets(ts, chunk, t) if run.need_truth else []
    if "paired" in run.chosen:
        with timer("paired", len(chunk)):
            for a, b, truth in zip(src_hu, out_hu, truths, strict=True):
                if truth is not None:
                    run.paired[key].add(a, b, truth)
    if "clinical" in run.chosen:
        with timer("clinical", len(chunk)):
            for a, b, truth in zip(src_hu, out_hu, truths, strict=True):
                if truth is not None:
                    run.clinical[key].add_slice({"before": a, "harmonized": b}, truth)


def _results(run: _Run) -> dict[str, Any]:
    """results.json's numbers: per kernel pair and metric, before and per model, and the summary."""
    ts = run.ts
    results: dict[str, Any] = {
        "metrics": run.chosen,
        "notes": run.notes,
        "domains": ts.domains,
        "pairs_order": [pair_name(a, b) for a, b in combinations(ts.domains, 2)],
        "slices_per_domain": {d: len(v) for d, v in ts.slices.items()},
        "models": [
            {
                "label": lab,
                "path": str(h.path),
                "sha256": h.sha256,
                "trained": h.trained,
                "iterations": int(h.model_file.card["training"]["iterations"]),
                "texture_loss": h.model_file.card["training"].get("texture_loss"),
            }
            for lab, h in zip(run.labels, run.harmonizers, strict=True)
        ],
        "labels": {},
        "pairs": {},
        "summary": {lab: {} for lab in run.labels},
    }
    if run.fidnet is not None:
        results["labels"]["fid"] = run.fidnet.label
        results["fid_settings"] = {
            "weights": run.fidnet.weights,
            "dims": run.fidnet.dims,
            "comparable": run.fidnet.comparable,
            "display_window_hu": list(run.fid_window or ts.spec.hu_window),
            "resize": "bilinear to 299x299 (pytorch-fid)",
            "channels": "gray x3",
        }
    if "frd" in run.chosen:
        from Training.evaluation.metrics.frd import LABEL as FRD_LABEL

        results["labels"]["frd"] = FRD_LABEL
    if "radiomics" in run.chosen:
        results["labels"]["radiomics"] = (
            f"% of the features that differ between the real domains (Welch "
            f"p < 0.01, {len(run.names)} pyradiomics features, body mask) that no "
            "longer differ after harmonization; mean of both directions"
        )
    pair_metrics = {
        "fid": _pair_fid, "radiomics": _pair_radiomics, "frd": _pair_frd,
        "structure": _pair_structure, "paired": _pair_paired, "clinical": _pair_clinical,
    }
    for a, b in combinations(ts.domains, 2):
        pn = pair_name(a, b)
        pr: dict[str, Any] = {}
        for metric, fn in pair_metrics.items():
            if metric in run.chosen:
                pr[metric] = fn(run, a, b, results["summary"], pn)
        results["pairs"][pn] = pr
    for lab in run.labels:
        rows = [v for k, v in results["summary"][lab].items() if k != "mean"]
        keys = sorted({k for r in rows for k in r})
        results["summary"][lab]["mean"] = {k: _mean([r.get(k) for r in rows]) for k in keys}
    return results


def _both(a: str, b: str) -> list[tuple[str, str]]:
    return [(a, b), (b, a)]


def _pair_fid(run: _Run, a: str, b: str, summary: dict, pn: str) -> dict:
    before = _safe_fid(run.real_act[a], run.real_act[b])
    out: dict[str, Any] = {"before": before, "models": {}}
    # Test-only Inception weights: the summary keys themselves carry the warning (curves too).
    tag = "" if run.fidnet.comparable else "_NOT_COMPARABLE"
    for mi, lab in enumerate(run.labels):
        per = {
            direction_name(s, t): _safe_fid(np.concatenate(run.harm_act[(mi, s, t)]), run.real_act[t])
            for s, t in _both(a, b)
        }
        out["models"][lab] = {"mean": _mean(list(per.values())), "directions": per}
        summary[lab].setdefault(pn, {}).update(
            {f"fid_before{tag}": before, f"fid{tag}": out["models"][lab]["mean"]}
        )
    return out


def _pair_radiomics(run: _Run, a: str, b: str, summary: dict, pn: str) -> dict:
    from Training.evaluation.metrics import radiomics_alignment as ra

    R = ra.differing_features(run.names, run.real_feat[a], run.real_feat[b])
    out: dict[str, Any] = {"n_features": len(run.names), "n_R": len(R), "R": R, "models": {}}
    for mi, lab in enumerate(run.labels):
        da = [
            ra.direction_alignment(
                run.names, run.real_feat[s], run.real_feat[t], np.concatenate(run.harm_feat[(mi, s, t)]),
                source=s, target=t,
            )
            for s, t in _both(a, b)
        ]
        mean = ra.mean_percent(da)
        out["models"][lab] = {
            "mean_percent": mean,
            "directions": {direction_name(d.source, d.target): d.to_dict() for d in da},
        }
        summary[lab].setdefault(pn, {})["radiomics_aligned_pct"] = mean
    return out


def _pair_frd(run: _Run, a: str, b: str, summary: dict, pn: str) -> dict:
    from Training.evaluation.metrics.frd import frechet_radiomic_distance

    before = frechet_radiomic_distance(run.real_feat[a], run.real_feat[b])
    out: dict[str, Any] = {"before": before, "models": {}}
    for mi, lab in enumerate(run.labels):
        per = {
            direction_name(s, t): frechet_radiomic_distance(
                np.concatenate(run.harm_feat[(mi, s, t)]), run.real_feat[t]
            )
            for s, t in _both(a, b)
        }
        out["models"][lab] = {"mean": _mean(list(per.values())), "directions": per}
        summary[lab].setdefault(pn, {}).update(frd_before=before, frd=out["models"][lab]["mean"])
    return out


def _pair_structure(run: _Run, a: str, b: str, summary: dict, pn: str) -> dict:
    from Training.evaluation.metrics.structure import mean_scores

    out: dict[str, Any] = {"models": {}}
    for mi, lab in enumerate(run.labels):
        per = {direction_name(s, t): mean_scores(run.struct[(mi, s, t)]) for s, t in _both(a, b)}
        mean = {
            k: _mean([p[k] for p in per.values()])
            for k in ("lung_dice", "structure_dice", "structure_iou", "ssim_lung")
        }
        mean["slices_with_lungs"] = sum(p["slices_with_lungs"] for p in per.values())
        out["models"][lab] = {"mean": mean, "directions": per}
        summary[lab].setdefault(pn, {}).update(
            structure_dice=mean["structure_dice"], ssim_lung=mean["ssim_lung"]
        )
    return out


_PAIRED_KEYS = ("psnr_before", "psnr_after", "ssim_before", "ssim_after", "nps_distance_before",
                "nps_distance_after")


def _pair_paired(run: _Run, a: str, b: str, summary: dict, pn: str) -> dict:
    out: dict[str, Any] = {"models": {}}
    for mi, lab in enumerate(run.labels):
        per = {direction_name(s, t): run.paired[(mi, s, t)].summary() for s, t in _both(a, b)}
        mean = {k: _mean([p[k] for p in per.values()]) for k in _PAIRED_KEYS}
        out["models"][lab] = {"mean": mean, "directions": per}
        summary[lab].setdefault(pn, {}).update(
            psnr_after=mean["psnr_after"], ssim_after=mean["ssim_after"],
            nps_distance_after=mean["nps_distance_after"],
        )
    dirs = _both(a, b)
    out["baselines"] = {}
    for name in sorted({n for d in dirs for n in run.baselines.get(d, {})}):
        per = {direction_name(s, t): run.baselines[(s, t)][name] for s, t in dirs
               if name in run.baselines.get((s, t), {})}
        keys = ("psnr_after", "ssim_after", "nps_distance_after")
        mean = {k: _mean([p[k] for p in per.values()]) for k in keys}
        out["baselines"][name] = {"mean": mean, "directions": per}
    return out


def _true_targets(ts: Any, chunk: Sequence[Any], target: str) -> list[np.ndarray | None]:
    """HU of the true target-kernel slice of every source slice in ``chunk`` (None without a partner)."""
    out: list[np.ndarray | None] = []
    for ref in chunk:
        partner = ts.partner(ref, target)
        out.append(None if partner is None else ts.to_hu(ts.canvases([partner])[0]))
    return out


def _clinical_results(
    clinical: dict[tuple[int, str, str], Any], pool: Any, cache_dir: Path, cancel: threading.Event | None
) -> dict[tuple[int, str, str], dict]:
    """Each direction's clinical results (radiomics in the evaluation's pool, cached by ROI content)."""
    return {
        key: acc.results(pool=pool, cache_dir=cache_dir, cancel=cancel)
        for key, acc in clinical.items()
        if acc.n_slices
    }


CLINICAL_SUMMARY = {  # summary key -> clinical_summary key; biases as |mean| over directions (signs flip)
    "laa950_bias": "laa950_ba_mean_diff",
    "pd15_bias": "pd15_ba_mean_diff",
    "ccc_share_lung": "ccc_share_lung",
    "ccc_share_soft_tissue": "ccc_share_soft_tissue",
}


def _clinical_pair(
    clinical_res: dict[tuple[int, str, str], dict],
    labels: list[str],
    dirs: list[tuple[str, str]],
    summary: dict[str, dict],
    pair: str,
) -> dict:
    """results['pairs'][pair]['clinical']: per model, each direction's clinical results and the mean over
    directions of before/after (|Bland-Altman bias| of %LAA-950 and PD15, CCC shares)."""
    from Training.evaluation.metrics.clinical_report import clinical_summary

    out: dict[str, Any] = {"models": {}}
    for mi, lab in enumerate(labels):
        per = {direction_name(s, t): clinical_res[(mi, s, t)] for s, t in dirs if (mi, s, t) in clinical_res}
        summ = [clinical_summary(r) for r in per.values()]
        mean: dict[str, float | None] = {}
        for key, src in CLINICAL_SUMMARY.items():
            for stage, method in (("before", "before"), ("after", "harmonized")):
                vals = [s[method].get(src) for s in summ]
                vals = [abs(v) if key.endswith("bias") and v is not None else v for v in vals]
                mean[f"{key}_{stage}"] = _mean(vals)
        out["models"][lab] = {"mean": mean, "directions": per}
        keys = ("laa950_bias", "pd15_bias", "ccc_share_soft_tissue")
        summary[lab].setdefault(pair, {}).update({f"clinical_{k}": mean[f"{k}_after"] for k in keys})
    return out


def _pair_clinical(run: _Run, a: str, b: str, summary: dict, pn: str) -> dict:
    return _clinical_pair(run.clinical_res, run.labels, _both(a, b), summary, pn)


def _paired_baselines(ts: Any, notes: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Classical baselines scored like the models on the test slices' paired truth: fitted on paired
    slices of the training patients (``baselines.fit_domain_baselines``). {(source, target): {name:
    PairedDirection summary + fitted parameters}}; empty (with a note) when they cannot be fitted."""
    from Training.data.dataset import DatasetError
    from Training.evaluation.baselines import fit_domain_baselines
    from Training.evaluation.metrics.paired import PairedDirection

    try:
        fitted, fitted_on = fit_domain_baselines(ts.root)
    except DatasetError as exc:
        notes.append(f"no classical baselines: {exc}")
        return {}
    notes.append(f"classical baselines (linear transfer filter, best Gaussian blur) fitted on {fitted_on}")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for (s, t), items in fitted.items():
        if s not in ts.slices or t not in ts.slices:
            continue
        for base in items:
            acc = PairedDirection(ts.spec.pixel_spacing_mm, ts.spec.hu_window)
            for _, chunk in _chunks(ts.slices[s]):
                src_hu = ts.to_hu(ts.canvases(chunk))
                for a, b, truth in zip(src_hu, base.apply(src_hu), _true_targets(ts, chunk, t), strict=True):
                    if truth is not None:
                        acc.add(a, b, truth)
            summary = acc.summary()
            summary.pop("nps", None)
            out.setdefault((s, t), {})[base.name] = {**summary, "fitted_params": base.params}
    return out


def _provenance(run: _Run, max_slices_per_domain: int | None) -> dict[str, Any]:
    from Training.evaluation.metrics import radiomics_features as rf

    ts = run.ts
    return {
        "dataset": str(Path(ts.root).resolve()),
        "split": "test",
        "simulated": ts.simulated,
        "dataset_json": ts.info,
        "preprocessing": ts.spec.to_dict(),
        "max_slices_per_domain": max_slices_per_domain,
        "directions": len(ts.domains) * (len(ts.domains) - 1),
        "radiomics_params": str(rf.PARAMS_PATH),
        "radiomics_mask": rf.MASK_VERSION,
        "radiomics_cache": str(run.cache.path) if run.cache is not None else None,
        "packages": _package_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if sys.argv else "",
    }


def _safe_fid(a: np.ndarray, b: np.ndarray) -> float | None:
    from Training.evaluation.metrics.fid import frechet_distance

    if len(a) < 2 or len(b) < 2:
        return None
    return frechet_distance(a, b)


def quick_evaluate(
    model_path: str | Path,
    dataset_root: str | Path,
    out_json: str | Path | None = None,
    *,
    max_slices_per_domain: int = 8,
    metrics: Sequence[str] = ("radiomics", "paired"),
    workers: int = 1,
    cache_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    cancel: threading.Event | None = None,
) -> dict:
    """Cheap evaluation for the trainer's periodic hook: a few test slices per domain, no figures.

    'paired' is silently dropped on real data. Writes ``out_json`` (e.g. RUN_DIR/eval/iter_000500.json,
    which ``Training.curves`` reads) atomically and returns the results.
    """
    chosen = list(metrics)
    from Training.evaluation.metrics.testset import load_test_set

    if "paired" in chosen and not load_test_set(dataset_root, 1).simulated:
        chosen.remove("paired")
    results = evaluate(
        dataset_root,
        [model_path],
        None,
        metrics=chosen,
        max_slices_per_domain=max_slices_per_domain,
        workers=workers,
        cache_dir=cache_dir,
        inception_weights=inception_weights,
        device=device,
        cancel=cancel,
        figures=False,
    )
    if out_json is not None:
        write_json_atomic(out_json, results)
    return results


# ---- command line ------------------------------------------------------------------------------------
