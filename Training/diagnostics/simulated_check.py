"""Every direction between a model's domains on held-out simulated patients, at their native pixel size.

    python -m Training.diagnostics.simulated_check SIM_TREE --model MODEL --out DIR
        [--domains A,B,...] [--slices-per-variant 2]

SIM_TREE is a ``Training.simulate --anatomy`` output whose anatomy the model never saw. For each ordered
pair (source, target) of domains present in the tree and in the model, the source series' slices are
harmonized (source given, as for a series whose tags name it) and scored against the same slices of the
target series with the real-pair validation's metrics (``validate_real.Direction``): PSNR, RMSE, HP noise,
NPS distance. DIR gets ``simulated_check.json``, ``table.csv`` and ``simulated_check.png`` (per direction:
PSNR gain and NPS-distance ratio, model / input).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from TextureStarGANCore.fileio import write_csv_atomic, write_figure_png, write_json_atomic
from Training.command import run_command
from Training.evaluation.validate_real import Direction
from Training.trainer.paired_data import load_simulated_groups

Progress = Callable[..., None]


def _rows(n: int, per_variant: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, per_variant)})


def check(tree: Path, model: Path, out: Path, *, domains: Sequence[str] | None = None,
          per_variant: int = 2, noise: bool = True, progress: Progress | None = None) -> dict[str, Any]:
    from TextureStarGANCore.inference import Harmonizer

    h = Harmonizer.from_checkpoint(model, device="cpu")
    wanted = [d for d in (domains or h.domains) if d in h.domains]
    groups = load_simulated_groups(tree, wanted)
    present = [d for d in wanted if all(d in g.series for g in groups)]
    if len(present) < 2 or not groups:
        raise ValueError(f"{tree}: fewer than two of the model's domains are simulated there")
    pairs = [(s, t) for s in present for t in present if s != t]
    t0 = time.perf_counter()
    rows = []
    for i, (s, t) in enumerate(pairs):
        src, tgt, outs = [], [], []
        for g in groups:
            idx = _rows(g.slices, per_variant)
            x = g.series[s][idx].astype(np.float32)
            src.append(x)
            tgt.append(g.series[t][idx].astype(np.float32))
            outs.append(h.harmonize(x, (*g.spacing_xy, 1.0), target=t, source=s,
                                    **({} if noise else {"noise": False})).astype(np.float32))
        # Variants differ in pixel size: score each and average, weighting by slices.
        scores, hp_target = [], []
        for g, a, b, o in zip(groups, src, tgt, outs, strict=True):
            ctx = Direction(f"{s}->{t}", s, t, a, b, g.spacing_xy)
            scores.append((len(a), (ctx.score(a), ctx.score(o))))
            hp_target.append(ctx.hp_target)
        row: dict[str, Any] = {"source": s, "target": t}
        for label, k in (("input", 0), ("model", 1)):
            for key in ("psnr_db", "rmse_hu", "hp_noise_hu", "nps_distance"):
                vals = [(n, sc[k][key]) for n, sc in scores if sc[k][key] is not None]
                weight = sum(n for n, _ in vals)
                row[f"{label}_{key}"] = sum(n * v for n, v in vals) / weight if vals else None
        row["target_hp_noise_hu"] = float(np.mean(hp_target))
        rows.append(row)
        if progress:
            progress("directions", i + 1, len(pairs))
    result = _summary(rows, tree, model, per_variant, time.perf_counter() - t0)
    result["noise"] = h.last_run.get("noise")
    write_json_atomic(out / "simulated_check.json", result, indent=1)
    keys = list(rows[0])
    write_csv_atomic(out / "table.csv", keys, [[r[k] for k in keys] for r in rows])
    _figure(rows, present, out / "simulated_check.png")
    return result


def _summary(rows: list[dict[str, Any]], tree: Path, model: Path, per_variant: int, seconds: float) -> dict:
    nps_pairs = [r for r in rows
                 if r["input_nps_distance"] is not None and r["model_nps_distance"] is not None]
    improved = [r for r in nps_pairs if r["model_nps_distance"] < r["input_nps_distance"]]
    psnr_up = [r for r in rows if r["model_psnr_db"] > r["input_psnr_db"]]
    return {
        "tree": str(tree), "model": str(model), "slices_per_variant": per_variant, "directions": len(rows),
        "nps_distance_improved": f"{len(improved)}/{len(nps_pairs)}",
        "psnr_improved": f"{len(psnr_up)}/{len(rows)}",
        "median_nps_distance": {"input": float(np.median([r["input_nps_distance"] for r in nps_pairs])),
                                "model": float(np.median([r["model_nps_distance"] for r in nps_pairs]))}
        if nps_pairs else None,
        "median_psnr_db": {"input": float(np.median([r["input_psnr_db"] for r in rows])),
                           "model": float(np.median([r["model_psnr_db"] for r in rows]))},
        "not_improved": [f"{r['source']}->{r['target']}" for r in nps_pairs if r not in improved],
        "psnr_not_improved": [f"{r['source']}->{r['target']}" for r in rows if r not in psnr_up],
        "seconds": round(seconds, 1), "rows": rows,
    }


def _figure(rows: list[dict[str, Any]], domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(domains)
    gain = np.full((n, n), np.nan)
    ratio = np.full((n, n), np.nan)
    for r in rows:
        i, j = domains.index(r["source"]), domains.index(r["target"])
        gain[i, j] = r["model_psnr_db"] - r["input_psnr_db"]
        if r["input_nps_distance"] and r["model_nps_distance"] is not None:
            ratio[i, j] = r["model_nps_distance"] / r["input_nps_distance"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5))
    for ax, data, title, cmap, lim in ((axes[0], gain, "PSNR gain (dB), model - input", "RdBu", None),
                                       (axes[1], ratio, "NPS distance, model / input", "RdBu_r", (0, 2))):
        lo, hi = lim or (-np.nanmax(np.abs(data)), np.nanmax(np.abs(data)))
        im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_xticks(range(n), domains, rotation=90, fontsize=7)
        ax.set_yticks(range(n), domains, fontsize=7)
        ax.set_xlabel("target")
        ax.set_ylabel("source")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    write_figure_png(fig, path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m Training.diagnostics.simulated_check",
                                 description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree", type=Path)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--domains", default=None, help="comma-separated subset of the model's domains")
    ap.add_argument("--slices-per-variant", type=int, default=2)
    ap.add_argument("--no-noise", action="store_true", help="models with noise synthesis: the mean image")
    args = ap.parse_args(argv)
    doms = args.domains.split(",") if args.domains else None
    code, res = run_command(
        lambda bars: check(args.tree, args.model, args.out, domains=doms, per_variant=args.slices_per_variant,
                           noise=not args.no_noise, progress=bars),
        desc="check", unit="direction", errors=(ValueError, OSError))
    if res is not None:
        print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
