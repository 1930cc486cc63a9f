"""Radiomic domain analysis on a prepared simulated dataset (real pyradiomics)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from simdata import SIM_PATIENTS, shared_dataset

from Training.data.analyze_domains import AnalysisError, analyze_domains, eta_squared


def test_eta_squared():
    rng = np.random.default_rng(0)
    labels = ["a"] * 20 + ["b"] * 20
    x = rng.normal(0, 0.1, (40, 2))
    x[20:, 0] += 5.0  # column 0 separates the groups, column 1 does not
    eta = eta_squared(x, labels)
    assert eta[0] > 0.95 and eta[1] < 0.2


def test_analysis_finds_the_kernel_domains(tmp_path):
    out = tmp_path / "analysis"
    summary = analyze_domains(shared_dataset(), out, slices_per_series=1)
    assert summary["series"] == SIM_PATIENTS * 3 and summary["features"] > 50
    with open(out / "features.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == SIM_PATIENTS * 3 and {r["kernel"] for r in rows} == {"B30f", "BONE", "STANDARD"}
    effects = {r["factor"]: r for r in summary["effect_sizes"]}
    # The simulated kernels change texture well beyond chance (eta^2 chance level here: 2 / 14). On these
    # 64 px slices (5.5 mm pixels) the anatomy of 5 patients is about as strong; full-size data is in
    # Testing/benchmarks/results/data.md.
    assert effects["kernel"]["median_eta2"] > 0.25 and effects["kernel"]["median_epsilon2"] > 0.15
    assert effects["kvp"]["note"].startswith("not testable")
    assert ("domain", "kernel") in [tuple(c) for c in summary["confounded"]]
    assert "confounded" in effects["scanner"]["note"]
    ari = {r["factor"]: r["adjusted_rand_index"] for r in summary["clustering"]}
    assert ari["kernel"] > 0.2  # clusters agree with kernels far above chance (0)
    md = (out / "summary.md").read_text()
    assert "scanner + reconstruction kernel" in md
    assert (out / "embedding.png").stat().st_size > 5000
    assert json.loads((out / "summary.json").read_text())["recommended_factor"] in {
        "domain",
        "kernel",
        "scanner",
        "pixel_spacing",
    }


def test_not_a_dataset(tmp_path):
    with pytest.raises(AnalysisError, match="Training.prepare"):
        analyze_domains(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
