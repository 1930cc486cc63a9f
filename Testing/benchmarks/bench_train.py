"""Trainer speed: baseline vs texture-aware iterations/s, and 1 vs 2 CPU processes (gloo DDP).

    .venv/bin/python Testing/benchmarks/bench_train.py [--config Training/configs/cpu_demo.yaml]
        [--data DATASET] [--iters 6] [--rounds 3] [--skip-ddp]

Baseline and texture runs alternate in rounds inside one process (same networks, same batches), so load
from other programs on a shared machine hits both alike; the ratio is of the medians of per-round times.
Without --data, synthetic kernel domains (Testing/trainer_support.py) of the config's crop size are used.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

from trainer_support import SyntheticSource, make_domain_images  # noqa: E402

from Training.trainer.config import load_config  # noqa: E402
from Training.trainer.ddp import (  # noqa: E402
    DistContext,
    barrier,
    init_distributed,
    seed_everything,
    shutdown,
)
from Training.trainer.loop import Trainer  # noqa: E402

CPU = DistContext(0, 1, 0, torch.device("cpu"), None)


def _source(cfg, data: Path | None, batch: int, rank: int = 0, world: int = 1):
    if data is not None:
        from Training.trainer.data_source import open_dataset

        ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo" if world > 1 else None)
        return open_dataset(data, cfg, ctx).source, None
    imgs = make_domain_images(6, cfg.model.img_size + 32, seed=0)
    return SyntheticSource(imgs, batch, cfg.model.img_size, seed=rank), 3


def _timed(trainer: Trainer, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        trainer.train_step()
        trainer.iteration += 1
    return (time.perf_counter() - t0) / iters


def texture_ratio(cfg_path: Path, data: Path | None, iters: int, rounds: int) -> dict:
    out = {}
    trainers = {}
    for name, enabled in (("baseline", False), ("texture", True)):
        cfg = load_config(cfg_path, [f"texture.enabled={'true' if enabled else 'false'}"])
        seed_everything(cfg.train.seed, 0)
        source, k = _source(cfg, data, cfg.train.batch_size)
        k = k or source.num_domains
        with tempfile.TemporaryDirectory() as tmp:
            trainers[name] = Trainer(cfg, Path(tmp), source, k, CPU, progress=False)
            trainers[name].monitor.close()
        trainers[name].train_step()  # warm-up (allocations, first-call overheads)
    times: dict[str, list[float]] = {"baseline": [], "texture": []}
    for _ in range(rounds):
        for name in ("baseline", "texture"):
            times[name].append(_timed(trainers[name], iters))
    for name, ts in times.items():
        out[name] = statistics.median(ts)
    out["ratio"] = out["texture"] / out["baseline"]
    out["rounds"] = times
    return out


def _ddp_bench(rank: int, world: int, port: int, cfg_path: str, data: str | None, iters: int,
               res: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        cfg = load_config(Path(cfg_path))
        seed_everything(cfg.train.seed, rank)
        source, k = _source(cfg, Path(data) if data else None, cfg.train.batch_size // world, rank, world)
        with tempfile.TemporaryDirectory() as tmp:
            tr = Trainer(cfg, Path(tmp), source, k or source.num_domains, ctx, progress=False)
            tr.monitor.close()
            tr.train_step()
            barrier(ctx)
            sec = _timed(tr, iters)
        flat = torch.cat([p.detach().reshape(-1) for n in tr.nets.values() for p in n.parameters()])
        torch.save({"sec": sec, "params": flat}, f"{res}.{rank}.pt")
    finally:
        shutdown(ctx)


def process_scaling(cfg_path: Path, data: Path | None, iters: int) -> dict:
    import torch.multiprocessing as mp

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            res = os.path.join(tmp, f"w{world}")
            mp.spawn(_ddp_bench, args=(world, port, str(cfg_path), str(data) if data else None, iters, res),
                     nprocs=world, join=True)
            r = [torch.load(f"{res}.{k}.pt", weights_only=True) for k in range(world)]
            out[world] = {"sec_per_it": max(x["sec"] for x in r),
                          "rank_param_max_diff": float((r[0]["params"] - r[-1]["params"]).abs().max())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "Training" / "configs" / "cpu_demo.yaml")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--only-ddp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load[0]:.1f}, torch {torch.__version__}, 1 thread per process")
    if not args.only_ddp:
        r = texture_ratio(args.config, args.data, args.iters, args.rounds)
        print("| run | s/iteration (median of rounds) | it/s |\n|---|---|---|")
        for name in ("baseline", "texture"):
            print(f"| {name} | {r[name]:.3f} | {1 / r[name]:.3f} |")
        print(f"texture / baseline time ratio: {r['ratio']:.3f}  (rounds: "
              f"{ {k: [round(t, 3) for t in v] for k, v in r['rounds'].items()} })")
    if not args.skip_ddp:
        s = process_scaling(args.config, args.data, args.iters)
        print("| processes | s/iteration (total batch fixed) | it/s | max param diff rank0 vs last |")
        print("|---|---|---|---|")
        for w, v in s.items():
            sec = v["sec_per_it"]
            print(f"| {w} | {sec:.3f} | {1 / sec:.3f} | {v['rank_param_max_diff']:.2e} |")
        print(f"speed-up 2 vs 1 processes: {s[1]['sec_per_it'] / s[2]['sec_per_it']:.2f}x")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
