"""Writing the evaluation's outputs: CSV tables in the paper's shape, report.md, figures, results.json.

Tables have one row per kernel pair (plus the mean over pairs) and one column per model next to the
"before harmonization" column, as the paper's Tables I and II. Every output is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from TextureStarGANCore.fileio import write_csv_atomic, write_json_atomic, write_text_atomic

FIG_WINDOW = (-1000.0, 400.0)  # lung window for the visual comparison


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    cells = [["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in r] for r in rows]
    return write_csv_atomic(path, header, cells)


def build_tables(results: dict) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """{name: (header, rows)} for every metric present; the mean row averages the pairs."""
    labels = [m["label"] for m in results["models"]]
    pairs = results["pairs_order"]
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}

    def with_mean(rows: list[list[Any]]) -> list[list[Any]]:
        if len(rows) < 2:
            return rows
        cols = list(zip(*[r[1:] for r in rows], strict=True))
        means = [
            float(np.mean([v for v in c if isinstance(v, float | int)]))
            if any(isinstance(v, float | int) for v in c)
            else None
            for c in cols
        ]
        return rows + [["mean", *means]]

    first = results["pairs"][pairs[0]] if pairs else {}
    if "fid" in first:
        rows = [
            [
                p,
                results["pairs"][p]["fid"]["before"],
                *[results["pairs"][p]["fid"]["models"][lab]["mean"] for lab in labels],
            ]
            for p in pairs
        ]
        # Values from test-only Inception weights carry the warning in every column name.
        tag = "" if results.get("fid_settings", {}).get("comparable", True) else " (NOT COMPARABLE)"
        header = [f"{h}{tag}" for h in ("before harmonization", *labels)]
        tables["fid"] = (["kernels", *header], with_mean(rows))
    if "radiomics" in first:
        rows = [
            [
                p,
                results["pairs"][p]["radiomics"]["n_R"],
                *[results["pairs"][p]["radiomics"]["models"][lab]["mean_percent"] for lab in labels],
            ]
            for p in pairs
        ]
        n = first["radiomics"]["n_features"]
        tables["radiomics"] = (
            ["kernels", f"|R| (of {n})", *[f"{lab} % aligned" for lab in labels]],
            with_mean(rows),
        )
    if "frd" in first:
        rows = [
            [
                p,
                results["pairs"][p]["frd"]["before"],
                *[results["pairs"][p]["frd"]["models"][lab]["mean"] for lab in labels],
            ]
            for p in pairs
        ]
        tables["frd"] = (["kernels", "before harmonization", *labels], with_mean(rows))
    if "structure" in first:
        keys = ("lung_dice", "structure_dice", "structure_iou", "ssim_lung")
        rows = [
            [p, *[results["pairs"][p]["structure"]["models"][lab]["mean"][k] for lab in labels for k in keys]]
            for p in pairs
        ]
        tables["structure"] = (["kernels", *[f"{lab} {k}" for lab in labels for k in keys]], with_mean(rows))
    if "paired" in first:
        keys = ("psnr", "ssim", "nps_distance")
        header, rows = ["kernels"], [[p] for p in pairs]
        for k in keys:
            header.append(f"{k} before")
            for r, p in zip(rows, pairs, strict=True):
                r.append(results["pairs"][p]["paired"]["models"][labels[0]]["mean"][f"{k}_before"])
            for lab in labels:
                header.append(f"{k} {lab}")
                for r, p in zip(rows, pairs, strict=True):
                    r.append(results["pairs"][p]["paired"]["models"][lab]["mean"][f"{k}_after"])
            # The classical baseline fitted on the training patients, scored on the same test slices.
            name = "linear filter"
            if any(name in results["pairs"][p]["paired"].get("baselines", {}) for p in pairs):
                header.append(f"{k} baseline: {name}")
                for r, p in zip(rows, pairs, strict=True):
                    b = results["pairs"][p]["paired"].get("baselines", {}).get(name)
                    r.append(b["mean"][f"{k}_after"] if b else None)
        tables["paired"] = (header, with_mean(rows))
    if "clinical" in first:
        header, rows = _clinical_table(results, labels, pairs)
        tables["clinical"] = (header, with_mean(rows))
    return tables


CLINICAL_COLUMNS = {  # no "|" in a header: it would split the markdown table
    "laa950_bias": "%LAA-950 abs. bias",
    "pd15_bias": "PD15 abs. bias (HU)",
    "ccc_share_soft_tissue": "% CCC>=0.85 soft tissue",
    "ccc_share_lung": "% CCC>=0.85 lung",
}


def _clinical_table(results: dict, labels: list[str], pairs: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Per pair: before and, per model, after (mean over both directions) of each clinical column."""
    header, rows = ["kernels"], [[p] for p in pairs]

    def cell(p: str, lab: str, key: str) -> float | None:
        v = results["pairs"][p]["clinical"]["models"][lab]["mean"][key]
        return None if v is None else (100.0 * v if "share" in key else v)

    for key, title in CLINICAL_COLUMNS.items():
        header.append(f"{title} before")
        for r, p in zip(rows, pairs, strict=True):
            r.append(cell(p, labels[0], f"{key}_before"))
        for lab in labels:
            header.append(f"{title} {lab}")
            for r, p in zip(rows, pairs, strict=True):
                r.append(cell(p, lab, f"{key}_after"))
    return header, rows


TABLE_FILES = {
    "fid": "table_fid.csv",
    "radiomics": "table_radiomics.csv",
    "structure": "structure.csv",
    "frd": "table_frd.csv",
    "paired": "paired.csv",
    "clinical": "table_clinical.csv",
}
TABLE_TITLES = {
    "fid": "Table I: FID before and after harmonization (lower is better; mean of both directions)",
    "radiomics": "Table II: % of radiomic features with no statistical difference after harmonization "
    "(higher is better; mean of both directions)",
    "frd": "Frechet Radiomic Distance before and after harmonization (lower is better)",
    "structure": "Structure preservation inside the lungs, harmonized vs its own input (1 = identical)",
    "paired": "Paired ground truth (simulated): PSNR [dB] / SSIM vs the true target-kernel slice (higher is "
    "better), NPS distance (relative L2, lower is better); 'baseline: linear filter' = the classical linear "
    "kernel-transfer filter fitted on the training patients",
    "clinical": "Clinical quantities vs the true target-kernel slice (simulated): absolute Bland-Altman mean "
    "difference of %LAA-950 and PD15 (lower is better), % of radiomic features with CCC >= 0.85 "
    "(higher is better); mean of both directions",
}


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(v) for v in r) + " |")
    return "\n".join(out)


def save_comparison_figures(
    out_dir: Path, examples: dict[str, dict[str, np.ndarray]], spacing_mm: float, note: str = ""
) -> list[str]:
    """Paper Fig. 4 style, one PNG per direction: the input and each model's output with zoomed ROIs
    (``TextureStarGANCore.figures.save_comparison_png``, shared with the CLI and the Slicer module)."""
    from TextureStarGANCore.figures import save_comparison_png

    names = []
    for direction, images in examples.items():
        before = images["before"]
        afters = [v for k, v in images.items() if k != "before"]
        titles = [
            f"before ({direction.split('->')[0]})",
            *[f"{k} -> {direction.split('->')[1]}" for k in images if k != "before"],
        ]
        name = f"fig_{direction.replace('->', '_to_')}.png"
        save_comparison_png(
            out_dir / name,
            before,
            afters,
            titles=titles,
            window=FIG_WINDOW,
            pixel_spacing=(spacing_mm, spacing_mm),
            suptitle=f"{direction}" + (f" - {note}" if note else ""),
        )
        names.append(name)
    return names


def write_outputs(out_dir: Path, results: dict, examples: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    """Write every table, figures, report.md and results.json into ``out_dir``; returns {what: file}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    tables = build_tables(results)
    for name, (header, rows) in tables.items():
        files[name] = _write_csv(out_dir / TABLE_FILES[name], header, rows).name
    if examples:
        untrained = any(not m["trained"] for m in results["models"])
        figs = save_comparison_figures(
            out_dir,
            examples,
            results["provenance"]["preprocessing"]["pixel_spacing_mm"],
            "UNTRAINED model: pipeline test only" if untrained else "",
        )
        files["figures"] = ", ".join(figs)
    nps_files = []
    for p in results["pairs_order"]:
        for d, summ in (
            results["pairs"][p]
            .get("paired", {})
            .get("models", {})
            .get(results["models"][0]["label"], {})
            .get("directions", {})
            .items()
        ):
            if not summ.get("nps"):
                continue
            from Training.simulator.nps import plot_nps

            freq = np.asarray(summ["nps"]["freq_per_mm"])
            curves = {
                f"source ({d.split('->')[0]})": (freq, summ["nps"]["source"]["nps"]),
                f"true target ({d.split('->')[1]})": (freq, summ["nps"]["target"]["nps"]),
            }
            for m in results["models"]:
                md = results["pairs"][p]["paired"]["models"][m["label"]]["directions"][d]
                curves[f"harmonized: {m['label']}"] = (freq, md["nps"]["harmonized"]["nps"])
            name = f"nps_{d.replace('->', '_to_')}.png"
            plot_nps(out_dir / name, curves, title=f"NPS {d} (uniform soft-tissue ROIs)")
            nps_files.append(name)
    if nps_files:
        files["nps"] = ", ".join(nps_files)
    clinical_md = write_clinical_sections(out_dir, results, files)
    results.setdefault("outputs", {}).update(files | {"results": "results.json", "report": "report.md"})
    write_text_atomic(out_dir / "report.md", render_report(results, tables, files, nps_files, clinical_md))
    write_json_atomic(out_dir / "results.json", results)
    return files


def write_clinical_sections(out_dir: Path, results: dict, files: dict[str, str]) -> list[str]:
    """Per pair, model and direction: the clinical figures (written) and markdown lines for report.md."""
    from Training.evaluation.metrics.clinical_report import clinical_markdown, save_clinical_figures

    lines: list[str] = []
    figs: list[str] = []
    for p in results["pairs_order"]:
        models = results["pairs"][p].get("clinical", {}).get("models", {})
        for mi, (lab, entry) in enumerate(models.items()):
            for d, res in entry["directions"].items():
                prefix = f"clinical_{d.replace('->', '_to_')}_m{mi}"
                names = save_clinical_figures(out_dir, res, prefix=prefix, title=f"{d}, {lab}")
                figs += names
                lines += [
                    f"### Clinical quantities {d}, {lab}",
                    "",
                    clinical_markdown(res, heading="####", figures=names),
                ]
    if figs:
        files["clinical_figures"] = ", ".join(figs)
    return lines


def render_report(
    results: dict,
    tables: dict,
    files: dict[str, str],
    nps_files: list[str],
    clinical_md: list[str] | None = None,
) -> str:
    prov = results["provenance"]
    lines = ["# Harmonization evaluation", ""]
    for note in results["notes"]:
        lines += [f"> **{note}**", ""]
    lines += [
        f"Dataset: `{prov['dataset']}` (test split, {'simulated' if prov['simulated'] else 'real'}); "
        f"slices per domain: {results['slices_per_domain']}.",
        "",
    ]
    lines += ["Models:", ""]
    for m in results["models"]:
        state = "trained" if m["trained"] else "**UNTRAINED (pipeline test only)**"
        lines.append(
            f"- {m['label']}: `{m['path']}` sha256 `{m['sha256'][:16]}...`, {m['iterations']} "
            f"iterations, {state}"
        )
    lines.append("")
    for name in ("fid", "radiomics", "frd", "structure", "paired", "clinical"):
        if name not in tables:
            continue
        header, rows = tables[name]
        lines += [f"## {TABLE_TITLES[name]}", ""]
        label = results["labels"].get(name)
        if label:
            lines += [f"_{label}_", ""]
        lines += [_markdown_table(header, rows), "", f"File: `{TABLE_FILES[name]}`", ""]
    if "figures" in files:
        lines += ["## Visual comparison (paper Fig. 4 style, lung window -1000..400 HU)", ""]
        lines += [f"![{f}]({f})" for f in files["figures"].split(", ")] + [""]
    for f in nps_files:
        lines += [f"![{f}]({f})", ""]
    if clinical_md:
        lines += ["## Clinical quantities per direction", "", *clinical_md]
    lines += [
        "## Provenance",
        "",
        "```",
        *(f"{k}: {v}" for k, v in prov.items() if k != "dataset_json"),
        "```",
        "",
        "Every number with its per-direction breakdown: `results.json`.",
        "",
    ]
    return "\n".join(lines)
