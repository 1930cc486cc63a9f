"""Clinical quantities on the real Philips chest pair (L sharp vs B smooth): speed and the numbers.

    PYTHONPATH=$PWD .venv/bin/python Testing/benchmarks/bench_clinical.py [--workers 2] [--slices 64]

Methods compared with the B (smooth) target: identity (= the L input) and Gaussian blurs of L with sigma
1.0, 1.3 (the REFERENCE's best single blur for L -> B), 1.6 and 2.0 px: five methods, as the real-pair
validation passes (input/identity, model, baselines). Times the whole ``clinical_comparison`` with a cold
feature cache (every ROI of every method and the target extracted) and again with the cache warm, then
measures the lung numbers on the second half of the slices (the REFERENCE's evaluation half). Then the
head phantom pair (YA bone -> UB standard, no lungs): identity and blur 1.3 px, radiomic CCC only. Writes
``Testing/benchmarks/results/clinical.md`` and ``clinical.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing" / "benchmarks")]

from machine import cpu_name, load_average  # noqa: E402

from TextureStarGANCore.fileio import write_json_atomic, write_text_atomic  # noqa: E402
from TextureStarGANCore.volume_io import read_volume  # noqa: E402
from Training.evaluation.metrics.clinical import clinical_comparison  # noqa: E402
from Training.evaluation.metrics.clinical_report import clinical_markdown, save_clinical_figures  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real_ct"
PAIR = REAL / "philips_brilliance16_chest_l_b_pair"
HEAD = REAL / "philips_ingenuity_head_phantom_ub_ya_pair"
SIGMAS = (1.0, 1.3, 1.6, 2.0)


def blur(stack: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(s, sigma) for s in stack]).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "Testing" / "benchmarks" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    L = read_volume(PAIR / "L_sharp")
    B = read_volume(PAIR / "B_smooth")
    spacing = float(L.spacing[0])
    lo = (L.hu.shape[0] - args.slices) // 2
    sl = slice(lo, lo + args.slices)
    lh, bh = L.hu[sl], B.hu[sl]
    methods = {"identity (L)": lh, **{f"blur {s:g} px": blur(lh, s) for s in SIGMAS}}
    load_start = load_average()
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("cold cache", "warm cache"):
            t0 = time.perf_counter()
            res = clinical_comparison(
                methods, bh, spacing, target="B", workers=args.workers, cache_dir=Path(tmp) / "cache"
            )
            timings[run] = time.perf_counter() - t0
    rois = sum(res["radiomics"]["rois"].values())
    half = slice(L.hu.shape[0] // 2, L.hu.shape[0])
    second = clinical_comparison(
        {"L (sharp)": L.hu[half], "L blur 1.3 px": blur(L.hu[half], 1.3)},
        B.hu[half],
        spacing,
        target="B (smooth)",
        radiomics=False,
    )
    figs = save_clinical_figures(out, res, prefix="clinical_chest_l_to_b", title="Philips chest, L -> B")
    ya, ub = read_volume(HEAD / "YA_bone"), read_volume(HEAD / "UB_standard")
    t0 = time.perf_counter()
    head = clinical_comparison(
        {"identity (YA)": ya.hu, "YA blur 1.3 px": blur(ya.hu, 1.3)},
        ub.hu,
        float(ya.spacing[0]),
        target="UB",
        workers=args.workers,
    )
    timings["head phantom, cold cache"] = time.perf_counter() - t0
    head_figs = save_clinical_figures(
        out, head, prefix="clinical_head_ya_to_ub", title="head phantom, YA -> UB"
    )
    lines = [
        "# Clinical quantities on the real chest pair (L sharp -> B smooth)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        "`Testing/benchmarks/bench_clinical.py`.",
        "",
        f"Machine: {cpu_name()}, 2-core VM, no GPU; load average at start {load_start}, "
        f"at end {load_average()} (shared with other engineers' jobs).",
        "",
        f"Speed: `clinical_comparison` of {len(methods)} methods + the target on {args.slices} slices "
        f"(512 x 512, {spacing:.3f} mm), {rois} matched {res['radiomics']['roi_mm']:g} mm ROIs per series, "
        f"{(len(methods) + 1) * rois} ROI feature extractions (102 features each; identity = input, measured "
        f"once), {args.workers} worker processes: **{timings['cold cache']:.0f} s with a cold cache**, "
        f"{timings['warm cache']:.1f} s with the cache warm (lung density and ROI placement only).",
        "",
        f"## All {args.slices} slices: identity and Gaussian blurs of L vs B",
        "",
        clinical_markdown(res, heading="###", figures=figs),
        f"## Second half of the slices ({half.start}..{half.stop - 1}), lung density only",
        "",
        clinical_markdown(second, heading="###"),
        f"## Head phantom YA (bone) -> UB (standard, iDose), all {ub.hu.shape[0]} slices "
        f"({timings['head phantom, cold cache']:.0f} s, cold cache)",
        "",
        clinical_markdown(head, heading="###", figures=head_figs),
    ]
    write_text_atomic(out / "clinical.md", "\n".join(lines) + "\n")
    write_json_atomic(
        out / "clinical.json", {"timing_s": timings, "all": res, "second_half": second, "head": head}
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
