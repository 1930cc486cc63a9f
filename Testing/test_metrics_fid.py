"""FID through pytorch-fid: behaviour on known sets, weights handling, labelling of test-only weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from Training.evaluation.metrics import fid


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(2)
    # Random-init Inception: the values are NOT COMPARABLE with real FID; they only exercise the pipeline.
    return fid.build_inception(fid.RANDOM_FOR_TESTING, dims=64)


def test_fid_of_a_set_with_itself_is_near_zero_and_grows_with_a_shift(net):
    assert not net.comparable and net.label == fid.NOT_COMPARABLE
    rng = np.random.default_rng(0)
    base = np.clip(0.4 + 0.15 * rng.standard_normal((20, 48, 48)), 0, 1).astype(np.float32)
    other = np.clip(0.4 + 0.15 * rng.standard_normal((20, 48, 48)), 0, 1).astype(np.float32)
    act = fid.activations(net, base)
    assert act.shape == (20, 64) and np.isfinite(act).all()
    d_self = fid.frechet_distance(act, act)
    d_same_dist = fid.frechet_distance(act, fid.activations(net, other))
    d_small = fid.frechet_distance(act, fid.activations(net, np.clip(other + 0.1, 0, 1)))
    d_big = fid.frechet_distance(act, fid.activations(net, np.clip(other + 0.3, 0, 1)))
    assert d_self < 1e-6 * max(d_big, 1e-12) + 1e-9
    assert d_same_dist < d_small < d_big


def test_missing_weights_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    expected = tmp_path / "th" / "hub" / "checkpoints" / fid.WEIGHTS_FILE
    assert fid.default_weights_path() == expected
    with pytest.raises(fid.InceptionWeightsMissing) as err:
        fid.build_inception(None)
    assert str(expected) in str(err.value) and "--inception-weights" in str(err.value)
    with pytest.raises(fid.InceptionWeightsMissing, match="nope.pth"):
        fid.build_inception(tmp_path / "nope.pth")
    assert not (tmp_path / "th").exists()  # nothing downloaded or created


def test_local_weights_file_is_loaded_without_download(tmp_path, monkeypatch):
    """A weights file in pytorch-fid's layout is read with torch.load(weights_only=True), never fetched."""
    import torchvision
    from pytorch_fid import inception as pfi

    with monkeypatch.context() as mp:  # a random FID Inception with the real parameter names
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(torchvision.models.inception.Inception3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(3)
        reference = pfi.fid_inception_v3()
    path = tmp_path / fid.WEIGHTS_FILE
    torch.save(reference.state_dict(), path)

    def no_download(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    loaded = fid.build_inception(path, dims=64)
    assert loaded.comparable and loaded.weights == str(path)
    assert torch.equal(loaded.model.blocks[0][0].conv.weight, reference.Conv2d_1a_3x3.conv.weight)


def test_to_unit_windows():
    canvas = np.array([[-1.0, 0.0, 1.0]], np.float32)[None]
    assert np.allclose(fid.to_unit(canvas, (-1024, 2048)), [[[0.0, 0.5, 1.0]]])
    lung = fid.to_unit(canvas, (-1024, 2048), (-1000, 400))
    assert lung[0, 0, 0] == 0.0 and lung[0, 0, 2] == 1.0 and lung[0, 0, 1] == pytest.approx(1.0)
