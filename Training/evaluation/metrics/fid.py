"""Frechet Inception Distance (the paper's Table I) through pytorch-fid.

pytorch-fid's ``InceptionV3`` (the TensorFlow FID weights, bilinear resize to 299 x 299, [0,1] -> [-1,1]
normalization) gives the 2048-d pool features and ``calculate_frechet_distance`` the distance, so the
numbers are standard FID. CT canvases are single-channel; they are mapped to [0, 1] through a display window
and replicated to 3 channels. The default window is the model's own preprocessing window
(``PreprocessSpec.hu_window``, -1024..2048 HU), i.e. (canvas + 1) / 2, which is what a StarGAN v2 pipeline
feeds to FID when it saves its [-1, 1] outputs as images.

Weights: the standard file ``pt_inception-2015-12-05-6726825d.pth`` from ``$TORCH_HOME/hub/checkpoints``
(or ``--inception-weights PATH``); it is never downloaded here. ``RANDOM_FOR_TESTING`` builds the same
network with random weights to exercise the pipeline offline; such values are marked not comparable.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import scipy.linalg
import torch

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
RANDOM_FOR_TESTING = "random-for-testing"
NOT_COMPARABLE = "NOT COMPARABLE: random-init Inception (pipeline test only)"


class InceptionWeightsMissing(FileNotFoundError):
    """The standard FID Inception weights are not on this machine."""


def default_weights_path() -> Path:
    """Where pytorch-fid (torch.hub) keeps the weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_weights(weights: str | Path | None) -> Path | None:
    """The weights file to use, ``None`` for random-for-testing; a clear error when it is missing."""
    if weights is not None and str(weights) == RANDOM_FOR_TESTING:
        return None
    path = Path(weights).expanduser() if weights is not None else default_weights_path()
    if not path.is_file():
        raise InceptionWeightsMissing(
            f"FID needs the standard Inception weights '{WEIGHTS_FILE}' and they are not at {path}. "
            f"Copy the file (from https://github.com/mseitzer/pytorch-fid/releases, tag fid_weights) to "
            f"{default_weights_path()} (the folder follows $TORCH_HOME) or pass --inception-weights PATH; "
            f"or leave 'fid' out of --metrics."
        )
    return path


@dataclass
class FIDNetwork:
    """pytorch-fid's InceptionV3 ready for feature extraction, with where its weights came from."""

    model: torch.nn.Module
    device: torch.device
    dims: int
    weights: str  # file path, or RANDOM_FOR_TESTING
    comparable: bool

    @property
    def label(self) -> str:
        return "standard FID (pytorch-fid InceptionV3)" if self.comparable else NOT_COMPARABLE


def build_inception(
    weights: str | Path | None = None, dims: int = 2048, device: str | torch.device = "cpu"
) -> FIDNetwork:
    """pytorch-fid's InceptionV3 with its standard resize and normalization, weights from a local file."""
    from pytorch_fid import inception as pfi

    if dims not in pfi.InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(f"dims must be one of {sorted(pfi.InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
    path = resolve_weights(weights)
    with ExitStack() as stack:
        # pytorch-fid fetches its weights by URL; hand it the local file instead so nothing is downloaded.
        if path is not None:
            state = torch.load(path, map_location="cpu", weights_only=True)
            stack.enter_context(mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state))
        else:
            stack.enter_context(mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: None))
            import torchvision

            stack.enter_context(
                mock.patch.object(
                    torchvision.models.inception.Inception3, "load_state_dict", lambda self, *a, **k: None
                )
            )
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(0)
        model = pfi.InceptionV3(
            [pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]], resize_input=True, normalize_input=True
        )
        if path is None:
            # PyTorch's default conv init shrinks activations ~1e-8 through Inception's depth; He init keeps
            # the random features at a usable scale.
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    dev = torch.device(device)
    source = str(path) if path is not None else RANDOM_FOR_TESTING
    return FIDNetwork(model.eval().to(dev), dev, dims, source, path is not None)


def to_unit(
    canvas: np.ndarray, hu_window: tuple[float, float], display_window: tuple[float, float] | None = None
) -> np.ndarray:
    """Map [-1, 1] canvases (model window ``hu_window``) to [0, 1] through ``display_window`` (HU)."""
    x = np.asarray(canvas, dtype=np.float32)
    if display_window is None:
        return np.clip((x + 1.0) * 0.5, 0.0, 1.0)
    lo, hi = hu_window
    hu = (x + 1.0) * 0.5 * (hi - lo) + lo
    return np.clip((hu - display_window[0]) / (display_window[1] - display_window[0]), 0.0, 1.0)


@torch.no_grad()
def activations(
    net: FIDNetwork,
    images01: np.ndarray,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """(N, dims) Inception features of grayscale images (N, H, W) in [0, 1]."""
    images01 = np.asarray(images01)
    if images01.ndim != 3:
        raise ValueError(f"expected grayscale images (N, H, W), got shape {images01.shape}")
    n = len(images01)
    out = np.empty((n, net.dims), dtype=np.float64)
    for start in range(0, n, batch_size):
        if cancel is not None and cancel.is_set():
            raise InterruptedError("FID feature extraction cancelled")
        batch = torch.from_numpy(np.ascontiguousarray(images01[start : start + batch_size], dtype=np.float32))
        batch = batch.to(net.device)[:, None].expand(-1, 3, -1, -1)
        feat = net.model(batch)[0]
        if feat.shape[2:] != (1, 1):  # lower blocks return maps; pytorch-fid pools them the same way
            feat = torch.nn.functional.adaptive_avg_pool2d(feat, (1, 1))
        out[start : start + len(batch)] = feat[:, :, 0, 0].double().cpu().numpy()
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return out


def frechet_distance(act_a: np.ndarray, act_b: np.ndarray) -> float:
    """FID between two activation sets (Gaussian fits, pytorch-fid's stable Frechet distance)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    if len(act_a) < 2 or len(act_b) < 2:
        raise ValueError("FID needs at least 2 images per set")
    mu_a, mu_b = act_a.mean(axis=0), act_b.mean(axis=0)
    cov_a, cov_b = np.cov(act_a, rowvar=False), np.cov(act_b, rowvar=False)
    with warnings.catch_warnings():
        # Fewer images than feature dimensions make the covariances singular; pytorch-fid handles it.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return float(max(calculate_frechet_distance(mu_a, cov_a, mu_b, cov_b), 0.0))
