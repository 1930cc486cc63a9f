"""Rendering ``clinical.clinical_comparison`` results: markdown tables, a compact summary, plots.

Used by the simulated evaluation's report.md and by the real-pair validation; every file is written
atomically (``TextureStarGANCore.fileio``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from TextureStarGANCore.fileio import write_figure_png
from Training.evaluation.metrics.clinical import BLAND_ALTMAN_QUANTITIES
from Training.evaluation.metrics.lung_density import QUANTITIES, QUANTITY_LABELS
from Training.evaluation.metrics.radiomic_reproducibility import CCC_REPRODUCIBLE, FEATURE_CLASSES

Table = tuple[list[str], list[list[Any]]]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def _limits(ba: dict) -> str:
    if ba["mean_diff"] is None:
        return "n/a"
    if ba["lower"] is None:
        return f"{ba['mean_diff']:+.2f} (n = 1)"
    return f"{ba['mean_diff']:+.2f} [{ba['lower']:+.2f}, {ba['upper']:+.2f}]"


def clinical_tables(res: dict) -> dict[str, Table]:
    """{name: (header, rows)}: 'lung' (per series), 'bland_altman', 'ccc_<region>' for each region."""
    tables: dict[str, Table] = {}
    names = [*res["methods"], res["target"]]
    lungs = res.get("lungs")
    if lungs:
        rows = []
        for n in names:
            s = lungs["series"][n]
            label = f"{n} (target)" if n == res["target"] and "target" not in n else n
            rows.append([label, *[None if s is None else s[q] for q in QUANTITIES]])
        tables["lung"] = (["series", *[QUANTITY_LABELS[q] for q in QUANTITIES]], rows)
        header = ["method vs target", "slices"]
        header += [f"{QUANTITY_LABELS[q]} mean diff [95 % limits]" for q in BLAND_ALTMAN_QUANTITIES]
        rows = [
            [m, lungs["bland_altman"][m][BLAND_ALTMAN_QUANTITIES[0]]["n"]]
            + [_limits(lungs["bland_altman"][m][q]) for q in BLAND_ALTMAN_QUANTITIES]
            for m in res["methods"]
        ]
        tables["bland_altman"] = (header, rows)
    for reg, per in res.get("radiomics", {}).get("regions", {}).items():
        header = ["method vs target", "ROIs", f"CCC >= {CCC_REPRODUCIBLE} (share)", "median CCC"]
        header += [f"median {c}" for c in FEATURE_CLASSES]
        rows = []
        for m, r in per.items():
            share = r["share_reproducible"]
            cell = "n/a" if share is None else f"{100 * share:.0f} % ({r['n_reproducible']}/{r['n_defined']})"
            rows.append(
                [m, r["n_rois"], cell, r["median_ccc"], *[r["median_by_class"][c] for c in FEATURE_CLASSES]]
            )
        tables[f"ccc_{reg}"] = (header, rows)
    return tables


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def clinical_markdown(res: dict, *, heading: str = "###", figures: list[str] | None = None) -> str:
    """Markdown for report.md: notes, lung table, Bland-Altman table, CCC tables, figure links."""
    tables = clinical_tables(res)
    lines: list[str] = [f"> **{n}**\n" for n in res.get("notes", [])]
    if "lung" in tables:
        lines += [
            f"{heading} Lung density per series ({res['lungs']['slices_with_lungs']} of {res['slices']} "
            "slices with lungs)",
            "",
            f"_{res['lungs']['mask']}; %LAA-t = % of lung voxels below t HU; PD15 = 15th percentile._",
            "",
            markdown_table(*tables["lung"]),
            "",
            f"{heading} Bland-Altman per slice, method - target",
            "",
            markdown_table(*tables["bland_altman"]),
            "",
        ]
    rad = res.get("radiomics")
    if rad:
        lines += [
            f"{heading} Radiomic reproducibility vs target (Lin's CCC, matched {rad['roi_mm']:g} mm ROIs)",
            "",
            f"_ROIs: {rad['rois']}. Share = features with CCC >= {CCC_REPRODUCIBLE} among those with a "
            "defined CCC; shape2D is the same ROI in every image (undefined)._",
            "",
        ]
        for reg in rad["regions"]:
            lines += [f"Region: {reg}", "", markdown_table(*tables[f"ccc_{reg}"]), ""]
    for f in figures or []:
        lines += [f"![{f}]({f})", ""]
    return "\n".join(lines)


def clinical_summary(res: dict) -> dict[str, dict[str, float | None]]:
    """Per method: series %LAA-950 and PD15 differences to the target, Bland-Altman bias, CCC shares."""
    out: dict[str, dict[str, float | None]] = {}
    lungs = res.get("lungs")
    for m in res["methods"]:
        row: dict[str, float | None] = {}
        if lungs:
            s, t = lungs["series"][m], lungs["series"][res["target"]]
            for q in BLAND_ALTMAN_QUANTITIES:
                row[f"{q}_series_diff"] = None if s is None else s[q] - t[q]
                row[f"{q}_ba_mean_diff"] = lungs["bland_altman"][m][q]["mean_diff"]
        for reg, per in res.get("radiomics", {}).get("regions", {}).items():
            row[f"ccc_share_{reg}"] = per[m]["share_reproducible"]
            row[f"ccc_median_{reg}"] = per[m]["median_ccc"]
        out[m] = row
    return out


def _save(fig: Any, path: Path) -> Path:

    write_figure_png(fig, path)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bland_altman(path: str | Path, res: dict, *, title: str = "") -> Path | None:
    """Bland-Altman of %LAA-950 and PD15 per slice, one column per method vs the target (None: no lungs)."""
    lungs = res.get("lungs")
    if not lungs:
        return None
    plt = _pyplot()
    methods = res["methods"]
    qs = BLAND_ALTMAN_QUANTITIES
    fig, axes = plt.subplots(
        len(qs), len(methods), figsize=(3.2 * len(methods) + 0.6, 3.0 * len(qs)), squeeze=False, sharey="row"
    )
    tgt = lungs["per_slice"][res["target"]]
    for qi, q in enumerate(qs):
        t = np.array([np.nan if v is None else v for v in tgt[q]], dtype=np.float64)
        for mi, m in enumerate(methods):
            ax = axes[qi, mi]
            v = np.array([np.nan if x is None else x for x in lungs["per_slice"][m][q]], dtype=np.float64)
            ok = np.isfinite(v) & np.isfinite(t)
            ax.scatter((v[ok] + t[ok]) / 2, v[ok] - t[ok], s=12, alpha=0.7)
            ba = lungs["bland_altman"][m][q]
            if ba["mean_diff"] is not None:
                ax.axhline(ba["mean_diff"], color="C1", label=f"mean {ba['mean_diff']:+.2f}")
            if ba["lower"] is not None:
                ax.axhline(
                    ba["lower"], color="C3", ls="--", label=f"95 % [{ba['lower']:+.2f}, {ba['upper']:+.2f}]"
                )
                ax.axhline(ba["upper"], color="C3", ls="--")
            ax.axhline(0.0, color="0.5", lw=0.8)
            ax.set_title(f"{m} vs {res['target']}", fontsize=9)
            ax.set_xlabel(f"mean of both: {QUANTITY_LABELS[q]}", fontsize=8)
            if mi == 0:
                ax.set_ylabel(f"difference: {QUANTITY_LABELS[q]}", fontsize=8)
            ax.legend(fontsize=7, loc="best")
            ax.xaxis.set_major_locator(plt.MaxNLocator(4))
            ax.grid(alpha=0.3)
    fig.suptitle(title or "Bland-Altman per slice, method - target", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_ccc_distributions(path: str | Path, res: dict, region: str, *, title: str = "") -> Path | None:
    """Box plots of per-feature CCC, one group per feature class, one box per method (None: no data)."""
    per = res.get("radiomics", {}).get("regions", {}).get(region)
    if not per:
        return None
    plt = _pyplot()
    from Training.evaluation.metrics.radiomic_reproducibility import feature_class

    methods = list(per)
    classes = [c for c in FEATURE_CLASSES if c != "shape2D"]  # shape2D: same ROI everywhere, undefined
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(classes) * (len(methods) + 1), 4.2))
    width = 0.8
    for mi, m in enumerate(methods):
        data, pos = [], []
        for ci, c in enumerate(classes):
            vals = [v for n, v in per[m]["ccc"].items() if feature_class(n) == c and v is not None]
            data.append(vals or [np.nan])
            pos.append(ci * (len(methods) + 1) + mi)
        box = ax.boxplot(
            data,
            positions=pos,
            widths=width,
            patch_artist=True,
            showfliers=True,
            medianprops={"color": "black"},
        )
        for patch in box["boxes"]:
            patch.set_facecolor(f"C{mi}")
            patch.set_alpha(0.6)
        share = per[m]["share_reproducible"]
        ax.plot(
            [],
            [],
            "s",
            color=f"C{mi}",
            label=f"{m} ({_fmt(None if share is None else 100 * share, 0)} % >= {CCC_REPRODUCIBLE})",
        )
    ax.axhline(CCC_REPRODUCIBLE, color="0.3", ls="--", lw=0.8)
    ax.set_xticks([ci * (len(methods) + 1) + (len(methods) - 1) / 2 for ci in range(len(classes))])
    ax.set_xticklabels(classes)
    ax.set_ylabel(f"Lin's CCC vs {res['target']} per feature")
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or f"Radiomic reproducibility, {region} ROIs", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def save_clinical_figures(
    out_dir: str | Path, res: dict, prefix: str = "clinical", title: str = ""
) -> list[str]:
    """Bland-Altman and CCC plots into ``out_dir``; returns the file names written."""
    out_dir = Path(out_dir)
    names = []
    p = plot_bland_altman(out_dir / f"{prefix}_bland_altman.png", res, title=title)
    if p is not None:
        names.append(p.name)
    for reg in res.get("radiomics", {}).get("regions", {}):
        sub = f"{title} - {reg} ROIs" if title else ""
        p = plot_ccc_distributions(out_dir / f"{prefix}_ccc_{reg}.png", res, reg, title=sub)
        if p is not None:
            names.append(p.name)
    return names
