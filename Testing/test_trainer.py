"""Trainer: config validation, checkpoints, resume, signals, NaN stop, 2-process gloo, overfitting."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
from trainer_support import SyntheticSource, ddp_worker, make_domain_images, tiny_config

from Training.trainer import checkpointing as ckpt
from Training.trainer.config import ConfigError, config_from_dict, load_config
from Training.trainer.ddp import DistContext, seed_everything
from Training.trainer.loop import NonFiniteLossError, Trainer
from Training.trainer.losses import texture_weight

CPU = DistContext(0, 1, 0, torch.device("cpu"), None)
CONFIGS = Path(__file__).resolve().parents[1] / "Training" / "configs"


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def images():
    return make_domain_images(3, 72, seed=1)


def _trainer(run_dir: Path, images, cfg=None, seed: int = 0, source=None) -> Trainer:
    cfg = cfg or tiny_config()
    seed_everything(cfg.train.seed, 0)
    source = source or SyntheticSource(images, cfg.train.batch_size, cfg.model.img_size, seed=seed)
    return Trainer(cfg, run_dir, source, len(images), CPU, progress=False)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"{n}.{k}": v.clone() for n, m in trainer.nets.items() for k, v in m.state_dict().items()}
    out.update({f"ema.{n}.{k}": v.clone() for n, m in trainer.ema.items() for k, v in m.state_dict().items()})
    if trainer.texture is not None:
        out.update({f"texture.{k}": v.clone() for k, v in trainer.texture.state_dict().items()})
    return out


# Config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"texture": {"enabled": "false"}}, "texture.enabled must be true or false"),
        ({"train": {"batch_size": 8.5}}, "train.batch_size must be an integer"),
        ({"train": {"lr": -1e-4}}, "train.lr must be > 0"),
        ({"train": {"beta2": 1.0}}, "train.beta2 must be in [0, 1)"),
        ({"trian": {}}, "unknown section(s) ['trian']"),
        ({"train": {"learning_rate": 1}}, "unknown key(s) ['learning_rate']"),
        ({"model": {"img_size": 100}}, "img_size must be a power of 2"),
        ({"texture": {"params": {"levelz": 8}}}, "texture.params"),
        ({"log": {"eval_metrics": ["psnr"]}}, "unknown metric"),
        ({"texture": {"warmup_iters": -5}}, "texture.warmup_iters must be >= 0"),
    ],
)
def test_config_rejects_bad_values_with_clear_message(raw, fragment):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    assert fragment in str(exc.value)


def test_config_file_overrides_and_yaml_exponent(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n  batch_size: 8\ntexture:\n  enabled: false\n")
    cfg = load_config(f, ["train.batch_size=4", "texture.enabled=true"])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.batch_size == 4 and cfg.texture.enabled is True
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(f, ["batch_size=4"])


@pytest.mark.parametrize("name", ["paper.yaml", "cpu_demo.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(CONFIGS / name)
    if name == "paper.yaml":  # the paper's setting
        assert (cfg.model.img_size, cfg.train.batch_size, cfg.train.total_iters) == (512, 8, 100000)
        t = cfg.train
        assert (t.lr, t.mapping_lr, t.beta1, t.beta2, t.weight_decay) == (1e-4, 1e-6, 0.0, 0.99, 1e-4)
        assert cfg.train.ema_beta == 0.999 and cfg.texture.enabled


# Checkpoints ----------------------------------------------------------------------------------------
def test_checkpoints_atomic_keep_last_and_safe_loading(tmp_path):
    for it in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, it, {"iteration": it, "nets": {}, "ema": {}, "optimizers": {},
                                            "rng": [ckpt.capture_rng()], "data": [{}], "config": {}}, 2)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["iteration"] == 4
    # A pickle that would run code on load is refused by weights_only loading.
    evil = tmp_path / "checkpoints" / "ckpt_00000009.pt"
    torch.save({"iteration": 9, "x": SyntheticSource}, evil)
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(evil)


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = ckpt.capture_rng()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


# Training -------------------------------------------------------------------------------------------
def test_interrupt_and_resume_continues_from_same_state(tmp_path, images):
    """2 + 2 iterations with a checkpoint between equal 4 uninterrupted iterations, bit for bit."""
    straight = _trainer(tmp_path / "a", images)
    straight.run(4)
    first = _trainer(tmp_path / "b", images)
    res = first.run(2)
    assert res.status == "max_iters" and res.checkpoint.name == "ckpt_00000002.pt"
    torch.manual_seed(12345)  # a fresh process would have other RNG states; resume must restore them
    second = _trainer(tmp_path / "b", images, seed=99)
    second.resume(ckpt.latest_checkpoint(tmp_path / "b"))
    assert second.iteration == 2
    second.run(4)
    a, b = _params(straight), _params(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert second.source.drawn == straight.source.drawn


def test_resume_accepts_older_checkpoints_and_refuses_other_architectures(tmp_path, images):
    """A checkpoint written before `model.residual` existed resumes; a different architecture does not."""
    trainer = _trainer(tmp_path / "a", images)
    state = trainer.state_dict()
    del state["model_config"]["residual"]  # as saved by earlier versions
    _trainer(tmp_path / "b", images).load_state_dict(state)
    state["model_config"]["residual"] = True
    with pytest.raises(ckpt.CheckpointError, match="resume with the config the run was started with"):
        _trainer(tmp_path / "c", images).load_state_dict(state)


def test_texture_on_and_off_share_the_loop(tmp_path, images):
    base = _trainer(tmp_path / "base", images, tiny_config(texture={"enabled": False}))
    terms = base.train_step()
    assert base.texture is None and not any(k.endswith("/txt") for k in terms)
    tex = _trainer(tmp_path / "tex", images)
    agg_before = [p.clone() for p in tex.texture.aggregation.parameters()]
    terms = tex.train_step()
    assert terms["G_latent/txt"] > 0 and terms["G_ref/txt"] > 0
    # The aggregation is really optimized (its parameters move), and gamma is logged.
    after = tex.texture.aggregation.parameters()
    moved = [not torch.equal(a, p) for a, p in zip(agg_before, after, strict=True)]
    assert any(moved)
    assert "texture/gamma" in tex._extra_scalars()


def test_texture_weight_warms_up_linearly(tmp_path, images):
    assert texture_weight(0, 1e-5, 0) == 1e-5
    assert texture_weight(0, 1e-5, 100) == 0.0
    assert texture_weight(25, 1e-5, 100) == pytest.approx(2.5e-6)
    assert texture_weight(100, 1e-5, 100) == texture_weight(5000, 1e-5, 100) == 1e-5
    # In the loop: the weight in use is logged and follows the ramp with the iteration count.
    tex = _trainer(tmp_path / "tex", images, tiny_config(texture={"weight": 2.0, "warmup_iters": 4}))
    weights = []
    for _ in range(6):
        weights.append(tex.train_step()["texture/weight"])
        tex.iteration += 1
    assert weights == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])


def test_sigterm_saves_checkpoint_and_stops(tmp_path, images):
    cfg = tiny_config()

    class KillOnThird(SyntheticSource):
        def next_batch(self):
            if self.drawn == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().next_batch()

    tr = _trainer(tmp_path, images, cfg, source=KillOnThird(images, 2, 64))
    res = tr.run(50)
    assert res.status == "interrupted" and res.iteration == 3
    assert ckpt.load_checkpoint(res.checkpoint)["iteration"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_nonfinite_loss_stops_and_names_last_good_checkpoint(tmp_path, images):
    class NaNAfterTwo(SyntheticSource):
        def next_batch(self):
            b = super().next_batch()
            if self.drawn > 2:
                b["x_src"] = torch.full_like(b["x_src"], float("nan"))
            return b

    tr = _trainer(tmp_path, images, tiny_config(checkpoint={"every": 2}), source=NaNAfterTwo(images, 2, 64))
    with pytest.raises(NonFiniteLossError) as exc:
        tr.run(10)
    assert "iteration 3" in str(exc.value) and "ckpt_00000002.pt" in str(exc.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(ddp_worker, args=(2, _free_port(), str(tmp_path), 2), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["iteration"] == r1["iteration"] == 2
    # Per-rank data shards: the ranks saw different crops ...
    assert not torch.equal(r0["first_batch"], r1["first_batch"])
    # ... yet DDP's gradient averaging keeps every network (and the texture aggregation) identical.
    for k, v in r0["params"].items():
        assert torch.allclose(v, r1["params"][k], atol=1e-6), k
    assert ckpt.load_checkpoint(tmp_path / "checkpoints" / "ckpt_00000002.pt")["world_size"] == 2


def test_small_overfit_run_losses_go_down(tmp_path, images):
    """On one repeated batch with a higher learning rate the reconstruction losses must fall."""

    class OneBatch(SyntheticSource):
        def next_batch(self):
            if not hasattr(self, "_b"):
                self._b = super().next_batch()
            return self._b

    cfg = tiny_config(train={"lr": 1e-3, "mapping_lr": 1e-4, "batch_size": 2})
    tr = _trainer(tmp_path, images, cfg, source=OneBatch(images, 2, 64, seed=4))
    hist = [tr.train_step() for _ in range(12)]

    def mean(key, part):
        return sum(h[key] for h in part) / len(part)

    early, late = hist[:3], hist[-3:]
    # Style reconstruction is too noisy over 12 steps (a new latent every step) to be asserted on.
    assert mean("G_latent/cyc", late) < 0.6 * mean("G_latent/cyc", early)
    assert mean("G_latent/txt", late) < 0.3 * mean("G_latent/txt", early)
    d = lambda h: h["D_latent/real"] + h["D_latent/fake"]  # noqa: E731
    assert sum(map(d, late)) < sum(map(d, early))


# Dataset source and command line ------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from eval_dataset_factory import make_eval_dataset

    return make_eval_dataset(tmp_path_factory.mktemp("ds"), canvas=128, patients=3, slices=3, test_patients=1)


def test_dataset_source_body_crops_shards_and_exact_positions(prepared):
    from Training.trainer.data_source import open_dataset

    cfg = tiny_config(train={"batch_size": 4})
    two = [open_dataset(prepared, cfg, DistContext(r, 2, r, torch.device("cpu"), "gloo")).source
           for r in (0, 1)]
    s0, s1 = two
    for d in range(3):  # disjoint per-rank shards of every domain
        assert not set(s0.shards[d].tolist()) & set(s1.shards[d].tolist())
    b = s0.next_batch()
    assert b["x_src"].shape == (2, 1, 64, 64) and b["x_ref"].shape == b["x_ref2"].shape == (2, 1, 64, 64)
    for x in (b["x_src"], b["x_ref"], b["x_ref2"]):  # every crop shows body, not just air
        assert ((x > -0.9).flatten(1).float().mean(1) > 0.05).all()
    s0.next_batch()
    state = s0.state_dict()
    third = s0.next_batch()
    s0.load_state_dict(state)
    again = s0.next_batch()
    assert all(torch.equal(third[k], again[k]) for k in third)


def test_command_line_trains_refuses_overwrite_and_resumes(prepared, tmp_path, capsys):
    from Training import train

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "model: {img_size: 64, base_width: 8, max_width: 16, latent_dim: 4, style_dim: 8,\n"
        "        mapping_hidden: 16}\n"
        "train: {total_iters: 10, batch_size: 2, threads: 1}\n"
        "texture: {enabled: false}\n"
        "log: {every: 1, image_every: 1, eval_every: 0}\n"
    )
    out = tmp_path / "run"
    args = ["--config", str(cfg), "--data", str(prepared), "--out", str(out), "--no-progress"]
    assert train.main(args + ["--max-iters", "1"]) == 0
    assert (out / "samples" / "samples_00000001.png").is_file() and (out / "run.json").is_file()
    assert train.main(args + ["--max-iters", "2"]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert train.main(args + ["--max-iters", "2", "--resume", "auto"]) == 0
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out))["iteration"] == 2
    assert train.main(args + ["--set", "train.batch_size=three"]) == 2
    assert "train.batch_size must be an integer" in capsys.readouterr().err


def test_discriminator_check_reports_windows_and_kernel_separability(prepared, tmp_path, capsys):
    from Training.diagnostics import discriminator_check

    cfg = tmp_path / "d.yaml"
    cfg.write_text("model: {img_size: 64, base_width: 8, max_width: 16, residual: true}\n"
                   "train: {batch_size: 4, threads: 1}\n")
    out = tmp_path / "d.json"
    args = ["--config", str(cfg), "--data", str(prepared), "--steps", "4", "--every", "2", "--no-progress"]
    assert discriminator_check.main(args + ["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [w["step"] for w in result["windows"]] == [2, 4]
    for w in result["windows"]:
        assert all(math.isfinite(w[k]) for k in ("bce_real", "bce_fake", "r1")) and 0 <= w["accuracy"] <= 1
    sep = result["separability_median_abs_laplacian"]
    # The emulated BONE kernel is the noisiest, B30f the smoothest: the statistic must rank them so.
    assert sep["BONE"]["median"] > sep["STANDARD"]["median"] > sep["B30f"]["median"]
    assert "chance: bce 0.693" in capsys.readouterr().out
    assert discriminator_check.main(args + ["--set", "train.lr=-1"]) == 2
    missing = ["--config", str(cfg), "--data", str(tmp_path / "nope"), "--no-progress"]
    assert discriminator_check.main(missing) == 2
