"""Check an exported model on held-out simulated patients against the paired true target-kernel slices.

    python -m Training.diagnostics.model_check MODEL.safetensors [MODEL2 ...] --data DATASET --out DIR
        [--slices-per-domain 4] [--tiled]

For every direction a -> b (six with three kernels) and every model: PSNR / SSIM inside the body and the
noise power spectrum distance to the true b slice (``metrics.paired``), the high-frequency noise
SD in uniform soft-tissue ROIs (source, harmonized, truth) and the low-pass structure error (Gaussian
sigma 3 mm, |lowpass(harmonized) - lowpass(truth)| in HU inside the body), which must stay near the
input's. `--tiled` also runs the generator on overlapping crops of the training size instead of the whole
canvas (the generator's instance norm then sees crop statistics, as in patch training). Writes
DIR/model_check.json, DIR/model_check.md and a before / after / truth PNG per direction. The classical
baselines (``Training.evaluation.baselines``: linear kernel-transfer filter both ways, best Gaussian blur
for the smoothing direction), fitted on the training patients' paired slices, get rows of their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from TextureStarGANCore.fileio import write_json_atomic, write_text_atomic
from TextureStarGANCore.masks import body_mask
from TextureStarGANCore.preprocessing import unit_to_hu
from Training.data.dataset import CTSliceDataset, DatasetError, paired_slices
from Training.evaluation.baselines import Baseline, fit_domain_baselines
from Training.evaluation.metrics.harmonize import CanvasHarmonizer
from Training.evaluation.metrics.paired import PairedDirection, roi_size, uniform_roi_centers

HP_SIGMA_MM = 1.5  # high-pass: image minus its Gaussian blur at this sigma
LP_SIGMA_MM = 3.0  # low-pass structure scale


def hf_noise_sd(hu: np.ndarray, centers: list[tuple[int, int]], size: int, spacing: float) -> float | None:
    """SD of the high-pass residual in the ROIs (noise level at the frequencies kernels differ most)."""
    if not centers:
        return None
    hp = hu - ndimage.gaussian_filter(hu, HP_SIGMA_MM / spacing)
    h = size // 2
    vals = [hp[r - h : r - h + size, c - h : c - h + size].std() for r, c in centers]
    return float(np.mean(vals))


def _score_direction(pairs: list, a: str, b: str, harmonize: Callable[[dict], np.ndarray], spec: Any,
                     figure: Path | None) -> dict:
    """Every figure of one direction a -> b for one method (``harmonize(slices) -> HU`` of slice a)."""
    sp = spec.pixel_spacing_mm
    acc = PairedDirection(sp, spec.hu_window)
    hf: dict[str, list[float]] = {"source": [], "harmonized": [], "target": []}
    lp_before, lp_after = [], []
    example = None
    for _, slices in pairs:
        src = unit_to_hu(slices[a], spec)
        tru = unit_to_hu(slices[b], spec)
        har = harmonize(slices)
        acc.add(src, har, tru)
        size = roi_size(sp, tru.shape[-1])
        centers = uniform_roi_centers(tru, sp, size)
        for k, img in (("source", src), ("harmonized", har), ("target", tru)):
            v = hf_noise_sd(img, centers, size, sp)
            if v is not None:
                hf[k].append(v)
        mask = body_mask(tru)
        lt = ndimage.gaussian_filter(tru, LP_SIGMA_MM / sp)
        for lst, img in ((lp_before, src), (lp_after, har)):
            low = ndimage.gaussian_filter(img, LP_SIGMA_MM / sp)
            lst.append(float(np.abs(low - lt)[mask].mean()))
        if example is None:
            example = (src, har, tru)
    s = acc.summary()
    s.pop("nps", None)
    s.update({f"hf_sd_{k}": (float(np.mean(v)) if v else None) for k, v in hf.items()})
    s["lowpass_err_before_hu"] = float(np.mean(lp_before))
    s["lowpass_err_after_hu"] = float(np.mean(lp_after))
    if example is not None and figure is not None:
        _figure(figure, example, a, b, sp)
    return s


def check(models: list[Path], data: Path, out: Path, per_domain: int, tiled: bool,
          baselines: bool = True) -> dict:
    ds = CTSliceDataset(data, "test")
    spec = ds.spec
    names = [d.name for d in ds.domains]
    keys = sorted({(ds.rows[i].patient, ds.rows[i].slice_index) for i in range(len(ds))})
    rng = np.random.default_rng(0)
    keys = [keys[i] for i in sorted(rng.choice(len(keys), min(per_domain, len(keys)), replace=False))]
    results: dict = {"dataset": str(data), "slices": [list(k) for k in keys], "models": {}}
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(k, paired_slices(ds, *k)) for k in keys]
    directions = [(a, b) for a in names for b in names if a != b]
    for mpath in models:
        runner = CanvasHarmonizer(mpath, batch_size=1)
        modes = {"full canvas": None}
        if tiled and runner.spec is not None:  # a kernel-transfer model has no canvas to tile
            modes[f"tiled {runner.model_file.config.img_size}"] = runner.model_file.config.img_size
        for mode, tile in modes.items():
            label = f"{Path(mpath).name} [{mode}]"
            per_dir = {}
            for a, b in directions:

                def run(slices: dict, a: str = a, b: str = b, tile: int | None = tile,
                        runner: CanvasHarmonizer = runner) -> np.ndarray:
                    return unit_to_hu(runner(slices[a][None], b, tile=tile, source=a, spec=spec)[0], spec)

                png = out / f"{Path(mpath).stem}_{a}_to_{b}.png" if tile is None else None
                per_dir[f"{a}->{b}"] = _score_direction(pairs, a, b, run, spec, png)
            results["models"][label] = per_dir
    if baselines:
        try:
            fitted, fitted_on = fit_domain_baselines(data)
        except DatasetError as exc:
            results["baselines_skipped"] = str(exc)
        else:
            results["baselines_fitted_on"] = fitted_on
            for (a, b), items in fitted.items():
                for base in items:
                    def run_base(slices: dict, a: str = a, base: Baseline = base) -> np.ndarray:
                        return base.apply(unit_to_hu(slices[a], spec)[None])[0]

                    s = _score_direction(pairs, a, b, run_base, spec, None)
                    s["fitted_params"] = base.params
                    results["models"].setdefault(f"baseline: {base.name}", {})[f"{a}->{b}"] = s
    _write(out, results)
    return results


def _figure(path: Path, example: tuple[np.ndarray, ...], a: str, b: str, spacing: float) -> None:
    """Input, harmonized and true target slice with zoomed regions (TextureStarGANCore.figures)."""
    from TextureStarGANCore.figures import save_comparison_png

    src, har, tru = example
    try:
        save_comparison_png(path, src, [har, tru], titles=(f"input {a}", f"harmonized to {b}", f"true {b}"),
                            pixel_spacing=(spacing, spacing), suptitle=f"{a} -> {b}")
    except Exception as exc:  # noqa: BLE001 - a figure must not cost the numbers
        print(f"figure {path.name} failed: {exc}", file=sys.stderr)


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _write(out: Path, results: dict) -> None:
    cols = ["psnr_before", "psnr_after", "ssim_before", "ssim_after", "nps_distance_before",
            "nps_distance_after", "hf_sd_source", "hf_sd_harmonized", "hf_sd_target",
            "lowpass_err_before_hu", "lowpass_err_after_hu"]
    lines = [f"Dataset: {results['dataset']}; slices (patient, index): {results['slices']}", ""]
    if "baselines_fitted_on" in results:
        lines += [f"Baselines (linear transfer filter, best Gaussian blur for the smoothing direction) "
                  f"fitted on {results['baselines_fitted_on']}; parameters in model_check.json.", ""]
    elif "baselines_skipped" in results:
        lines += [f"No baselines: {results['baselines_skipped']}", ""]
    for label, per_dir in results["models"].items():
        lines += [f"### {label}", "", "| direction | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for d, s in per_dir.items():
            lines.append(f"| {d} | " + " | ".join(_fmt(s.get(c)) for c in cols) + " |")
        lines.append("")
    write_json_atomic(out / "model_check.json", results)
    write_text_atomic(out / "model_check.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m Training.diagnostics.model_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="prepared simulated dataset (test split used)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slices-per-domain", type=int, default=4, help="paired slice positions (default 4)")
    ap.add_argument("--tiled", action="store_true", help="also evaluate tiled inference")
    ap.add_argument("--no-baselines", action="store_true",
                    help="skip the classical baselines (fitted on the training patients' paired slices)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = check(args.models, args.data, args.out, args.slices_per_domain, args.tiled,
                baselines=not args.no_baselines)
    print((args.out / "model_check.md").read_text())
    return 0 if res["models"] else 1


if __name__ == "__main__":
    sys.exit(main())
