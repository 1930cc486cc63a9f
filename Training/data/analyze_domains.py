"""Radiomic domain analysis: which acquisition factors drive texture variability, and how to define domains.

    python -m Training.analyze_domains --dataset DATASET --out DIR [--slices-per-series K] [--workers W]

The method's README defines kernel domains from radiomic texture features. For every series of a prepared
dataset this extracts pyradiomics texture features (firstorder, GLCM, GLRLM, GLSZM, GLDM, NGTDM; 2D,
binWidth 25, inside the body) on K evenly spaced canvas slices and averages them. Then:

- effect size per acquisition factor (scanner, kernel, domain, slice thickness, pixel spacing, kVp,
  patient): eta^2 = between-group / total sum of squares of each standardised feature, and epsilon^2
  (eta^2 corrected for the number of groups, which ranks the factors); median and top features per
  factor. Factors that split the series identically are reported as confounded;
- clustering agreement: k-means on the standardised features (k = number of groups of each factor),
  adjusted Rand index against each factor's labels;
- a 2D embedding (PCA) of the series coloured by domain (PNG);
- ``features.csv`` (one row per series), ``effect_sizes.csv``, ``clustering.csv`` and ``summary.md``
  recommending the domain definition.
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from TextureStarGANCore.fileio import write_figure_png, write_json_atomic, write_text_atomic
from TextureStarGANCore.masks import body_mask
from Training.evaluation.metrics.radiomics_features import MIN_MASK_PIXELS, feature_names, slice_features

__all__ = [
    "AnalysisError",
    "AnalysisCancelled",
    "analyze_domains",
    "extract_series_features",
    "eta_squared",
    "FACTORS",
]

FACTORS = ("domain", "kernel", "scanner", "slice_thickness", "pixel_spacing", "kvp", "patient")
FEATURE_CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")


class AnalysisError(ValueError):
    """Bad input to the analysis; the message says what to do."""


class AnalysisCancelled(RuntimeError):
    """The cancel event was set; no report was written."""


def extract_series_features(task: dict) -> dict:
    """Mean texture features over the given canvas rows of one series (runs in worker processes).

    The evaluation's radiomics configuration (``params/radiomics_2d.yaml``) without its shape features:
    the body's shape says nothing about the kernel.
    """
    from TextureStarGANCore.preprocessing import PreprocessSpec, unit_to_hu

    spec = PreprocessSpec.from_dict(task["spec"])
    arr = np.load(task["array"], mmap_mode="r")
    names = feature_names()
    keep = [i for i, n in enumerate(names) if n.split("_")[1] in FEATURE_CLASSES]
    rows = []
    for row in task["rows"]:
        hu = unit_to_hu(np.asarray(arr[row], dtype=np.float32), spec)
        mask = body_mask(hu)
        if mask.sum() < MIN_MASK_PIXELS:
            continue
        try:
            rows.append(slice_features(hu, spec.pixel_spacing_mm, mask=mask)[keep])
        except Exception as exc:  # noqa: BLE001 - pyradiomics raises plain exceptions on odd masks
            return {"series_uid": task["series_uid"], "error": str(exc)}
    if not rows:
        return {"series_uid": task["series_uid"], "error": "no slice with a body region"}
    means = np.nanmean(np.stack(rows), axis=0)
    return {
        "series_uid": task["series_uid"],
        "features": {names[i][len("original_"):]: float(m) for i, m in zip(keep, means, strict=True)},
    }


def eta_squared(values: np.ndarray, labels: Sequence, adjusted: bool = False) -> np.ndarray:
    """Per-column eta^2 (between-group SS / total SS) of ``values`` (n, f) grouped by ``labels``.

    ``adjusted`` gives epsilon^2 = (SS_between - (k - 1) MS_within) / SS_total, which removes the
    chance level (k - 1) / (n - 1) that eta^2 reaches with k groups of pure noise, so factors with many
    groups (e.g. patient) are not favoured."""
    x = np.asarray(values, dtype=np.float64)
    lab = np.asarray([str(v) for v in labels])
    total = ((x - x.mean(axis=0)) ** 2).sum(axis=0)
    between = np.zeros(x.shape[1])
    groups = np.unique(lab)
    for g in groups:
        sel = x[lab == g]
        between += len(sel) * (sel.mean(axis=0) - x.mean(axis=0)) ** 2
    if adjusted:
        k, n = len(groups), len(lab)
        ms_within = (total - between) / max(n - k, 1)
        between = between - (k - 1) * ms_within
    return np.where(total > 1e-12, between / np.maximum(total, 1e-12), 0.0)


def _series_factors(dataset: Path, info: dict) -> dict[str, dict]:
    """Factor values per series from the manifest and (when the DICOM tree is still there) its headers."""
    import pydicom

    source_root = Path(info.get("source_root", ""))
    per: dict[str, dict] = {}
    with open(dataset / "manifest.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            entry = per.setdefault(
                r["series_uid"],
                {
                    "series_uid": r["series_uid"],
                    "patient": r["patient"],
                    "domain": r["domain"],
                    "domain_id": int(r["domain_id"]),
                    "split": r["split"],
                    "array": r["array"],
                    "rows": [],
                    "source": r["source"],
                },
            )
            entry["rows"].append(int(r["row"]))
    for entry in per.values():
        header = None
        path = source_root / entry["source"]
        if path.is_file():
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - factors then come from the domain only
                header = None

        def tag(name: str, default: str = "unknown", header=header) -> str:
            if header is None or header.get(name) is None:
                return default
            value = header.get(name)
            if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
                return "\\".join(str(v) for v in value)
            return str(value).strip()

        entry["kernel"] = tag("ConvolutionKernel", entry["domain"])
        entry["scanner"] = f"{tag('Manufacturer')} {tag('ManufacturerModelName')}".strip()
        entry["slice_thickness"] = tag("SliceThickness")
        spacing = tag("PixelSpacing")
        entry["pixel_spacing"] = (
            f"{float(spacing.split(chr(92))[0]):.3f}" if spacing != "unknown" else spacing
        )
        entry["kvp"] = tag("KVP")
    return per


def _kmeans_ari(z: np.ndarray, labels: Sequence, seed: int) -> float:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    k = len(set(labels))
    if k < 2 or k >= len(z):
        return float("nan")
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    return float(adjusted_rand_score(list(labels), pred))


def _plot_embedding(path: Path, emb: np.ndarray, domains: list[str], explained: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    for d in sorted(set(domains)):
        sel = np.array([x == d for x in domains])
        ax.scatter(emb[sel, 0], emb[sel, 1], s=28, label=d, alpha=0.8)
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}% of variance)")
    ax.set_title("Series in radiomic texture-feature space (PCA), by domain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure_png(fig, path)


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def analyze_domains(
    dataset: str | Path,
    out: str | Path,
    *,
    slices_per_series: int = 4,
    workers: int = 1,
    split: str | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Run the analysis (see the module docstring); returns the summary dict also written as JSON."""
    from sklearn.decomposition import PCA

    dataset, out = Path(dataset), Path(out)
    series, tasks = _plan(dataset, out, slices_per_series, workers, split)
    started = time.time()
    results = _extract_all(tasks, workers, progress, cancel)
    failed = {r["series_uid"]: r["error"] for r in results if "error" in r}
    ok = sorted((r for r in results if "features" in r), key=lambda r: r["series_uid"])
    if len(ok) < 3:
        raise AnalysisError(f"features could be extracted for only {len(ok)} series: {failed}")
    names = sorted(set.intersection(*(set(r["features"]) for r in ok)))
    x = np.array([[r["features"][n] for n in names] for r in ok])
    keep = x.std(axis=0) > 1e-12  # constant features carry no information (and break z-scores)
    names = [n for n, k in zip(names, keep, strict=True) if k]
    x = x[:, keep]
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    meta = [series[r["series_uid"]] for r in ok]

    out.mkdir(parents=True, exist_ok=True)
    feat_rows = [
        {**{f: m[f] for f in ("series_uid", *FACTORS, "split")}, **dict(zip(names, row, strict=True))}
        for m, row in zip(meta, x, strict=True)
    ]
    write_text_atomic(out / "features.csv", _csv_text(feat_rows))
    effect_rows, cluster_rows, confounded = _factor_effects(z, meta, names, seed)
    write_text_atomic(out / "effect_sizes.csv", _csv_text(effect_rows))
    write_text_atomic(
        out / "clustering.csv",
        _csv_text(cluster_rows or [{"factor": "", "k": "", "adjusted_rand_index": ""}]),
    )
    pca = PCA(n_components=2, random_state=seed).fit(z)
    _plot_embedding(
        out / "embedding.png", pca.transform(z), [m["domain"] for m in meta], pca.explained_variance_ratio_
    )

    ranked = sorted(
        (r for r in effect_rows if r["median_eta2"] != "" and r["factor"] != "patient"),
        key=lambda r: -r["median_epsilon2"],
    )
    best = ranked[0] if ranked else None
    ari = {r["factor"]: r["adjusted_rand_index"] for r in cluster_rows}
    summary = {
        "dataset": str(dataset.resolve()),
        "series": len(ok),
        "slices_per_series": slices_per_series,
        "features": len(names),
        "failed": failed,
        "effect_sizes": effect_rows,
        "clustering": cluster_rows,
        "confounded": confounded,
        "seconds": round(time.time() - started, 1),
        "recommended_factor": best["factor"] if best else None,
    }
    write_json_atomic(out / "summary.json", summary, indent=2)
    write_text_atomic(out / "summary.md", _summary_md(summary, ranked, ari, dataset))
    return summary


def _plan(
    dataset: Path, out: Path, slices_per_series: int, workers: int, split: str | None
) -> tuple[dict[str, dict], list[dict]]:
    """Check the request; the series (with their acquisition factors) and one extraction task per series."""
    if not (dataset / "manifest.csv").is_file():
        raise AnalysisError(
            f"{dataset} is not a prepared dataset (no manifest.csv); run python -m Training.prepare first"
        )
    if slices_per_series < 1 or workers < 1:
        raise AnalysisError("--slices-per-series and --workers must be at least 1")
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} is a file; give a folder")
    if not out.parent.is_dir():
        raise AnalysisError(f"the parent folder of --out ({out.parent}) does not exist; create it first")
    info = json.loads((dataset / "dataset.json").read_text()) if (dataset / "dataset.json").is_file() else {}
    spec = json.loads((dataset / "preprocessing.json").read_text())
    series = _series_factors(dataset, info)
    if split is not None:
        series = {k: v for k, v in series.items() if v["split"] == split}
    if len(series) < 3:
        raise AnalysisError(
            f"{dataset} has {len(series)} series{' in split ' + split if split else ''}; "
            "at least 3 are needed to compare acquisition factors"
        )
    tasks = []
    for uid, s in sorted(series.items()):
        rows = sorted(s["rows"])
        pick = np.unique(np.linspace(0, len(rows) - 1, min(slices_per_series, len(rows))).round().astype(int))
        tasks.append(
            {"series_uid": uid, "array": str(dataset / "arrays" / s["array"]),
             "rows": [rows[i] for i in pick], "spec": spec}
        )
    return series, tasks


def _extract_all(
    tasks: list[dict], workers: int, progress: Callable[[int, int], None] | None,
    cancel: threading.Event | None,
) -> list[dict]:
    results: list[dict] = []

    def collect(res: dict) -> None:
        results.append(res)
        if progress:
            progress(len(results), len(tasks))
        if cancel is not None and cancel.is_set():
            raise AnalysisCancelled("domain analysis cancelled; no report was written")

    if workers == 1:
        for t in tasks:
            collect(extract_series_features(t))
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for res in pool.imap_unordered(extract_series_features, tasks):
                collect(res)
    return results


def _factor_effects(
    z: np.ndarray, meta: list[dict], names: list[str], seed: int
) -> tuple[list[dict], list[dict], list[tuple[str, str]]]:
    """Per acquisition factor: effect sizes (eta^2, epsilon^2), k-means agreement, and confounded pairs."""
    from sklearn.metrics import adjusted_rand_score

    effect_rows, cluster_rows, partitions = [], [], {}
    for factor in FACTORS:
        labels = [str(m[factor]) for m in meta]
        n_groups = len(set(labels))
        partitions[factor] = labels
        if n_groups < 2 or n_groups >= len(meta):
            effect_rows.append(
                {"factor": factor, "groups": n_groups, "median_eta2": "", "median_epsilon2": "",
                 "top_features": "", "note": "not testable (one group, or one series per group)"}
            )
            continue
        eta = eta_squared(z, labels)
        eps = eta_squared(z, labels, adjusted=True)
        top = np.argsort(eps)[::-1][:5]
        effect_rows.append(
            {
                "factor": factor,
                "groups": n_groups,
                "median_eta2": round(float(np.median(eta)), 4),
                "median_epsilon2": round(float(np.median(eps)), 4),
                "top_features": "; ".join(f"{names[i]} ({eps[i]:.2f})" for i in top),
                "note": "",
            }
        )
        if factor != "patient":
            cluster_rows.append(
                {"factor": factor, "k": n_groups,
                 "adjusted_rand_index": round(_kmeans_ari(z, labels, seed), 4)}
            )
    # Factors that split the series identically cannot be told apart on this data.
    testable = [f for f in FACTORS if 1 < len(set(partitions[f])) < len(meta)]
    confounded = [
        (a, b)
        for i, a in enumerate(testable)
        for b in testable[i + 1 :]
        if adjusted_rand_score(partitions[a], partitions[b]) > 0.999
    ]
    for row in effect_rows:
        same = [b if a == row["factor"] else a for a, b in confounded if row["factor"] in (a, b)]
        if same:
            row["note"] = (row["note"] + " " if row["note"] else "") + "confounded with " + ", ".join(same)
    return effect_rows, cluster_rows, confounded


def _summary_md(summary: dict, ranked: list[dict], ari: dict, dataset: Path) -> str:
    lines = [
        f"# Radiomic domain analysis: {dataset}",
        "",
        f"{summary['series']} series, {summary['slices_per_series']} slice(s) each, {summary['features']} "
        f"pyradiomics texture features ({', '.join(FEATURE_CLASSES)}; the evaluation's "
        "Training/params/radiomics_2d.yaml, body mask).",
        "",
        "## Effect size per acquisition factor",
        "",
        "eta^2 = share of a feature's variance explained by the factor's groups (0 = none, 1 = all); "
        "epsilon^2 = the same minus what chance gives with that many groups (ranks the factors); median "
        "over features. Adjusted Rand index (ARI) = agreement of k-means clusters of the features with the "
        "factor's groups (1 = identical, 0 = chance).",
        "",
        "| factor | groups | median eta^2 | median epsilon^2 | k-means ARI | strongest features (epsilon^2) "
        "| note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["effect_sizes"]:
        lines.append(
            f"| {r['factor']} | {r['groups']} | {r['median_eta2']} | {r['median_epsilon2']} | "
            f"{ari.get(r['factor'], '')} | "
            f"{r['top_features']} | {r['note']} |"
        )
    lines += ["", "![embedding](embedding.png)", "", "## Recommendation", ""]
    if not ranked:
        lines.append(
            "No factor could be tested (every factor has one group). Collect series from more than "
            "one scanner or kernel."
        )
    else:
        best = ranked[0]
        lines.append(
            f"The factor that explains most texture variability is **{best['factor']}** (median epsilon^2 "
            f"{best['median_epsilon2']}, eta^2 {best['median_eta2']}, "
            f"k-means ARI {ari.get(best['factor'], 'n/a')})."
        )
        conf = [b if a == best["factor"] else a for a, b in summary["confounded"] if best["factor"] in (a, b)]
        if conf:
            lines.append(
                f"On this data it is confounded with {', '.join(conf)} (they split the series "
                "identically), so the data cannot say which of them drives the texture."
            )
        kernel_like = {"domain", "kernel", "scanner"}
        if best["factor"] in kernel_like or set(conf) & kernel_like:
            lines.append(
                "Define the harmonization domains as **scanner + reconstruction kernel** groups (what "
                "`Training.prepare` does), as the method's README recommends; merge groups only where "
                "their features cluster together."
            )
        else:
            lines.append(
                f"Texture differs most by {best['factor']}, not by kernel: consider defining domains "
                f"by {best['factor']} (or by kernel within each {best['factor']}) before training."
            )
        weak = [r["factor"] for r in ranked if r["median_epsilon2"] < 0.1]
        if weak:
            lines.append(f"Factors with little effect (median epsilon^2 < 0.1): {', '.join(weak)}.")
    if summary["failed"]:
        lines += ["", f"Feature extraction failed for {len(summary['failed'])} series (see summary.json)."]
    return "\n".join(lines) + "\n"
