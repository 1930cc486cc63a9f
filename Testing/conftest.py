"""Fixtures shared by all tests: real CT data shipped beside the project and in pydicom."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CTH_SHARED_DIR", REPO_ROOT.parent / "shared"))

# Two cores on the CI machine: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """A real GE HiSpeed Dual head CT (kernel STD+, gantry tilt, two slice spacings)."""
    path = SHARED / "data" / "real_ct" / "ge_hispeed_dual_head_std_plus"
    if not path.is_dir():
        pytest.fail(f"real CT test data missing at {path} (set CTH_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def ct_small_path() -> Path:
    """pydicom's CT_small.dcm: a real GE CT slice, kernel STANDARD, 128 x 128."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-network tests: on a busy 2-core machine a second OpenMP
    thread mostly waits for the first (measured 10-30x slower), and the result does not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The Slicer logic and job tests share these two (imported on use: slicer-core loads only where needed).
@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny untrained model file."""
    from model_factory import make_model_file

    return make_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=3)


@pytest.fixture(scope="module")
def kt_model_path(tmp_path_factory):
    """A tiny untrained kernel-transfer model file (seeded, non-trivial weights)."""
    from model_factory import make_kernel_transfer_file

    return make_kernel_transfer_file(tmp_path_factory.mktemp("kt_model") / "kt.safetensors", seed=3)


@pytest.fixture()
def scene():
    """A real MRML scene with Slicer's logics (slicer-core)."""
    from slicer_helpers import new_scene

    scene, app, keep = new_scene()
    yield scene
    del keep, app
