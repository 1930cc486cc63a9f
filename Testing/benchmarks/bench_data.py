"""Benchmark of the data pipeline: simulator slices/s (full FBP vs fast path) and prepare
with 1 and 2 workers. Ratios are measured in one run on the same machine.

    .venv/bin/python Testing/benchmarks/bench_data.py [--sim-tree /work/data/sim_ct] [--out results/data.md]

Without --sim-tree a small tree (4 patients x 24 slices at 512 px) is simulated first. Results go to
Testing/benchmarks/results/data.md (with the machine and its load average, since other jobs may share it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def bench_simulator(size: int, n_fast: int, n_full: int) -> dict:
    from Training.simulator import kernels as K
    from Training.simulator.phantom import ChestPhantom, random_params

    spec = K.kernel_by_name("STANDARD")
    px = spec.pixel_mm(size)
    z = np.arange(max(n_fast, n_full)) * 2.5
    t = time.perf_counter()
    truth = ChestPhantom(random_params(np.random.default_rng(0), (0.0, float(z[-1]))), z).slices(size, px)
    phantom_s = (time.perf_counter() - t) / len(z)
    t = time.perf_counter()
    cal = K.calibrate(spec, px, size=192)
    cal_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    for k in range(n_fast):
        K.reconstruct_fast(truth[k], spec, cal, rng)
    fast_s = (time.perf_counter() - t) / n_fast
    t = time.perf_counter()
    for k in range(n_full):
        K.reconstruct_fbp(truth[k], spec, cal, rng, n_angles=size)
    full_s = (time.perf_counter() - t) / n_full
    return {
        "size": size,
        "phantom_s_per_slice": phantom_s,
        "calibration_s_per_kernel": cal_s,
        "fast_s_per_slice": fast_s,
        "full_s_per_slice": full_s,
        "n_fast": n_fast,
        "n_full": n_full,
    }


def bench_prepare(tree: Path, patients: int, workers: tuple[int, ...]) -> dict:
    from Training.data.prepare import prepare

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        root = work / "dicom"
        root.mkdir()
        chosen = sorted(p for p in tree.iterdir() if p.is_dir() and p.name != "nps")[:patients]
        for p in chosen:
            os.symlink(p.resolve(), root / p.name)
        out = {}
        for w in workers:
            t = time.perf_counter()
            info = prepare(root, work / f"ds{w}", workers=w)
            out[w] = {"seconds": time.perf_counter() - t, "slices": info["slices"], "series": info["series"]}
        return {"patients": len(chosen), "runs": out}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sim-tree", type=Path, default=None, help="existing simulated tree for the prepare runs"
    )
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--fast-slices", type=int, default=10)
    ap.add_argument("--full-slices", type=int, default=2)
    ap.add_argument("--prepare-patients", type=int, default=4)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "data.md")
    args = ap.parse_args()

    load_before = os.getloadavg()
    sim = bench_simulator(args.size, args.fast_slices, args.full_slices)
    tmp = None
    tree = args.sim_tree
    if tree is None:
        from Training.simulator.simulate import simulate

        tmp = Path(tempfile.mkdtemp(prefix="bench-sim-"))
        tree = tmp / "tree"
        simulate(tree, args.prepare_patients, 24, size=args.size, seed=1, plots=False)
    prep = bench_prepare(tree, args.prepare_patients, (1, 2))
    load_after = os.getloadavg()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    sim_info = (
        json.loads((tree / "simulation.json").read_text()) if (tree / "simulation.json").is_file() else {}
    )
    result = {
        "simulator": sim,
        "prepare": prep,
        "load_before": load_before,
        "load_after": load_after,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "demo_simulation": sim_info.get("settings"),
    }
    print(json.dumps(result, indent=2))
    _write_markdown(args.out, result)
    return 0


def _write_markdown(path: Path, r: dict) -> None:
    s, p = r["simulator"], r["prepare"]
    runs = p["runs"]
    one, two = runs[1], runs[2]
    lines = [
        "# Data pipeline benchmark",
        "",
        f"Machine: {r['machine']}, no GPU; shared with ~7 other engineers' jobs during the run (load average "
        f"{r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after, on 2 cores), so absolute times "
        "are pessimistic; the ratios were measured in the same run. Script: "
        "`Testing/benchmarks/bench_data.py`.",
        "",
        f"## Simulator ({s['size']} x {s['size']}, one kernel, STANDARD)",
        "",
        "| step | seconds per slice | slices per second |",
        "|---|---|---|",
        f"| phantom rasterisation | {s['phantom_s_per_slice']:.3f} | {1 / s['phantom_s_per_slice']:.2f} |",
        f"| fast path (image-domain emulation) | {s['fast_s_per_slice']:.3f} | "
        f"{1 / s['fast_s_per_slice']:.2f} |",
        f"| full path (radon {s['size']} views, Poisson, FBP) | {s['full_s_per_slice']:.2f} | "
        f"{1 / s['full_s_per_slice']:.3f} |",
        "",
        f"Full / fast = **{s['full_s_per_slice'] / s['fast_s_per_slice']:.0f}x**. Calibration of the fast "
        f"path on the full path: {s['calibration_s_per_kernel']:.1f} s per kernel (once per run).",
        "",
    ]
    demo = r.get("demo_simulation") or {}
    if demo.get("seconds") and demo.get("slices"):
        n = demo["slices"] * 24 * 3
        rate = n / demo["seconds"]
        lines += [
            f"Demo tree (`--patients 24 --slices 24`, 3 kernels, fast path): {demo['seconds']:.0f} s end to "
            f"end = {rate:.2f} slices/s (phantoms, calibration and DICOM writing included; machine loaded).",
            "",
        ]
    lines += [
        f"## Prepare ({p['patients']} simulated patients, {one['series']} series, {one['slices']} slices "
        "512 x 512 -> 512 canvas)",
        "",
        "| workers | seconds | slices per second |",
        "|---|---|---|",
        f"| 1 | {one['seconds']:.1f} | {one['slices'] / one['seconds']:.2f} |",
        f"| 2 | {two['seconds']:.1f} | {two['slices'] / two['seconds']:.2f} |",
        "",
        f"Speed-up with 2 workers: **{one['seconds'] / two['seconds']:.2f}x** (forked workers; the 2 cores "
        "were shared with other jobs).",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
