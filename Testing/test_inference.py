"""Harmonizer: determinism, batching, progress, cancel, reference-guided style, errors, OOM retry."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from model_factory import make_model_file

from TextureStarGANCore import Harmonizer
from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.domains import UnknownDomainError
from TextureStarGANCore.inference import HarmonizationCancelled, detect_source
from TextureStarGANCore.preprocessing import PreprocessSpec
from TextureStarGANCore.volume_io import InputError, read_volume

SPACING = (1.5, 1.5, 3.0)
# Tiny widths keep every harmonize call well under a second on a busy 2-core machine.
TINY = ModelConfig.small(img_size=64, base_width=8, max_width=32, style_dim=16, mapping_hidden=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def harmonizer(tmp_path_factory) -> Harmonizer:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    make_model_file(path, config=TINY, spec=PreprocessSpec(canvas_size=64, pixel_spacing_mm=4.0))
    return Harmonizer.from_checkpoint(path, device="cpu", batch_size=2)


def chest(n: int = 3, rows: int = 100, cols: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    vol = np.full((n, rows, cols), -1000.0, dtype=np.float32)
    body = ((yy - rows / 2) / (rows * 0.4)) ** 2 + ((xx - cols / 2) / (cols * 0.42)) ** 2 < 1
    lung_x = (np.abs(xx - cols / 2) - cols * 0.2) / (cols * 0.12)
    lung = ((yy - rows / 2) / (rows * 0.25)) ** 2 + lung_x**2 < 1
    vol[:, body] = 40.0
    vol[:, lung] = -850.0
    vol += rng.normal(0, 30, vol.shape).astype(np.float32)
    vol[:, :3, :3] = -2000.0  # padding
    return vol


class Identity(torch.nn.Module):
    def forward(self, x, s):
        return x


def test_properties(harmonizer):
    assert harmonizer.domains == ["B30f", "BONE", "STANDARD"]
    card = harmonizer.model_card
    assert card["preprocessing"]["canvas_size"] == 64
    card["domains"] = []  # a copy: the harmonizer's card is not changed
    assert len(harmonizer.model_card["domains"]) == 3
    assert harmonizer.trained is False and harmonizer.device.type == "cpu"


def test_output_shape_dtype_and_determinism(harmonizer):
    vol = chest()
    a = harmonizer.harmonize(vol, SPACING, "B30f")
    b = harmonizer.harmonize(vol, SPACING, "b30f")
    assert a.shape == vol.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - vol).max() > 1.0  # the (random) generator does change the image
    ints = harmonizer.harmonize(vol.round().astype(np.int16), SPACING, 0)
    assert ints.dtype == np.int16 and ints.shape == vol.shape
    other = harmonizer.harmonize(vol, SPACING, "BONE")
    assert np.abs(other - a).max() > 0.1  # another target style gives another image


def test_batching_equals_unbatched(harmonizer):
    vol = chest()
    one = harmonizer.harmonize(vol, SPACING, "STANDARD", batch_size=1)
    all_ = harmonizer.harmonize(vol, SPACING, "STANDARD", batch_size=3)
    np.testing.assert_allclose(one, all_, atol=0.1)  # float rounding only (well below 1 HU)


def test_identity_generator_returns_the_input(harmonizer, monkeypatch):
    vol = chest(rows=90, cols=111)
    monkeypatch.setattr(harmonizer, "_generator", Identity())
    out = harmonizer.harmonize(vol, (0.7, 0.9, 2.0), "B30f")
    assert np.abs(out - vol).max() <= 1.0


def test_padding_and_voxels_outside_the_canvas_are_kept(harmonizer):
    vol = chest(n=2, rows=140, cols=150)  # 140 x 2.5 mm = 350 mm > the 256 mm canvas
    vol[:, 70, 75] = 3000.0  # above the HU window
    out = harmonizer.harmonize(vol, (2.5, 2.5, 3.0), "BONE")
    assert (out[:, :3, :3] == -2000.0).all()
    assert (out[:, 70, 75] == 3000.0).all()
    np.testing.assert_array_equal(out[:, :, :5], vol[:, :, :5])  # outside the canvas
    np.testing.assert_array_equal(out[:, :5, :], vol[:, :5, :])


def test_progress_is_reported_per_batch(harmonizer):
    calls = []
    harmonizer.harmonize(chest(), SPACING, "BONE", progress=lambda d, n: calls.append((d, n)))
    assert calls == [(2, 3), (3, 3)]


def test_cancel_stops_cleanly(harmonizer):
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        cancel.set()  # a user pressing Cancel during the first batch

    with pytest.raises(HarmonizationCancelled, match="after 2 of 3"):
        harmonizer.harmonize(chest(), SPACING, "BONE", progress=progress, cancel=cancel)
    assert calls == [2]
    with pytest.raises(HarmonizationCancelled):
        harmonizer.harmonize(chest(), SPACING, "BONE", cancel=cancel)


def test_reference_guided_style(harmonizer):
    vol = chest()
    reference = chest(n=2, seed=3) * 1.1
    by_domain = harmonizer.harmonize(vol, SPACING, "B30f")
    by_ref = harmonizer.harmonize(vol, SPACING, "B30f", reference=reference)
    assert harmonizer.last_run["style"] == "reference"
    again = harmonizer.harmonize(vol, SPACING, "B30f", reference=(reference, SPACING))
    np.testing.assert_array_equal(by_ref, again)
    assert np.abs(by_ref - by_domain).max() > 0.1
    s1 = harmonizer.reference_style(reference, "B30f", SPACING)
    s2 = harmonizer.reference_style(chest(n=2, seed=5) - 200, "B30f", SPACING)
    assert s1.shape == (1, harmonizer.model_card["architecture"]["style_dim"])
    assert not torch.allclose(s1, s2)


def test_unknown_target_lists_domains(harmonizer):
    with pytest.raises(UnknownDomainError) as err:
        harmonizer.harmonize(chest(), SPACING, "B70f")
    for name in ("B30f", "BONE", "STANDARD"):
        assert name in str(err.value)
    with pytest.raises(UnknownDomainError):
        harmonizer.harmonize(chest(), SPACING, "BONE", source="LUNG")


def test_source_is_validated_and_recorded(harmonizer):
    harmonizer.harmonize(chest(n=1), SPACING, "BONE", source="standard")
    assert harmonizer.last_run["source"] == "STANDARD" and harmonizer.last_run["target"] == "BONE"


@pytest.mark.parametrize(
    "volume, spacing, message",
    [
        (np.zeros((40, 40), np.float32) - 1000, SPACING, "2D"),
        (np.full((2, 40, 40), 0.5, np.float32), SPACING, "does not look like CT"),
        (np.where(np.eye(40)[None] > 0, np.nan, -1000.0).astype(np.float32), SPACING, "NaN"),
        (None, (1.0, 0.0, 1.0), "spacing"),
    ],
)
def test_bad_input_is_refused(harmonizer, volume, spacing, message):
    volume = chest(n=1) if volume is None else volume
    with pytest.raises(ValueError, match=message):
        harmonizer.harmonize(volume, spacing, "BONE")


def test_cuda_out_of_memory_halves_the_batch(harmonizer, monkeypatch):
    vol = chest()
    expected = harmonizer.harmonize(vol, SPACING, "BONE", batch_size=1)
    real_batch = harmonizer._batch
    sizes = []

    def flaky(slices, *args):
        sizes.append(len(slices))
        if len(slices) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_batch(slices, *args)

    monkeypatch.setattr(harmonizer, "_batch", flaky)
    out = harmonizer.harmonize(vol, SPACING, "BONE", batch_size=3)
    assert sizes[:3] == [3, 1, 1] and harmonizer.last_batch_size == 1
    np.testing.assert_allclose(out, expected, atol=0.1)


def test_detect_source_from_tags(harmonizer, ct_small_path):
    domains = harmonizer.domain_info
    tags = {"Manufacturer": "SIEMENS", "ManufacturerModelName": "Sensation 16", "ConvolutionKernel": "B30f"}
    assert detect_source(tags, domains).name == "B30f"
    assert harmonizer.detect_source(read_volume(ct_small_path)).name == "STANDARD"  # GE, STANDARD
    assert detect_source({"ConvolutionKernel": "STD+", "Manufacturer": "GE MEDICAL SYSTEMS"}, domains) is None
    assert detect_source({}, domains) is None


def test_non_ct_error_is_an_input_error(harmonizer):
    with pytest.raises(InputError):
        harmonizer.harmonize(np.full((2, 40, 40), 100.0, np.float32), SPACING, "BONE")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_gpu_is_refused(tmp_path):
    path = make_model_file(tmp_path / "m.safetensors", config=TINY)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Harmonizer.from_checkpoint(path, device="cuda")
