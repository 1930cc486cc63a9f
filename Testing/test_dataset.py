"""Dataset reader: balanced domain sampling, crops, reference images, paired slices."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from simdata import SIM_PATIENTS, SIM_SLICES, TINY_SPEC, shared_dataset

from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS
from TextureStarGANCore.preprocessing import PreprocessSpec
from Training.data.dataset import BalancedDomainSampler, CTSliceDataset, DatasetError, paired_slices
from Training.data.prepare import MANIFEST_COLUMNS


def _write_dataset(root: Path, counts: dict[int, int], size: int = 32) -> Path:
    """A hand-made dataset in the prepare layout: background -1, domain d's "body" has the value d / 10."""
    (root / "arrays").mkdir(parents=True)
    rows = []
    for d, n in counts.items():
        arr = np.full((n, size, size), -1.0, dtype=np.float16)
        arr[:, 2:-2, 2:-2] = d / 10.0
        np.save(root / "arrays" / f"s{d}.npy", arr)
        name = DEFAULT_SIMULATED_DOMAINS[d].name
        for k in range(n):
            rows.append(
                {
                    "patient": f"P{k % 4}",
                    "series_uid": f"s{d}",
                    "domain": name,
                    "domain_id": d,
                    "split": "train",
                    "slice_index": k,
                    "z_mm": k,
                    "source": f"x/{k}.dcm",
                    "array": f"s{d}.npy",
                    "row": k,
                }
            )
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    doms = [DEFAULT_SIMULATED_DOMAINS[d].to_dict() for d in counts]
    (root / "domains.json").write_text(json.dumps({"domains": doms}))
    (root / "preprocessing.json").write_text(json.dumps(PreprocessSpec(canvas_size=size).to_dict()))
    return root


def test_balanced_sampler_evens_out_unequal_domains(tmp_path):
    ds = CTSliceDataset(_write_dataset(tmp_path / "d", {0: 60, 1: 10, 2: 5}), "train")
    sampler = BalancedDomainSampler(ds, num_samples=3000, seed=0)
    counts = Counter(ds.rows[i].domain_id for i in sampler)
    assert all(abs(counts[d] / 3000 - 1 / 3) < 0.04 for d in (0, 1, 2)), counts
    assert list(sampler) == list(BalancedDomainSampler(ds, num_samples=3000, seed=0))  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != list(BalancedDomainSampler(ds, num_samples=3000, seed=0))
    # Plain sampling would follow the slice counts instead (60:10:5).
    assert Counter(r.domain_id for r in ds.rows)[0] == 60


def test_items_crops_and_references(tmp_path):
    ds = CTSliceDataset(_write_dataset(tmp_path / "d", {0: 6, 1: 6, 2: 6}), "train", crop_size=8, seed=1)
    img, d = ds[7]
    assert img.shape == (1, 8, 8) and img.dtype == torch.float32 and d == 1
    assert torch.allclose(img, ds[7][0])  # seeded crops repeat for the same item and epoch
    assert float(img[0, 4, 4]) == pytest.approx(0.1, abs=1e-3)  # foreground crop: centred on the "body"
    ref = ds.reference(2, n=4)
    assert ref.shape == (4, 1, 8, 8)
    assert torch.all((ref == -1.0) | ((ref - 0.2).abs() < 1e-3))  # only domain-2 slices
    a, b = ds.reference_pair(torch.tensor([0, 2, 1]))
    assert a.shape == b.shape == (3, 1, 8, 8)
    assert float(a[1].max()) == pytest.approx(0.2, abs=1e-3)
    assert float(a[0].max()) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(DatasetError, match="crop_size"):
        CTSliceDataset(tmp_path / "d", "train", crop_size=64)
    with pytest.raises(DatasetError, match="split 'test'"):
        CTSliceDataset(tmp_path / "d", "test")


def test_dataloader_with_simulated_dataset():
    root = shared_dataset()
    ds = CTSliceDataset(root, "train", crop_size=32, seed=0)
    assert ds.simulated and [d.name for d in ds.domains] == ["B30f", "BONE", "STANDARD"]
    loader = torch.utils.data.DataLoader(ds, batch_size=6, sampler=BalancedDomainSampler(ds, 12, seed=0))
    batches = list(loader)
    x, y = batches[0]
    assert x.shape == (6, 1, 32, 32) and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_paired_slices_give_the_same_anatomy_in_every_kernel():
    ds = CTSliceDataset(shared_dataset(), split=None)
    patient = ds.rows[0].patient
    pairs = paired_slices(ds, patient, SIM_SLICES - 1)
    assert sorted(pairs) == ["B30f", "BONE", "STANDARD"]
    imgs = list(pairs.values())
    assert all(i.shape == (TINY_SPEC.canvas_size,) * 2 for i in imgs)
    # Same phantom slice: the kernels differ in noise and sharpness, not anatomy.
    assert np.corrcoef(imgs[0].ravel(), imgs[1].ravel())[0, 1] > 0.9
    other = paired_slices(ds, ds.rows[-1].patient if ds.rows[-1].patient != patient else "SIM003-0001", 0)
    assert (
        np.corrcoef(imgs[0].ravel(), other["B30f"].ravel())[0, 1]
        < np.corrcoef(imgs[0].ravel(), imgs[1].ravel())[0, 1]
    )
    with pytest.raises(KeyError):
        paired_slices(ds, patient, SIM_SLICES + 5)
    assert len({r.patient for r in ds.rows}) == SIM_PATIENTS


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="Training.prepare"):
        CTSliceDataset(tmp_path)
