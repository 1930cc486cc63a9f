"""Can a config's StarGAN v2 discriminator tell a dataset's kernels apart? Train D alone on that task.

    python -m Training.diagnostics.discriminator_check --config CFG --data DATASET [--steps N]
        [--set SECTION.KEY=VALUE ...] [--out RESULT.json]

Why: kernels differ in noise texture, a small signal (tens of HU) on top of anatomy (hundreds of HU). The
adversarial game only teaches the generator a kernel once D separates kernels. With `model.residual` the
untrained generator is the identity, so D's first fakes are real crops of *other* kernels shown to the
target kernel's head. This trains the discriminator of the config (its optimizer settings and R1 weight)
on exactly that task, with no generator, and reports per window of steps the BCE of reals and fakes
(ln 2 = 0.693 is chance) and the share of correct decisions. Beside it, a hand-made statistic, the median
|Laplacian| of each crop per kernel, shows whether the kernels are separable in the data at all.
Run it before spending GPU hours on a new dataset or config.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from TextureStarGANCore.fileio import write_json_atomic
from TextureStarGANCore.networks import Discriminator
from Training.trainer.config import ConfigError, TrainConfig, load_config
from Training.trainer.data_source import DataError, DatasetSource, open_dataset
from Training.trainer.ddp import DistContext
from Training.trainer.losses import adversarial_loss, r1_penalty

_LAPLACIAN = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])[None, None]


def laplacian_statistic(x: torch.Tensor, body_level: float) -> torch.Tensor:
    """Median |Laplacian| per image of a (B, 1, H, W) batch over body pixels (> body_level; NaN if none).

    A noise level that the anatomy's edges barely move; air (clipped to the window's floor) is left out.
    """
    lap = F.conv2d(x.float(), _LAPLACIAN.to(x.device)).abs().flatten(1)
    body = (x[..., 1:-1, 1:-1] > body_level).flatten(1)
    return torch.stack([v[m].median() if m.any() else v.new_tensor(float("nan")) for v, m in zip(lap, body,
                                                                                                   strict=True)])


def other_domain(y: torch.Tensor, num_domains: int, g: torch.Generator) -> torch.Tensor:
    """A uniformly drawn domain different from each entry of y."""
    shift = torch.randint(1, num_domains, y.shape, generator=g)
    return (y + shift) % num_domains


def separability(source: DatasetSource, names: list[str], batches: int = 8) -> dict[str, dict[str, float]]:
    """Per kernel: min / median / max of `laplacian_statistic` over the body crops of a few batches."""
    stats: dict[int, list[float]] = {d: [] for d in range(len(names))}
    for _ in range(batches):
        b = source.next_batch()
        values = laplacian_statistic(b["x_src"], source.body_level).tolist()
        for v, d in zip(values, b["y_src"].tolist(), strict=True):
            if math.isfinite(v):
                stats[d].append(v)
    out = {}
    for d, vals in stats.items():
        if vals:
            t = torch.tensor(vals)
            out[names[d]] = {"min": float(t.min()), "median": float(t.median()), "max": float(t.max()),
                             "crops": len(vals)}
    return out


def train_discriminator(cfg: TrainConfig, source: DatasetSource, num_domains: int, steps: int,
                        every: int, progress: bool = True) -> list[dict[str, float]]:
    """Train a fresh D of `cfg` to accept real crops of kernel y and reject other kernels' crops under y."""
    torch.manual_seed(cfg.train.seed)
    g = torch.Generator().manual_seed(cfg.train.seed)
    disc = Discriminator(cfg.model.model_config(num_domains))
    t = cfg.train
    opt = torch.optim.Adam(disc.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    windows: list[dict[str, float]] = []
    acc: list[float] = []
    sums = {"bce_real": 0.0, "bce_fake": 0.0, "r1": 0.0}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="discriminator", dynamic_ncols=True)
    for step in range(1, steps + 1):
        b = source.next_batch()
        x_real = b["x_src"].requires_grad_(True)
        d_real = disc(x_real, b["y_src"])
        d_fake = disc(b["x_ref"], other_domain(b["y_ref"], num_domains, g))
        loss_real, loss_fake = adversarial_loss(d_real, 1.0), adversarial_loss(d_fake, 0.0)
        reg = r1_penalty(d_real, x_real)
        opt.zero_grad(set_to_none=True)
        (cfg.loss.lambda_adv * (loss_real + loss_fake) + cfg.loss.lambda_reg * reg).backward()
        opt.step()
        sums["bce_real"] += float(loss_real.detach())
        sums["bce_fake"] += float(loss_fake.detach())
        sums["r1"] += float(reg.detach())
        acc.append(float(torch.cat([d_real.detach() > 0, d_fake.detach() < 0]).float().mean()))
        if bar is not None:
            bar.update(1)
        if step % every == 0 or step == steps:
            n = len(acc)
            windows.append({"step": step, **{k: v / n for k, v in sums.items()}, "accuracy": sum(acc) / n})
            sums = dict.fromkeys(sums, 0.0)
            acc = []
    if bar is not None:
        bar.close()
    return windows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m Training.diagnostics.discriminator_check",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset (train split used)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100, help="steps per reported window")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        print("error: --steps and --every must be positive", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        ctx = DistContext(0, 1, 0, torch.device("cpu"), None)
        opened = open_dataset(args.data, cfg, ctx)
    except (ConfigError, DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = [d["name"] for d in opened.run_info["domains"]]
    result: dict[str, Any] = {
        "config": str(args.config), "data": str(args.data), "overrides": args.overrides,
        "separability_median_abs_laplacian": separability(opened.source, names),
    }
    result["windows"] = train_discriminator(cfg, opened.source, opened.num_domains, args.steps, args.every,
                                            progress=not args.no_progress)
    print("median |Laplacian| per crop ([-1, 1] units), min / median / max:")
    for name, s in result["separability_median_abs_laplacian"].items():
        print(f"  {name:>10}: {s['min']:.4f} / {s['median']:.4f} / {s['max']:.4f}  ({s['crops']} crops)")
    print("step  bce_real  bce_fake  r1       accuracy   (chance: bce 0.693, accuracy 0.5)")
    for w in result["windows"]:
        print(f"{w['step']:>5}  {w['bce_real']:.3f}     {w['bce_fake']:.3f}     {w['r1']:.5f}  "
              f"{w['accuracy']:.3f}")
    if args.out is not None:
        write_json_atomic(args.out, result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
