"""Export a training run to the engine's model file; the Harmonizer loads it and harmonizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from trainer_support import SyntheticSource, make_domain_images, tiny_config

from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS
from TextureStarGANCore.model_file import compute_domain_styles, load_model_file
from TextureStarGANCore.preprocessing import PreprocessSpec
from Training import export
from Training.trainer.ddp import DistContext, seed_everything
from Training.trainer.loop import Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    seed_everything(cfg.train.seed, 0)
    info = {"data": "synthetic test domains", "simulated": True,
            "domains": [d.to_dict() for d in DEFAULT_SIMULATED_DOMAINS],
            "preprocessing": PreprocessSpec(canvas_size=64, pixel_spacing_mm=8.0).to_dict()}
    source = SyntheticSource(make_domain_images(3, 72, seed=2), 2, 64)
    trainer = Trainer(cfg, run, source, 3, DistContext(0, 1, 0, torch.device("cpu"), None), run_info=info,
                      progress=False)
    trainer.run(2)
    (run / "eval").mkdir()
    (run / "eval" / "iter_000002.json").write_text(json.dumps({"paired": {"psnr_gain_db": 1.5}}))
    (run / "eval" / "iter_000009.json").write_text(json.dumps({"paired": {"psnr_gain_db": 9.0}}))
    return run


def test_export_writes_a_valid_model_file_with_provenance(run_dir, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert export.main([str(run_dir), "--out", str(out), "--num-latents", "64"]) == 0
    assert "exported ckpt_00000002.pt" in capsys.readouterr().out
    mf = load_model_file(out)
    tr = mf.card["training"]
    assert tr["iterations"] == 2 and tr["texture_loss"] is True and tr["code_version"].startswith("ct-harm")
    assert tr["config"]["model"]["img_size"] == 64 and "simulated" in mf.card["intended_use"]
    # Metrics: the newest evaluation not newer than the exported iteration.
    assert mf.card["metrics"]["iteration"] == 2
    assert mf.card["metrics"]["results"]["paired"]["psnr_gain_db"] == 1.5
    assert [d.name for d in mf.domains] == [d.name for d in DEFAULT_SIMULATED_DOMAINS]
    assert mf.preprocessing.canvas_size == 64
    assert (mf.card["target_styles"]["num_latents"], mf.card["target_styles"]["seed"]) == (64, 0)
    # Deterministic styles: the documented mean over seeded latents of the exported EMA mapping network.
    from TextureStarGANCore.model_file import instantiate

    nets = instantiate(mf)
    expected = compute_domain_styles(nets["mapping_network"], 3, num_latents=64, seed=0)
    assert torch.allclose(mf.domain_styles, expected, atol=1e-6)
    out2 = tmp_path / "again.safetensors"
    assert export.main([str(run_dir), "--out", str(out2), "--num-latents", "64"]) == 0
    assert torch.equal(load_model_file(out2).domain_styles, mf.domain_styles)


def test_exported_model_loads_in_harmonizer_and_harmonizes(run_dir, tmp_path):
    from TextureStarGANCore.inference import Harmonizer

    out = tmp_path / "model.safetensors"
    assert export.main([str(run_dir), "--out", str(out), "--num-latents", "64"]) == 0
    h = Harmonizer.from_checkpoint(out, device="cpu")
    rng = np.random.default_rng(0)
    vol = np.full((2, 96, 96), -1000.0, dtype=np.float32)
    vol[:, 20:76, 20:76] = 40.0 + 30.0 * rng.standard_normal((2, 56, 56))
    res = h.harmonize(vol, (5.0, 5.0, 2.0), target="BONE")
    assert res.shape == vol.shape and res.dtype == vol.dtype and np.isfinite(res).all()
    assert not np.array_equal(res, vol)  # the generator ran


def test_export_errors_are_clear_and_write_nothing(tmp_path, run_dir, capsys):
    assert export.main([str(tmp_path), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "m.pt"
    assert export.main([str(run_dir), "--out", str(bad), "--num-latents", "8"]) == 2
    assert ".safetensors" in capsys.readouterr().err and not bad.exists()
