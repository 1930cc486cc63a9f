"""Dataset reader for the trainer and the evaluation: canvases of a prepared dataset (``Training.prepare``).

- ``CTSliceDataset(root, split)``: one item per slice -> (image (1, S, S) float32 in [-1, 1], domain_id),
  optionally a random ``crop_size`` crop (centred on body pixels when possible, so a crop shows texture
  rather than background). Arrays are opened memory-mapped, lazily, per process (DataLoader workers).
- ``BalancedDomainSampler``: every draw picks a domain uniformly, then a random slice of it, so small
  domains are seen as often as large ones (the paper's domains differ 2x in size).
- ``dataset.reference(domain_id, n)``: random images of one domain (StarGAN v2's x_ref / x_ref2).
- ``paired_slices(dataset, patient, slice_index)``: the same phantom slice in every domain (simulated
  data: paired ground truth for the evaluation).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from TextureStarGANCore.domains import Domain
from TextureStarGANCore.masks import BODY_THRESHOLD_HU
from TextureStarGANCore.preprocessing import PreprocessSpec, hu_to_unit

__all__ = [
    "DatasetError",
    "SliceRow",
    "CTSliceDataset",
    "BalancedDomainSampler",
    "paired_slices",
    "load_domains",
]

_REQUIRED = ("patient", "series_uid", "domain", "domain_id", "split", "slice_index", "array", "row")


class DatasetError(ValueError):
    """A folder that is not a complete prepared dataset; the message says how to make one."""


@dataclass(frozen=True)
class SliceRow:
    patient: str
    series_uid: str
    domain: str
    domain_id: int
    split: str
    slice_index: int
    array: str
    row: int
    origin: str = "real"  # real / simulated (manifests written before the column: from dataset.json)


def load_domains(root: str | Path) -> list[Domain]:
    """The dataset's domains (domains.json), in id order."""
    path = Path(root) / "domains.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(
            f"{path} is missing or unreadable ({exc}); prepare the dataset with python -m Training.prepare"
        ) from None
    entries = data.get("domains", data) if isinstance(data, dict) else data
    return sorted((Domain.from_dict(d) for d in entries), key=lambda d: d.id)


def _default_origin(root: Path) -> str:
    # Datasets written before the origin column came from one tree, simulated or not (dataset.json).
    try:
        return "simulated" if json.loads((root / "dataset.json").read_text()).get("simulated") else "real"
    except (OSError, ValueError):
        return "real"


def _read_manifest(root: Path) -> list[SliceRow]:
    path = root / "manifest.csv"
    if not path.is_file():
        raise DatasetError(
            f"{root} is not a prepared dataset (no manifest.csv); create one with "
            "python -m Training.prepare --dicom-root DICOM --out DATASET"
        )
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path} lacks column(s) {missing}; re-run Training.prepare")
        default_origin = _default_origin(root)
        try:
            return [
                SliceRow(
                    r["patient"],
                    r["series_uid"],
                    r["domain"],
                    int(r["domain_id"]),
                    r["split"],
                    int(r["slice_index"]),
                    r["array"],
                    int(r["row"]),
                    r.get("origin") or default_origin,
                )
                for r in reader
            ]
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{path} has a malformed row ({exc}); re-run Training.prepare") from None


class CTSliceDataset(Dataset):
    """Slices of one split (``split=None``: all) as (image (1, S, S) float32, domain_id).

    ``crop_size``: random square crops of that size (must not exceed the canvas); ``foreground_crops``
    puts the crop centre on a body pixel (above -500 HU) when one is found in a few tries. ``seed`` makes
    the crops reproducible per item and epoch when ``set_epoch`` is used; without it torch's RNG is used
    (per-worker seeding handled by the DataLoader).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        *,
        crop_size: int | None = None,
        foreground_crops: bool = True,
        domains: Sequence[str | int] | None = None,
        seed: int | None = None,
        origin: str | None = None,
    ) -> None:
        self.root = Path(root)
        rows = _read_manifest(self.root)
        try:
            self.spec = PreprocessSpec.from_dict(json.loads((self.root / "preprocessing.json").read_text()))
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"{self.root / 'preprocessing.json'} is missing or invalid ({exc}); re-run Training.prepare"
            ) from None
        self.domains = load_domains(self.root)
        info_path = self.root / "dataset.json"
        self.info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        self.simulated = bool(self.info.get("simulated", False))
        if split is not None:
            splits = sorted({r.split for r in rows})
            rows = [r for r in rows if r.split == split]
            if not rows:
                raise DatasetError(f"{self.root} has no slices in split {split!r} (splits: {splits})")
        if domains is not None:
            wanted = {str(d).lower() for d in domains}
            rows = [r for r in rows if r.domain.lower() in wanted or str(r.domain_id) in wanted]
            if not rows:
                raise DatasetError(
                    f"no slices of domains {list(domains)} in {self.root} "
                    f"(domains: {[d.name for d in self.domains]})"
                )
        if origin is not None:  # "real" or "simulated": e.g. keep real slices out of training
            rows = [r for r in rows if r.origin == origin]
            if not rows:
                raise DatasetError(f"{self.root} has no {origin!r} slices in this selection")
        self.rows = rows
        size = self.spec.canvas_size
        if crop_size is not None and not 8 <= crop_size <= size:
            raise DatasetError(f"crop_size must be between 8 and the canvas size {size}, got {crop_size}")
        self.crop_size = crop_size
        self.foreground_crops = foreground_crops
        self.seed = seed
        self.epoch = 0
        self.by_domain: dict[int, np.ndarray] = {}
        for i, r in enumerate(rows):
            self.by_domain.setdefault(r.domain_id, []).append(i)  # type: ignore[arg-type]
        self.by_domain = {k: np.asarray(v, dtype=np.int64) for k, v in sorted(self.by_domain.items())}
        self._pairs: dict[tuple[str, int], list[int]] | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._fg_threshold = float(hu_to_unit(np.float32(BODY_THRESHOLD_HU), self.spec.hu_window))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def domain_ids(self) -> list[int]:
        return list(self.by_domain)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _array(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            path = self.root / "arrays" / name
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DatasetError(
                    f"dataset array {path} is missing or damaged ({exc}); re-run "
                    "Training.prepare on the same folder to repair it"
                ) from None
            self._arrays[name] = arr
        return arr

    def canvas(self, index: int) -> np.ndarray:
        """The full (S, S) float32 canvas of item ``index``."""
        r = self.rows[index]
        return np.asarray(self._array(r.array)[r.row], dtype=np.float32)

    def _crop(self, img: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        c = self.crop_size
        if c is None or c == img.shape[-1]:
            return img
        size = img.shape[-1]

        def rand(hi: int) -> int:
            return int(rng.integers(0, hi)) if rng is not None else int(torch.randint(0, hi, (1,)).item())

        top, left = rand(size - c + 1), rand(size - c + 1)
        if self.foreground_crops:
            for _ in range(8):
                if img[top + c // 2, left + c // 2] > self._fg_threshold:
                    break
                top, left = rand(size - c + 1), rand(size - c + 1)
        return img[top : top + c, left : left + c]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.seed is not None else None
        img = self._crop(self.canvas(index), rng)
        return torch.from_numpy(np.ascontiguousarray(img))[None], self.rows[index].domain_id

    def reference(self, domain_id: int, n: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random images (n, 1, s, s) of ``domain_id`` (StarGAN v2 reference images)."""
        idx = self.by_domain.get(int(domain_id))
        if idx is None or len(idx) == 0:
            raise DatasetError(
                f"domain id {domain_id} has no slices in this split (present: {self.domain_ids})"
            )
        pick = torch.randint(0, len(idx), (n,), generator=generator)
        return torch.stack([self[int(idx[int(p)])][0] for p in pick])

    def reference_pair(
        self, domain_ids: Sequence[int] | torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent reference batches (x_ref, x_ref2), one image of each given target domain."""
        ids = [int(d) for d in domain_ids]
        a = torch.cat([self.reference(d, 1, generator) for d in ids])
        b = torch.cat([self.reference(d, 1, generator) for d in ids])
        return a, b

    def pairs_index(self) -> dict[tuple[str, int], list[int]]:
        if self._pairs is None:
            pairs: dict[tuple[str, int], list[int]] = {}
            for i, r in enumerate(self.rows):
                pairs.setdefault((r.patient, r.slice_index), []).append(i)
            self._pairs = pairs
        return self._pairs


class BalancedDomainSampler(Sampler[int]):
    """Indices drawn domain-first: uniform over domains, then uniform over that domain's slices.

    ``num_samples`` per epoch (default: the dataset length); seeded and epoch-aware (``set_epoch``).
    """

    def __init__(self, dataset: CTSliceDataset, num_samples: int | None = None, seed: int = 0) -> None:
        if not dataset.by_domain:
            raise DatasetError("the dataset is empty; nothing to sample")
        self.dataset = dataset
        self.num_samples = int(num_samples or len(dataset))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = list(self.dataset.by_domain.values())
        which = rng.integers(0, len(groups), self.num_samples)
        for g in which:
            idx = groups[int(g)]
            yield int(idx[int(rng.integers(0, len(idx)))])


def paired_slices(dataset: CTSliceDataset, patient: str, slice_index: int) -> dict[str, np.ndarray]:
    """{domain name: (S, S) float32 canvas} of one slice position of one patient in every domain present.

    Meaningful for simulated data (the same phantom slice reconstructed with every kernel); for real
    data it returns whatever series of that patient have that slice index, which are not pixel-paired.
    """
    idx = dataset.pairs_index().get((str(patient), int(slice_index)))
    if not idx:
        raise KeyError(f"no slice {slice_index} of patient {patient!r} in this dataset split")
    return {dataset.rows[i].domain: dataset.canvas(i) for i in idx}
