"""``Training.diagnostics.model_check`` with the classical baseline rows, on the tiny simulated dataset."""

from __future__ import annotations

import json

import pytest
from eval_dataset_factory import make_eval_dataset
from model_factory import make_kernel_transfer_file, make_model_file
from simdata import TINY_SPEC, shared_dataset

from TextureStarGANCore.config import ModelConfig
from Training.diagnostics import model_check
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


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    ds = make_eval_dataset(root / "ds", canvas=128, patients=1, slices=2, domains=("B30f", "BONE"))
    model = make_model_file(root / "m.safetensors", config=ModelConfig.small(img_size=64), seed=0)
    rc = model_check.main([str(model), "--data", str(ds), "--out", str(root / "out"),
                           "--slices-per-domain", "2", "--tiled"])
    return rc, root / "out"


def test_every_direction_and_mode_is_measured(checked):
    rc, out = checked
    assert rc == 0
    res = json.loads((out / "model_check.json").read_text())
    assert sorted(res["models"]) == ["m.safetensors [full canvas]", "m.safetensors [tiled 64]"]
    for per_dir in res["models"].values():
        assert sorted(per_dir) == ["B30f->BONE", "BONE->B30f"]
        for s in per_dir.values():
            # "before" compares the untouched source with the truth: the kernels differ, so PSNR is finite.
            assert 10 < s["psnr_before"] < 80
            assert s["hf_sd_target"] is None or s["hf_sd_target"] > 0
    # The sharp (BONE) truth carries more high-frequency noise than the smooth one.
    full = res["models"]["m.safetensors [full canvas]"]
    assert full["B30f->BONE"]["hf_sd_target"] > full["BONE->B30f"]["hf_sd_target"]
    assert (out / "model_check.md").is_file()
    assert sorted(p.name for p in out.glob("*.png")) == ["m_B30f_to_BONE.png", "m_BONE_to_B30f.png"]


def test_a_kernel_transfer_model_runs_on_the_full_canvas_only(tmp_path, one_torch_thread):
    ds = make_eval_dataset(tmp_path / "ds", canvas=64, patients=1, slices=2, domains=("B30f", "BONE"))
    model = make_kernel_transfer_file(tmp_path / "kt.safetensors", iterations=1)
    rc = model_check.main([str(model), "--data", str(ds), "--out", str(tmp_path / "out"),
                           "--slices-per-domain", "2", "--tiled"])  # nothing to tile: no canvas of its own
    assert rc == 0
    res = json.loads((tmp_path / "out" / "model_check.json").read_text())
    per_dir = res["models"]["kt.safetensors [full canvas]"]
    assert [m for m in res["models"] if m.startswith("kt")] == ["kt.safetensors [full canvas]"]
    assert sorted(per_dir) == ["B30f->BONE", "BONE->B30f"]
    assert all(10 < s["psnr_after"] < 80 for s in per_dir.values())
