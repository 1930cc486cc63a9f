"""Tiny simulated DICOM trees shared by the data-pipeline tests.

``shared_sim_tree()`` (phantoms) and ``shared_anatomy_sim()`` (real anatomy) simulate once per test process
(into a temporary folder removed at exit) so the simulator, preparation, dataset and trainer tests do not
each pay for it. Tests must not modify them.
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


ANATOMY_DOMAINS = ("PHILIPS_B", "PHILIPS_L", "SIEMENS_I30f_3")


def shared_anatomy_sim(chest_pair: Path) -> tuple[Path, Path]:
    """(anatomy tree, simulated tree), read-only: three slices (30-32) of the real chest pair's B series with
    its licence files as a user's anatomy tree, and one variant of it (192 px, seed 3) with the kernels
    ``ANATOMY_DOMAINS``."""
    if "anatomy" not in _SHARED:
        from Training.simulate import main

        tmp = Path(tempfile.mkdtemp(prefix="cth-anatomy-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        series = tmp / "anatomy" / "pair" / "B_smooth"
        series.mkdir(parents=True)
        for f in sorted((chest_pair / "B_smooth").iterdir())[30:33]:
            shutil.copy(f, series / f.name)
        for name in ("README.md", "LICENSE"):
            shutil.copy(chest_pair / name, tmp / "anatomy" / "pair" / name)
        out = tmp / "sim"
        args = ["--out", str(out), "--anatomy", str(tmp / "anatomy"), "--domains", ",".join(ANATOMY_DOMAINS),
                "--size", "192", "--variants", "1", "--seed", "3"]
        if main(args) != 0:
            raise RuntimeError("the shared real-anatomy simulation failed")
        _SHARED["anatomy"], _SHARED["anatomy_sim"] = tmp / "anatomy", out
    return _SHARED["anatomy"], _SHARED["anatomy_sim"]
