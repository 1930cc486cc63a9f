"""Small synthetic kernel domains for trainer tests: smooth 'anatomy', a different noise texture per domain.

Domain k's noise is white noise blurred with a domain-specific Gaussian (sharp kernel = little blur, high
amplitude), the way reconstruction kernels differ. Sampling is balanced over domains with its own seeded
generator, so the stream position is part of the resume state like the real dataset reader's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

NOISE = ((2.0, 0.05), (0.0, 0.12), (1.0, 0.08))  # (blur sigma in px, noise SD in [-1, 1] units) per domain


def _blur(x: Tensor, sigma: float) -> Tensor:
    if sigma <= 0:
        return x
    r = int(3 * sigma) + 1
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def make_domain_images(n_per_domain: int, size: int, num_domains: int = 3, seed: int = 0) -> list[Tensor]:
    """num_domains tensors (n, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(num_domains):
        anatomy = _blur(torch.rand(n_per_domain, 1, size, size, generator=g), 4.0)
        anatomy = (anatomy - anatomy.mean()) * 6.0 - 0.3
        sigma, sd = NOISE[k % len(NOISE)]
        noise = _blur(torch.randn(n_per_domain, 1, size, size, generator=g), sigma)
        noise = noise / noise.std() * sd
        out.append((anatomy + noise).clamp(-1, 1)[:, 0])
    return out


class SyntheticSource:
    """BatchSource over in-memory domain images with random crops and balanced domains."""

    def __init__(self, images: list[Tensor], batch: int, crop: int, seed: int = 0) -> None:
        self.images = images
        self.batch = batch
        self.crop = crop
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = 0

    def _crops(self, domains: Tensor) -> Tensor:
        out = []
        for d in domains.tolist():
            imgs = self.images[d]
            i = int(torch.randint(imgs.shape[0], (1,), generator=self.gen))
            h, w = imgs.shape[-2:]
            r = int(torch.randint(h - self.crop + 1, (1,), generator=self.gen))
            c = int(torch.randint(w - self.crop + 1, (1,), generator=self.gen))
            out.append(imgs[i, r : r + self.crop, c : c + self.crop])
        return torch.stack(out)[:, None]

    def next_batch(self) -> dict[str, Tensor]:
        k = len(self.images)
        y_src = torch.randint(k, (self.batch,), generator=self.gen)
        y_ref = torch.randint(k, (self.batch,), generator=self.gen)
        self.drawn += 1
        return {"x_src": self._crops(y_src), "y_src": y_src, "x_ref": self._crops(y_ref),
                "x_ref2": self._crops(y_ref), "y_ref": y_ref}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])
        self.drawn = int(state["drawn"])


def tiny_config(**sections: Any):
    """A validated TrainConfig small enough for a test iteration in about a second on one core."""
    from Training.trainer.config import config_from_dict

    raw: dict[str, Any] = {
        "model": {"img_size": 64, "base_width": 8, "max_width": 16, "latent_dim": 4, "style_dim": 8,
                  "mapping_hidden": 16},
        "train": {"total_iters": 1000, "batch_size": 2, "seed": 3},
        "texture": {"enabled": True, "weight": 0.001, "params": {"levels": 32}},
        "checkpoint": {"every": 1000, "keep_last": 2},
        "log": {"every": 1, "image_every": 1000, "eval_every": 0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def ddp_worker(rank: int, world: int, port: int, out_dir: str, iters: int) -> None:
    """One process of a 2-process gloo run (torch.multiprocessing.spawn target)."""
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    from Training.trainer.ddp import init_distributed, seed_everything, shutdown
    from Training.trainer.loop import Trainer

    ctx = init_distributed("cpu")
    try:
        cfg = tiny_config(train={"batch_size": 2 * world}, texture={"enabled": True})
        seed_everything(cfg.train.seed, ctx.rank)
        source = SyntheticSource(make_domain_images(3, 72, seed=5), 2, 64, seed=100 + rank)
        trainer = Trainer(cfg, out_dir, source, 3, ctx, progress=False)
        first = source.next_batch()["x_src"]
        source.gen.manual_seed(100 + rank)
        result = trainer.run(iters)
        params = {f"{n}.{k}": v.detach().clone() for n, net in trainer.nets.items()
                  for k, v in net.state_dict().items()}
        params.update({f"texture.{k}": v.detach().clone() for k, v in trainer.texture.state_dict().items()})
        torch.save({"params": params, "iteration": result.iteration, "first_batch": first,
                    "status": result.status}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown(ctx)
