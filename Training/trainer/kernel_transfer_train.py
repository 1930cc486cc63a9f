"""Train the kernel-transfer model (default model v2) on paired reconstructions; resumable, on CPU or a GPU.

Steps: load the paired groups (simulated variants of real anatomy, real multi-kernel acquisitions), start
every domain's MTF from the simulator's catalogue kernel (its apodisation window in cycles/mm), fit the
source estimator on spectral features of every training slice, then optimise the generator on aligned
crops: the mean squared error to the real/simulated target (the RMSE that validation reports) plus,
optionally, the paper's GLCM texture loss on the same pair (its self-attention aggregation stepped to
maximise it). Checkpoints are atomic and load with ``weights_only=True``.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from TextureStarGANCore.fileio import write_bytes_atomic, write_csv_atomic
from TextureStarGANCore.kernel_transfer import (
    HU_MIN,
    HU_SCALE,
    KernelTransferConfig,
    KernelTransferGenerator,
    SourceEstimator,
    spectral_features,
)
from TextureStarGANCore.texture import TextureLoss

from .kernel_transfer_config import KTConfig, KTConfigError
from .paired_data import PairedGroup, PairSampler

__all__ = ["KTRun", "build_networks", "init_log_mtf", "fit_estimator", "paired_error", "train",
           "latest_checkpoint"]

Progress = Callable[[str, int, int], None]


def model_config(cfg: KTConfig) -> KernelTransferConfig:
    m = cfg.model
    return KernelTransferConfig(num_domains=len(cfg.domains), width=m.width, depth=m.depth,
                                embed_dim=m.embed_dim, max_gain=float(m.max_gain),
                                smooth_origin=m.smooth_origin, noise_synthesis=m.noise_synthesis,
                                flat_zero_residual=m.flat_zero_residual, split_residual=m.split_residual)


def init_log_mtf(gen: KernelTransferGenerator, domains: list[str]) -> None:
    """Each domain's log MTF at the knots from its catalogue kernel's apodisation window (1 at f = 0)."""
    from Training.simulator import kernels as K
    from Training.simulator.catalogue import catalogue_kernel

    knots = gen.config.knots.numpy()
    rows = []
    for name in domains:
        w = K.window_response(catalogue_kernel(name), knots)
        w = np.clip(np.asarray(w, dtype=np.float64) / max(float(w[0]), 1e-9), 1e-3, None)
        rows.append(np.log(w[1:]))
    with torch.no_grad():
        gen.log_mtf.copy_(torch.tensor(np.stack(rows), dtype=torch.float32))


def build_networks(cfg: KTConfig) -> tuple[KernelTransferGenerator, SourceEstimator]:
    torch.manual_seed(cfg.train.seed)
    mc = model_config(cfg)
    gen = KernelTransferGenerator(mc)
    init_log_mtf(gen, cfg.domains)
    return gen, SourceEstimator(mc)


def _slice_features(groups: list[PairedGroup], index: dict[str, int], bands: int, stride: int,
                    extra: list[tuple[np.ndarray, tuple[float, float], str]],
                    progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
    items: list[tuple[np.ndarray, tuple[float, float], int]] = []
    for g in groups:
        for name, arr in g.series.items():
            items += [(arr[k], g.spacing_xy, index[name]) for k in range(0, len(arr), stride)]
    for arr, spacing, name in extra:
        items += [(a, spacing, index[name]) for a in arr[::stride]]
    feats, labels = [], []
    for i, (img, spacing, label) in enumerate(items):
        x = torch.from_numpy(img.astype(np.float32))[None]
        feats.append(spectral_features(x, spacing, bands)[0])
        labels.append(label)
        if progress:
            progress("estimator features", i + 1, len(items))
    return torch.stack(feats), torch.tensor(labels)


def fit_estimator(est: SourceEstimator, groups: list[PairedGroup], cfg: KTConfig,
                  extra: list[tuple[np.ndarray, tuple[float, float], str]] = (),  # type: ignore[assignment]
                  progress: Progress | None = None) -> dict[str, float]:
    """Fit the source estimator (cross-entropy) on every slice's spectral features; its training accuracy."""
    index = {d: i for i, d in enumerate(cfg.domains)}
    x, y = _slice_features(groups, index, est.config.feature_bands, cfg.estimator.slice_stride,
                           list(extra), progress)
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-3)
    # The mask half is 0/1: keep it unscaled so a missing band reads as "absent", not as an outlier.
    mean[est.config.feature_bands:], std[est.config.feature_bands:] = 0.0, 1.0
    est.feature_mean.copy_(mean)
    est.feature_std.copy_(std)
    opt = torch.optim.Adam(est.mlp.parameters(), cfg.estimator.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for step in range(cfg.estimator.steps):
        pick = torch.randint(len(x), (min(256, len(x)),), generator=gen)
        loss = F.cross_entropy(est.logits(x[pick]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress and step % 50 == 0:
            progress("estimator", step + 1, cfg.estimator.steps)
    with torch.no_grad():
        acc = float((est.logits(x).argmax(1) == y).float().mean())
    return {"slices": int(len(x)), "train_accuracy": acc}


def _window(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.clamp((x - lo) / (hi - lo) * 2 - 1, -1.0, 1.0)


def _param_groups(gen: KernelTransferGenerator, cfg: KTConfig) -> list[dict[str, Any]]:
    """The optimizer's groups: the transfer curves at their own rate, the rest at ``train.lr``; parts named in
    ``train.frozen`` are left out (and get no gradient). log_keep (noise synthesis) is fitted after training,
    by kernel_transfer_noise.fit_noise."""
    frozen = set(cfg.train.frozen)
    named = [(n, p) for n, p in gen.named_parameters() if n != "log_keep"]
    parts = {n.split(".")[0] for n, _ in named}
    if frozen - parts:
        raise KTConfigError(f"train.frozen: no generator part named {sorted(frozen - parts)}; parts: "
                            f"{sorted(parts)}")
    for n, p in named:
        p.requires_grad_(n.split(".")[0] not in frozen)
    trainable = [(n, p) for n, p in named if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n == "log_mtf"], "lr": cfg.train.mtf_lr},
              {"params": [p for n, p in trainable if n != "log_mtf"], "lr": cfg.train.lr}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise KTConfigError("train.frozen: every part of the generator is frozen, nothing would train")
    return groups


@dataclass
class KTRun:
    """Everything a training run keeps between iterations (and in its checkpoints)."""

    cfg: KTConfig
    gen: KernelTransferGenerator
    est: SourceEstimator
    opt: torch.optim.Optimizer
    texture: TextureLoss | None
    tex_opt: torch.optim.Optimizer | None
    iteration: int = 0
    estimator_stats: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: KTConfig) -> KTRun:
        gen, est = build_networks(cfg)
        opt = torch.optim.Adam(_param_groups(gen, cfg))
        texture = tex_opt = None
        if cfg.loss.texture > 0:
            texture = TextureLoss(levels=cfg.loss.texture_levels)
            tex_opt = torch.optim.Adam(texture.aggregation.parameters(), 2e-4)
        return cls(cfg, gen, est, opt, texture, tex_opt)

    def state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration, "generator": self.gen.state_dict(),
            "estimator": self.est.state_dict(),
            "optimizer": self.opt.state_dict(),
            "texture": self.texture.state_dict() if self.texture is not None else {},
            "texture_optimizer": self.tex_opt.state_dict() if self.tex_opt is not None else {},
            "estimator_stats": dict(self.estimator_stats), "history": list(self.history),
            "torch_rng": torch.get_rng_state(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.gen.load_state_dict(state["generator"])
        self.est.load_state_dict(state["estimator"])
        self.opt.load_state_dict(state["optimizer"])
        if self.texture is not None and state["texture"]:
            self.texture.load_state_dict(state["texture"])
            self.tex_opt.load_state_dict(state["texture_optimizer"])  # type: ignore[union-attr]
        self.estimator_stats = dict(state["estimator_stats"])
        self.history = list(state["history"])
        torch.set_rng_state(state["torch_rng"])


def save_checkpoint(run: KTRun, out: Path) -> Path:
    buf = io.BytesIO()
    torch.save(run.state(), buf)
    path = out / f"checkpoint_{run.iteration:07d}.pt"
    write_bytes_atomic(path, buf.getvalue())
    for old in sorted(out.glob("checkpoint_*.pt"))[:-2]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint_*.pt"))
    return found[-1] if found else None


def _lr_factor(it: int, total: int) -> float:
    """Cosine decay to 5 % after a warm-up of 100 iterations (a tenth of a shorter run)."""
    warm = min(100, max(1, total // 10))
    if it < warm:
        return (it + 1) / warm
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, it / max(1, total))))


def paired_error(gen: KernelTransferGenerator, batch: dict[str, Any],
                 margin: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deterministic output's squared error to the target in units of HU_SCALE (B, 1, h, w), and the
    clipped output and target, on the crop interior (``margin`` pixels off each side)."""
    x = torch.from_numpy(batch["source_hu"])
    y = torch.from_numpy(batch["target_hu"])
    src, tgt = torch.from_numpy(batch["source"]), torch.from_numpy(batch["target"])
    out = gen(x, batch["spacing_xy"], src, tgt)
    m = margin
    oc = torch.clamp(out[..., m:-m, m:-m], HU_MIN, 3000.0)
    yc = torch.clamp(y[..., m:-m, m:-m], HU_MIN, 3000.0)
    return ((oc - yc) / HU_SCALE) ** 2, oc, yc


def train_step(run: KTRun, batch: dict[str, Any]) -> dict[str, float]:
    cfg = run.cfg
    err, oc, yc = paired_error(run.gen, batch, cfg.data.margin)
    loss_pair = err.mean()
    loss = cfg.loss.paired * loss_pair
    row = {"paired_rmse_hu": float(loss_pair.detach()) ** 0.5 * HU_SCALE}
    if cfg.loss.noise_excess > 0:
        from .kernel_transfer_noise import noise_excess_loss

        items = None
        if cfg.loss.noise_excess_sharpening_only:
            items = run.gen.sharpening(batch["source"], batch["target"])
        excess = noise_excess_loss(oc, yc, batch, include_real=cfg.loss.noise_excess_real, items=items)
        loss = loss + cfg.loss.noise_excess * excess
        row["noise_excess"] = float(excess.detach())
    real = torch.from_numpy(batch["real"])
    if bool(real.any()):
        row["real_rmse_hu"] = float(err[real].mean().detach()) ** 0.5 * HU_SCALE
    if run.texture is not None:
        lo, hi = cfg.loss.texture_window_hu
        w = cfg.loss.texture * min(1.0, (run.iteration + 1) / max(1, cfg.loss.texture_warmup))
        ltx = run.texture(_window(yc, lo, hi), _window(oc, lo, hi))
        loss = loss + w * ltx
        row["texture"] = float(ltx.detach())
    run.opt.zero_grad()
    if loss.requires_grad:  # with train.frozen a batch can reach frozen parts only (no sharpening crop)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.gen.parameters(), 5.0)
        run.opt.step()
    if run.texture is not None and run.tex_opt is not None:
        run.tex_opt.zero_grad()
        run.texture.aggregation_objective().backward()
        run.tex_opt.step()
    return row


def train(run: KTRun, groups: list[PairedGroup], out: Path, *, stop: Callable[[], bool] = lambda: False,
          progress: Progress | None = None, max_iters: int | None = None) -> KTRun:
    """Optimise from ``run.iteration`` to ``cfg.train.iters`` (or ``max_iters``); checkpoints in ``out``."""
    cfg = run.cfg
    index = {d: i for i, d in enumerate(cfg.domains)}
    sampler = PairSampler(groups, index, cfg.data.crop, cfg.data.real_fraction, cfg.data.identity_fraction,
                          seed=cfg.train.seed)
    total = cfg.train.iters
    end = min(total, max_iters) if max_iters is not None else total
    base = [g["lr"] for g in run.opt.param_groups]
    t0 = time.perf_counter()
    while run.iteration < end:
        f = _lr_factor(run.iteration, total)
        for g, lr in zip(run.opt.param_groups, base, strict=True):
            g["lr"] = lr * f
        sampler.rng = np.random.default_rng([cfg.train.seed, run.iteration])  # resumes draw the same crops
        row = train_step(run, sampler.batch(cfg.train.batch))
        run.iteration += 1
        row.update(iteration=run.iteration, seconds=time.perf_counter() - t0)
        run.history.append(row)
        for g, lr in zip(run.opt.param_groups, base, strict=True):
            g["lr"] = lr
        if progress:
            progress("train", run.iteration, total)
        if run.iteration % cfg.checkpoint_every == 0 or run.iteration == end or stop():
            save_checkpoint(run, out)
            keys = sorted({k for r in run.history for k in r})
            write_csv_atomic(out / "history.csv", keys, [[r.get(k, "") for k in keys] for r in run.history])
        if stop():
            break
    return run
