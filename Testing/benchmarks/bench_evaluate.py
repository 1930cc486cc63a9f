"""Benchmark of the evaluation: radiomics features/s with 1 and 2 workers, and a whole evaluation run on a
simulated test split, extrapolated to the paper's test set (~9700 slices, 3 domains, 2 models).

    .venv/bin/python Testing/benchmarks/bench_evaluate.py [--slices 6] [--canvas 512] [--out FILE]

Uses 512 x 512 canvases at 1 mm (the paper's preprocessing), phantom anatomy with emulated kernels
(Testing/eval_dataset_factory.py) and an untrained model of the paper's canvas size (speed only: the
generator's cost does not depend on its weights). FID uses the random-init Inception (same network, same
cost as the real weights; values NOT COMPARABLE and not reported).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

from eval_dataset_factory import make_eval_dataset  # noqa: E402
from model_factory import make_model_file  # noqa: E402

from TextureStarGANCore.config import ModelConfig  # noqa: E402
from Training.evaluation.evaluate import evaluate  # noqa: E402
from Training.evaluation.metrics import radiomics_features as rf  # noqa: E402
from Training.evaluation.metrics.testset import load_test_set  # noqa: E402

PAPER_TEST_SLICES = 9700
PAPER_DOMAINS = 3
PAPER_MODELS = 2  # baseline and texture-aware, side by side


def _rate(canv: np.ndarray, spec, workers: int) -> float:
    """Slices/s of feature extraction with a warm pool (start-up excluded: one pool serves a whole run)."""
    with rf.feature_pool(workers) as pool:
        rf.extract_features(canv[:workers], spec.hu_window, spec.pixel_spacing_mm, pool=pool)  # warm-up
        t0 = time.perf_counter()
        feats = rf.extract_features(canv, spec.hu_window, spec.pixel_spacing_mm, pool=pool)
        dt = time.perf_counter() - t0
    assert np.isfinite(feats).all()
    return len(canv) / dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=4, help="slices per domain in the simulated test split")
    ap.add_argument("--canvas", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "Testing" / "benchmarks" / "results" / "evaluation_raw.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    load = Path("/proc/loadavg").read_text().split()[:3]
    lines = [
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, python "
        f"{platform.python_version()}, load average at start: {load}"
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = make_eval_dataset(
            tmp / "ds", canvas=args.canvas, patients=1, slices=args.slices, domains=("B30f", "BONE")
        )
        ts = load_test_set(ds)
        canv = ts.canvases(ts.slices["B30f"] + ts.slices["BONE"])
        rf.feature_names()
        rates = {w: _rate(canv, ts.spec, w) for w in (1, 2)}
        for w, r in rates.items():
            lines.append(
                f"radiomics (102 features, body mask) {args.canvas}^2 phantom slices, {w} worker(s): "
                f"{r:.2f} slices/s"
            )
        lines.append(f"ratio 2 workers / 1 worker (same run): {rates[2] / rates[1]:.2f}")
        cfg = ModelConfig.small(img_size=args.canvas)
        model = make_model_file(tmp / "m.safetensors", config=cfg)
        res = evaluate(
            ds,
            [model],
            tmp / "out",
            inception_weights="random-for-testing",
            workers=2,
            cache_dir=tmp / "cache",
        )
        timing = res["timing"]
        lines.append(
            f"whole evaluation (all 5 metrics, 1 untrained model, 2 domains x {args.slices} slices, "
            f"{args.canvas}^2, 2 workers): {timing['total_seconds']:.1f} s"
        )
        stats_s = timing["statistics_seconds"]
        lines.append(f"  statistics (FID matrix square roots, FRD, Welch): {stats_s:.1f} s")
        for stage, v in timing["stages"].items():
            lines.append(f"  {stage}: {v['seconds_per_slice']:.3f} s/slice ({v['slices']} slices)")
        st = {k: v["seconds_per_slice"] for k, v in timing["stages"].items()}
        # A trained model outputs CT-like images; an untrained one outputs noise, whose texture matrices
        # (GLSZM/GLRLM zones, GLCM gray levels) make pyradiomics several times slower. For the paper's
        # extrapolation the harmonized images cost what real images cost.
        per_real = st["fid_real"] + st["radiomics_real"]
        per_dir = st["harmonize"] + st["fid_harmonized"] + st["radiomics_real"] + st["structure"]
        paper = (
            PAPER_TEST_SLICES * per_real + PAPER_TEST_SLICES * PAPER_MODELS * (PAPER_DOMAINS - 1) * per_dir
        )
        lines.append(
            f"extrapolated to the paper's test set ({PAPER_TEST_SLICES} slices, {PAPER_DOMAINS} domains, "
            f"{PAPER_MODELS} models, no paired metrics): {paper / 3600:.1f} h on this machine "
            f"(radiomics on harmonized images costed as real images)"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
