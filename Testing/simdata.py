"""Tiny simulated DICOM trees shared by the data-pipeline tests.

``shared_sim_tree()`` simulates once per test process (into a temporary folder removed at exit) so the
simulator, preparation and dataset tests do not each pay for it. Tests must not modify it.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from TextureStarGANCore.preprocessing import PreprocessSpec

# Small but real: 64 x 64 slices (5.2-5.9 mm pixels) on a 96 px canvas at 4 mm, so the body fits.
SIM_SIZE = 64
SIM_SEED = 3
SIM_PATIENTS, SIM_SLICES = 5, 3
TINY_SPEC = PreprocessSpec(canvas_size=96, pixel_spacing_mm=4.0)
_SHARED: dict[str, Path] = {}


def make_sim_tree(
    path: Path,
    patients: int = SIM_PATIENTS,
    slices: int = SIM_SLICES,
    seed: int = SIM_SEED,
    plots: bool = False,
) -> Path:
    from Training.simulator.simulate import simulate

    simulate(path, patients, slices, size=SIM_SIZE, seed=seed, plots=plots)
    return path


def shared_sim_tree() -> Path:
    """The read-only tree of SIM_PATIENTS x 3 kernels x SIM_SLICES slices (with NPS plots)."""
    if "tree" not in _SHARED:
        tmp = Path(tempfile.mkdtemp(prefix="cth-sim-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _SHARED["tree"] = make_sim_tree(tmp / "tree", plots=True)
    return _SHARED["tree"]


def shared_dataset() -> Path:
    """``shared_sim_tree()`` prepared with TINY_SPEC (seed 7); read-only."""
    if "dataset" not in _SHARED:
        from Training.data.prepare import prepare

        out = shared_sim_tree().parent / "dataset"
        prepare(shared_sim_tree(), out, spec=TINY_SPEC, seed=7)
        _SHARED["dataset"] = out
    return _SHARED["dataset"]
