"""Kernel-transfer model files end to end: the file (round trip, refusals), the Harmonizer at native pixel
size (identity, smoothing, pixel sizes, source choice, warnings, cancel) and ``ctharmonize`` (info,
harmonize, ``--method filter``). The evaluation's ``CanvasHarmonizer`` is tested in test_evaluate.py, the
Slicer logic in test_slicer_logic.py and test_slicer_job.py."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from model_factory import KT_TINY, kernel_transfer_networks, make_kernel_transfer_file
from model_factory import rewrite_model_file as _rewrite

from TextureStarGANCore import cli
from TextureStarGANCore import model_file as mfile
from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS
from TextureStarGANCore.filter_method import FilterHarmonizer, model_linear_filter
from TextureStarGANCore.inference import HarmonizationCancelled, Harmonizer, PixelSizeWarning
from TextureStarGANCore.kernel_transfer import (
    HU_MAX,
    HU_MIN,
    KernelTransferConfig,
    KernelTransferGenerator,
    linear_transfer_filter,
)
from TextureStarGANCore.model_file import (
    KIND_KERNEL_TRANSFER,
    ModelFileError,
    instantiate,
    load_model_file,
    save_kernel_transfer_model,
)
from TextureStarGANCore.transfer_filter import TransferFilter
from TextureStarGANCore.volume_io import read_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py

DOMAINS = list(DEFAULT_SIMULATED_DOMAINS)  # B30f (Siemens), BONE (GE), STANDARD (GE)
TRAINING = {"data": "test", "iterations": 10, "texture_loss": False, "code_version": "test"}
SPACING = (0.7, 0.7, 2.0)
GE_STANDARD_TAGS = {"Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturerModelName": "LightSpeed 16",
                    "ConvolutionKernel": "STANDARD"}


@pytest.fixture(scope="module")
def kt_file(tmp_path_factory) -> Path:
    return make_kernel_transfer_file(tmp_path_factory.mktemp("kt") / "kt.safetensors", iterations=10)


@pytest.fixture(scope="module")
def harmonizer(kt_file) -> Harmonizer:
    return Harmonizer.from_checkpoint(kt_file, device="cpu", batch_size=2)


def chest(n: int = 4, rows: int = 64, cols: int = 64, seed: int = 0) -> np.ndarray:
    """Air, a soft-tissue ellipse with white noise, a lung, a bone and scanner padding, in HU (float32)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    body = ((yy - rows / 2) / (rows * 0.4)) ** 2 + ((xx - cols / 2) / (cols * 0.42)) ** 2 < 1
    lung = ((yy - rows / 2) / (rows * 0.2)) ** 2 + ((xx - cols * 0.35) / (cols * 0.1)) ** 2 < 1
    bone = (yy - rows / 2) ** 2 + (xx - cols * 0.68) ** 2 < (rows * 0.06) ** 2
    vol = np.full((n, rows, cols), -1000.0, dtype=np.float32)
    vol[:, body] = 40.0
    vol[:, lung] = -850.0
    vol[:, bone] = 1200.0
    vol += rng.normal(0, 40, vol.shape).astype(np.float32)
    vol[:, :3, :3] = -2000.0  # padding, clipped by the model to HU_MIN
    return vol


def hf_power(vol: np.ndarray, spacing_mm: float, above: float = 0.3) -> float:
    """Mean spectral power above ``above`` cycles/mm."""
    spec = np.abs(np.fft.rfft2(vol - vol.mean(axis=(-2, -1), keepdims=True))) ** 2
    fy = np.fft.fftfreq(vol.shape[-2], spacing_mm)[:, None]
    fx = np.fft.rfftfreq(vol.shape[-1], spacing_mm)[None, :]
    return float(spec[..., np.hypot(fx, fy) > above].mean())


# ------------------------------------------------------------------------------------------------ the file
def test_round_trip_gives_identical_outputs(tmp_path):
    gen, est = kernel_transfer_networks(seed=1)
    path = save_kernel_transfer_model(tmp_path / "m.safetensors", gen, est, DOMAINS, TRAINING,
                                      metrics={"psnr": 40.0}, supported_pixel_mm=(0.5, 0.9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # written atomically
    mf = load_model_file(path)
    assert mf.kind == KIND_KERNEL_TRANSFER and mf.config == KT_TINY and mf.trained
    assert mf.preprocessing is None and mf.domain_styles is None and mf.supported_pixel_mm == (0.5, 0.9)
    assert mf.domains == DOMAINS and sorted(mf.state_dicts) == ["generator", "source_estimator"]
    card = mf.card
    assert card["architecture"]["kind"] == "kernel_transfer" and card["metrics"] == {"psnr": 40.0}
    assert "preprocessing" not in card and "target_styles" not in card
    nets = instantiate(mf)
    assert not any(p.requires_grad for p in nets["generator"].parameters())
    x = torch.from_numpy(chest(2))[:, None]
    with torch.no_grad():
        for source, target in (([1, 2], [0, 0]), (torch.tensor([[0.2, 0.5, 0.3]] * 2), [2, 1])):
            assert torch.equal(nets["generator"](x, [(0.7, 0.7), (0.5, 0.6)], source, target),
                               gen(x, [(0.7, 0.7), (0.5, 0.6)], source, target))
        assert torch.equal(nets["source_estimator"](x, (0.7, 0.7)), est(x, (0.7, 0.7)))
    # The StarGAN v2 reader's expectations do not leak into this kind: no canvas, no styles.
    assert Harmonizer(mf, device="cpu").preprocessing is None


def _nan(ts: dict) -> None:
    ts["generator.convs.0.weight"][0, 0, 0, 0] = float("nan")


@pytest.mark.parametrize(
    ("card", "tensors", "digest", "messages"),
    [
        (None, lambda ts: ts.update({"generator.log_mtf": torch.zeros(3, 10)}), True,
         ["generator.log_mtf", "shape (3, 10)", "(3, 36)"]),
        (None, lambda ts: ts.pop("source_estimator.feature_std"), True,
         ["1 missing", "source_estimator.feature_std"]),
        (None, lambda ts: ts.update({"domain_styles": torch.zeros(3, 16)}), True,
         ["1 unexpected", "domain_styles"]),
        (None, _nan, True, ["non-finite", "generator.convs.0.weight"]),
        (None, lambda ts: ts["generator.embed"].mul_(2), False, ["checksum"]),
        (lambda c: c["architecture"].update(width=16), None, True,
         ["generator.convs.0.weight", "architecture needs (16, 2, 3, 3)"]),
        (lambda c: c["architecture"].update(kind="diffusion"), None, True,
         ["unknown model kind 'diffusion'", "update this software"]),
        (lambda c: c["architecture"].update(max_gain=0.5), None, True, ["architecture", "max_gain"]),
        (lambda c: c["architecture"].update(colour=1), None, True, ["unknown architecture field"]),
        (lambda c: c.pop("supported_pixel_mm"), None, True, ["missing field", "supported_pixel_mm"]),
        (lambda c: c.update(supported_pixel_mm=[1.0, 0.4]), None, True,
         ["supported_pixel_mm", "min <= max"]),
        (lambda c: c.update(supported_pixel_mm="0.4-1"), None, True, ["supported_pixel_mm"]),
        (lambda c: c["domains"].pop(), None, True, ["2 domains listed", "num_domains=3"]),
        (lambda c: c["training"].pop("code_version"), None, True, ["training.code_version"]),
        (lambda c: c.update(transfer_filters=[{"source": "BONE", "target": "B45f", "filter": {}}]), None,
         True, ["must name the model's domains"]),
        (lambda c: c.update(created="yesterday"), None, True, ["ISO date"]),
    ],
    ids=["shape", "missing", "styles", "nan", "digest", "width", "kind", "max_gain", "unknown_field",
         "no_pixel_range", "pixel_range_order", "pixel_range_type", "domains", "training", "filters",
         "created"],
)
def test_bad_files_are_refused_with_a_clear_message(kt_file, tmp_path, card, tensors, digest, messages):
    bad = _rewrite(kt_file, tmp_path / "bad.safetensors", card=card, tensors=tensors, digest=digest)
    with pytest.raises(ModelFileError) as info:
        load_model_file(bad)
    for m in messages:
        assert m.lower() in str(info.value).lower(), str(info.value)


def test_save_refuses_bad_input_and_writes_nothing(tmp_path):
    gen, est = kernel_transfer_networks()
    other = kernel_transfer_networks(KernelTransferConfig(num_domains=3, width=4, depth=3))[1]
    cases = [
        (dict(estimator=other), "different architectures"),
        (dict(estimator=gen), "SourceEstimator"),
        (dict(path=tmp_path / "m.pt"), ".safetensors"),
        (dict(supported_pixel_mm=(0.0, 1.0)), "supported_pixel_mm"),
        (dict(domains=DOMAINS[:2]), "2 domains listed"),
        (dict(training={"data": "x"}), "training.iterations"),
        (dict(metrics={"x": float("nan")}), "not valid JSON"),
    ]
    for change, message in cases:
        args = dict(path=tmp_path / "m.safetensors", generator=gen, estimator=est, domains=DOMAINS,
                    training=TRAINING) | change
        with pytest.raises(ModelFileError, match=message):
            save_kernel_transfer_model(**args)
    with torch.no_grad():
        gen.out.bias.fill_(float("inf"))
    with pytest.raises(ModelFileError, match="refusing to save"):
        save_kernel_transfer_model(tmp_path / "m.safetensors", gen, est, DOMAINS, TRAINING)
    assert list(tmp_path.iterdir()) == []


def test_stargan_writer_refuses_a_kernel_transfer_config(tmp_path):
    with pytest.raises(ModelFileError, match="save_kernel_transfer_model"):
        mfile.save_model_file(tmp_path / "m.safetensors", config=KT_TINY, weights={},
                              domain_styles=torch.zeros(3, 4), card={})


# ---------------------------------------------------------------------------------------------- harmonizer
def test_zero_residual_with_equal_mtfs_returns_the_clipped_input(tmp_path):
    # max_gain 8: the soft gain cap costs 8e-9 of the value at zero log gain (at 4 it is 2e-6, 0.002 HU at
    # 1000 HU: far below a stored HU step, but above this test's 1e-3 HU).
    config = KernelTransferConfig(num_domains=3, width=8, depth=3, max_gain=8.0)
    same = -(config.knots[1:].float() / 0.5) ** 2
    path = make_kernel_transfer_file(tmp_path / "id.safetensors", config=config, residual=False,
                                     log_mtf=same.expand(3, -1).clone())
    h = Harmonizer.from_checkpoint(path, device="cpu")
    vol = chest()
    vol[1, 10:14, 10:14] = 3500.0  # above HU_MAX: clipped
    for source, target in (("B30f", "BONE"), ("STANDARD", "STANDARD")):
        out = h.harmonize(vol, SPACING, target, source=source)
        assert out.dtype == vol.dtype and out.shape == vol.shape
        np.testing.assert_allclose(out, np.clip(vol, HU_MIN, HU_MAX), rtol=0, atol=1e-3)


def test_a_flat_zero_residual_keeps_flat_images_and_round_trips(tmp_path):
    # The same seeded weights with and without the option: without it the residual shifts a flat image (so
    # this test can fail), with it a flat interior comes back unchanged while textured input still changes.
    flat_cfg = KernelTransferConfig(num_domains=3, width=8, depth=3, max_gain=8.0, flat_zero_residual=True)
    plain_cfg = KernelTransferConfig(num_domains=3, width=8, depth=3, max_gain=8.0)
    same = -(flat_cfg.knots[1:].float() / 0.5) ** 2
    paths = {c.flat_zero_residual: make_kernel_transfer_file(tmp_path / f"{c.flat_zero_residual}.safetensors",
                                                             config=c, log_mtf=same.expand(3, -1).clone())
             for c in (flat_cfg, plain_cfg)}
    flat = np.stack([np.full((40, 40), v, np.float32) for v in (-1000.0, -850.0, 40.0, 900.0)])
    inner = (slice(None), slice(8, -8), slice(8, -8))  # the zero-padded border is not a flat image
    h = Harmonizer.from_checkpoint(paths[True], device="cpu")
    assert h._generator.config.flat_zero_residual
    plain = Harmonizer.from_checkpoint(paths[False], device="cpu")
    shift = plain.harmonize(flat, SPACING, "BONE", source="B30f") - flat
    assert np.abs(shift[inner]).max() > 1.0
    out = h.harmonize(flat, SPACING, "BONE", source="B30f")
    np.testing.assert_allclose(out[inner], flat[inner], rtol=0, atol=1e-2)
    vol = chest()
    changed = h.harmonize(vol, SPACING, "BONE", source="B30f") - np.clip(vol, HU_MIN, HU_MAX)
    assert np.abs(changed).mean() > 1.0


def test_the_flat_response_on_a_level_grid_matches_the_per_pixel_network():
    """The flat response is read from a table of levels (it was the per-pixel network, as slow as the
    residual itself); against the per-pixel form it must agree to 0.01 HU, random weights and FiLM."""
    from TextureStarGANCore.kernel_transfer import HU_SCALE, _flat_response

    torch.manual_seed(3)
    c = KernelTransferConfig(num_domains=3, width=24, depth=6)
    gen = KernelTransferGenerator(c)
    torch.nn.init.normal_(gen.out.weight, 0.0, 0.05)  # convolutions at their default init, FiLM and output
    torch.nn.init.normal_(gen.film.weight, 0.0, 0.1)  # random (they start at zero)
    film = gen.film(torch.randn(2, 2 * c.embed_dim)).view(2, c.depth - 1, 2, c.width, 1, 1)
    ramp = np.linspace(-1100.0, 3200.0, 64 * 64).reshape(64, 64)  # every level, a little beyond the clip
    level = torch.from_numpy(np.stack([chest(1)[0], ramp]).astype(np.float32))[:, None] / HU_SCALE
    h = torch.cat([level, level], 1)  # the per-pixel form: the network on a constant image, pixel by pixel
    for k, conv in enumerate(gen.convs):
        h = F.leaky_relu(F.conv2d(h, conv.weight.sum((2, 3), keepdim=True), conv.bias) * (1 + film[:, k, 0])
                         + film[:, k, 1], 0.2)
    exact = F.conv2d(h, gen.out.weight.sum((2, 3), keepdim=True), gen.out.bias)
    with torch.no_grad():
        table = _flat_response(gen.convs, gen.out, level, film)
    assert float(exact.abs().max()) * HU_SCALE > 10.0  # random weights respond strongly
    assert float((table - exact).abs().max()) * HU_SCALE < 0.01


def test_a_split_residual_runs_each_direction_through_its_own_network():
    config = KernelTransferConfig(num_domains=3, width=8, depth=3, split_residual=True)
    gen, _ = kernel_transfer_networks(config, seed=2)
    with torch.no_grad():  # the sharpening network at zero: sharpening directions are the linear transfer
        gen.out_up.weight.zero_()
        gen.out_up.bias.zero_()
    x = torch.from_numpy(chest(2))[:, None]
    eye = torch.eye(3)
    b30f, bone = (DOMAINS.index(d) for d in DOMAINS if d.name in ("B30f", "BONE"))
    with torch.no_grad():
        for src, tgt, sharpening in ((b30f, bone, True), (bone, b30f, False)):
            s, t = eye[[src, src]], eye[[tgt, tgt]]
            assert bool(gen.sharpening(s, t).all()) == sharpening
            x_lin = gen.linear(torch.clamp(x, HU_MIN, HU_MAX), [(0.7, 0.7)] * 2, s, t)
            res = gen.residual(torch.clamp(x, HU_MIN, HU_MAX), x_lin, s, t)
            assert (res.abs().max() == 0) == sharpening
        mixed = gen.residual(x, x, eye[[b30f, bone]], eye[[bone, b30f]])  # one batch, both networks
        assert mixed[0].abs().max() == 0 < mixed[1].abs().max()


def test_sharpening_follows_the_noise_power_not_the_mtf_tails():
    """A sharp kernel whose MTF ends at 0.8 cycles/mm (Philips L as fitted) against a smooth one with a faint
    tail: the tail's knots give a positive mean log gain, yet the transfer removes most of the noise."""
    config = KernelTransferConfig(num_domains=3, width=8, depth=3)
    gen, _ = kernel_transfer_networks(config, seed=0)
    f = config.knots[1:].float()
    with torch.no_grad():
        gen.log_mtf[0] = torch.where(f < 0.7, torch.log1p(2 * f), torch.tensor(-12.0))  # sharp, ends at 0.7
        gen.log_mtf[1] = torch.log(torch.exp(-(f / 0.35) ** 2) + 0.05)  # smooth, faint tail
    sharp, smooth = torch.tensor([0]), torch.tensor([1])
    assert gen.log_gain(torch.eye(3)[[0]], torch.eye(3)[[1]]).mean() > 0
    assert not gen.sharpening(sharp, smooth) and gen.sharpening(smooth, sharp)


def test_a_smoother_target_mtf_lowers_high_frequency_power(tmp_path):
    path = make_kernel_transfer_file(tmp_path / "lin.safetensors", residual=False)
    h = Harmonizer.from_checkpoint(path, device="cpu")
    vol = chest()
    smooth = h.harmonize(vol, SPACING, "B30f", source="BONE")  # f_c 0.9 -> 0.45 cycles/mm
    sharp = h.harmonize(vol, SPACING, "BONE", source="B30f")
    before = hf_power(vol, SPACING[0])
    assert hf_power(smooth, SPACING[0]) < 0.5 * before < 2 * before < hf_power(sharp, SPACING[0])
    body = slice(20, 44)
    assert abs(smooth[:, body, body].mean() - vol[:, body, body].mean()) < 5  # mean HU are kept


def test_two_pixel_sizes_non_square_integer_volume(harmonizer):
    vol = np.rint(chest(3, 64, 80)).astype(np.int16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeWarning)
        fine = harmonizer.harmonize(vol, (0.45, 0.45, 1.0), "B30f", source="BONE")
        coarse = harmonizer.harmonize(vol, (0.95, 0.9, 1.0), "B30f", source="BONE")
    assert fine.dtype == coarse.dtype == np.int16 and fine.shape == coarse.shape == vol.shape
    assert harmonizer.last_run["pixel_mm"] == [0.95, 0.9] and harmonizer.last_run["notes"] == []
    # The transfer is defined in cycles/mm: the same pixels mean different frequencies at the two sizes.
    assert not np.array_equal(fine, coarse)
    assert hf_power(fine.astype(float), 0.45) < hf_power(vol.astype(float), 0.45)


def test_deterministic_and_independent_of_the_batch_size(harmonizer):
    vol = chest(5)
    seen = []
    a = harmonizer.harmonize(vol, SPACING, "STANDARD", source="BONE", batch_size=1)
    b = harmonizer.harmonize(vol, SPACING, "STANDARD", source="BONE", batch_size=3,
                             progress=lambda d, t: seen.append((d, t)))
    c = harmonizer.harmonize(vol, SPACING, "STANDARD", source="BONE", batch_size=3)
    assert seen == [(3, 5), (5, 5)]
    np.testing.assert_array_equal(b, c)
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert not np.allclose(a, vol, atol=1.0)  # the model changed the image
    assert harmonizer.last_run["kind"] == "kernel_transfer" and harmonizer.last_run["slices"] == 5


def test_the_source_is_chosen_from_user_tags_or_estimate_and_recorded(harmonizer):
    vol = chest()
    user = harmonizer.harmonize(vol, SPACING, "B30f", source="BONE", tags=GE_STANDARD_TAGS)
    assert harmonizer.last_run["source"] == "BONE" and harmonizer.last_run["source_from"] == "user"
    tagged = harmonizer.harmonize(vol, SPACING, "B30f", tags=GE_STANDARD_TAGS)
    assert harmonizer.last_run["source"] == "STANDARD" and harmonizer.last_run["source_from"] == "tags"
    assert not np.array_equal(user, tagged)  # the source changes the output
    # A kernel the model does not know, of a vendor it has domains of: the nearest of the kernel's family.
    harmonizer.harmonize(vol, SPACING, "STANDARD",
                         tags={"Manufacturer": "SIEMENS", "ConvolutionKernel": "B70f"})
    assert harmonizer.last_run["source"] == "B30f"
    assert harmonizer.last_run["source_from"] == "kernel family of B70f (tags)"
    # No tags, or tags naming a kernel of no known family: estimated from the image.
    expected, probs = harmonizer.estimate_source(vol, SPACING)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3) and set(probs) == {d.name for d in DOMAINS}
    for tags in (None, {"Manufacturer": "TOSHIBA", "ConvolutionKernel": "FC13"}):
        estimated = harmonizer.harmonize(vol, SPACING, "B30f", tags=tags)
        run = harmonizer.last_run
        assert run["source"] == expected.name and run["source_probabilities"] == probs
        assert run["source_from"] == f"estimated from the image (p={probs[expected.name]:.2f})"
        # The most likely domain is used as a one-hot source.
        np.testing.assert_array_equal(estimated, harmonizer.harmonize(vol, SPACING, "B30f",
                                                                      source=expected.name))


def test_a_confident_estimator_picks_its_domain(tmp_path):
    gen, est = kernel_transfer_networks()
    with torch.no_grad():
        est.mlp[-1].bias.copy_(torch.tensor([0.0, 20.0, 0.0]))  # BONE, whatever the image
    path = save_kernel_transfer_model(tmp_path / "bone.safetensors", gen, est, DOMAINS, TRAINING)
    h = Harmonizer.from_checkpoint(path, device="cpu")
    h.harmonize(chest(20), SPACING, "STANDARD")
    assert h.last_run["source"] == "BONE" and h.last_run["source_from"] == "estimated from the image (p=1.00)"


def test_pixel_size_outside_the_supported_range_warns_and_runs(harmonizer):
    vol = chest(2)
    with pytest.warns(PixelSizeWarning, match=r"\(2 mm\) is outside the range this model supports \(0.4"):
        out = harmonizer.harmonize(vol, (2.0, 2.0, 2.0), "B30f", source="BONE")
    assert out.shape == vol.shape
    assert "0.4 to 1 mm" in harmonizer.last_run["notes"][0]
    with pytest.warns(PixelSizeWarning, match=r"0.3 x 0.5 mm"):
        harmonizer.harmonize(vol, (0.3, 0.5, 2.0), "B30f", source="BONE")


def test_reference_and_styles_are_refused(harmonizer):
    vol = chest(2)
    with pytest.raises(ValueError, match="kernel-transfer model.*no reference volume"):
        harmonizer.harmonize(vol, SPACING, "B30f", reference=(vol, SPACING))
    with pytest.raises(ValueError, match="StarGAN v2"):
        harmonizer.target_style("B30f")
    with pytest.raises(ValueError, match="positive numbers"):
        harmonizer.harmonize(vol, (0.7, 0.0, 1.0), "B30f")


def test_cancel_before_and_between_batches(harmonizer):
    vol = chest(6)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(HarmonizationCancelled, match="before it started"):
        harmonizer.harmonize(vol, SPACING, "B30f", source="BONE", cancel=cancel)
    cancel.clear()
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        cancel.set()

    with pytest.raises(HarmonizationCancelled, match="after 2 of 6"):
        harmonizer.harmonize(vol, SPACING, "B30f", source="BONE", cancel=cancel, progress=progress,
                             batch_size=2)
    assert seen == [2]


def test_validate_real_interface(harmonizer):
    """What Training.evaluation.validate_real uses: detect_source, resolve, domains, path, harmonize."""
    assert harmonizer.domains == ["B30f", "BONE", "STANDARD"] and harmonizer.path.name == "kt.safetensors"
    assert harmonizer.detect_source({"ConvolutionKernel": "BONE", "Manufacturer": "GE"}).name == "BONE"
    assert harmonizer.resolve("STANDARD").id == 2
    out = harmonizer.harmonize(chest(2), SPACING, target="STANDARD", source="BONE",
                               progress=lambda d, t: None)
    assert out.shape == (2, 64, 64) and harmonizer.kind == "kernel_transfer"
    assert harmonizer.supported_pixel_mm == (0.4, 1.0)


# --------------------------------------------------------------------------------------- linear part/filter
def test_the_linear_part_as_a_transfer_filter(tmp_path, kt_file):
    mf = load_model_file(kt_file)
    gen = instantiate(mf)["generator"]
    f = linear_transfer_filter(gen, 1, 0)
    with torch.no_grad():
        lg = gen.log_gain(torch.eye(3)[[1]], torch.eye(3)[[0]])[0].double().numpy()
    np.testing.assert_allclose(f.freq_per_mm, KT_TINY.knots.numpy())
    np.testing.assert_allclose(f.gain, np.exp(lg), rtol=1e-6)
    assert f.gain[0] == pytest.approx(1.0, abs=1e-4) and f.gain[-1] < 0.1  # BONE -> B30f smooths
    # Applied by TransferFilter it matches the generator's linear part (no residual) closely.
    path = make_kernel_transfer_file(tmp_path / "lin.safetensors", residual=False)
    vol = chest(2)
    by_model = Harmonizer.from_checkpoint(path, device="cpu").harmonize(vol, SPACING, "B30f", source="BONE")
    lin = load_model_file(path)
    bone, b30f = lin.domains[1], lin.domains[0]
    by_filter = model_linear_filter(lin, bone, b30f).apply(np.clip(vol, HU_MIN, HU_MAX), SPACING[:2])
    assert np.abs(by_model - by_filter).mean() < 2.0
    with pytest.raises(ValueError, match="out of range"):
        linear_transfer_filter(gen, 0, 3)


def test_filter_harmonizer_prefers_the_cards_fitted_filter(tmp_path):
    blur = TransferFilter(np.array([0.0, 2.0]), np.array([1.0, 0.5]), "fitted")
    path = make_kernel_transfer_file(tmp_path / "f.safetensors", transfer_filters=[
        {"source": "BONE", "target": "B30f", "filter": blur.to_dict(), "fitted_on": "test"}])
    mf = load_model_file(path)
    b30f, bone, std = mf.domains
    fitted = FilterHarmonizer(mf, bone, b30f)
    assert fitted.filter_origin is None and fitted.filter.description == "fitted"
    fallback = FilterHarmonizer(mf, std, b30f)
    assert "model's own linear transfer STANDARD -> B30f" in fallback.filter_origin
    np.testing.assert_allclose(fallback.filter.gain, model_linear_filter(mf, std, b30f).gain)


# --------------------------------------------------------------------------------------------------- CLI
@pytest.fixture()
def cli_deps():
    """The command line draws progress with tqdm, which the Python 3.9 engine environment (the Slicer
    bundle's dependencies, test_bundled_python39.py) does not have."""
    pytest.importorskip("tqdm")


def run(*args: str | Path) -> int:
    return cli.main([str(a) for a in args])


def nifti(path: Path, spacing=(0.7, 0.7, 2.0), n: int = 3) -> Path:
    img = sitk.GetImageFromArray(np.rint(chest(n)).astype(np.int16))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.usefixtures("cli_deps")
def test_cli_info_prints_kind_domains_and_pixel_range(kt_file, capsys):
    assert run("info", "--model", kt_file) == 0
    out = capsys.readouterr().out
    assert "kind: kernel transfer" in out and "supported pixel size: 0.4 to 1 mm" in out
    assert "canvas" not in out.split("model card:")[0]
    for d in DOMAINS:
        assert d.name in out and d.scanner_model in out
    assert "every other pair: the model's own linear transfer" in out
    assert '"kind": "kernel_transfer"' in out


@pytest.mark.usefixtures("cli_deps")
def test_cli_harmonize_estimates_the_source_of_a_file_without_tags(kt_file, tmp_path, capsys):
    src = nifti(tmp_path / "in.nii.gz")
    out = tmp_path / "out.nii.gz"
    assert run("harmonize", src, "--target", "B30f", "--output", out, "--model", kt_file) == 0
    err = capsys.readouterr().err
    assert "no DICOM tags tell the input's kernel; the source kernel is estimated from the image" in err
    assert "source kernel estimated from the image -> B30f" in err
    assert "source kernel: " in err and "(estimated from the image (p=" in err and "warning" not in err
    a, b = read_volume(src), read_volume(out)
    assert b.shape == a.shape and b.stored_dtype == np.int16 and not np.array_equal(a.hu, b.hu)
    assert b.spacing == pytest.approx(a.spacing)


@pytest.mark.usefixtures("cli_deps")
def test_cli_harmonize_user_source_and_pixel_warning(kt_file, tmp_path, capsys):
    src = nifti(tmp_path / "in.nrrd", spacing=(2.0, 2.0, 3.0), n=2)
    out = tmp_path / "out.nrrd"
    assert run("harmonize", src, "--target", "STANDARD", "--source", "BONE", "--output", out,
               "--model", kt_file) == 0
    err = capsys.readouterr().err
    assert "warning: the input's pixel size (2 mm) is outside the range this model supports (0.4 to 1 mm)" \
        in err
    assert "source kernel: BONE (given with --source)" in err and "BONE -> STANDARD" in err
    assert "PixelSizeWarning" not in err  # printed once, as a plain warning line
    assert out.is_file()


@pytest.mark.usefixtures("cli_deps")
def test_cli_harmonize_dicom_source_from_tags(kt_file, ct_small_path, tmp_path, capsys):
    out = tmp_path / "o"
    assert run("harmonize", ct_small_path, "--target", "BONE", "--output", out, "--model", kt_file) == 0
    err = capsys.readouterr().err
    assert "STANDARD -> BONE" in err and "source kernel: STANDARD (from the DICOM tags)" in err
    assert "BONE" in read_volume(out).tags.get("SeriesDescription", "")


@pytest.mark.usefixtures("cli_deps")
def test_cli_refuses_an_untrained_kernel_transfer_model(tmp_path, capsys):
    path = make_kernel_transfer_file(tmp_path / "u.safetensors", iterations=0)
    rc = run("harmonize", nifti(tmp_path / "in.nii.gz"), "--target", "B30f", "--output", tmp_path / "o.nrrd",
             "--model", path)
    assert rc == cli.EXIT_BAD_INPUT and "untrained" in capsys.readouterr().err


@pytest.mark.usefixtures("cli_deps")
def test_cli_method_filter_falls_back_to_the_models_linear_part(kt_file, ct_small_path, tmp_path, capsys):
    out = tmp_path / "f.nrrd"
    rc = run("harmonize", ct_small_path, "--target", "B30f", "--method", "filter", "--model", kt_file,
             "--output", out)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "the model's own linear transfer STANDARD -> B30f" in err and "source kernel:" not in err
    mf = load_model_file(kt_file)
    src, res = read_volume(ct_small_path), read_volume(out)
    expected = model_linear_filter(mf, mf.domains[2], mf.domains[0]).apply(src.hu, src.spacing[:2])
    assert np.abs(res.hu - expected).max() <= 1.0  # integer storage rounds
    # Without a known source the filter cannot be chosen.
    rc = run("harmonize", nifti(tmp_path / "in.nii.gz"), "--target", "B30f", "--method", "filter",
             "--model", kt_file, "--output", tmp_path / "g.nrrd")
    assert rc == cli.EXIT_BAD_INPUT and "--method filter needs" in capsys.readouterr().err


@pytest.mark.usefixtures("cli_deps")
def test_cli_takes_the_kernel_family_of_an_unknown_kernel_for_both_methods(kt_file, ct_small_path, tmp_path,
                                                                          capsys):
    import pydicom

    src = tmp_path / "in"  # CT_small as a 3-slice GE series with BONEPLUS, not a kernel of the model
    src.mkdir()
    uid = pydicom.uid.generate_uid()
    for i in range(3):
        ds = pydicom.dcmread(ct_small_path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, pydicom.uid.generate_uid(), i + 1
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [5.0 * i]
        ds.Manufacturer, ds.ConvolutionKernel = "GE MEDICAL SYSTEMS", "BONEPLUS"
        ds.save_as(src / f"s{i}.dcm", enforce_file_format=True)
    assert run("harmonize", src, "--target", "B30f", "--output", tmp_path / "m.nrrd", "--model", kt_file) == 0
    err = capsys.readouterr().err
    assert "the nearest of its vendor's kernel family, BONE, is used" in err
    assert "source kernel: BONE (kernel family of BONEPLUS (tags))" in err
    assert run("harmonize", src, "--target", "B30f", "--output", tmp_path / "f.nrrd", "--model", kt_file,
               "--method", "filter") == 0
    assert "kernel family, BONE" in capsys.readouterr().err
    assert run("harmonize", src, "--target", "BONE", "--output", tmp_path / "b.nrrd", "--model", kt_file) == 0
    assert "the nearest of the input kernel's family is the target BONE" in capsys.readouterr().err
