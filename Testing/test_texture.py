"""Tests of the multi-scale texture loss: exact closed form, GLCM conventions, gradients,
aggregation constraints, batch independence, mixed precision."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.feature import graycomatrix, graycoprops

from TextureStarGANCore.texture import (
    MultiScaleTextureExtractor,
    TextureAggregation,
    TextureLoss,
    explicit_contrast_grid,
    glcm_offset,
    soft_glcm,
)

DISTANCES = (1, 3, 5, 7)
ANGLES = (0, 45, 90, 135)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: on a shared 2-core machine, a second thread only adds synchronisation waits.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gaussian_blur(x: torch.Tensor, sd: float) -> torch.Tensor:
    r = int(math.ceil(3 * sd))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sd**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def _power_law_noise(size: int, exponent: float, gen: torch.Generator) -> torch.Tensor:
    """Noise with power spectrum ~ 1/f^exponent (0 white, 1 pink, 2 brown), scaled to SD 0.25."""
    white = torch.randn(size, size, generator=gen, dtype=torch.float64)
    fy = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(size, dtype=torch.float64)[None, :]
    f = torch.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    img = torch.fft.ifft2(torch.fft.fft2(white) / f ** (exponent / 2)).real
    img = img - img.mean()
    return (0.25 * img / img.std()).view(1, 1, size, size)


def _structured_images(size: int = 20) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    r = torch.arange(size, dtype=torch.float64)[:, None]
    c = torch.arange(size, dtype=torch.float64)[None, :]
    imgs = {
        "uniform_random": torch.rand(1, 1, size, size, generator=gen, dtype=torch.float64) * 2 - 1,
        "vertical_stripes": (0.6 * torch.cos(math.pi * c / 2) + 0 * r).view(1, 1, size, size),
        "horizontal_stripes": (0.5 * ((r // 3) % 2) - 0.2 + 0 * c).view(1, 1, size, size),
        "diagonal_stripes": (0.7 * torch.sin(2 * math.pi * (r + c) / 5)).view(1, 1, size, size),
        "checkerboard": (0.8 * ((r + c) % 2) - 0.4).view(1, 1, size, size),
        "white_noise": _power_law_noise(size, 0.0, gen),
        "pink_noise": _power_law_noise(size, 1.0, gen),
        "brown_noise": _power_law_noise(size, 2.0, gen),
        "blurred_noise": _gaussian_blur(torch.randn(1, 1, size, size, generator=gen).double(), 1.5),
        # Air background at the range end plus values outside the range (generator outputs are unbounded).
        "ct_like_edges": torch.where(
            (r - size / 2) ** 2 + (c - size / 2) ** 2 < (size / 3) ** 2,
            0.1 * torch.randn(size, size, generator=gen, dtype=torch.float64) - 0.3,
            torch.full((size, size), -1.0, dtype=torch.float64),
        ).view(1, 1, size, size)
        * 1.05,
        "constant": torch.full((1, 1, size, size), 0.3, dtype=torch.float64),
    }
    return imgs


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


# --- conventions -------------------------------------------------------------------------------------------


def test_offsets_follow_eqs_6_7_with_columns_as_u() -> None:
    # (row, col) displacement: theta = 0 along columns, 90 down the rows, rounded to whole pixels.
    assert glcm_offset(1, 0) == (0, 1)
    assert glcm_offset(1, 90) == (1, 0)
    assert glcm_offset(3, 45) == (2, 2)
    assert glcm_offset(5, 135) == (4, -4)
    assert glcm_offset(7, 45) == (5, 5)


@pytest.mark.parametrize("levels", [8, 256])
def test_soft_glcm_with_small_sigma_equals_scikit_image_glcm(levels: int) -> None:
    # On images whose values sit on bin centres, a sigma of 0.1 bin leaks exp(-50) ~ 2e-22 into neighbour
    # bins: the soft GLCM is the hard one. Comparing whole matrices pins down the pair direction of every
    # offset (contrast alone is symmetric) and that pairs leaving the image are dropped, not wrapped.
    rng = np.random.default_rng(0)
    q = rng.integers(0, levels, size=(13, 17)).astype(np.uint8)
    width = 2.0 / (levels - 1)
    x = torch.from_numpy(-1.0 + q * width).view(1, 1, 13, 17)
    ref = graycomatrix(q, list(DISTANCES), [math.radians(a) for a in ANGLES], levels=levels, normed=True)
    for (i, d), (j, a) in itertools.product(enumerate(DISTANCES), enumerate(ANGLES)):
        g = soft_glcm(x, d, a, levels, 0.1 * width)[0].numpy()
        np.testing.assert_allclose(g, ref[:, :, i, j], rtol=0, atol=1e-12, err_msg=f"d={d} angle={a}")


@pytest.mark.parametrize("levels", [16, 256])
def test_contrast_matches_scikit_image_on_quantized_images(levels: int) -> None:
    # Fast path in float32 vs graycoprops contrast. Tolerance 1e-5 relative: with sigma = 0.1 bin the soft
    # assignment is hard to exp(-50); what remains is float32 rounding of the moments (~1e-7).
    rng = np.random.default_rng(1)
    q = rng.integers(0, levels, size=(2, 40, 36)).astype(np.uint8)
    width = 2.0 / (levels - 1)
    x = torch.from_numpy(-1.0 + q * width).float().unsqueeze(1)
    ext = MultiScaleTextureExtractor(DISTANCES, ANGLES, levels=levels, sigma=0.1 * width)
    grid = ext(x)
    for b in range(2):
        m = graycomatrix(q[b], list(DISTANCES), [math.radians(a) for a in ANGLES], levels=levels, normed=True)
        ref = torch.from_numpy(graycoprops(m, "contrast"))
        assert _relerr(grid[b], ref) < 1e-5


# --- closed form == explicit --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_structured_images()))
def test_closed_form_equals_explicit_soft_glcm_every_cell(name: str) -> None:
    x = _structured_images()[name]
    explicit = explicit_contrast_grid(x)  # float64 reference, default sigma, 256 levels
    fast = MultiScaleTextureExtractor()(x.float())  # float32 input as in training
    assert fast.shape == (1, 4, 4) and fast.dtype == torch.float32
    assert _relerr(fast, explicit) < 1e-5, name


@pytest.mark.parametrize(
    ("levels", "sigma", "value_range"),
    [(32, 0.2, (0.0, 1.0)), (64, 0.004, (-1.0, 1.0)), (256, 3.0 * 2 / 255, (-1.0, 1.0))],
)
def test_closed_form_equals_explicit_other_binnings(levels: int, sigma: float, value_range) -> None:
    # A wide sigma (window = every bin), a sigma below one bin, and a wider-than-default one.
    gen = torch.Generator().manual_seed(7)
    lo, hi = value_range
    x = lo + (hi - lo) * torch.rand(2, 1, 20, 23, generator=gen, dtype=torch.float64)
    explicit = explicit_contrast_grid(x, levels=levels, sigma=sigma, value_range=value_range)
    ext = MultiScaleTextureExtractor(levels=levels, sigma=sigma, value_range=value_range)
    assert _relerr(ext(x.float()), explicit) < 1e-5
    assert _relerr(ext(x), explicit) < 1e-10  # float64 path: the support truncation is ~1e-12


# --- signal, gradients -------------------------------------------------------------------------------------


def test_every_cell_changes_with_the_image_and_has_a_gradient() -> None:
    gen = torch.Generator().manual_seed(11)
    x = _gaussian_blur(0.2 * torch.randn(1, 1, 48, 48, generator=gen), 1.0).requires_grad_(True)
    ext = MultiScaleTextureExtractor()
    grid = ext(x)
    # Not the collapsed constant (L^2 - 1) / 6 of a uniform GLCM, and cells differ from each other.
    assert not torch.allclose(grid, torch.full_like(grid, (256**2 - 1) / 6), rtol=1e-3)
    assert grid.flatten().unique().numel() == 16
    x2 = x.detach() + 0.02 * torch.randn(x.shape, generator=gen)
    changed = (ext(x2) - grid.detach()).abs() / grid.detach()
    assert bool((changed > 1e-4).all()), changed
    for i, j in itertools.product(range(4), range(4)):
        (g,) = torch.autograd.grad(grid[0, i, j], x, retain_graph=True)
        assert torch.isfinite(g).all() and float(g.abs().sum()) > 0, (i, j)


def test_gradcheck_closed_form_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(1, 1, 7, 8, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    ext = MultiScaleTextureExtractor(distances=(1, 3), levels=16)
    assert torch.autograd.gradcheck(ext, (x,))
    wide = MultiScaleTextureExtractor(distances=(1, 2), levels=8, sigma=0.4)
    assert torch.autograd.gradcheck(wide, (x,))


def test_gradcheck_explicit_soft_glcm_float64() -> None:
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(1, 1, 6, 5, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: soft_glcm(z, 2, 45, 5, 0.3), (x,))


def test_closed_form_gradient_equals_explicit_gradient() -> None:
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(1, 1, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    weights = torch.rand(1, 4, 4, generator=gen, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad((explicit_contrast_grid(x, levels=64) * weights).sum(), x)
    (g_fast,) = torch.autograd.grad((MultiScaleTextureExtractor(levels=64)(x) * weights).sum(), x)
    # Agreement to the support truncation (neglected tail ~ 7^3 exp(-24.5) ~ 1e-8), not float64 epsilon.
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-6, atol=1e-9)


def _equal_variance_textures(size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    sharp = torch.randn(1, 1, size, size, generator=gen)
    smooth = _gaussian_blur(torch.randn(1, 1, size, size, generator=gen), 2.0)
    sharp = 0.08 * sharp / sharp.std()
    smooth = 0.08 * smooth / smooth.std()
    return sharp, smooth


def test_sharp_and_smooth_kernel_textures_give_clearly_different_grids() -> None:
    sharp, smooth = _equal_variance_textures()
    ext = MultiScaleTextureExtractor()
    t_sharp, t_smooth = ext(sharp)[0], ext(smooth)[0]
    # Same variance, so only texture separates them: white noise decorrelates at once (flat over d),
    # smooth noise has a small contrast at d = 1 that grows with distance.
    assert bool((t_sharp[0] > 5 * t_smooth[0]).all())
    assert float(t_sharp.max() / t_sharp.min()) < 1.3
    assert bool((t_smooth[1:] > t_smooth[:-1]).all())


def test_default_sigma_keeps_texture_contrast_and_a_wide_sigma_blurs_it() -> None:
    # Why sigma = one bin: inside the range the soft contrast is the continuous-valued contrast + 2 bins^2,
    # so equal-variance textures keep their hard-GLCM ratio; sigma = 0.5 (~64 bins) squashes it (pitfall).
    sharp, smooth = _equal_variance_textures()
    width = 2 / 255
    hard = (sharp[..., :, 1:] - sharp[..., :, :-1]).pow(2).mean() / width**2
    soft = MultiScaleTextureExtractor()(sharp)[0, 0, 0]
    assert abs(float(soft) - (float(hard) + 2.0)) / float(hard) < 1e-3
    ratio_default = MultiScaleTextureExtractor()(sharp)[0, 0] / MultiScaleTextureExtractor()(smooth)[0, 0]
    wide = MultiScaleTextureExtractor(sigma=0.5)
    ratio_wide = wide(sharp)[0, 0] / wide(smooth)[0, 0]
    assert bool((ratio_default > 5).all()) and bool((ratio_wide < 1.5).all())


# --- aggregation and loss ----------------------------------------------------------------------------------


def test_loss_is_zero_for_identical_images_and_grows_with_mismatch() -> None:
    gen = torch.Generator().manual_seed(12)
    x = _gaussian_blur(0.2 * torch.randn(2, 1, 48, 48, generator=gen), 1.0)
    noise = torch.randn(x.shape, generator=gen)
    loss = TextureLoss()
    with torch.no_grad():
        assert float(loss(x, x.clone())) == 0.0
        values = [float(loss(x, x + a * noise)) for a in (0.005, 0.02, 0.05, 0.1)]
    assert all(b > a > 0 for a, b in zip(values, values[1:])), values  # noqa: B905 (runs on Python 3.9 too)


def test_aggregation_parameters_receive_gradients_and_stats_are_exposed() -> None:
    gen = torch.Generator().manual_seed(13)
    x = _gaussian_blur(0.2 * torch.randn(2, 1, 40, 40, generator=gen), 1.0)
    x_rec = (x + 0.05 * torch.randn(x.shape, generator=gen)).requires_grad_(True)
    loss = TextureLoss()
    value = loss(x, x_rec)
    value.backward()
    params = dict(loss.aggregation.named_parameters())
    assert set(params) == {"query.weight", "query.bias", "key.weight", "key.bias", "value_raw", "gamma_raw"}
    for name, p in params.items():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert float(x_rec.grad.abs().sum()) > 0
    stats = loss.stats()
    assert 0 < stats["gamma"] < 1 and 0 < stats["value_weight"] < 1
    assert 0 <= stats["attention_entropy"] <= stats["attention_entropy_max"] + 1e-6
    assert stats["delta_mean"] > 0
    # The aggregation's own step: gradients reach its parameters only, never the images.
    for p in params.values():
        p.grad = None
    x_rec.grad = None
    loss.aggregation_objective().backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in params.values())
    assert x_rec.grad is None


def test_degenerate_direction_is_blocked() -> None:
    # Fixed Delta T; minimising L_txt over the aggregation parameters alone can never go below sum(Delta T),
    # and maximising it (the aggregation's objective) stays below (1 + gamma_max * p * q) * sum(Delta T).
    gen = torch.Generator().manual_seed(14)
    delta = torch.rand(3, 4, 4, generator=gen) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)
    floor = delta.sum(dim=(1, 2))
    for sign in (1.0, -1.0):
        agg = TextureAggregation()
        opt = torch.optim.Adam(agg.parameters(), lr=0.3)
        first = agg(delta).detach()
        for _ in range(60):
            opt.zero_grad()
            per_sample = agg(delta)
            assert bool((per_sample >= floor * (1 - 1e-6)).all())
            assert bool((per_sample <= floor * (1 + agg.gamma_max * 16) * (1 + 1e-6)).all())
            (sign * per_sample.mean()).backward()
            opt.step()
        last = agg(delta).detach()
        if sign > 0:  # minimised: approaches the floor, never crosses it
            assert bool((last < first).all()) and bool((last >= floor * (1 - 1e-6)).all())
            assert float(agg.gamma.detach()) < 0.02
        else:  # maximised: the attention is trained and gamma grows
            assert bool((last > first).all()) and float(agg.gamma.detach()) > 0.5


def test_batch_independence() -> None:
    gen = torch.Generator().manual_seed(15)
    x = _gaussian_blur(0.2 * torch.randn(3, 1, 40, 40, generator=gen), 1.0)
    y = x.clone()
    y[1] = 0.3 * torch.randn(1, 40, 40, generator=gen)
    ext = MultiScaleTextureExtractor()
    gx, gy = ext(x), ext(y)
    torch.testing.assert_close(gy[[0, 2]], gx[[0, 2]], rtol=1e-6, atol=0)
    assert not torch.allclose(gy[1], gx[1])
    # Each sample's grid equals the one computed alone, and the loss is the mean of per-sample losses.
    for i in range(3):
        torch.testing.assert_close(ext(x[i : i + 1])[0], gx[i], rtol=1e-6, atol=0)
    loss = TextureLoss()
    x_rec = x + 0.05 * torch.randn(x.shape, generator=gen)
    singles = torch.stack([loss(x[i : i + 1], x_rec[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(loss(x, x_rec), singles.mean(), rtol=1e-6, atol=0)


def test_bf16_autocast_computes_in_float32() -> None:
    gen = torch.Generator().manual_seed(16)
    x = _gaussian_blur(0.2 * torch.randn(2, 1, 32, 32, generator=gen), 1.0)
    x_rec = (x + 0.05 * torch.randn(x.shape, generator=gen)).to(torch.bfloat16)
    loss = TextureLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grid = loss.extractor(x_rec)
        value = loss(x, x_rec)
    assert grid.dtype == torch.float32 and value.dtype == torch.float32
    torch.testing.assert_close(grid, loss.extractor(x_rec.float()), rtol=1e-6, atol=0)
    torch.testing.assert_close(value, loss(x, x_rec.float()), rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(17)
    x = _gaussian_blur(0.2 * torch.randn(2, 1, 64, 64, generator=gen), 1.0)
    x_rec = x + 0.05 * torch.randn(x.shape, generator=gen)
    loss = TextureLoss()
    cpu = loss(x, x_rec)
    gpu = loss.cuda()(x.cuda(), x_rec.cuda().requires_grad_(True))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=0)
    gpu.backward()


# --- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_rejected_clearly_and_input_untouched() -> None:
    ext = MultiScaleTextureExtractor()
    x = torch.zeros(2, 1, 32, 32)
    before = x.clone()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        ext(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="no pixel pairs"):
        ext(torch.zeros(1, 1, 5, 40))
    with pytest.raises(ValueError, match="floating-point"):
        ext(torch.zeros(1, 1, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="levels"):
        MultiScaleTextureExtractor(levels=1)
    with pytest.raises(ValueError, match="sigma"):
        MultiScaleTextureExtractor(sigma=0.0)
    with pytest.raises(ValueError, match="value_range"):
        MultiScaleTextureExtractor(value_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="distances"):
        MultiScaleTextureExtractor(distances=(0, 1))
    with pytest.raises(ValueError, match="same shape"):
        TextureLoss()(x, torch.zeros(2, 1, 32, 30))
    with pytest.raises(ValueError, match="Delta T must have shape"):
        TextureAggregation()(torch.zeros(2, 3, 4))
    ext(x)
    TextureLoss()(x, x)
    assert torch.equal(x, before)
