"""Evaluate harmonization models on a prepared dataset's test split: the paper's protocol and more.

``python -m Training.evaluate --dataset DATASET [--model MODEL] [--compare MODEL2] --out DIR
[--metrics fid,radiomics,structure,frd,paired] [--max-slices N] [--workers W] [--inception-weights PATH]``

For every kernel pair, both directions (paper III-B, IV): FID before/after (Table I), % of differing
radiomic features aligned (Table II), structure preservation inside the lungs, Frechet Radiomic Distance,
and on simulated data PSNR/SSIM/NPS against the true target-kernel slice. Writes ``table_fid.csv``,
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
from datetime import UTC, datetime
from itertools import combinations, permutations
from pathlib import Path
from typing import Any

import numpy as np

from TextureStarGANCore.fileio import write_json_atomic

ALL_METRICS = ("fid", "radiomics", "structure", "frd", "paired")
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
    from Training.evaluation.metrics import radiomics_alignment as ra
    from Training.evaluation.metrics.harmonize import CanvasHarmonizer
    from Training.evaluation.metrics.structure import structure_scores
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
    if "paired" in chosen and not ts.simulated:
        if explicit:
            raise EvaluationError(
                "'paired' needs a simulated dataset (paired ground truth); this dataset is "
                "real (dataset.json simulated: false). Leave 'paired' out of --metrics."
            )
        chosen.remove("paired")
        notes.append("paired ground-truth metrics skipped: real (unpaired) data")
    from TextureStarGANCore.model_file import DEFAULT_MODEL_PATH, ModelFileError

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
    labels = _model_labels(harmonizers)

    fidnet = None
    if "fid" in chosen:
        from Training.evaluation.metrics.fid import InceptionWeightsMissing, build_inception

        try:
            fidnet = build_inception(inception_weights, dims=fid_dims, device=device)
        except InceptionWeightsMissing as exc:
            raise EvaluationError(str(exc)) from None
    need_feats = "radiomics" in chosen or "frd" in chosen
    spacing = ts.spec.pixel_spacing_mm
    window = ts.spec.hu_window
    n_dir = len(ts.domains) * (len(ts.domains) - 1)
    total = sum(len(v) for v in ts.slices.values()) * (1 + len(harmonizers) * (len(ts.domains) - 1))
    prog = _Progress(total, progress, cancel)
    prog.check()

    from Training.evaluation.metrics import fid as fidmod
    from Training.evaluation.metrics import radiomics_features as rf

    names = list(rf.feature_names()) if need_feats else []
    cache = rf.FeatureCache(cache_dir or default_cache_dir(), ts.root) if need_feats else None
    real_act: dict[str, np.ndarray] = {}
    real_feat: dict[str, np.ndarray] = {}
    harm_act: dict[tuple[int, str, str], list[np.ndarray]] = {}
    harm_feat: dict[tuple[int, str, str], list[np.ndarray]] = {}
    struct: dict[tuple[int, str, str], list] = {}
    paired: dict[tuple[int, str, str], Any] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    timer = _Timer()
    t_start = time.perf_counter()

    with rf.feature_pool(workers if need_feats else 1) as pool:
        # Real images: features from the cache where possible, Inception activations.
        for d in ts.domains:
            refs = ts.slices[d]
            acts, feats = [], []
            for start in range(0, len(refs), CHUNK):
                chunk = refs[start : start + CHUNK]
                canv = ts.canvases(chunk)
                if fidnet is not None:
                    with timer("fid_real", len(chunk)):
                        acts.append(
                            fidmod.activations(
                                fidnet, fidmod.to_unit(canv, window, fid_window), cancel=cancel
                            )
                        )
                if cache is not None:
                    ids = [ts.slice_id(i) for i in chunk]
                    table, missing = cache.get(ids)
                    if missing:
                        with timer("radiomics_real", len(missing)):
                            table[missing] = rf.extract_features(
                                canv[missing], window, spacing, pool=pool, cancel=cancel
                            )
                        cache.put([ids[i] for i in missing], table[missing])
                    feats.append(table)
                prog.step(len(chunk))
            if acts:
                real_act[d] = np.concatenate(acts)
            if feats:
                real_feat[d] = np.concatenate(feats)
        # Harmonized images, streamed per direction.
        for mi, h in enumerate(harmonizers):
            for s, t in permutations(ts.domains, 2):
                key = (mi, s, t)
                harm_act[key], harm_feat[key], struct[key] = [], [], []
                if "paired" in chosen:
                    from Training.evaluation.metrics.paired import PairedDirection

                    paired[key] = PairedDirection(spacing, window)
                refs = ts.slices[s]
                for start in range(0, len(refs), CHUNK):
                    chunk = refs[start : start + CHUNK]
                    src = ts.canvases(chunk)
                    with timer("harmonize", len(chunk)):
                        out = h(src, t, cancel=cancel)
                    if start == 0:
                        ex = examples.setdefault(direction_name(s, t), {"before": ts.to_hu(src[0])})
                        ex[labels[mi]] = ts.to_hu(out[0])
                    if fidnet is not None:
                        with timer("fid_harmonized", len(chunk)):
                            harm_act[key].append(
                                fidmod.activations(
                                    fidnet, fidmod.to_unit(out, window, fid_window), cancel=cancel
                                )
                            )
                    if need_feats:
                        with timer("radiomics_harmonized", len(chunk)):
                            harm_feat[key].append(
                                rf.extract_features(out, window, spacing, pool=pool, cancel=cancel)
                            )
                    if "structure" in chosen or "paired" in chosen:
                        src_hu, out_hu = ts.to_hu(src), ts.to_hu(out)
                        if "structure" in chosen:
                            with timer("structure", len(chunk)):
                                struct[key] += [
                                    structure_scores(a, b, spacing)
                                    for a, b in zip(src_hu, out_hu, strict=True)
                                ]
                        if "paired" in chosen:
                            with timer("paired", len(chunk)):
                                for ref, a, b in zip(chunk, src_hu, out_hu, strict=True):
                                    partner = ts.partner(ref, t)
                                    if partner is not None:
                                        truth = ts.to_hu(ts.canvases([partner])[0])
                                        paired[key].add(a, b, truth)
                    prog.step(len(chunk))

    baselines: dict[tuple[str, str], dict[str, Any]] = {}
    if "paired" in chosen:
        with timer("baselines", 1):
            baselines = _paired_baselines(ts, spacing, window, notes)

    # ---- numbers ------------------------------------------------------------------------------------
    t_stats = time.perf_counter()
    from Training.evaluation.metrics.structure import mean_scores

    results: dict[str, Any] = {
        "metrics": chosen,
        "notes": notes,
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
            for lab, h in zip(labels, harmonizers, strict=True)
        ],
        "labels": {},
        "pairs": {},
        "summary": {lab: {} for lab in labels},
    }
    if fidnet is not None:
        results["labels"]["fid"] = fidnet.label
        results["fid_settings"] = {
            "weights": fidnet.weights,
            "dims": fidnet.dims,
            "comparable": fidnet.comparable,
            "display_window_hu": list(fid_window or window),
            "resize": "bilinear to 299x299 (pytorch-fid)",
            "channels": "gray x3",
        }
    if "frd" in chosen:
        from Training.evaluation.metrics.frd import LABEL as FRD_LABEL
        from Training.evaluation.metrics.frd import frechet_radiomic_distance

        results["labels"]["frd"] = FRD_LABEL
    if "radiomics" in chosen:
        results["labels"]["radiomics"] = (
            f"% of the features that differ between the real domains (Welch "
            f"p < 0.01, {len(names)} pyradiomics features, body mask) that no "
            "longer differ after harmonization; mean of both directions"
        )
    for a, b in combinations(ts.domains, 2):
        pn = pair_name(a, b)
        pr: dict[str, Any] = {}
        dirs = [(a, b), (b, a)]
        if fidnet is not None:
            before = _safe_fid(real_act[a], real_act[b])
            pr["fid"] = {"before": before, "models": {}}
            for mi, lab in enumerate(labels):
                per = {
                    direction_name(s, t): _safe_fid(np.concatenate(harm_act[(mi, s, t)]), real_act[t])
                    for s, t in dirs
                }
                pr["fid"]["models"][lab] = {"mean": _mean(list(per.values())), "directions": per}
                # Test-only Inception weights: the summary keys themselves carry the warning (curves too).
                tag = "" if fidnet.comparable else "_NOT_COMPARABLE"
                results["summary"][lab].setdefault(pn, {}).update(
                    {f"fid_before{tag}": before, f"fid{tag}": pr["fid"]["models"][lab]["mean"]}
                )
        if "radiomics" in chosen:
            R = ra.differing_features(names, real_feat[a], real_feat[b])
            pr["radiomics"] = {"n_features": len(names), "n_R": len(R), "R": R, "models": {}}
            for mi, lab in enumerate(labels):
                da = [
                    ra.direction_alignment(
                        names,
                        real_feat[s],
                        real_feat[t],
                        np.concatenate(harm_feat[(mi, s, t)]),
                        source=s,
                        target=t,
                    )
                    for s, t in dirs
                ]
                mean = ra.mean_percent(da)
                pr["radiomics"]["models"][lab] = {
                    "mean_percent": mean,
                    "directions": {direction_name(d.source, d.target): d.to_dict() for d in da},
                }
                results["summary"][lab].setdefault(pn, {})["radiomics_aligned_pct"] = mean
        if "frd" in chosen:
            before = frechet_radiomic_distance(real_feat[a], real_feat[b])
            pr["frd"] = {"before": before, "models": {}}
            for mi, lab in enumerate(labels):
                per = {
                    direction_name(s, t): frechet_radiomic_distance(
                        np.concatenate(harm_feat[(mi, s, t)]), real_feat[t]
                    )
                    for s, t in dirs
                }
                pr["frd"]["models"][lab] = {"mean": _mean(list(per.values())), "directions": per}
                results["summary"][lab].setdefault(pn, {}).update(
                    frd_before=before, frd=pr["frd"]["models"][lab]["mean"]
                )
        if "structure" in chosen:
            pr["structure"] = {"models": {}}
            for mi, lab in enumerate(labels):
                per = {direction_name(s, t): mean_scores(struct[(mi, s, t)]) for s, t in dirs}
                mean = {
                    k: _mean([p[k] for p in per.values()])
                    for k in ("lung_dice", "structure_dice", "structure_iou", "ssim_lung")
                }
                mean["slices_with_lungs"] = sum(p["slices_with_lungs"] for p in per.values())
                pr["structure"]["models"][lab] = {"mean": mean, "directions": per}
                results["summary"][lab].setdefault(pn, {}).update(
                    structure_dice=mean["structure_dice"], ssim_lung=mean["ssim_lung"]
                )
        if "paired" in chosen:
            pr["paired"] = {"models": {}}
            for mi, lab in enumerate(labels):
                per = {direction_name(s, t): paired[(mi, s, t)].summary() for s, t in dirs}
                keys = (
                    "psnr_before",
                    "psnr_after",
                    "ssim_before",
                    "ssim_after",
                    "nps_distance_before",
                    "nps_distance_after",
                )
                mean = {k: _mean([p[k] for p in per.values()]) for k in keys}
                pr["paired"]["models"][lab] = {"mean": mean, "directions": per}
                results["summary"][lab].setdefault(pn, {}).update(
                    psnr_after=mean["psnr_after"],
                    ssim_after=mean["ssim_after"],
                    nps_distance_after=mean["nps_distance_after"],
                )
            pr["paired"]["baselines"] = {}
            for name in sorted({n for d in dirs for n in baselines.get(d, {})}):
                per = {direction_name(s, t): baselines[(s, t)][name] for s, t in dirs
                       if name in baselines.get((s, t), {})}
                mean = {k: _mean([p[k] for p in per.values()])
                        for k in ("psnr_after", "ssim_after", "nps_distance_after")}
                pr["paired"]["baselines"][name] = {"mean": mean, "directions": per}
        results["pairs"][pn] = pr
    for lab in labels:
        rows = [v for k, v in results["summary"][lab].items() if k != "mean"]
        keys = sorted({k for r in rows for k in r})
        results["summary"][lab]["mean"] = {k: _mean([r.get(k) for r in rows]) for k in keys}
    # Statistics: per pair and direction a 2048-d matrix square root (FID) and the Welch tests; a fixed
    # cost that does not grow with the number of slices.
    results["timing"] = {
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "statistics_seconds": round(time.perf_counter() - t_stats, 3),
        "stages": timer.to_dict(),
    }
    results["provenance"] = {
        "dataset": str(Path(ts.root).resolve()),
        "split": "test",
        "simulated": ts.simulated,
        "dataset_json": ts.info,
        "preprocessing": ts.spec.to_dict(),
        "max_slices_per_domain": max_slices_per_domain,
        "directions": n_dir,
        "radiomics_params": str(rf.PARAMS_PATH),
        "radiomics_mask": rf.MASK_VERSION,
        "radiomics_cache": str(cache.path) if cache is not None else None,
        "packages": _package_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if sys.argv else "",
    }
    if any(not h.trained for h in harmonizers):
        results["notes"].append(f"model(s) marked {UNTRAINED}: numbers exercise the pipeline, not the method")
    if fidnet is not None and not fidnet.comparable:
        results["notes"].append(f"FID values are {fidmod.NOT_COMPARABLE}")
    if out_dir is not None:
        from Training.evaluation.metrics.report import write_outputs

        write_outputs(Path(out_dir), results, examples if figures else {}, paired_raw=paired, labels=labels)
    return results


def _paired_baselines(ts: Any, spacing: float, window: tuple[float, float],
                      notes: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
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
            acc = PairedDirection(spacing, window)
            refs = ts.slices[s]
            for start in range(0, len(refs), CHUNK):
                chunk = refs[start : start + CHUNK]
                src_hu = ts.to_hu(ts.canvases(chunk))
                for ref, a, b in zip(chunk, src_hu, base.apply(src_hu), strict=True):
                    partner = ts.partner(ref, t)
                    if partner is not None:
                        acc.add(a, b, ts.to_hu(ts.canvases([partner])[0]))
            summary = acc.summary()
            summary.pop("nps", None)
            out.setdefault((s, t), {})[base.name] = {**summary, "fitted_params": base.params}
    return out


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
