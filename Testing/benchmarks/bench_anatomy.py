"""Speed of the real-anatomy simulator: paired 512 x 512 slices for 13 kernels (issue 15).

    PYTHONPATH=$PWD .venv/bin/python Testing/benchmarks/bench_anatomy.py

Stages timed separately (object per source slice; reconstruction of all kernels per output slice; DICOM
writing; one-time calibration per kernel and pixel size) and end to end with ``simulate_anatomy`` on the
shared Philips chest series. Writes Testing/benchmarks/results/anatomy.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name, load_average  # noqa: E402

from TextureStarGANCore.volume_io import read_volume  # noqa: E402
from Training.simulator import anatomy as A  # noqa: E402
from Training.simulator.catalogue import select  # noqa: E402
from Training.simulator.simulate import write_ct_series  # noqa: E402
from Training.simulator.simulate_anatomy import resample_object, simulate_anatomy  # noqa: E402

KERNELS = (
    "PHILIPS_B,PHILIPS_C,PHILIPS_L,SIEMENS_B30f,SIEMENS_B40f,SIEMENS_B50f,SIEMENS_B70f,SIEMENS_I30f_3,"
    "GE_SOFT,GE_STANDARD,GE_LUNG,GE_BONE,GE_STANDARD_ASIR40"
)
REPO = Path(__file__).resolve().parents[2]
SOURCE = Path(os.environ.get("CTH_SHARED_DIR", REPO.parent / "shared")) / "data/real_ct"
SOURCE = SOURCE / "philips_brilliance16_chest_l_b_pair" / "B_smooth"


def main() -> int:
    specs = select(KERNELS)
    vol = read_volume(SOURCE)
    px_src = float(vol.spacing[0])
    load0 = load_average()
    src = A.source_window(A.find_anatomy(SOURCE)[0])
    src_cal = A.CalibrationCache().get(src, px_src)
    t = time.perf_counter()
    objs = [A.attenuation_map(vol.hu[k], px_src, src, src_cal) for k in range(8)]
    t_obj = (time.perf_counter() - t) / 8
    cals = A.CalibrationCache(step_mm=0.05)
    px = 0.8
    t = time.perf_counter()
    for s in specs:
        cals.get(s, px)
    t_cal = (time.perf_counter() - t) / len(specs)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    grids = [resample_object(o, px_src, (256.0, 256.0), 512, px, 3.0, 1.0) for o in objs]
    t_resample = (time.perf_counter() - t) / len(objs)
    t = time.perf_counter()
    recon = [A.reconstruct_kernels(g, px, specs, cals, A.photons(1.0, 5.0), rng) for g in grids]
    t_rec = (time.perf_counter() - t) / len(grids)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for s in specs:
            stack = np.stack([r[s.name] for r in recon])
            write_ct_series(
                Path(tmp) / s.name,
                stack,
                pixel_mm=px,
                z_mm=list(range(len(stack))),
                spec=s,
                patient_id="B",
                study_uid="1.2",
                series_uid=f"1.2.{len(s.name)}",
                frame_uid="1.3",
                series_number=1,
                description="bench",
                uid_seed=("b", s.name),
            )
        t_write = (time.perf_counter() - t) / (len(recon) * len(specs))
        # End to end: 16 source slices x 3 variants x 13 kernels (objects reused across variants).
        t = time.perf_counter()
        tree = Path(tmp) / "src"
        tree.mkdir()
        for f in sorted(SOURCE.iterdir())[24:40]:
            os.symlink(f, tree / f.name)
        rec = simulate_anatomy(Path(tmp) / "out", tree, specs, variants=3, seed=1)
        t_e2e = time.perf_counter() - t
    n_out = sum(p["slices"] for p in rec["patients"])
    per_slice = t_resample + t_rec + t_write * len(specs)
    rows = [
        ("object per source slice (NLM denoise + deconvolution, 512^2)", f"{t_obj:.2f} s"),
        ("calibration per kernel and pixel size (one-time, cached)", f"{t_cal:.2f} s"),
        ("resample object onto a new grid (cubic, rotation, scale)", f"{t_resample:.3f} s"),
        (
            f"reconstruct all {len(specs)} kernels of one 512^2 slice",
            f"{t_rec:.3f} s ({t_rec / len(specs) * 1000:.0f} ms per kernel)",
        ),
        ("write one 512^2 DICOM slice", f"{t_write * 1000:.1f} ms"),
        (f"per paired output slice ({len(specs)} kernels), object reused", f"{per_slice:.2f} s"),
        (
            f"end to end: 16 slices x 3 variants x {len(specs)} kernels",
            f"{t_e2e:.0f} s for {n_out} paired slices ({n_out * len(specs)} images)",
        ),
    ]
    lines = [
        "# Real-anatomy simulator speed (issue 15)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        "`Testing/benchmarks/bench_anatomy.py`.",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical cores, no GPU; load average at start {load0}, "
        f"at end {load_average()} (shared with other engineers' jobs).",
        "",
        "| stage | time |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        f"Throughput: {3600 / per_slice:.0f} paired slices per hour ({len(specs)} kernels each) once the "
        f"objects exist (several variants per source slice); end to end incl. objects and calibration "
        f"{3600 * n_out / t_e2e:.0f} paired slices per hour.",
    ]
    out = Path(__file__).resolve().parent / "results" / "anatomy.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
