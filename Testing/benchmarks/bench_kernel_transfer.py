"""CPU speed of the default model v2 (kernel transfer) against model v1 (StarGAN v2), in one run.

Measures, for each model file:
- ``Harmonizer.harmonize`` on a synthetic 512 x 512 chest volume (numpy in and out), slices/s;
- ``ctharmonize harmonize`` end to end on the bundled real sample (read DICOM, harmonize, write a DICOM
  series and the before/after PNG), slices/s.
Targets (issue "default model v2"): at least 1 slice/s end to end on the 2-core CPU, model file <= 25 MB.

    .venv/bin/python Testing/benchmarks/bench_kernel_transfer.py [--slices 16] [--v1 PATH]

Writes Testing/benchmarks/results/kernel_transfer_inference.md (and prints it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, load_average  # Testing/benchmarks/machine.py (benchmarks run as scripts)

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "kernel_transfer_inference.md"
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from bench_harmonize import synthetic_volume  # noqa: E402

from TextureStarGANCore.inference import Harmonizer  # noqa: E402
from TextureStarGANCore.model_file import DEFAULT_MODEL_PATH  # noqa: E402

SAMPLE = REPO / "TextureStarGANCore" / "samples" / "chest_l_sharp"
V1 = REPO / "Training" / "baseline_models" / "stargan_v1" / "stargan_v1.safetensors"
LONG = REPO.parent / "shared" / "data" / "real_ct" / "philips_brilliance16_chest_l_b_pair" / "L_sharp"


def engine_rate(model: Path, n: int, target: str, source: str | None, **kwargs: object) -> float:
    h = Harmonizer.from_checkpoint(model, device="cpu")
    vol = synthetic_volume(n)
    h.harmonize(vol[:1], (0.7, 0.7, 1.25), target=target, source=source, **kwargs)  # warm-up
    t0 = time.perf_counter()
    h.harmonize(vol, (0.7, 0.7, 1.25), target=target, source=source, **kwargs)
    return n / (time.perf_counter() - t0)


def cli_rate(model: Path, target: str, folder: Path = SAMPLE,
             extra: tuple[str, ...] = ()) -> tuple[float, int]:
    slices = len(list(folder.glob("*.dcm")))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "TextureStarGANCore.cli", "harmonize", str(folder), "--target", target,
               "--model", str(model), "--output", f"{tmp}/out", "--compare-png", f"{tmp}/compare.png",
               "--device", "cpu", *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        return slices / (time.perf_counter() - t0), slices


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--v1", type=Path, default=V1)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    cases = [("v2 kernel transfer (bundled default)", DEFAULT_MODEL_PATH, "PHILIPS_B", "GE_BONE", "B")]
    if args.v1.is_file():
        cases.append(("v1 StarGAN v2 (previous default)", args.v1, "B30f", None, "B30f"))
    for label, path, target, source, cli_target in cases:
        eng = engine_rate(path, args.slices, target, source)
        cli, n = cli_rate(path, cli_target)
        long = cli_rate(path, cli_target, LONG) if LONG.is_dir() else (float("nan"), 0)
        rows.append((label, path.stat().st_size / 2**20, eng, cli, n, *long))
    lines = [
        "# Kernel-transfer model (default v2): CPU inference speed",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads; load average at the end "
        f"{load_average()}. Command: `.venv/bin/python Testing/benchmarks/bench_kernel_transfer.py "
        f"--slices {args.slices}`.",
        "",
        "| model | file (MB) | engine, 512 x 512 synthetic (slices/s) | `ctharmonize harmonize` end to end "
        "incl. start-up, DICOM in/out and PNG: bundled sample (slices/s) | the same on the 64-slice shared "
        "chest L series (slices/s) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {lab} | {mb:.2f} | {eng:.2f} | {cli:.2f} ({n} slices) | {lcli:.2f} ({ln} slices) |"
              for lab, mb, eng, cli, n, lcli, ln in rows]
    if len(rows) == 2:
        lines += ["", f"Ratio v2 / v1: engine {rows[0][2] / rows[1][2]:.2f}x, end to end "
                  f"{rows[0][3] / rows[1][3]:.2f}x (same run, same machine)."]
    if Harmonizer.from_checkpoint(DEFAULT_MODEL_PATH, device="cpu").synthesizes_noise:
        # The rows above convert towards a smoother kernel: no noise drawn. Iterative UB -> sharp YA draws it.
        kw = {"target": "PHILIPS_YA", "source": "PHILIPS_UB_IDOSE"}
        with_noise = engine_rate(DEFAULT_MODEL_PATH, args.slices, **kw)
        without = engine_rate(DEFAULT_MODEL_PATH, args.slices, **kw, noise=False)
        long = cli_rate(DEFAULT_MODEL_PATH, "YA", LONG, ("--source", "PHILIPS_UB_IDOSE")) if LONG.is_dir() \
            else (float("nan"), 0)
        lines += ["", f"Noise synthesis (v2, UB iDose -> YA, a direction that draws noise): engine "
                  f"{with_noise:.2f} slices/s with noise, {without:.2f} without (`noise=False`), ratio "
                  f"{with_noise / without:.2f}x; `ctharmonize harmonize --source PHILIPS_UB_IDOSE --target "
                  "YA` "
                  f"end to end on the 64-slice series {long[0]:.2f} slices/s."]
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
