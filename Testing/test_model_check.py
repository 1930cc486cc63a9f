"""``Training.diagnostics.model_check`` with the classical baseline rows, on the tiny simulated dataset."""

from __future__ import annotations

import pytest
from model_factory import make_model_file
from simdata import TINY_SPEC, shared_dataset

from TextureStarGANCore.config import ModelConfig
from Training.diagnostics.model_check import check

TINY = ModelConfig.small(img_size=64, base_width=8, max_width=32, style_dim=16, mapping_hidden=32)


@pytest.mark.slow  # simulates and prepares the shared tiny dataset (~30 s) unless another test did
def test_model_check_adds_baselines_fitted_on_training_patients(tmp_path, one_torch_thread):
    model = make_model_file(tmp_path / "m.safetensors", config=TINY, spec=TINY_SPEC, iterations=1)
    res = check([model], shared_dataset(), tmp_path / "out", per_domain=2, tiled=False)
    linear, blur = res["models"]["baseline: linear filter"], res["models"]["baseline: gaussian blur"]
    assert len(linear) == 6 and len(blur) == 3  # blur only where it smooths
    assert "train split" in res["baselines_fitted_on"]
    for d, s in blur.items():
        assert s["fitted_params"]["sigma_px"] > 0
        assert linear[d]["psnr_after"] > linear[d]["psnr_before"]  # fitted on other patients, still helps
    assert "Baselines" in (tmp_path / "out" / "model_check.md").read_text()
