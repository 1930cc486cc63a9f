"""Outputs of a real-pair validation: results.json, table.csv, report.md and the PNGs, into one folder.

The caller hands a temporary folder (``fileio.atomic_output(folder=True)``), so all of it appears at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from TextureStarGANCore.figures import LUNG_WINDOW, SOFT_TISSUE_WINDOW, choose_rois
from TextureStarGANCore.fileio import (
    write_csv_atomic,
    write_figure_png,
    write_json_atomic,
    write_text_atomic,
)
from Training.evaluation.metrics.transfer import FREQS_PER_MM, LOW_BAND_PER_MM
from Training.simulator.nps import plot_nps

COLUMNS = ("rmse_hu", "lowpass_rmse_hu", "psnr_db", "ssim", "hp_noise_hu", "hp_gap_closed",
           "nps_distance", "edge_width_10_90_mm", "mtf50_per_mm", "lung_structure_dice", "lung_ssim")
HEADINGS = ("RMSE (HU)", "low-pass RMSE (HU)", "PSNR (dB)", "SSIM", "HP noise (HU)", "HP gap closed",
            "NPS distance",
            "edge 10-90 (mm)", "MTF50 (/mm)", "lung structure Dice", "lung SSIM")
ERROR_HU = 150.0  # error maps span -ERROR_HU..+ERROR_HU


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _params_text(m: dict[str, Any]) -> str:
    p = m.get("params", {})
    if m.get("kind") == "model":
        return f"target domain {p['target_domain']} ({p['target_from']})"
    skip = {"response", "max_gain_choices", "filter"}
    return ", ".join(f"{k}={v}" for k, v in p.items() if k not in skip) or "none"


def _rows(res: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The methods of one direction, then the real target's own figures."""
    rows = list(res["methods"].items())
    rows.append(("real target", {"kind": "reference", **res["target"]}))
    return rows


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    out = []
    for pair in summary["pairs"]:
        for d, res in pair["directions"].items():
            for name, m in _rows(res):
                out.append([pair["pair"], d, res["source_kernel"], res["target_kernel"], name, m["kind"],
                            _params_text(m) if m["kind"] != "reference" else "",
                            *(_fmt(m.get(c), 5) for c in COLUMNS)])
    return out


def _verdict_lines(res: dict[str, Any]) -> list[str]:
    v = res["verdict"]
    best = v["best_baseline"]
    lines = []
    for name, r in v.items():
        if name == "best_baseline":
            continue
        yes = "yes" if r["beats_best_baseline"] else "no"
        nps = {True: "better", False: "worse", None: "not measurable (no uniform soft tissue)"}[
            r["beats_nps"]]
        lines.append(f"**{res['source_kernel']} -> {res['target_kernel']}, {name}: beats the best baseline "
                     f"({best}) on RMSE and NPS: {yes}** (RMSE {'better' if r['beats_rmse'] else 'worse'}, "
                     f"NPS distance {nps})")
        if r.get("calibrate_kernels"):
            err = res["methods"][name]["transfer_low_error"]
            lines.append(f"- {name} passes {abs(err):.1%} too {'little' if err < 0 else 'much'} at "
                         f"{LOW_BAND_PER_MM[0]:g}-{LOW_BAND_PER_MM[-1]:g} cycles/mm (table \"Effective "
                         "transfer\"): this scanner's kernels are not the ones the model assumes. Calibrate "
                         "them on this pair's fitting slices (`python -m Training.calibrate_kernels --pair "
                         "SHARP_DIR SMOOTH_DIR --model MODEL --out CALIBRATED.safetensors`) and validate the "
                         "calibrated model.")
    return lines


def transfer_lines(res: dict[str, Any]) -> list[str]:
    """The effective-transfer table of one direction (every method and the real target)."""
    rows = [(name, m) for name, m in _rows(res) if m.get("transfer_gains")]
    if not rows:
        return []
    keys = [f"{f:g}" for f in FREQS_PER_MM]
    lines = ["Effective transfer: the least-squares radial response from the input to each output on the "
             "evaluated slices, at each frequency (cycles/mm), and its largest relative error against the "
             f"real target's over {LOW_BAND_PER_MM[0]:g}-{LOW_BAND_PER_MM[-1]:g} cycles/mm.", "",
             "| method | " + " | ".join(f"{k} /mm" for k in keys) + " | low-band error |",
             "|---|" + "---|" * (len(keys) + 1)]
    for name, m in rows:
        err = m.get("transfer_low_error")
        err_text = f"{err:+.1%}" if err is not None and np.isfinite(err) else "-"
        lines.append(f"| {name} | " + " | ".join(f"{m['transfer_gains'][k]:.3f}" for k in keys)
                     + f" | {err_text} |")
    return lines + [""]


def report_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Real-CT validation: paired reconstructions of one acquisition", "",
             f"Models: {', '.join(summary['models'])} (device {summary['device']}). RMSE inside the body of "
             f"the real target with HU clipped to {summary['rmse_window_hu']}; low-pass RMSE: the same after "
             "a Gaussian blur of sigma 3 mm (anatomy and mean values); PSNR/SSIM on the same window. "
             "HP noise: SD of image minus its Gaussian blur (sigma 2 px) in soft tissue of the real target; "
             "gap closed = 1 - |HP - HP_target| / |HP_input - HP_target|. NPS distance: relative L2 to the "
             "real target's radial NPS in uniform soft-tissue ROIs. Edge 10-90: rise distance of the mean "
             "edge-spread function on high-contrast edges of the real target (smaller = sharper); MTF50 from "
             "its derivative. Lung: structure Dice / SSIM inside the lungs against the real target. "
             "Baselines are fitted only on the fitting slices, all figures are on the evaluated slices.", ""]
    for pair in summary["pairs"]:
        s = pair["seconds"]
        lines += [f"## {pair['pair']}", "",
                  f"- sharp: kernel {pair['sharp']['kernel']} ({pair['sharp']['folder']}); smooth: kernel "
                  f"{pair['smooth']['kernel']} ({pair['smooth']['folder']}); "
                  f"{pair['sharp']['Manufacturer']} {pair['sharp']['ManufacturerModelName']}, "
                  f"pixel {pair['pixel_spacing_mm'][0]:.3f} mm",
                  f"- fitted on slices {pair['fit_slices'][0]}:{pair['fit_slices'][1]}, evaluated on "
                  f"{pair['evaluated_slices'][0]}:{pair['evaluated_slices'][1]} (0-based, end exclusive)",
                  f"- time: {s['total']:.1f} s in total (baseline fitting {s['baseline_fit']:.1f} s, "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in s["models"].items())
                  + f", metrics {s['metrics']:.1f} s"
                  + (f", clinical quantities {s['clinical']:.1f} s)" if s.get("clinical") is not None
                     else ")"),
                  ""]
        for d, res in pair["directions"].items():
            lines += [f"### {res['source_kernel']} -> {res['target_kernel']} ({d})", ""]
            lines += _verdict_lines(res) + [""]
            lines.append("| method | fitted parameters | " + " | ".join(HEADINGS) + " |")
            lines.append("|---|---|" + "---|" * len(HEADINGS))
            for name, m in _rows(res):
                params = _params_text(m) if m["kind"] != "reference" else "(the real reconstruction)"
                lines.append(f"| {name} | {params} | " + " | ".join(_fmt(m.get(c)) for c in COLUMNS) + " |")
            nps = (f"NPS from {res['nps_rois']} uniform soft-tissue ROIs" if res["nps_rois"] else
                   "NPS not measurable: no uniform soft-tissue ROI in the evaluated slices")
            lines += ["", f"{nps}; edges from {res['edge_points']} edge points.", ""]
            lines += transfer_lines(res)
            for name, m in res["methods"].items():
                if m["kind"] == "baseline" and m["params"].get("response"):
                    p = m["params"]
                    choices = (f"; max gain chosen from {p['max_gain_choices']} by the fit RMSE"
                               if "max_gain_choices" in p else "")
                    lines.append(f"- {name}: {p['response']}; fitted parameters: the gains at {p['knots']} "
                                 f"knots, 0..{p['max_knot_freq_per_mm']} cycles/mm (all in results.json, "
                                 f"params.filter){choices}; fit RMSE {_fmt(m['fit_rmse_hu'])} HU")
            stem = _stem(pair, d)
            lines += ["", f"![images]({stem}_images.png)", "", f"![NPS]({stem}_nps.png)", ""]
            lines += clinical_lines(summary, res)
    return "\n".join(lines) + "\n"


def clinical_lines(summary: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """The clinical section of one direction: summary table, then ``clinical_report``'s tables and plots."""
    from Training.evaluation.metrics.clinical_report import clinical_markdown

    head = f"#### Clinical quantities, {res['source_kernel']} -> {res['target_kernel']}"
    if "clinical" not in res:
        return [head, "", "Skipped (--no-clinical)." if summary.get("clinical") is False else "Not computed.",
                ""]
    cs = res["clinical_summary"]
    lines = [head, "",
             f"Every method on the evaluated slices against the real target ({res['target_kernel']}); "
             f"input = identity, best baseline (lowest RMSE) = {cs['best_baseline']}. %LAA-950 in %, PD15 in "
             "HU (series-pooled over the slices with lungs), Bland-Altman mean difference per slice "
             "(method - target), share of radiomic features with Lin's CCC >= 0.85 per ROI region.", ""]
    regions = sorted({k[len("ccc_share_"):] for row in cs["methods"].values() for k in row
                      if k.startswith("ccc_share_")})
    header = ["method", "%LAA-950", "PD15 (HU)", "BA mean diff %LAA-950", "BA mean diff PD15 (HU)",
              *[f"CCC >= 0.85, {r}" for r in regions]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in cs["methods"].items():
        shares = [row.get(f"ccc_share_{r}") for r in regions]
        cells = [_fmt(row.get("laa950")), _fmt(row.get("pd15")), _fmt(row.get("laa950_ba_mean_diff")),
                 _fmt(row.get("pd15_ba_mean_diff")),
                 *["-" if v is None else f"{100 * v:.0f} %" for v in shares]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", clinical_markdown(res["clinical"], heading="#####", figures=res.get("clinical_figures"))]
    return lines


def _stem(pair: dict[str, Any], d: str) -> str:
    return f"{pair['pair']}/{d.replace('->', '_to_')}"


def _show_slice(res: dict[str, Any]) -> int:
    """The evaluated slice with the most body (most to look at)."""
    return int(np.argmax((res["_images"]["target"] > -500).sum(axis=(1, 2))))


def images_png(path: Path, pair: dict[str, Any], d: str, res: dict[str, Any]) -> None:
    """Input / models / best baseline / real target / error maps, in lung and soft-tissue windows, and
    a zoomed region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = _show_slice(res)
    imgs = res["_images"]
    best = res["verdict"]["best_baseline"]
    models = [n for n, m in res["methods"].items() if m["kind"] == "model"]
    rows = [(f"input ({res['source_kernel']})", imgs["input"][k])]
    rows += [(n, imgs[n][k]) for n in models]
    rows += [(f"best baseline: {best}", imgs[best][k]),
             (f"real target ({res['target_kernel']})", imgs["target"][k])]
    errors = [(f"error {n}", imgs[n][k] - imgs["target"][k]) for n in [*models, best, "identity"]]
    spacing = tuple(pair["pixel_spacing_mm"])
    roi = choose_rois(imgs["target"][k], spacing, count=1)[0]
    n = len(rows) + len(errors)
    fig, axes = plt.subplots(n, 3, figsize=(9.0, 3.0 * n), squeeze=False)
    for i, (label, img) in enumerate(rows):
        for j, (window, wname) in enumerate(((LUNG_WINDOW, "lung"), (SOFT_TISSUE_WINDOW, "soft tissue"))):
            axes[i, j].imshow(img, cmap="gray", vmin=window[0], vmax=window[1])
            axes[i, j].set_title(f"{label}, {wname}", fontsize=8)
        w = roi.window or SOFT_TISSUE_WINDOW
        axes[i, 2].imshow(roi.crop(img), cmap="gray", vmin=w[0], vmax=w[1])
        axes[i, 2].set_title(f"{label}, zoom {roi.label}", fontsize=8)
    for i, (label, err) in enumerate(errors, start=len(rows)):
        axes[i, 0].imshow(err, cmap="coolwarm", vmin=-ERROR_HU, vmax=ERROR_HU)
        axes[i, 0].set_title(f"{label} (+-{ERROR_HU:.0f} HU)", fontsize=8)
        axes[i, 1].imshow(np.abs(err), cmap="magma", vmin=0, vmax=ERROR_HU / 2)
        axes[i, 1].set_title(f"|{label}| (0..{ERROR_HU / 2:.0f} HU)", fontsize=8)
        axes[i, 2].imshow(roi.crop(err), cmap="coolwarm", vmin=-ERROR_HU, vmax=ERROR_HU)
        axes[i, 2].set_title(f"{label}, zoom", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    slice_no = pair["evaluated_slices"][0] + k
    fig.suptitle(f"{pair['pair']}: {res['source_kernel']} -> {res['target_kernel']}, slice {slice_no}",
                 fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.25 / n))
    write_figure_png(fig, path, dpi=80)


def nps_png(path: Path, pair: dict[str, Any], res: dict[str, Any]) -> None:
    freq = res["nps_freq_per_mm"]
    if freq is None:
        return
    curves = {f"real target ({res['target_kernel']})": (freq, res["target"]["nps"]["nps"])}
    styles = {f"real target ({res['target_kernel']})": "k-"}
    for name, m in res["methods"].items():
        if m.get("nps"):
            label = name if name != "identity" else f"input ({res['source_kernel']})"
            curves[label] = (freq, m["nps"]["nps"])
    plot_nps(path, curves, styles=styles,
             title=f"{pair['pair']}: {res['source_kernel']} -> {res['target_kernel']}, uniform soft tissue")


def _strip_images(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_images(v) for k, v in obj.items() if k != "_images"}
    if isinstance(obj, list):
        return [_strip_images(v) for v in obj]
    return obj


def write_outputs(folder: Path, summary: dict[str, Any]) -> None:
    folder = Path(folder)
    for pair in summary["pairs"]:
        for d, res in pair["directions"].items():
            stem = folder / _stem(pair, d)
            images_png(stem.parent / f"{stem.name}_images.png", pair, d, res)
            nps_png(stem.parent / f"{stem.name}_nps.png", pair, res)
            if "clinical" in res:
                from Training.evaluation.metrics.clinical_report import save_clinical_figures

                names = save_clinical_figures(
                    stem.parent, res["clinical"], prefix=f"{stem.name}_clinical",
                    title=f"{pair['pair']}: {res['source_kernel']} -> {res['target_kernel']}")
                res["clinical_figures"] = [f"{pair['pair']}/{n}" for n in names]
    write_json_atomic(folder / "results.json", _strip_images(summary))
    write_csv_atomic(folder / "table.csv",
                     ["pair", "direction", "source_kernel", "target_kernel", "method", "kind", "parameters",
                      *COLUMNS], table_rows(summary))
    write_text_atomic(folder / "report.md", report_markdown(summary))
