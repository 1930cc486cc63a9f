"""Metric curves over training (the paper's Figs. 2 and 3): ``python -m Training.curves RUN_DIR --out DIR``.

Reads the periodic evaluations the trainer writes with ``Training.evaluate.quick_evaluate`` to
``RUN_DIR/eval/iter_XXXXXX.json`` and plots every metric over iterations, one panel per kernel pair and one
for the average over pairs. Several run folders (e.g. baseline and texture-aware) share the axes.
Writes ``curve_<metric>.png`` per metric and ``curves.csv`` with every plotted point.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from TextureStarGANCore.fileio import write_bytes_atomic, write_csv_atomic

TITLES = {
    "fid": "FID (lower is better)",
    "fid_before": "FID before harmonization",
    "radiomics_aligned_pct": "% radiomic features aligned (higher is better)",
    "frd": "Frechet Radiomic Distance (lower is better)",
    "frd_before": "FRD before harmonization",
    "structure_dice": "lung structure Dice (higher is better)",
    "ssim_lung": "SSIM inside the lungs",
    "psnr_after": "PSNR vs true target [dB]",
    "ssim_after": "SSIM vs true target",
    "nps_distance_after": "NPS distance to true target (lower is better)",
}
_ITER = re.compile(r"iter_(\d+)\.json$")


class CurvesError(ValueError):
    pass


def read_run(run_dir: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{metric: {pair or 'average': [(iteration, value), ...]}} from RUN_DIR/eval/iter_*.json."""
    folder = Path(run_dir) / "eval"
    files = sorted((int(m.group(1)), p) for p in folder.glob("iter_*.json") if (m := _ITER.search(p.name)))
    if not files:
        raise CurvesError(
            f"no periodic evaluations in {folder} (expected iter_XXXXXX.json written by the trainer's "
            "evaluation hook); train with evaluation enabled or point to the run folder"
        )
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for it, path in files:
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))["summary"]
        except (OSError, ValueError, KeyError) as exc:
            raise CurvesError(f"{path} is not an evaluation result ({exc})") from None
        if not summary:
            continue
        per_pair = next(iter(summary.values()))  # the run's own model
        for pair, values in per_pair.items():
            for metric, v in values.items():
                if isinstance(v, int | float) and v == v:
                    name = "average" if pair == "mean" else pair
                    out.setdefault(metric, {}).setdefault(name, []).append((it, float(v)))
    return out


def plot_curves(runs: dict[str, dict], out_dir: str | Path) -> list[Path]:
    """One PNG per metric: a panel per pair plus the average, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    metrics = sorted({m for r in runs.values() for m in r})
    written = []
    for metric in metrics:
        panels = sorted({p for r in runs.values() for p in r.get(metric, {}) if p != "average"}) + ["average"]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            for label, r in runs.items():
                pts = sorted(r.get(metric, {}).get(panel, []))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
            ax.set_title(panel, fontsize=9)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(TITLES.get(metric, metric), fontsize=8)
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(TITLES.get(metric, metric), fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        written.append(write_bytes_atomic(out_dir / f"curve_{metric}.png", buf.getvalue()))
    rows = [
        [label, metric, pair, it, f"{v:.6g}"]
        for label, r in runs.items()
        for metric, pairs in sorted(r.items())
        for pair, pts in sorted(pairs.items())
        for it, v in sorted(pts)
    ]
    header = ["run", "metric", "pair", "iteration", "value"]
    written.append(write_csv_atomic(out_dir / "curves.csv", header, rows))
    return written
