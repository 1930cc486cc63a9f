"""Training batches from a prepared dataset (`data.dataset`): balanced domains, per-rank shards, crops.

Every batch is a pure function of (seed, rank, batch number): domains drawn uniformly (balanced, as the
dataset's `BalancedDomainSampler`), a random slice of each from this rank's shard (every world_size-th slice
of each domain), a model.img_size crop centred on a random body pixel, and two reference images of each
target domain. So the
data position in a checkpoint is just the batch number, resuming reproduces the stream exactly, and a
background thread can prefetch without touching the random state of the training loop.
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from TextureStarGANCore.masks import BODY_THRESHOLD_HU
from TextureStarGANCore.preprocessing import hu_to_unit
from Training.data.dataset import CTSliceDataset, DatasetError

from .config import TrainConfig
from .ddp import DistContext


class DataError(ValueError):
    """The dataset cannot be used for this config (message names the problem and the fix)."""


class DatasetSource:
    """BatchSource over one split of a prepared dataset for one rank."""

    def __init__(self, dataset: CTSliceDataset, batch: int, crop: int, seed: int, rank: int = 0,
                 world_size: int = 1, prefetch: int = 0) -> None:
        self.dataset = dataset
        self.batch = batch
        self.crop = crop
        self.body_level = float(hu_to_unit(np.float32(BODY_THRESHOLD_HU), dataset.spec))
        self.seed = seed
        self.rank = rank
        self.num_domains = len(dataset.domains)
        self.shards: list[np.ndarray] = []
        for d in dataset.domains:
            idx = dataset.by_domain.get(d.id)
            if idx is None or len(idx) == 0:
                raise DataError(f"domain {d.name} has no slices in this split; every domain of domains.json "
                                "needs training slices (re-run Training.prepare with more patients)")
            # Disjoint shards when there are enough slices; otherwise every rank samples the whole domain.
            self.shards.append(idx[rank::world_size] if len(idx) >= world_size else idx)
        self.position = 0  # batches handed out so far
        self._pool = cf.ThreadPoolExecutor(max_workers=1) if prefetch > 0 else None
        self._pending: dict[int, cf.Future] = {}
        self._depth = prefetch

    def _rng(self, n: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.rank, n]).generate_state(2, dtype=np.uint64)
        return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))

    def _crop(self, img: np.ndarray, g: torch.Generator) -> np.ndarray:
        """A crop centred on a random body pixel (above -500 HU), so every crop shows tissue texture.

        Why not random positions: the body covers ~15% of a 512 mm canvas, so most random crops (and a
        third of crops after a few random tries) would be pure air, wasting compute and teaching D nothing.
        """
        c, s = self.crop, img.shape[-1]
        if c >= s:
            return img
        centres = img[c // 2 : s - c + c // 2 + 1, c // 2 : s - c + c // 2 + 1] > self.body_level
        rows, cols = np.nonzero(centres)  # index (r, q) here = top-left corner (r, q) of the crop
        if len(rows):
            k = int(torch.randint(len(rows), (1,), generator=g))
            top, left = int(rows[k]), int(cols[k])
        else:
            top, left = (int(v) for v in torch.randint(s - c + 1, (2,), generator=g))
        return img[top : top + c, left : left + c]

    def _images(self, domains: Tensor, g: torch.Generator) -> Tensor:
        out = []
        for d in domains.tolist():
            shard = self.shards[d]
            i = int(shard[int(torch.randint(len(shard), (1,), generator=g))])
            out.append(torch.from_numpy(np.ascontiguousarray(self._crop(self.dataset.canvas(i), g))))
        return torch.stack(out)[:, None]

    def make_batch(self, n: int) -> dict[str, Tensor]:
        g = self._rng(n)
        y_src = torch.randint(self.num_domains, (self.batch,), generator=g)
        y_ref = torch.randint(self.num_domains, (self.batch,), generator=g)
        return {
            "x_src": self._images(y_src, g),
            "y_src": y_src,
            "x_ref": self._images(y_ref, g),
            "x_ref2": self._images(y_ref, g),
            "y_ref": y_ref,
        }

    def next_batch(self) -> dict[str, Tensor]:
        n = self.position
        if self._pool is None:
            batch = self.make_batch(n)
        else:
            for k in range(n, n + self._depth + 1):
                if k not in self._pending:
                    self._pending[k] = self._pool.submit(self.make_batch, k)
            batch = self._pending.pop(n).result()
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self.position = int(state["position"])


@dataclass
class OpenedDataset:
    source: DatasetSource
    num_domains: int
    run_info: dict[str, Any]


def open_dataset(root: str | Path, cfg: TrainConfig, ctx: DistContext) -> OpenedDataset:
    """Open the training split for this rank and describe it for the model card (DataError on problems)."""
    root = Path(root)
    size = cfg.model.img_size
    try:
        ds = CTSliceDataset(root, cfg.data.train_split, origin=cfg.data.origin)
    except DatasetError as exc:
        raise DataError(str(exc)) from None
    if size > ds.spec.canvas_size:
        raise DataError(f"model.img_size {size} (the training crop) exceeds the dataset canvas "
                        f"{ds.spec.canvas_size}; lower model.img_size")
    if len(ds.domains) < 2:
        raise DataError(f"{root} has {len(ds.domains)} domain(s); harmonization needs at least two")
    source = DatasetSource(ds, cfg.train.batch_size // ctx.world_size, size, cfg.train.seed, ctx.rank,
                           ctx.world_size, prefetch=cfg.data.num_workers)
    kind = "simulated kernels" if ds.simulated else "CT series"
    counts = {d.name: int(len(ds.by_domain.get(d.id, []))) for d in ds.domains}
    info = {
        "data": f"{kind} from {root.resolve()} (split {cfg.data.train_split!r}, slices per domain {counts})",
        "data_root": str(root.resolve()),
        "simulated": ds.simulated,
        "domains": [d.to_dict() for d in ds.domains],
        "preprocessing": ds.spec.to_dict(),
        "dataset": ds.info,
        "train_slices": counts,
    }
    return OpenedDataset(source, len(ds.domains), info)
