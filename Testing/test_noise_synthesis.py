"""Noise synthesis of kernel-transfer models (TextureStarGANCore/noise_synthesis.py): the local noise level
read from the input, the missing spectrum, reproducible draws that follow the input's noise, the switch in
the Harmonizer, and the fit of the curves (Training/trainer/kernel_transfer_noise.py) on paired crops."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_factory import KT_TINY, kernel_transfer_networks, make_kernel_transfer_file
from scipy import ndimage

from TextureStarGANCore.inference import Harmonizer
from TextureStarGANCore.kernel_transfer import (
    KernelTransferConfig,
    KernelTransferGenerator,
    radial_frequency_t,
)
from TextureStarGANCore.noise_synthesis import (
    KEEP_MARGIN,
    SOFT_BETA,
    highpass_response,
    local_noise_variance,
    missing_noise_spectrum,
)
from Training.trainer.kernel_transfer_noise import fit_noise, noise_fit_loss
from Training.trainer.paired_data import PairedGroup, PairSampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py

KT_NOISE = dataclasses.replace(KT_TINY, noise_synthesis=True, smooth_origin=True)
SPACING = (0.5, 0.5)


def _phantom(rows: int = 128, cols: int = 128, sd_left: float = 10.0, sd_right: float = 30.0,
             seed: int = 0) -> np.ndarray:
    """Soft tissue (40 HU) whose white noise is ``sd_left`` in the left and ``sd_right`` in the right half,
    with 16 columns of constant scanner padding on the left."""
    rng = np.random.default_rng(seed)
    img = np.full((rows, cols), 40.0, dtype=np.float32)
    sd = np.where(np.arange(cols) < cols // 2, sd_left, sd_right)[None, :]
    img += (rng.normal(0, 1, (rows, cols)) * sd).astype(np.float32)
    img[:, :16] = -1024.0
    return img


def test_local_noise_variance_reads_white_noise_and_ignores_an_edge():
    rng = np.random.default_rng(1)
    img = rng.normal(0, 20, (256, 256)).astype(np.float32)
    img[:, 128:] += 1000.0  # a bone border through the middle
    img[:, :40] = -1024.0  # padding
    x = torch.from_numpy(img)
    freq = radial_frequency_t(256, 256, SPACING, x.device)
    var = local_noise_variance(x, SPACING, freq).numpy()
    expected = 400.0 * float((highpass_response(freq) ** 2).mean())  # white noise through the high-pass
    away = var[:, 60:110]  # noise, more than a block from padding and edge
    assert abs(float(np.median(away)) / expected - 1) < 0.1
    assert abs(float(np.median(var[:, 128:136])) / expected - 1) < 0.5  # the edge's block: not 1000s of HU^2
    assert float(var[:, :20].max()) < 0.05 * expected  # constant padding has no noise


def test_missing_spectrum_is_what_the_target_keeps_beyond_the_source():
    freq = torch.linspace(0.0, 1.0, 21)
    zero = torch.zeros_like(freq)
    assert float(missing_noise_spectrum(freq, zero, zero, zero).abs().max()) == 0.0
    soft = missing_noise_spectrum(freq, zero, zero, zero, soft=True)  # the fit's smooth max(0, .)
    torch.testing.assert_close(soft, freq * F.softplus(torch.tensor(-SOFT_BETA * KEEP_MARGIN)) / SOFT_BETA)
    close = torch.full_like(freq, math.log(0.9))  # within the margin: fitting noise, nothing added
    assert float(missing_noise_spectrum(freq, zero, close, zero).max()) == 0.0
    quarter = torch.full_like(freq, math.log(0.25))
    share = 1 - 0.25 * (1 + KEEP_MARGIN)
    less = missing_noise_spectrum(freq, zero, quarter, zero)
    torch.testing.assert_close(less, freq * share, rtol=1e-3, atol=1e-6)  # the source kept a quarter
    four = torch.full_like(freq, math.log(4.0))
    torch.testing.assert_close(missing_noise_spectrum(freq, four, quarter, zero), freq * 4 * share, rtol=1e-3,
                               atol=1e-6)  # in the target's MTF^2
    assert float(missing_noise_spectrum(freq, zero, zero, quarter).max()) == 0.0  # a noisier source: none


def _iterative_first_domain(keep: float = 0.2) -> torch.Tensor:
    """log_keep curves: domain 0 (B30f) keeps ``keep`` of FBP noise (an iterative kernel), the others 1."""
    log_keep = torch.zeros(3, KT_NOISE.num_knots - 1)
    log_keep[0] = math.log(keep)
    return log_keep


def _noise_model_file(path):
    return make_kernel_transfer_file(path, config=KT_NOISE, iterations=10, log_keep=_iterative_first_domain())


def _noise_generator(keep_source: float = 0.2, residual: bool = False) -> KernelTransferGenerator:
    zero_mtf = torch.zeros(3, KT_NOISE.num_knots - 1)  # equal MTFs: the deterministic part is identity
    return kernel_transfer_networks(KT_NOISE, log_mtf=zero_mtf, log_keep=_iterative_first_domain(keep_source),
                                    residual=residual)[0]


def test_synthesized_noise_is_reproducible_and_follows_the_inputs_noise():
    gen = _noise_generator()
    x = torch.from_numpy(_phantom())[None, None]
    with torch.no_grad():
        mean = gen(x, [SPACING], [0], [1])
        a, b, c = (gen(x, [SPACING], [0], [1], seeds=[s]) - mean for s in (5, 5, 6))
        back = gen(x, [SPACING], [1], [0], seeds=[5]) - gen(x, [SPACING], [1], [0])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    n = a[0, 0].numpy()
    left, right = n[:, 24:56].std(), n[:, 72:120].std()
    assert left > 1.0 and 2.2 < right / left < 3.8  # three times the input noise: three times the noise
    # 1 - 0.2 x 1.15 = 0.77 of FBP noise power missing: about 2x the input SD (sqrt(0.77 / 0.2)).
    assert 1.4 < right / 30.0 < 2.8
    assert float(np.abs(n[:, :16]).max()) == 0.0  # padding stays noise-free
    assert float(back.abs().max()) < 0.05 * float(a.abs().max())  # towards the iterative kernel: none


def test_models_without_noise_synthesis_ignore_seeds_and_keep_their_tensors():
    gen = kernel_transfer_networks(KT_TINY)[0]
    assert "log_keep" not in gen.state_dict()  # the first v2 files load unchanged
    x = torch.from_numpy(_phantom(64, 64))[None, None]
    with torch.no_grad():
        torch.testing.assert_close(gen(x, [SPACING], [0], [1], seeds=[3]), gen(x, [SPACING], [0], [1]))
    with pytest.raises(ValueError, match="noise_synthesis must be true or false"):
        KernelTransferConfig(num_domains=3, noise_synthesis="yes")  # type: ignore[arg-type]


def test_smooth_origin_keeps_the_contrast_of_a_large_object():
    """A 40 mm disc of 1000 HU through a mild smoothing transfer: the quadratic first segment keeps its
    centre within 0.5 % of the contrast; the linear one loses more (the kink at f = 0)."""
    yy, xx = np.mgrid[:256, :256]
    disc = torch.from_numpy(np.where(np.hypot(yy - 128, xx - 128) < 40, 0.0, -1000.0).astype(np.float32))
    log_mtf = torch.zeros(3, KT_TINY.num_knots - 1)
    log_mtf[0] = -(KT_TINY.knots[1:].float() / 0.5) ** 2
    centre = {}
    for smooth in (False, True):
        cfg = dataclasses.replace(KT_TINY, smooth_origin=smooth)
        gen = kernel_transfer_networks(cfg, log_mtf=log_mtf, residual=False)[0]
        with torch.no_grad():
            out = gen(disc[None, None], [(0.5, 0.5)], [1], [0])[0, 0]
        centre[smooth] = float(out[118:138, 118:138].mean())
    assert abs(centre[True]) < 5.0
    assert abs(centre[False]) > abs(centre[True])


def test_harmonizer_noise_switch_seed_and_batch_size(tmp_path):
    path = _noise_model_file(tmp_path / "noise.safetensors")
    vol = np.stack([_phantom(64, 64, seed=s) for s in range(3)])
    h = Harmonizer.from_checkpoint(path, device="cpu", batch_size=2)
    one = h.harmonize(vol, (0.5, 0.5, 2.0), target="BONE", source="B30f")
    assert h.last_run["noise"] == "synthesized (seed 0)"
    mean = h.harmonize(vol, (0.5, 0.5, 2.0), target="BONE", source="B30f", noise=False)
    assert h.last_run["noise"] == "off"
    other = h.harmonize(vol, (0.5, 0.5, 2.0), target="BONE", source="B30f", noise_seed=1)
    single = Harmonizer.from_checkpoint(path, device="cpu", batch_size=1).harmonize(
        vol, (0.5, 0.5, 2.0), target="BONE", source="B30f")
    np.testing.assert_allclose(one, single, atol=1e-3)  # slice k: its own seed, any batches
    assert np.std(one - mean) > 5.0 and not np.array_equal(one, other)
    plain = Harmonizer.from_checkpoint(
        make_kernel_transfer_file(tmp_path / "plain.safetensors", iterations=10), device="cpu")
    plain.harmonize(vol, (0.5, 0.5, 2.0), target="BONE", source="B30f")
    assert plain.last_run["noise"] == "not in this model"


def _noisy_pair_group() -> PairedGroup:
    """Domain A: anatomy with white noise of SD 5 HU (an iterative reconstruction); domain B: the same plus
    independent white noise of SD 25 HU. Equal resolution: only the noise differs."""
    rng = np.random.default_rng(0)
    base = ndimage.gaussian_filter(rng.normal(0, 300, (6, 96, 96)), (0, 6, 6)) + 40
    a = base + rng.normal(0, 5, base.shape)
    b = a + rng.normal(0, 25, base.shape)
    return PairedGroup("noise", "simulated", SPACING, {"A": a.astype(np.int16), "B": b.astype(np.int16)})


def test_fitting_the_curves_restores_the_missing_noise():
    torch.manual_seed(0)
    cfg = dataclasses.replace(KT_NOISE, num_domains=2)
    gen = KernelTransferGenerator(cfg).eval()
    group = _noisy_pair_group()
    index = {"A": 0, "B": 1}
    fixed = PairSampler([group], index, 64, 0.0, 0.0, seed=3).batch(8)
    before = float(noise_fit_loss(gen, fixed, 8).detach())
    stats = fit_noise(gen, [group], index, crop=64, margin=8, real_fraction=0.0, steps=60, batch=4, lr=0.1)
    assert stats["loss_last"] < stats["loss_first"]
    assert float(noise_fit_loss(gen, fixed, 8).detach()) < 0.5 * before
    x = torch.from_numpy(group.series["A"][:1].astype(np.float32))[:, None]
    y = group.series["B"][0].astype(np.float32)
    with torch.no_grad():
        out = gen(x, [SPACING], [0], [1], seeds=[0])[0, 0].numpy()

    def hp_sd(v: np.ndarray) -> float:
        return float((v - ndimage.gaussian_filter(v, 2.0))[8:-8, 8:-8].std())

    gap = 1 - abs(hp_sd(out) - hp_sd(y)) / abs(hp_sd(x[0, 0].numpy()) - hp_sd(y))
    assert gap > 0.6


def test_cli_no_noise_writes_the_mean_image(tmp_path):
    pytest.importorskip("tqdm")  # the command line's progress bars
    import SimpleITK as sitk

    from TextureStarGANCore import cli

    model = _noise_model_file(tmp_path / "noise.safetensors")
    vol = np.stack([_phantom(64, 64, seed=s) for s in range(2)]).round().astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.5, 0.5, 2.0))
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    outs = {}
    for name, extra in (("noise", []), ("mean", ["--no-noise"])):
        out = tmp_path / f"{name}.nrrd"
        assert cli.main(["harmonize", str(tmp_path / "in.nrrd"), "--target", "BONE", "--source", "B30f",
                         "--output", str(out), "--model", str(model), *extra]) == 0
        outs[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(np.float32)
    mean = Harmonizer.from_checkpoint(model, device="cpu").harmonize(
        vol, (0.5, 0.5, 2.0), target="BONE", source="B30f", noise=False)
    np.testing.assert_allclose(outs["mean"], np.rint(mean), atol=1.0)
    assert np.std(outs["noise"] - outs["mean"]) > 5.0
