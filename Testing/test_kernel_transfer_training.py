"""The kernel-transfer trainer: paired crops are aligned, the MTFs start from the catalogue, training steps
learn, runs resume exactly, and the export loads in the engine and harmonizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SHARED
from simdata import ANATOMY_DOMAINS, shared_anatomy_sim

from Training.trainer.kernel_transfer_config import KTConfigError, load_kt_config
from Training.trainer.kernel_transfer_train import KTRun, build_networks, train
from Training.trainer.paired_data import PairedGroup, PairSampler

CHEST = SHARED / "data" / "real_ct" / "philips_brilliance16_chest_l_b_pair"
DOMAINS = list(ANATOMY_DOMAINS)


def _need_real() -> None:
    if not CHEST.is_dir():
        pytest.skip(f"shared real CT not found at {CHEST} (set CTH_SHARED_DIR)")


def _config(tmp: Path, sim: Path | None, **over) -> Path:
    cfg = {
        "domains": DOMAINS,
        "model": {"width": 8, "depth": 3, "embed_dim": 4},
        "data": {"simulated": [str(sim)] if sim else [],
                 "real": [{"name": "chest", "series": {"PHILIPS_L": str(CHEST / "L_sharp"),
                                                       "PHILIPS_B": str(CHEST / "B_smooth")},
                           "slices": "0:2"}],
                 "crop": 64, "margin": 8},
        "train": {"iters": 6, "batch": 2, "threads": 1},
        "estimator": {"steps": 20, "slice_stride": 1},
        "noise": {"steps": 3, "batch": 2},
        "loss": {},
        "checkpoint_every": 3,
    }
    for key, value in over.items():
        sec, _, k = key.partition(".")
        cfg[sec][k] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def sim_tree() -> Path:
    """One simulated variant (3 slices of the real chest B as anatomy, 192 px) with the three kernels."""
    _need_real()
    return shared_anatomy_sim(CHEST)[1]


def test_sampler_crops_are_aligned_and_use_two_domains():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 30, (3, 96, 96)).astype(np.int16)
    base[:, 20:80, 20:80] += 40
    group = PairedGroup("g", "simulated", (0.7, 0.7), {"A": base, "B": (base + 5).astype(np.int16)})
    sampler = PairSampler([group], {"A": 0, "B": 1}, crop=48, real_fraction=0.0, identity_fraction=0.0,
                          seed=1)
    b = sampler.batch(16)
    assert b["source_hu"].shape == (16, 1, 48, 48)
    assert set(zip(b["source"], b["target"], strict=True)) <= {(0, 1), (1, 0)}
    diff = b["target_hu"] - b["source_hu"]
    expected = np.where(b["source"] == 0, 5.0, -5.0)[:, None, None, None]
    np.testing.assert_array_equal(diff, np.broadcast_to(expected, diff.shape))


def test_mtfs_start_from_the_catalogue_and_an_untrained_model_is_the_linear_transfer(tmp_path):
    cfg = load_kt_config(_config(tmp_path, None))
    gen, _ = build_networks(cfg)
    lm = gen.log_mtf_knots().detach()
    b, sharp = lm[DOMAINS.index("PHILIPS_B")], lm[DOMAINS.index("PHILIPS_L")]
    assert b[0] == 0 and sharp[0] == 0
    assert bool((b[4:11] < sharp[4:11]).all())  # B passes less than L at 0.2-0.5 cycles/mm
    # Noise band-limited below ~0.35 cycles/mm (blur of 1.5 px at 0.8 mm), where B is smoother than L.
    from scipy import ndimage

    x = torch.from_numpy(ndimage.gaussian_filter(np.random.default_rng(0).normal(0, 400, (64, 64)), 1.5))
    x = x.float()[None, None]
    with torch.no_grad():
        same = gen(x, [(0.8, 0.8)], [1], [1])
        smoother = gen(x, [(0.8, 0.8)], [1], [0])
    assert torch.allclose(same, x, atol=0.05)
    hp = [float((v - v.mean()).pow(2).mean()) for v in (x, smoother)]
    assert hp[1] < 0.8 * hp[0]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(KTConfigError, match="train: unknown key"):
        load_kt_config(_config(tmp_path, None), {"train.speed": 3})
    with pytest.raises(KTConfigError, match="crop"):
        load_kt_config(_config(tmp_path, None), {"data.crop": 32})
    with pytest.raises(KTConfigError, match="model.noise_synthesis: must be true or false"):
        load_kt_config(_config(tmp_path, None), {"model.noise_synthesis": "yes"})


def test_training_learns_resumes_exactly_and_exports(sim_tree, tmp_path):
    from Training.train_kernel_transfer import main as train_main

    torch.set_num_threads(1)
    cfg_path = _config(tmp_path, sim_tree)
    run_dir = tmp_path / "run"
    model = tmp_path / "model.safetensors"
    assert train_main(["--config", str(cfg_path), "--out", str(run_dir), "--max-iters", "3"]) == 0
    assert train_main(["--config", str(cfg_path), "--out", str(run_dir)]) == 2  # would overwrite: refused
    assert train_main(["--config", str(cfg_path), "--out", str(run_dir), "--resume", "auto",
                       "--export", str(model)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iteration"] == 6 and summary["groups"] == {"simulated": 1, "real": 1}
    assert summary["noise_fit"]["steps"] == 3  # the noise curves are fitted after training
    assert (run_dir / "training_curve.png").stat().st_size > 1000
    # Resuming gives the same weights as one uninterrupted run.
    straight = tmp_path / "straight"
    assert train_main(["--config", str(cfg_path), "--out", str(straight)]) == 0
    a = torch.load(sorted(run_dir.glob("checkpoint_*.pt"))[-1], weights_only=True)["generator"]
    b = torch.load(sorted(straight.glob("checkpoint_*.pt"))[-1], weights_only=True)["generator"]
    for key in a:
        torch.testing.assert_close(a[key], b[key])

    from TextureStarGANCore.inference import Harmonizer
    from TextureStarGANCore.volume_io import read_volume

    h = Harmonizer.from_checkpoint(model, device="cpu")
    assert h.domains == DOMAINS
    vol = read_volume(CHEST / "L_sharp")
    out = h.harmonize(vol.hu[40:41], vol.spacing, target="PHILIPS_B", source="PHILIPS_L")
    assert out.shape == (1, 512, 512) and np.isfinite(out).all()


def test_a_fine_tune_keeps_the_estimator_splits_the_residual_and_trains_with_the_noise_excess_term(
        sim_tree, tmp_path):
    from Training.train_kernel_transfer import main as train_main

    torch.set_num_threads(1)
    first = tmp_path / "first"
    assert train_main(["--config", str(_config(tmp_path, sim_tree)), "--out", str(first)]) == 0
    start = sorted(first.glob("checkpoint_*.pt"))[-1]
    cfg = _config(tmp_path, sim_tree, **{"loss.noise_excess": 0.01, "train.iters": 3,
                                         "model.split_residual": True,
                                         "loss.noise_excess_sharpening_only": True})
    tuned = tmp_path / "tuned"
    assert train_main(["--config", str(cfg), "--out", str(tuned), "--init-from", str(start),
                       "--keep-estimator"]) == 0
    before = torch.load(start, weights_only=True)
    after = torch.load(sorted(tuned.glob("checkpoint_*.pt"))[-1], weights_only=True)
    for key, value in before["estimator"].items():
        assert torch.equal(value, after["estimator"][key]), key  # kept, not refitted
    assert after["estimator_stats"]["kept_from"] == str(start)
    assert all("noise_excess" in row for row in after["history"])
    # Both residual networks start from the single one, and training moves them apart.
    gen_before, gen_after = before["generator"], after["generator"]
    for key in ("convs.0.weight", "out.weight"):
        up = key.replace(".", "_up.", 1)
        assert gen_after[up].shape == gen_before[key].shape
        assert not torch.equal(gen_after[up], gen_after[key])
    assert train_main(["--config", str(cfg), "--out", str(tmp_path / "x"), "--keep-estimator"]) == 2
    # train.frozen: only the sharpening network trains; every frozen part stays the starting checkpoint's.
    frozen = ["log_mtf", "embed", "convs", "film", "out"]
    cfg = _config(tmp_path, sim_tree,
                  **{"train.iters": 3, "model.split_residual": True, "train.frozen": frozen})
    assert train_main(["--config", str(cfg), "--out", str(tmp_path / "frozen"), "--init-from", str(start),
                       "--keep-estimator"]) == 0
    last = sorted((tmp_path / "frozen").glob("checkpoint_*.pt"))[-1]
    after = torch.load(last, weights_only=True)["generator"]
    for key, value in gen_before.items():
        if key.split(".")[0] in frozen:
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["convs_up.0.weight"], gen_before["convs.0.weight"])
    bad = _config(tmp_path, sim_tree, **{"train.frozen": ["convz"]})
    assert train_main(["--config", str(bad), "--out", str(tmp_path / "bad")]) != 0


def test_the_noise_excess_term_penalises_only_more_noise_than_the_target():
    from Training.trainer.kernel_transfer_noise import noise_excess_loss

    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.normal(40.0, 15.0, (1, 1, 96, 96)).astype(np.float32))
    batch = {"source": np.array([0]), "target": np.array([1]), "spacing_xy": [(0.7, 0.7)],
             "real": np.array([True])}
    extra = torch.from_numpy(rng.normal(0.0, 15.0, (1, 1, 96, 96)).astype(np.float32))
    noisier = (target + extra).requires_grad_(True)
    assert float(noise_excess_loss(target, target, batch)) == 0.0
    assert float(noise_excess_loss(40.0 + 0.5 * (target - 40.0), target, batch)) == 0.0  # less noise: free
    loss = noise_excess_loss(noisier, target, batch)
    assert float(loss) > 0.05  # twice the variance: log 2 above the target, beyond the 10 % tolerance
    loss.backward()
    assert noisier.grad is not None and float(noisier.grad.abs().sum()) > 0
    same = {**batch, "target": np.array([0])}
    assert float(noise_excess_loss(noisier, target, same)) == 0.0  # identity crops are not judged
    assert float(noise_excess_loss(noisier, target, batch, include_real=False)) == 0.0  # a real crop
    for chosen in (True, False):  # ``items``: only the chosen crops (the sharpening ones in training)
        picked = noise_excess_loss(noisier, target, batch, items=torch.tensor([chosen]))
        assert (float(picked) == float(loss)) if chosen else (float(picked) == 0.0)


def test_a_learning_step_lowers_the_paired_error(tmp_path):
    """Forty steps on one real pair lower the error on a fixed batch of its crops (real torch training)."""
    _need_real()
    torch.set_num_threads(1)
    cfg = load_kt_config(_config(tmp_path, None), {"train.iters": 40, "train.batch": 4})
    from Training.train_kernel_transfer import load_groups

    groups, _ = load_groups(cfg, lambda *a: None)
    run = KTRun.create(cfg)
    fixed = PairSampler(groups, {d: i for i, d in enumerate(DOMAINS)}, 64, 1.0, 0.0, seed=99).batch(8)

    def error() -> float:
        with torch.no_grad():
            out = run.gen(torch.from_numpy(fixed["source_hu"]), fixed["spacing_xy"],
                          torch.from_numpy(fixed["source"]), torch.from_numpy(fixed["target"]))
        return float((out - torch.from_numpy(fixed["target_hu"]))[..., 8:-8, 8:-8].pow(2).mean())

    before = error()
    train(run, groups, tmp_path / "r")
    assert error() < 0.97 * before


def test_card_metrics_keep_the_validated_model_and_its_no_noise_row_only(tmp_path):
    from Training.trainer.kernel_transfer_export import real_pair_metrics

    def method(kind: str, file: str | None = None) -> dict:
        return {"kind": kind, "rmse_hu": 1.0, **({"params": {"file": file}} if file else {})}

    results = {"models": ["a.safetensors", "b.safetensors"], "pairs": [{
        "pair": "p", "fit_slices": [0, 2], "evaluated_slices": [2, 4], "rmse_window_hu": [-1024, 600],
        "directions": {"sharp->smooth": {
            "source_kernel": "L", "target_kernel": "B", "target": {"rmse_hu": 0.0},
            "methods": {"identity": method("baseline"), "model a": method("model", "a.safetensors"),
                        "model b": method("model", "b.safetensors"),
                        "model a --no-noise": method("model", "a.safetensors")}}}}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    rows = real_pair_metrics(path)["rows"]
    assert [r["method"] for r in rows] == ["identity", "this model", "this model --no-noise", "real target"]
