"""Generator throughput on CPU: slices/s, counted FLOPs, achieved GFLOP/s and its ratio to a float32 matmul.

Each case (config x batch x memory format) runs in its own subprocess so that its peak RSS is its own; the
matmul reference is measured in that same subprocess right before and after the generator timing, so the
ratio compares like with like on a machine whose load changes (the development machine is shared).

    .venv/bin/python Testing/benchmarks/bench_generator.py            # paper + small, batch 1 and 4
    .venv/bin/python Testing/benchmarks/bench_generator.py --quick    # small config only
    .venv/bin/python Testing/benchmarks/bench_generator.py --profile  # top operators of one paper pass

Writes Testing/benchmarks/results/engine_networks.md (and prints the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # Testing/benchmarks/machine.py (benchmarks run as scripts)

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "engine_networks.md"
NOTES_MARKER = "<!-- notes: kept across re-runs -->"
LAYOUTS = {"cf": "contiguous", "cl": "channels_last"}
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))
from TextureStarGANCore.fileio import write_text_atomic  # noqa: E402


def _matmul_gflops(torch, n: int, repeats: int) -> float:
    """Best-of float32 GEMM rate: the machine's practical peak for dense float32 work right now."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b  # warm-up (MKL/oneDNN initialisation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def run_case(preset: str, batch: int, layout: str, repeats: int, threads: int) -> dict:
    """One measurement in this process (called in a fresh subprocess by `main`).

    layout: 'cf' (contiguous NCHW) or 'cl' (channels_last). For 'cf' the same weights are also run through
    the plain textbook blocks of Testing/reference_blocks.py (the speed before the exact rewrites in
    networks.py), interleaved pass by pass with the optimised network so both see the same machine load.
    """
    import torch
    from reference_blocks import reference_generator_forward
    from torch.utils.flop_counter import FlopCounterMode

    from TextureStarGANCore.config import ModelConfig
    from TextureStarGANCore.networks import Generator

    torch.set_num_threads(threads)
    cfg = ModelConfig.paper() if preset == "paper" else ModelConfig.small()
    torch.manual_seed(0)
    g = Generator(cfg).eval().requires_grad_(False)
    x = torch.rand(batch, 1, cfg.img_size, cfg.img_size) * 2 - 1
    s = torch.randn(batch, cfg.style_dim)
    if layout == "cl":
        g = g.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with_ref = layout == "cf"

    def ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return reference_generator_forward(g, a, b)

    def count(fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn(x, s)
        return counter.get_total_flops()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn(x, s)
        return time.perf_counter() - t0

    with torch.inference_mode():
        flops = count(g)
        ref_flops = count(ref) if with_ref else None
        mm_before = _matmul_gflops(torch, 2048, 5)
        g(x, s)  # warm-up
        times, ref_times = [], []
        for _ in range(repeats):
            times.append(timed(g))
            if with_ref:
                ref_times.append(timed(ref))
        mm_after = _matmul_gflops(torch, 2048, 5)
    t_med = statistics.median(times)
    mm = (mm_before + mm_after) / 2
    gflops = flops / t_med / 1e9
    out = {
        "preset": preset,
        "img": cfg.img_size,
        "widths": f"{cfg.base_width}->{cfg.max_width}",
        "batch": batch,
        "layout": layout,
        "threads": threads,
        "gflop_per_slice": flops / batch / 1e9,
        "t_median_s": t_med,
        "t_best_s": min(times),
        "slices_per_s": batch / t_med,
        "gflops": gflops,
        "matmul_gflops": mm,
        "matmul_before_after": [mm_before, mm_after],
        "ratio": gflops / mm,
        "ratio_best": flops / min(times) / 1e9 / max(mm_before, mm_after),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if with_ref:
        t_ref = statistics.median(ref_times)
        out |= {
            "ref_gflop_per_slice": ref_flops / batch / 1e9,
            "ref_t_median_s": t_ref,
            "ref_slices_per_s": batch / t_ref,
            "ref_ratio": ref_flops / t_ref / 1e9 / mm,
            "speedup_vs_ref": t_ref / t_med,
        }
    return out


def profile(threads: int) -> str:
    """Top operators of one paper-size batch-1 pass (self CPU time)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from TextureStarGANCore.config import ModelConfig
    from TextureStarGANCore.networks import Generator

    torch.set_num_threads(threads)
    cfg = ModelConfig.paper()
    g = Generator(cfg).eval()
    x = torch.rand(1, 1, 512, 512) * 2 - 1
    s = torch.randn(1, cfg.style_dim)
    with torch.inference_mode():
        g(x, s)
        with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            g(x, s)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def _machine() -> str:
    cpu = cpu_name()
    load = os.getloadavg()
    return (
        f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}; load average at start "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        + ("(other jobs were sharing the machine)" if load[0] > 1.5 else "(quiet machine)")
    )


def _table(rows: list[dict]) -> str:
    head = (
        "| config | img | widths | batch | threads | layout | GFLOP/slice | median s/batch | slices/s "
        "| GFLOP/s | matmul GFLOP/s | ratio (median) | ratio (best) | textbook blocks: GFLOP/slice "
        "| slices/s | ratio | speed-up of optimised | peak RSS MB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['preset']} | {r['img']} | {r['widths']} | {r['batch']} | {r['threads']} | "
        f"{LAYOUTS[r['layout']]} | {r['gflop_per_slice']:.2f} | "
        f"{r['t_median_s']:.3f} | {r['slices_per_s']:.3f} | {r['gflops']:.1f} | {r['matmul_gflops']:.1f} | "
        f"{r['ratio']:.2f} | {r['ratio_best']:.2f} | "
        + (
            f"{r['ref_gflop_per_slice']:.2f} | {r['ref_slices_per_s']:.3f} | {r['ref_ratio']:.2f} | "
            f"{r['speedup_vs_ref']:.2f}x | "
            if "speedup_vs_ref" in r
            else "- | - | - | - | "
        )
        + f"{r['peak_rss_mb']:.0f} |\n"
        for r in rows
    )
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small config only")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts to compare")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print the top operators of a paper pass and exit")
    ap.add_argument("--no-write", action="store_true", help="do not write the results file")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args(argv)

    threads = [int(t) for t in str(args.threads).split(",")]
    if args.case:
        preset, batch, layout = args.case.split(",")
        print(json.dumps(run_case(preset, int(batch), layout, args.repeats, threads[0])))
        return 0
    if args.profile:
        print(profile(threads[0]))
        return 0

    cases = [("small", 1), ("small", 4)] + ([] if args.quick else [("paper", 1), ("paper", 4)])
    rows = []
    machine = _machine()
    for preset, batch in cases:
        # channels_last only at the first thread count: it did not help on this CPU (see notes).
        variants = [("cf", threads[0]), ("cl", threads[0])] + [("cf", t) for t in threads[1:]]
        for layout, n_threads in variants:
            cmd = [sys.executable, __file__, "--case", f"{preset},{batch},{layout}",
                   "--repeats", str(args.repeats), "--threads", str(n_threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(n_threads))
            print(f"running {preset} batch {batch} {layout} {n_threads} thread(s) ...", flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {r['slices_per_s']:.2f} slices/s, {r['gflops']:.1f} GFLOP/s, ratio {r['ratio']:.2f}, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    table = _table(rows)
    print(table)
    if not args.no_write:
        import torch

        text = (
            "# Engine networks: generator throughput on CPU\n\n"
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
            "`Testing/benchmarks/bench_generator.py`.\n\n"
            f"Machine: {machine}. torch {torch.__version__}, inference_mode, "
            f"float32, median of {args.repeats} timed passes after one warm-up.\n\n"
            "Ratio = generator GFLOP/s (FLOPs counted with torch.utils.flop_counter.FlopCounterMode: "
            "convolutions and matmuls, multiply-add = 2) / float32 2048x2048 matmul GFLOP/s measured in the "
            "same process just before and after (mean). Target: ratio >= 0.5. 'ratio (best)' uses the "
            "fastest pass and the faster matmul, which is less sensitive to other users' load. "
            "'textbook blocks' = the same weights run through the plain StarGAN v2 blocks "
            "(Testing/reference_blocks.py), timed interleaved pass by pass with the optimised network in "
            "the same process; 'speed-up' = its median time / the optimised median time.\n\n"
            + table
        )
        # Hand-written analysis below the marker survives a re-run; only the measured part is replaced.
        if RESULTS.exists() and NOTES_MARKER in RESULTS.read_text():
            text += "\n" + NOTES_MARKER + RESULTS.read_text().split(NOTES_MARKER, 1)[1]
        write_text_atomic(RESULTS, text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
