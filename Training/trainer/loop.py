"""The StarGAN v2 training loop (baseline and texture-aware share it; the config switches the texture loss).

Per iteration (the StarGAN v2 schedule): discriminator step with a latent-guided fake, discriminator step with
a reference-guided fake (both with R1), generator step (latent-guided) updating G, F and E, generator step
(reference-guided) updating G; then the EMA copies of G, F, E. With the texture loss on, L_txt(x_real, x_rec)
enters both generator steps and the aggregation's parameters get their own optimizer step after each
(see `TextureLoss`: the aggregation maximises the loss within its bounds, the generator minimises it).
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.model_file import compute_domain_styles
from TextureStarGANCore.networks import build_networks
from TextureStarGANCore.texture import TextureLoss

from . import checkpointing as ckpt
from .config import TrainConfig
from .ddp import DistContext, allreduce_grads_, allreduce_mean, any_rank, no_sync, wrap
from .losses import Nets, discriminator_loss, diversity_weight, generator_loss, texture_weight
from .monitor import Monitor, image_grid

INFERENCE_NETS = ("generator", "mapping_network", "style_encoder")


class BatchSource(Protocol):
    """Per-rank stream of training batches (the dataset reader's sampler, or a test stand-in)."""

    def next_batch(self) -> dict[str, Tensor]:
        """x_src (B,1,S,S), y_src (B,), x_ref, x_ref2 (B,1,S,S) of domain y_ref (B,)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/Inf; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    iteration: int
    status: str  # "completed" | "max_iters" | "interrupted"
    checkpoint: Path | None
    last_terms: dict[str, float]


class Trainer:
    """Owns the networks, EMA copies, optimizers and the schedule; `run()` trains until a stop condition."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        source: BatchSource,
        num_domains: int,
        ctx: DistContext,
        *,
        run_info: dict[str, Any] | None = None,
        progress: bool = True,
        eval_hook: Callable[[Trainer], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.source = source
        self.ctx = ctx
        self.run_info = run_info or {}
        self.progress = progress and ctx.is_main
        self.eval_hook = eval_hook
        world = ctx.world_size
        if cfg.train.batch_size % world:
            raise ValueError(
                f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of processes "
                f"({world}); it is the total batch over all processes"
            )
        self.local_batch = cfg.train.batch_size // world
        self.model_config = cfg.model.model_config(num_domains)
        dev = ctx.device
        # Initial weights from the run seed, not the rank's stream: identical on every rank, which the EMA
        # copies and the texture aggregation (outside DDP's initial broadcast) rely on.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            nets = build_networks(self.model_config)
            texture = TextureLoss(**cfg.texture.params) if cfg.texture.enabled else None
        self.nets: dict[str, nn.Module] = {k: v.to(dev) for k, v in nets.items()}
        self.ema: dict[str, nn.Module] = {k: copy.deepcopy(self.nets[k]).eval() for k in INFERENCE_NETS}
        for m in self.ema.values():
            m.requires_grad_(False)
        t = cfg.train
        betas = (t.beta1, t.beta2)
        self.optims = {
            name: torch.optim.Adam(
                net.parameters(), lr=t.mapping_lr if name == "mapping_network" else t.lr,
                betas=betas, weight_decay=t.weight_decay,
            )
            for name, net in self.nets.items()
        }
        self.texture: TextureLoss | None = None
        self.texture_optim: torch.optim.Optimizer | None = None
        if texture is not None:
            self.texture = texture.to(dev)
            self.texture_optim = torch.optim.Adam(
                self.texture.aggregation.parameters(), lr=cfg.texture.lr, betas=betas
            )
        self.wrapped = Nets(**{k: wrap(v, ctx) for k, v in self.nets.items()},
                            texture=self.texture, texture_weight=cfg.texture.weight)
        self.iteration = 0
        self._stop_requested = False
        self._samples: tuple[Tensor, Tensor] | None = None  # source crops shown in the image grids
        self.monitor = Monitor(self.run_dir, enabled=ctx.is_main)
        use_amp = t.amp and dev.type == "cuda" and torch.cuda.is_bf16_supported()
        # bfloat16 needs no loss scaling (float16 would, and R1's double backward complicates scaling).
        self._autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
        )

    # ------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        if not self.ctx.distributed:
            return [obj]
        out: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(out, obj)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Full resume state; RNG and data positions of every rank (collective: call on all ranks)."""
        rngs = self._gather(ckpt.capture_rng())
        data = self._gather(self.source.state_dict())
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "nets": {k: v.state_dict() for k, v in self.nets.items()},
            "ema": {k: v.state_dict() for k, v in self.ema.items()},
            "optimizers": {k: v.state_dict() for k, v in self.optims.items()},
            "rng": rngs,
            "data": data,
            "world_size": self.ctx.world_size,
            "config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "run_info": self.run_info,
        }
        if self.texture is not None and self.texture_optim is not None:
            state["texture"] = self.texture.state_dict()
            state["texture_optimizer"] = self.texture_optim.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:  # through ModelConfig, so fields added later with defaults (e.g. residual) compare equal
            saved = ModelConfig.from_dict(state.get("model_config"))
        except ValueError:
            saved = None
        if saved != self.model_config:
            raise ckpt.CheckpointError(
                f"checkpoint architecture {state.get('model_config')} differs from this config's "
                f"{self.model_config.to_dict()}; resume with the config the run was started with"
            )
        saved_texture = "texture" in state
        if saved_texture != (self.texture is not None):
            raise ckpt.CheckpointError(
                f"checkpoint was trained with texture.enabled={saved_texture} but the config says "
                f"{self.texture is not None}; a run cannot switch between baseline and texture-aware"
            )
        for k, v in self.nets.items():
            v.load_state_dict(state["nets"][k])
        for k, v in self.ema.items():
            v.load_state_dict(state["ema"][k])
        for k, v in self.optims.items():
            v.load_state_dict(state["optimizers"][k])
        if self.texture is not None and self.texture_optim is not None:
            self.texture.load_state_dict(state["texture"])
            self.texture_optim.load_state_dict(state["texture_optimizer"])
        self.iteration = int(state["iteration"])
        rank = self.ctx.rank
        if int(state.get("world_size", 1)) == self.ctx.world_size:
            ckpt.restore_rng(state["rng"][rank])
            self.source.load_state_dict(state["data"][rank])
        else:
            # A different process count cannot continue every rank's stream; start fresh, reproducible ones.
            from .ddp import seed_everything

            seed_everything(self.cfg.train.seed + self.iteration, rank)
            if self.ctx.is_main:
                print(f"resume: checkpoint was written by {state.get('world_size')} processes, now "
                      f"{self.ctx.world_size}; weights and optimizers continue, random streams restart")

    def save(self) -> Path | None:
        """Checkpoint now (collective; rank 0 writes). Returns the path on rank 0."""
        state = self.state_dict()
        path = None
        if self.ctx.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.iteration, state, self.cfg.checkpoint.keep_last)
        if self.ctx.distributed:
            dist.barrier()
        return path

    def resume(self, path: Path) -> None:
        self.load_state_dict(ckpt.load_checkpoint(path))
        if self.ctx.is_main:
            print(f"resumed from {path} at iteration {self.iteration}")

    # ------------------------------------------------------------------------------------------------
    # One iteration
    # ------------------------------------------------------------------------------------------------
    def _batch(self) -> dict[str, Tensor]:
        b = self.source.next_batch()
        dev = self.ctx.device
        out = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
        latent = self.model_config.latent_dim
        n = out["x_src"].shape[0]
        out["z1"] = torch.randn(n, latent, device=dev)
        out["z2"] = torch.randn(n, latent, device=dev)
        return out

    def _texture_step(self) -> None:
        """One step of the aggregation on the Delta T of the generator pass just taken (maximises L_txt)."""
        assert self.texture is not None and self.texture_optim is not None
        self.texture_optim.zero_grad(set_to_none=True)
        self.texture.aggregation_objective().backward()
        allreduce_grads_(list(self.texture.aggregation.parameters()), self.ctx)
        self.texture_optim.step()

    def train_step(self) -> dict[str, float]:
        """One full StarGAN v2 iteration; returns the logged loss terms (this rank's values)."""
        cfg, n, o = self.cfg, self.wrapped, self.optims
        b = self._batch()
        x, y, y_trg = b["x_src"], b["y_src"], b["y_ref"]
        terms: dict[str, float] = {}
        if self._samples is None:
            k = min(4, x.shape[0])
            self._samples = (x[:k].detach().clone(), y[:k].clone())
        # Discriminator: latent-guided fake, then reference-guided fake.
        for tag, kwargs in (("latent", {"z_trg": b["z1"]}), ("ref", {"x_ref": b["x_ref"]})):
            loss, t = discriminator_loss(n, x, y, y_trg, cfg.loss, autocast=self._autocast, **kwargs)
            o["discriminator"].zero_grad(set_to_none=True)
            loss.backward()
            o["discriminator"].step()
            terms.update({f"D_{tag}/{k}": v for k, v in t.items()})
        lam_ds = diversity_weight(self.iteration, cfg.loss.lambda_ds, cfg.loss.ds_iter)
        n.texture_weight = texture_weight(self.iteration, cfg.texture.weight, cfg.texture.warmup_iters)
        # Generator, latent-guided: updates G, F and E. D's gradients here are thrown away (no all-reduce).
        with no_sync(n.discriminator):
            out = generator_loss(n, x, y, y_trg, cfg.loss, lam_ds, z_trgs=(b["z1"], b["z2"]),
                                 autocast=self._autocast)
            for k in ("generator", "mapping_network", "style_encoder"):
                o[k].zero_grad(set_to_none=True)
            out.loss.backward()
        for k in ("generator", "mapping_network", "style_encoder"):
            o[k].step()
        terms.update({f"G_latent/{k}": v for k, v in out.terms.items()})
        if self.texture is not None:
            self._texture_step()
        # Generator, reference-guided: updates G only (as in StarGAN v2); E's gradients are discarded.
        with no_sync(n.discriminator, n.style_encoder, n.mapping_network):
            out = generator_loss(n, x, y, y_trg, cfg.loss, lam_ds, x_refs=(b["x_ref"], b["x_ref2"]),
                                 autocast=self._autocast)
            o["generator"].zero_grad(set_to_none=True)
            out.loss.backward()
        o["generator"].step()
        terms.update({f"G_ref/{k}": v for k, v in out.terms.items()})
        if self.texture is not None:
            self._texture_step()
        self._update_ema()
        terms["lambda_ds"] = lam_ds
        if self.texture is not None:
            terms["texture/weight"] = n.texture_weight
        return terms

    @torch.no_grad()
    def _update_ema(self) -> None:
        beta = self.cfg.train.ema_beta
        for k, ema in self.ema.items():
            for p_ema, p in zip(ema.parameters(), self.nets[k].parameters(), strict=True):
                p_ema.lerp_(p.detach(), 1.0 - beta)

    # ------------------------------------------------------------------------------------------------
    # Observability
    # ------------------------------------------------------------------------------------------------
    def _extra_scalars(self) -> dict[str, float]:
        vals = {f"lr/{k}": o.param_groups[0]["lr"] for k, o in self.optims.items()}
        if self.texture is not None and self.texture_optim is not None:
            vals["lr/texture_aggregation"] = self.texture_optim.param_groups[0]["lr"]
            vals.update({f"texture/{k}": v for k, v in self.texture.stats().items()})
        return vals

    @torch.no_grad()
    def sample_grid(self, x: Tensor, y: Tensor, num_latents: int = 256) -> Any:
        """Rows: source | translated to each domain (EMA nets, mean style) | cycle back from the next one."""
        g, e = self.ema["generator"], self.ema["style_encoder"]
        styles = compute_domain_styles(self.ema["mapping_network"], self.model_config.num_domains,
                                       num_latents=num_latents, seed=0).to(x.device)
        s_src = e(x, y)
        rows = []
        k = self.model_config.num_domains
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            outs = [g(xi, styles[d : d + 1]) for d in range(k)]
            nxt = (int(y[i]) + 1) % k
            rec = g(outs[nxt], s_src[i : i + 1])
            rows.append([xi[0, 0]] + [o[0, 0] for o in outs] + [rec[0, 0]])
        return image_grid(rows)

    # ------------------------------------------------------------------------------------------------
    # Run
    # ------------------------------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None, *_: Any) -> None:
        """First signal: finish the iteration, checkpoint, return. A second Ctrl-C aborts at once."""
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.ctx.is_main and signum is not None:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this iteration "
                  "(Ctrl-C again to abort without saving)", flush=True)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the iteration and returns."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _nonfinite(self, terms: dict[str, float]) -> None:
        bad = sorted(k for k, v in terms.items() if not math.isfinite(v))
        if not any_rank(bool(bad), self.ctx):
            return
        last = ckpt.latest_checkpoint(self.run_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"non-finite loss at iteration {self.iteration + 1} ({', '.join(bad) or 'on another rank'}); "
            f"training stopped; {where}. Lower train.lr or check the data, then resume with --resume "
            f"{last if last else 'auto'}"
        )

    def run(self, max_iters: int | None = None) -> TrainResult:
        """Train until train.total_iters (or the absolute iteration `max_iters`, or a stop signal)."""
        cfg = self.cfg
        end = cfg.train.total_iters if max_iters is None else min(max_iters, cfg.train.total_iters)
        bar = None
        if self.progress and self.iteration < end:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.iteration, desc="train", dynamic_ncols=True)
        status = "completed" if end == cfg.train.total_iters else "max_iters"
        terms: dict[str, float] = {}
        start = self.iteration
        window_start, window_iters = time.perf_counter(), 0
        with self._signals():
            try:
                while self.iteration < end:
                    for m in self.nets.values():
                        m.train()
                    terms = self.train_step()
                    self._nonfinite(terms)
                    self.iteration += 1
                    window_iters += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(D=f"{terms['D_latent/real'] + terms['D_latent/fake']:.3f}",
                                        cyc=f"{terms['G_latent/cyc']:.3f}", refresh=False)
                    it = self.iteration
                    if it % cfg.log.every == 0 or it == end:
                        logged = allreduce_mean(terms, self.ctx)
                        now = time.perf_counter()
                        logged["speed/it_per_s"] = window_iters / max(now - window_start, 1e-9)
                        window_start, window_iters = now, 0
                        logged.update(self._extra_scalars())
                        self.monitor.scalars(it, logged)
                    if self.ctx.is_main and it % cfg.log.image_every == 0:
                        assert self._samples is not None
                        self.monitor.images(it, "samples", self.sample_grid(*self._samples))
                    if it % cfg.checkpoint.every == 0 and it != end:
                        self.save()
                    if self.eval_hook is not None and cfg.log.eval_every and it % cfg.log.eval_every == 0:
                        if self.ctx.is_main:
                            self.eval_hook(self)
                        if self.ctx.distributed:
                            dist.barrier()
                    if any_rank(self._stop_requested, self.ctx):
                        status = "interrupted"
                        break
            finally:
                if bar is not None:
                    bar.close()
        if self.iteration > start:  # the final state, unless this call trained nothing
            last_path = self.save()
        else:
            last_path = ckpt.latest_checkpoint(self.run_dir)
        self.monitor.close()
        return TrainResult(self.iteration, status, last_path, terms)
