"""Benchmark of the multi-scale texture loss: fast closed form vs explicit soft GLCM, and the loss
against one paper-size generator forward + backward.

Every case runs in a fresh subprocess, so its peak resident memory (getrusage ru_maxrss) is its own; the
figure reported is that peak minus the resident size just before the timed work (torch, inputs and model
already loaded). Inputs are real CT: slices of the GE HiSpeed series in ../shared/data/real_ct, mapped to
[-1, 1] with the project's HU window (air sits at the range end, the costlier path of the fast moments).

    .venv/bin/python Testing/benchmarks/bench_texture.py [--threads 2] [--skip-explicit] [--skip-generator]

Writes Testing/benchmarks/results/texture.md (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # Testing/benchmarks/machine.py (benchmarks run as scripts)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from TextureStarGANCore.fileio import write_json_atomic, write_text_atomic  # noqa: E402

# (case, batch, size, repetitions, timeout in s)
FAST = [("fast_grid", 1, 256, 5, 600), ("fast_grid", 8, 256, 3, 600), ("fast_grid", 1, 512, 3, 600),
        ("fast_grid", 8, 512, 3, 900), ("fast_loss", 8, 512, 3, 900)]
EXPLICIT = [("explicit_grid", 1, 256, 1, 1800)]
GENERATOR = [("generator", 8, 512, 1, 1800)]
DESCRIPTION = {
    "fast_grid": "MultiScaleTextureExtractor (closed form): one 4x4 grid per image, fwd+bwd",
    "fast_loss": "TextureLoss(x_real, x_rec): two grids + aggregation, fwd+bwd (one training call)",
    "explicit_grid": "explicit soft GLCMs (soft_glcm + glcm_contrast) for the same grid, fwd+bwd",
    "generator": "paper-size Generator (ModelConfig.paper(): 512 px, widths 32..512), fwd+bwd",
}


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _real_ct_batch(batch: int, size: int):
    import torch
    import torch.nn.functional as F

    from TextureStarGANCore.preprocessing import PreprocessSpec, hu_to_unit
    from TextureStarGANCore.volume_io import read_volume

    shared = Path(os.environ.get("CTH_SHARED_DIR", REPO.parent / "shared"))
    vol = read_volume(shared / "data" / "real_ct" / "ge_hispeed_dual_head_std_plus")
    idx = [round(i * (vol.hu.shape[0] - 1) / max(batch - 1, 1)) for i in range(batch)]
    x = torch.as_tensor(hu_to_unit(vol.hu[idx].astype("float32"), PreprocessSpec())).unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x.contiguous()


def run_case(case: str, batch: int, size: int, reps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = _real_ct_batch(batch, size)
    extra: dict = {}
    if case == "generator":
        from TextureStarGANCore.config import ModelConfig
        from TextureStarGANCore.networks import Generator

        gen = Generator(ModelConfig.paper())
        style = torch.randn(batch, 64)

        def step() -> None:
            gen.zero_grad(set_to_none=True)
            gen(x, style).abs().mean().backward()
    elif case == "fast_loss":
        from TextureStarGANCore.texture import TextureLoss

        loss = TextureLoss()
        x_rec = (x + 0.02 * torch.randn(x.shape)).requires_grad_(True)

        def step() -> None:
            x_rec.grad = None
            loss(x, x_rec).backward()
    else:
        from TextureStarGANCore.texture import MultiScaleTextureExtractor, explicit_contrast_grid

        ext = MultiScaleTextureExtractor()
        xg = x.clone().requires_grad_(True)
        fn = explicit_contrast_grid if case == "explicit_grid" else ext

        def step() -> None:
            xg.grad = None
            fn(xg).sum().backward()

        if case == "explicit_grid":
            with torch.no_grad():
                ref = explicit_contrast_grid(x.double())
                extra["max_rel_diff_fast_vs_explicit"] = float(((ext(x).double() - ref).abs() / ref).max())
    times = []
    base = _rss_gb()  # before any work: the warm-up call reaches the same peak as the timed ones
    if reps > 1:
        step()  # warm-up (allocator, FFT plans)
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"case": case, "batch": batch, "size": size, "reps": reps, "threads": threads,
            "time_s": statistics.median(times), "times_s": times,
            "peak_extra_gb": max(_rss_gb() - base, 0.0), "peak_rss_gb": _rss_gb(), **extra}


def _run_subprocess(case, batch, size, reps, timeout, threads) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--batch", str(batch), "--size", str(size),
           "--reps", str(reps), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"case": case, "batch": batch, "size": size, "error": f"timed out after {timeout} s"}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        return {"case": case, "batch": batch, "size": size, "error": f"exit {out.returncode}: {tail[0]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> str:
    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GB RAM, no GPU; load average at start {load}"


def _gb(value: float) -> str:
    # Below 10 MB the peak did not rise measurably above what loading torch and the inputs had reached.
    return "<0.01" if value < 0.01 else f"{value:.2f}"


def _report(results: list[dict], threads: int, started: str) -> str:
    import torch

    lines = [
        "# Texture loss benchmark", "",
        f"Measured {started} with `Testing/benchmarks/bench_texture.py`, torch {torch.__version__}, "
        f"{threads} torch thread(s) per case, each case in a fresh process.",
        f"Machine: {_machine()}. The machine was shared with other engineers' jobs while this ran, so "
        "absolute times are noisy; the ratios are taken from this one run. One torch thread per case: with "
        "the machine oversubscribed (load ~8-10 on 2 cores), two OpenMP threads spent most of their time "
        "waiting for each other (fast_grid 1 x 256: 1.47 s with 2 threads vs 0.10 s with 1 in a trial).", "",
        "Inputs: real CT slices (GE HiSpeed series, HU window -1024..2048 -> [-1, 1], area-resized for 256), "
        "256 levels, default sigma (one bin), offsets d in {1, 3, 5, 7} x angles {0, 45, 90, 135}.",
        "Time = median forward+backward; memory = peak resident set growth over the warm-up and timed "
        "calls.", "",
        "| case | batch | size | time (s) | peak extra memory (GB) | notes |", "|---|---|---|---|---|---|",
    ]
    by = {(r["case"], r["batch"], r["size"]): r for r in results}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['batch']} | {r['size']} | - | - | {r['error']} |")
            continue
        note = DESCRIPTION[r["case"]]
        if "max_rel_diff_fast_vs_explicit" in r:
            note += f"; fast vs explicit (float64) max rel. diff {r['max_rel_diff_fast_vs_explicit']:.1e}"
        lines.append(f"| {r['case']} | {r['batch']} | {r['size']} | {r['time_s']:.3f} | "
                     f"{_gb(r['peak_extra_gb'])} | {note} |")
    lines += ["", "Not run: the explicit path at batch 8 (any size) and at 512 x 512: its autograd graph "
              "keeps two H*W*L soft-histogram tensors per offset (about 4.6-5 GB at batch 1, 256 x 256), so "
              "batch 1 at 512 needs ~20 GB and batch 8 at 256 ~40 GB, more than this 24 GB machine.", "",
              "## Ratios"]
    fast1 = by.get(("fast_grid", 1, 256))
    expl = by.get(("explicit_grid", 1, 256))
    if fast1 and expl and "error" not in fast1 and "error" not in expl:
        lines.append(f"- explicit / fast at batch 1, 256 x 256: time {expl['time_s'] / fast1['time_s']:.0f}x "
                     f"(target >= 1000x), memory {_gb(expl['peak_extra_gb'])} GB vs "
                     f"{_gb(fast1['peak_extra_gb'])} GB.")
    loss = by.get(("fast_loss", 8, 512))
    gen = by.get(("generator", 8, 512))
    if loss and gen and "error" not in loss and "error" not in gen:
        per_call = loss["time_s"] / gen["time_s"]
        lines.append(f"- texture loss call / one paper-size generator forward+backward, batch 8, 512 x 512: "
                     f"{100 * per_call:.2f}% (target <= 3% of a training iteration).")
        lines.append("  Per training iteration (Training/trainer: two generator steps, latent- and "
                     "reference-guided) the loss is called twice, while each generator step runs G forward "
                     "3 times and backpropagates through 2 of them (x_fake, x_rec), and the two "
                     "discriminator steps run G forward twice more: at least 4 G forward+backward per "
                     "iteration. So the "
                     f"loss is at most 2 / 4 x {100 * per_call:.2f}% = {100 * per_call / 2:.2f}% of the "
                     "generator work of an iteration, before counting the discriminator, style encoder and "
                     "mapping network.")
    if by.get(("fast_grid", 8, 512)) and "error" not in by[("fast_grid", 8, 512)]:
        lines.append("- batch 8 at 512 x 512 runs on this 24 GB CPU machine (see the table for its memory).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per case (1: on a shared, oversubscribed machine, 2 OpenMP threads "
                         "spend most of their time waiting for each other)")
    ap.add_argument("--skip-explicit", action="store_true", help="skip the ~5 GB, minutes-long explicit case")
    ap.add_argument("--skip-generator", action="store_true", help="skip the paper-size generator case")
    ap.add_argument("--out", type=Path, default=REPO / "Testing" / "benchmarks" / "results" / "texture.md")
    ap.add_argument("--keep-previous", action="store_true",
                    help="keep the previous run's results (OUT with .json) for the cases not run now")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT from its .json without running")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process: one case, one JSON line
        print(json.dumps(run_case(args.case, args.batch, args.size, args.reps, args.threads)))
        return
    raw = args.out.with_suffix(".json")
    if args.report_only:
        previous = json.loads(raw.read_text())
        text = _report(previous["results"], args.threads, previous["started"])
        write_text_atomic(args.out, text)
        print(text)
        return
    from tqdm import tqdm

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cases = FAST + ([] if args.skip_explicit else EXPLICIT) + ([] if args.skip_generator else GENERATOR)
    results = []
    for case, batch, size, reps, timeout in tqdm(cases, desc="texture benchmark", unit="case"):
        r = _run_subprocess(case, batch, size, reps, timeout, args.threads)
        tqdm.write(json.dumps(r))
        results.append(r)
    if args.keep_previous and raw.is_file():
        done = {(r["case"], r["batch"], r["size"]) for r in results}
        previous = json.loads(raw.read_text())
        results = [r for r in previous["results"] if (r["case"], r["batch"], r["size"]) not in done] + results
        order = {c[:3]: i for i, c in enumerate(FAST + EXPLICIT + GENERATOR)}
        results.sort(key=lambda r: order.get((r["case"], r["batch"], r["size"]), 99))
        started = f"{previous['started']} and {started}"
    text = _report(results, args.threads, started)
    write_json_atomic(raw, {"started": started, "results": results})
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
