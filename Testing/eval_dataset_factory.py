"""A tiny prepared dataset (as Training.prepare writes it) for evaluation tests: phantom slices, 3 kernels.

Anatomy comes from the simulator's ``Training.simulator.phantom``; kernels are a cheap image-domain emulation
(Gaussian blur for sharpness + Gaussian-filtered noise for the noise texture) so that the test stays fast.
Every patient/slice exists in every kernel, as in the simulator, so paired ground truth is available.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS
from TextureStarGANCore.preprocessing import PreprocessSpec, hu_to_unit
from Training.simulator.phantom import ChestPhantom, random_params

# (blur sigma mm, noise SD HU, noise correlation sigma mm) per default domain: smooth, sharp, medium.
KERNELS = {"B30f": (1.2, 12.0, 1.5), "BONE": (0.0, 60.0, 0.3), "STANDARD": (0.6, 25.0, 0.8)}


def make_eval_dataset(
    root: Path,
    *,
    canvas: int = 64,
    patients: int = 2,
    slices: int = 4,
    seed: int = 0,
    test_patients: int | None = None,
    domains: tuple[str, ...] | None = None,
) -> Path:
    """Write DATASET/{manifest.csv, arrays/, domains.json, preprocessing.json, dataset.json}."""
    root = Path(root)
    (root / "arrays").mkdir(parents=True, exist_ok=True)
    spacing = 512.0 / canvas
    spec = PreprocessSpec(canvas_size=canvas, pixel_spacing_mm=spacing)
    rng = np.random.default_rng(seed)
    test_patients = patients if test_patients is None else test_patients
    rows = []
    for p in range(patients):
        z = np.linspace(-60.0, 60.0, slices)
        hu = ChestPhantom(random_params(rng, (float(z[0]), float(z[-1]))), z).slices(canvas, spacing)
        split = "test" if p < test_patients else "train"
        for d in DEFAULT_SIMULATED_DOMAINS:
            if domains is not None and d.name not in domains:
                continue
            blur, sd, corr = KERNELS[d.name]
            out = np.empty_like(hu)
            for i, s in enumerate(hu):
                img = ndimage.gaussian_filter(s, blur / spacing) if blur else s.copy()
                noise = rng.standard_normal(s.shape)
                if corr:
                    noise = ndimage.gaussian_filter(noise, corr / spacing)
                    noise /= max(noise.std(), 1e-6)
                out[i] = np.where(s > -900, img + sd * noise, img)
            uid = f"1.2.826.0.1.{seed}.{p}.{d.id}"
            np.save(root / "arrays" / f"{uid}.npy", hu_to_unit(out, spec).astype(np.float16))
            for i in range(slices):
                rows.append(
                    {
                        "patient": f"P{p:03d}",
                        "series_uid": uid,
                        "domain": d.name,
                        "domain_id": d.id,
                        "split": split,
                        "slice_index": i,
                        "z_mm": float(z[i]),
                        "source": "test-factory",
                        "array": f"{uid}.npy",
                        "row": i,
                    }
                )
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "domains.json").write_text(
        json.dumps([d.to_dict() for d in DEFAULT_SIMULATED_DOMAINS if domains is None or d.name in domains])
    )
    (root / "preprocessing.json").write_text(json.dumps(spec.to_dict()))
    (root / "dataset.json").write_text(
        json.dumps({"simulated": True, "seed": seed, "source": "test factory"})
    )
    return root
