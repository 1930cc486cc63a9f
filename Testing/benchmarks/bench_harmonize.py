"""End-to-end harmonization throughput: ``Harmonizer.harmonize`` on a synthetic 512 x 512 CT volume.

Measures slices/s of the whole pipeline (HU -> canvas -> generator -> back into the input grid, numpy in
and out) for the paper-size model (512 canvas at 1 mm, widths 32 -> 512) and a small model (256 canvas at
1.4 mm, img_size 128, widths 16 -> 128), with random weights (speed does not depend on training). It also
splits the time into preprocessing and generator, and reports the generator's achieved GFLOP/s as a ratio
to a float32 (CPU) or bf16 (CUDA) matrix multiply measured in the same run.

On a CUDA machine it also runs the product target: a 300-slice 512 x 512 volume end to end with the
paper-size model (target: at most 1 s on one H100).

    .venv/bin/python Testing/benchmarks/bench_harmonize.py                 # CPU (and CUDA if present)
    .venv/bin/python Testing/benchmarks/bench_harmonize.py --paper-slices 2 --small-slices 8
    .venv/bin/python Testing/benchmarks/bench_harmonize.py --device cuda --cuda-slices 300

Writes Testing/benchmarks/results/engine_inference.md (and prints it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # Testing/benchmarks/machine.py (benchmarks run as scripts)

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "engine_inference.md"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from TextureStarGANCore.config import ModelConfig  # noqa: E402
from TextureStarGANCore.inference import Harmonizer  # noqa: E402
from TextureStarGANCore.preprocessing import PreprocessSpec, body_center, from_canvas, to_canvas  # noqa: E402

CASES = {
    "paper": (ModelConfig.paper(), PreprocessSpec(canvas_size=512, pixel_spacing_mm=1.0)),
    "small": (ModelConfig.small(img_size=128, base_width=16, max_width=128),
              PreprocessSpec(canvas_size=256, pixel_spacing_mm=1.4)),
}
SPACING = (0.7, 0.7, 1.25)  # a typical chest CT: 358 mm field of view


def synthetic_volume(n: int, seed: int = 0) -> np.ndarray:
    """A chest-like 512 x 512 phantom (body, lungs, spine, noise, -2000 padding) as int16 HU."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512] / 512.0
    base = np.full((512, 512), -1000.0)
    base[((xx - 0.5) / 0.42) ** 2 + ((yy - 0.52) / 0.3) ** 2 < 1] = 40.0
    for cx in (0.33, 0.67):
        base[((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.2) ** 2 < 1] = -850.0
    base[((xx - 0.5) / 0.05) ** 2 + ((yy - 0.75) / 0.05) ** 2 < 1] = 700.0
    vol = base[None] + rng.normal(0.0, 30.0, (n, 512, 512))
    vol[:, (xx - 0.5) ** 2 + (yy - 0.5) ** 2 > 0.25] = -2000.0
    return vol.astype(np.int16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of dense matmul rate on ``device``: float32 on CPU, bf16 on CUDA (what autocast uses)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / (10 if device.type == "cuda" else 1))
    return 2.0 * n**3 / best / 1e9


def generator_flops_per_slice(cfg: ModelConfig, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from TextureStarGANCore.networks import Generator

    with torch.device("meta"):
        g = Generator(cfg)
        with FlopCounterMode(display=False) as counter:
            g(torch.zeros(1, 1, size, size), torch.zeros(1, cfg.style_dim))
    return float(counter.get_total_flops())


def bench_case(name: str, slices: int, device: str, batch_size: int | None, tmp: Path) -> dict:
    from model_factory import make_model_file

    cfg, spec = CASES[name]
    path = make_model_file(tmp / f"{name}.safetensors", config=cfg, spec=spec)
    h = Harmonizer.from_checkpoint(path, device=device, batch_size=batch_size)
    dev = h.device
    vol = synthetic_volume(slices)
    h.harmonize(vol[: min(slices, h.batch_size)], SPACING, "B30f")  # warm-up (allocations, kernels)
    _sync(dev)
    t0 = time.perf_counter()
    out = h.harmonize(vol, SPACING, "B30f")
    _sync(dev)
    total = time.perf_counter() - t0
    assert out.shape == vol.shape and out.dtype == vol.dtype

    # Preprocessing alone (identity generator), same batches, same device.
    center = body_center(vol, SPACING[:2])
    t0 = time.perf_counter()
    for start in range(0, slices, h.batch_size):
        x = torch.from_numpy(vol[start:start + h.batch_size].astype(np.float32)).to(dev)
        canvas, placement = to_canvas(x, SPACING[:2], spec, center)
        from_canvas(canvas, placement, x).cpu()
    _sync(dev)
    pre = time.perf_counter() - t0

    flops = generator_flops_per_slice(cfg, spec.canvas_size)
    gen_time = max(total - pre, 1e-9)
    ref = matmul_gflops(dev)
    achieved = flops * slices / gen_time / 1e9
    return {
        "case": name, "device": str(dev), "slices": slices, "batch": h.last_batch_size,
        "canvas": f"{spec.canvas_size} @ {spec.pixel_spacing_mm:g} mm", "seconds": total,
        "slices_per_s": slices / total, "pre_share": pre / total, "gflop_per_slice": flops / 1e9,
        "gen_gflops": achieved, "matmul_gflops": ref, "ratio": achieved / ref,
    }


def machine(device: str) -> str:
    cpu = cpu_name()
    parts = [f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available() and device != "cpu":
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}")
    return "; ".join(parts)


def table(rows: list[dict]) -> str:
    head = ("| case | device | canvas | slices | batch | s total | slices/s | preprocessing share | "
            "GFLOP/slice (G) | G GFLOP/s | matmul GFLOP/s | ratio |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['device']} | {r['canvas']} | {r['slices']} | {r['batch']} | "
            f"{r['seconds']:.2f} | {r['slices_per_s']:.3g} | {r['pre_share']:.0%} | "
            f"{r['gflop_per_slice']:.1f} | {r['gen_gflops']:.1f} | {r['matmul_gflops']:.1f} | "
            f"{r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--paper-slices", type=int, default=2, help="slices for the paper model on CPU")
    ap.add_argument("--small-slices", type=int, default=8, help="slices for the small model on CPU")
    ap.add_argument("--cuda-slices", type=int, default=300, help="slices for the CUDA end-to-end target")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
        if args.device != "cuda":
            for name, n in (("small", args.small_slices), ("paper", args.paper_slices)):
                rows.append(bench_case(name, n, "cpu", None, Path(tmp)))
                print(table(rows[-1:]), flush=True)
        if use_cuda:
            for name in ("small", "paper"):
                rows.append(bench_case(name, args.cuda_slices, "cuda", None, Path(tmp)))
                print(table(rows[-1:]), flush=True)
    load_after = os.getloadavg()
    text = [
        "# Engine inference benchmark (end to end)",
        "",
        f"`Testing/benchmarks/bench_harmonize.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine(args.device)}. Load average (1 min) {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (the development machine is shared with other engineers' jobs).",
        "",
        "`Harmonizer.harmonize` on a synthetic 512 x 512 chest phantom (int16 HU, 0.7 mm pixels), numpy in "
        "and out, random weights. Preprocessing share: HU -> canvas -> input grid alone, same batches. "
        "Generator GFLOP/s = counted FLOPs / (total - preprocessing); ratio = that / dense matmul rate "
        "measured in the same run (float32 on CPU, bf16 on CUDA).",
        "",
        table(rows),
        "",
    ]
    cuda_paper = [r for r in rows if r["case"] == "paper" and r["device"].startswith("cuda")]
    if cuda_paper:
        r = cuda_paper[0]
        verdict = "meets" if r["seconds"] <= 1.0 else "misses"
        text.append(f"CUDA target: {r['slices']} slices at 512 x 512 end to end in {r['seconds']:.2f} s "
                    f"({verdict} the 1 s target).")
    else:
        text.append("CUDA target (300 slices of 512 x 512 in at most 1 s on one H100): not measured here (no "
                    "GPU on this machine); run this script on a CUDA machine, it measures it automatically.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
