"""The model check on held-out simulated pairs: identity numbers, both inference modes, files written."""

from __future__ import annotations

import json

import pytest
from eval_dataset_factory import make_eval_dataset
from model_factory import make_model_file

from TextureStarGANCore.config import ModelConfig
from Training.diagnostics import model_check


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
