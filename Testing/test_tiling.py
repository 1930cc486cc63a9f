"""Tiled generator inference (``run_generator_tiled``) and the card's ``preprocessing.tile_size``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_factory import make_model_file

from TextureStarGANCore import Harmonizer
from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.inference import run_generator_tiled, tile_starts, tile_window
from TextureStarGANCore.model_file import instantiate, load_model_file
from TextureStarGANCore.networks import build_networks
from TextureStarGANCore.preprocessing import PreprocessSpec
from Training.evaluation.metrics.harmonize import CanvasHarmonizer
from Training.trainer import export

TINY = ModelConfig.small(img_size=64, base_width=8, max_width=32, style_dim=16, mapping_hidden=32)
SPEC_128 = PreprocessSpec(canvas_size=128, pixel_spacing_mm=4.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def tiled_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiled.safetensors"
    spec = PreprocessSpec(canvas_size=128, pixel_spacing_mm=4.0, tile_size=64)
    return make_model_file(path, config=TINY, spec=spec)


def smooth_canvases(n: int = 2, size: int = 128, seed: int = 0) -> torch.Tensor:
    """Smooth body-like canvases with mild noise in [-1, 1], (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.where(yy**2 + (xx / 0.9) ** 2 < 0.7, -0.3 + 0.2 * xx, torch.tensor(-1.0))
    return (base + 0.02 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1)


class Identity(torch.nn.Module):
    def forward(self, x, s):
        return x


class PerPixel(torch.nn.Module):
    """1x1 convolution modulated by the style: no spatial context, so tiling cannot change it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x, s):
        return torch.tanh(self.conv(x) * (1 + s.mean(1).view(-1, 1, 1, 1)))


def test_tile_starts_cover_the_canvas_and_window_is_positive():
    assert tile_starts(128, 64, 32) == [0, 32, 64]
    assert tile_starts(112, 32, 24) == [0, 24, 48, 72, 80]  # last tile moved back to end at the border
    assert tile_starts(64, 64, 32) == [0]
    with pytest.raises(ValueError, match="tile"):
        tile_starts(32, 64, 32)
    w = tile_window(64)
    assert w.min() > 0 and torch.allclose(w, w.T)
    # Periodic Hann: windows half a tile apart sum to a constant (a pure cross-fade).
    pair = (w[0, :32] + w[0, 32:]).numpy()
    np.testing.assert_allclose(pair, np.full(32, pair[0]), rtol=1e-5)


@pytest.mark.parametrize(("size", "tile", "stride"), [(128, 32, 16), (112, 32, 24), (96, 64, None)])
def test_identity_generator_returns_the_canvas_borders_included(size, tile, stride):
    x = smooth_canvases(3, size)
    out = run_generator_tiled(Identity(), x, torch.zeros(1, 4), tile, stride, batch=7)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., 0, :], x[..., 0, :], atol=1e-6, rtol=0)  # borders: one tile each
    torch.testing.assert_close(out[..., :, -1], x[..., :, -1], atol=1e-6, rtol=0)


def test_per_pixel_generator_gives_the_whole_canvas_result():
    gen = PerPixel()
    x = smooth_canvases(2, 128, seed=3)
    style = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))  # per-canvas styles
    with torch.no_grad():
        whole = run_generator_tiled(gen, x, style, None)
        tiled = run_generator_tiled(gen, x, style, 32, batch=5)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    assert whole.std() > 0.05  # not a constant output


class InstanceNormNet(torch.nn.Module):
    """A seeded random conv net with instance norm: each tile gets its own statistics, so plain stitching
    of tiles leaves visible steps (the StarGAN generator's untrained output is too busy to show them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect"), torch.nn.InstanceNorm2d(8),
            torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(8, 1, 3, padding=1, padding_mode="reflect"))

    def forward(self, x, s):
        return self.net(x)


def _column_jumps(img: torch.Tensor) -> torch.Tensor:
    """Mean |difference| between neighbouring columns inside the body (index j: columns j and j+1)."""
    body = img[..., 20:108, :]
    return (body[..., 1:] - body[..., :-1]).abs().mean(dim=(0, 1, 2))


def _seam_ratio(img: torch.Tensor, edge: int) -> float:
    """Jump across columns edge | edge+1 over the jumps just beside it (1 = no seam)."""
    j = _column_jumps(img)
    return float(j[edge] / ((j[edge - 1] + j[edge + 1]) / 2))


def test_random_generator_tiles_are_deterministic(tiled_model):
    gen = instantiate(load_model_file(tiled_model))["generator"]
    x = smooth_canvases(2, 128, seed=5)
    style = torch.randn(1, TINY.style_dim, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a = run_generator_tiled(gen, x, style, 64)
        again = run_generator_tiled(gen, x, style, 64)
        b = run_generator_tiled(gen, x, style, 64, batch=3)  # other batching, same numbers
        whole = run_generator_tiled(gen, x, style, None)
    torch.testing.assert_close(a, again, atol=0, rtol=0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - whole).abs().max() > 1e-3  # instance norm does see the tiles: tiling matters


def test_blended_tiles_leave_no_seams():
    gen = InstanceNormNet()
    x = smooth_canvases(2, 128, seed=5)
    with torch.inference_mode():
        blended = run_generator_tiled(gen, x, torch.zeros(1, 4), 64)
        hard = run_generator_tiled(gen, x, torch.zeros(1, 4), 64, stride=64)  # no overlap: plain stitching
    assert _seam_ratio(hard, 63) > 3.0  # the check can fail: stitching leaves a step at the tile edge
    for edge in (31, 63, 95):  # every tile edge of the blended result (tiles start at 0, 32, 64)
        assert _seam_ratio(blended, edge) < 1.5, edge
        assert _seam_ratio(blended.transpose(-1, -2), edge) < 1.5, edge


def test_harmonizer_runs_tiles_and_identity_stays_exact(tiled_model, monkeypatch):
    h = Harmonizer.from_checkpoint(tiled_model, device="cpu", batch_size=2)
    assert h.preprocessing.tile_size == 64
    rng = np.random.default_rng(0)
    vol = np.full((3, 90, 100), -1000.0, np.float32)
    vol[:, 15:75, 10:90] = 40.0
    vol += rng.normal(0, 20, vol.shape).astype(np.float32)
    calls = []
    a = h.harmonize(vol, (3.0, 3.0, 3.0), "BONE", progress=lambda d, n: calls.append((d, n)))
    b = h.harmonize(vol, (3.0, 3.0, 3.0), "BONE", batch_size=1)
    assert calls == [(2, 3), (3, 3)]  # tiles go through the slice batches (progress, cancel, OOM retry)
    np.testing.assert_allclose(a, b, atol=0.1)
    assert np.abs(a - vol).max() > 1.0
    monkeypatch.setattr(h, "_generator", Identity())
    assert np.abs(h.harmonize(vol, (3.0, 3.0, 3.0), "BONE") - vol).max() <= 1.0


def test_canvas_harmonizer_uses_the_same_tiling(tiled_model):
    ch = CanvasHarmonizer(tiled_model, batch_size=2)
    canv = smooth_canvases(3, 128, seed=7)[:, 0].numpy()
    out = ch(canv, "STANDARD")
    with torch.inference_mode():
        ref = run_generator_tiled(ch.generator, torch.from_numpy(canv)[:, None], ch.styles[2:3], 64)
    np.testing.assert_allclose(out, ref[:, 0].clamp(-1, 1).numpy(), atol=1e-4)  # batching rounding only
    with torch.inference_mode():
        whole = run_generator_tiled(ch.generator, torch.from_numpy(canv)[:, None], ch.styles[2:3], None)
    assert np.abs(out - whole[:, 0].clamp(-1, 1).numpy()).max() > 1e-2  # not the whole-canvas result
    # Datasets never carry tile_size: the canvas geometry alone must match.
    ch.check_compatible(SPEC_128, ch.domains)
    with pytest.raises(ValueError, match="differs"):
        ch.check_compatible(PreprocessSpec(canvas_size=128, pixel_spacing_mm=2.0), ["BONE"])


def test_old_model_files_without_tile_size_load(tmp_path):
    path = make_model_file(tmp_path / "old.safetensors", config=TINY, spec=SPEC_128)
    mf = load_model_file(path)
    assert "tile_size" not in mf.card["preprocessing"]  # whole-canvas cards look exactly as before
    assert mf.preprocessing.tile_size is None and mf.preprocessing == SPEC_128
    old = {"canvas_size": 128, "pixel_spacing_mm": 4.0, "hu_window": [-1024, 2048], "background_hu": -1024}
    assert PreprocessSpec.from_dict(old) == SPEC_128


def test_card_round_trip_keeps_tile_size_and_validates_it(tiled_model, tmp_path):
    mf = load_model_file(tiled_model)
    assert mf.card["preprocessing"]["tile_size"] == 64 and mf.preprocessing.tile_size == 64
    spec = PreprocessSpec.from_dict(mf.preprocessing.to_dict())
    assert spec == mf.preprocessing and spec.canvas_only() == SPEC_128
    with pytest.raises(ValueError, match="tile_size"):
        PreprocessSpec(canvas_size=128, tile_size=256)
    with pytest.raises(ValueError, match="tile_size"):
        PreprocessSpec.from_dict({**SPEC_128.to_dict(), "tile_size": True})
    with pytest.raises(ValueError, match="not a multiple of 4"):  # TINY's generator needs multiples of 4
        make_model_file(tmp_path / "bad.safetensors", config=TINY,
                        spec=PreprocessSpec(canvas_size=128, pixel_spacing_mm=4.0, tile_size=30))
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize(("canvas", "expected"), [(128, 64), (64, None)])
def test_export_writes_tile_size_for_crop_training(tmp_path, canvas, expected):
    torch.manual_seed(0)
    nets = build_networks(TINY)
    spec = PreprocessSpec(canvas_size=canvas, pixel_spacing_mm=512.0 / canvas)
    info = {"data": "test", "simulated": True, "preprocessing": spec.to_dict(),
            "domains": [d.to_dict() for d in load_model_file(
                make_model_file(tmp_path / "d.safetensors", config=TINY)).domains]}
    out = export.export_model(tmp_path / "m.safetensors", ema=nets, model_config=TINY, iteration=1,
                              texture_loss=False, run_info=info, train_config={}, num_latents=16)
    mf = load_model_file(out)
    assert mf.preprocessing.tile_size == expected
    assert mf.preprocessing.canvas_only() == spec
