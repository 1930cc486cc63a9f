"""Calibration of a kernel-transfer model on a real paired acquisition (Training.calibrate_kernels): real
DICOM (slices of the shared Philips head phantom pair), real torch steps on a tiny model."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED
from model_factory import KT_TINY, make_kernel_transfer_file, make_model_file

from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS, Domain
from TextureStarGANCore.inference import Harmonizer, detect_source
from TextureStarGANCore.kernel_transfer import KernelTransferConfig
from TextureStarGANCore.model_file import instantiate, load_model_file
from TextureStarGANCore.volume_io import read_volume
from Training.calibrate_kernels import main

HEAD = SHARED / "data" / "real_ct" / "philips_ingenuity_head_phantom_ub_ya_pair"
NOISY = KernelTransferConfig(num_domains=3, width=8, depth=3, noise_synthesis=True)
PHILIPS = (
    Domain(0, "PHILIPS_YA", "Philips YA", "Philips", "Ingenuity CT", "YA"),
    Domain(1, "PHILIPS_UB", "Philips UB", "Philips", "Ingenuity CT", "UB"),
    Domain(2, "STANDARD", "GE STANDARD", "GE MEDICAL SYSTEMS", "LightSpeed 16", "STANDARD"),
)


@pytest.fixture(scope="module")
def head_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Six slices of each series of the head pair (the shared data are never modified)."""
    if not HEAD.is_dir():
        pytest.skip(f"shared real CT pair missing at {HEAD} (set CTH_SHARED_DIR)")
    root = tmp_path_factory.mktemp("head")
    out = []
    for name in ("YA_bone", "UB_standard"):
        (root / name).mkdir()
        for f in sorted((HEAD / name).iterdir())[:6]:
            shutil.copy(f, root / name / f.name)
        out.append(root / name)
    return out[0], out[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(pair: tuple[Path, Path], model: Path, out: Path, *extra: str) -> int:
    return main(["--pair", str(pair[0]), str(pair[1]), "--model", str(model), "--out", str(out), *extra])


def test_calibration_fits_the_pair_kernels_and_nothing_else(head_pair, tmp_path, one_torch_thread, capsys):
    # The curves of YA (sharp) and UB (smooth) start swapped: the fit must turn the pair's order around.
    f = KT_TINY.knots[1:].float()
    wrong = torch.stack([-(f / 0.5) ** 2, -(f / 0.7) ** 2, -(f / 0.6) ** 2])
    keep = torch.full((3, NOISY.num_knots - 1), -0.2)
    base = make_kernel_transfer_file(tmp_path / "base.safetensors", config=NOISY, domains=PHILIPS,
                                     iterations=10, log_mtf=wrong, log_keep=keep, residual=False)
    before = _digest(base)
    out = tmp_path / "calibrated.safetensors"
    assert _run(head_pair, base, out, "--iters", "100", "--noise-steps", "5") == 0
    printed = capsys.readouterr().out
    assert '"fit_rmse_hu_after"' in printed
    assert _digest(base) == before  # the input model is untouched

    old, new = load_model_file(base), load_model_file(out)
    record = new.card["training"]["calibrations"][-1]
    assert record["fit_rmse_hu_after"] < 0.8 * record["fit_rmse_hu_before"], record
    assert record["domains"]["PHILIPS_YA"]["how"] == "from the DICOM tags"
    assert new.card["metrics"] == {}  # the base model's measurements do not describe this one
    assert [d.name for d in new.domains] == [d.name for d in PHILIPS]
    g_old, g_new = old.state_dicts["generator"], new.state_dicts["generator"]
    for key, value in g_old.items():
        if key in ("log_mtf", "embed", "log_keep"):
            assert torch.equal(value[2], g_new[key][2]), key  # the third kernel's rows are untouched
            if key != "embed":  # (no gradient reaches the embeddings through a residual that is zero)
                assert not torch.equal(value[:2], g_new[key][:2]), key
        else:
            assert torch.equal(value, g_new[key]), key  # the shared residual network is untouched
    # Only the ratio of the two curves acts: at 0.8 cycles/mm it turns towards "YA passes more than UB".
    def ub_over_ya(g: dict) -> float:
        return float(g["log_mtf"][1, 15] - g["log_mtf"][0, 15])

    assert ub_over_ya(g_new) < ub_over_ya(g_old) - 0.2


def test_unknown_kernels_become_new_domains_named_from_the_tags(head_pair, tmp_path, one_torch_thread):
    base = make_kernel_transfer_file(tmp_path / "base.safetensors", iterations=10)
    out = tmp_path / "calibrated.safetensors"
    assert _run(head_pair, base, out, "--iters", "3", "--like-sharp", "BONE") == 0
    model = load_model_file(out)
    names = [d.name for d in model.domains]
    assert names == [d.name for d in DEFAULT_SIMULATED_DOMAINS] + ["PHILIPS_YA", "PHILIPS_UB"]
    record = model.card["training"]["calibrations"][-1]["domains"]
    assert record["PHILIPS_YA"] == {"new": True, "how": "new: kernel not in the model",
                                    "started_from": "BONE"}
    assert record["PHILIPS_UB"]["started_from"] in {"B30f", "BONE", "STANDARD"}  # the estimator's choice
    # A series of the calibrated scanner is now recognised from its tags.
    assert detect_source(read_volume(head_pair[0]), model.domains).name == "PHILIPS_YA"
    assert detect_source(read_volume(head_pair[1]), model.domains).name == "PHILIPS_UB"
    # Directions between the old kernels give the old output; the estimator never proposes a new one.
    x = read_volume(head_pair[0]).hu[:1].astype(np.float32)
    h_old = Harmonizer.from_checkpoint(base, device="cpu")
    h_new = Harmonizer.from_checkpoint(out, device="cpu")
    spacing = (0.451171875, 0.451171875, 1.0)
    a = h_old.harmonize(x, spacing, target="BONE", source="B30f")
    b = h_new.harmonize(x, spacing, target="BONE", source="B30f")
    assert float(np.abs(a - b).max()) < 1e-3  # float rounding of a longer one-hot product at most
    _, probs = h_new.estimate_source(x, spacing)
    assert probs["PHILIPS_YA"] < 1e-9 and probs["PHILIPS_UB"] < 1e-9
    assert instantiate(model)["generator"].log_mtf.shape[0] == 5


@pytest.mark.parametrize("extra, message", [
    (("--sharp-domain", "B30f", "--smooth-domain", "B30f"), "a pair needs two kernels"),
    (("--like-sharp", "NOPE"), "unknown domain"),
    (("--fit-slices", "5:5"), "selects no slices"),
    (("--iters", "-1"), "must not be negative"),
])
def test_bad_options_give_a_clear_error_and_write_nothing(head_pair, tmp_path, capsys, extra, message):
    base = make_kernel_transfer_file(tmp_path / "base.safetensors", iterations=10)
    out = tmp_path / "calibrated.safetensors"
    assert _run(head_pair, base, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_wrong_models_and_outputs_are_refused(head_pair, tmp_path, capsys):
    base = make_kernel_transfer_file(tmp_path / "base.safetensors", iterations=10)
    assert _run(head_pair, base, base) == 2
    assert "write a new file" in capsys.readouterr().err
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    assert _run(head_pair, base, taken) == 2
    assert "--overwrite" in capsys.readouterr().err and taken.read_bytes() == b"keep me"
    stargan = make_model_file(tmp_path / "stargan.safetensors")
    assert _run(head_pair, stargan, tmp_path / "x.safetensors") == 2
    assert "needs a kernel-transfer model" in capsys.readouterr().err
    assert _run((head_pair[0], head_pair[0]), base, tmp_path / "y.safetensors") == 2  # one series twice
    assert "nothing to convert" in capsys.readouterr().err


def test_a_new_kernel_of_a_known_vendor_starts_from_its_family_not_the_estimate():
    from Training.trainer.kernel_calibration import domain_for_series

    def estimate() -> str:
        raise AssertionError("the estimator is for vendors without a kernel family")

    tags = {"Manufacturer": "SIEMENS", "ManufacturerModelName": "SOMATOM Force", "ConvolutionKernel": "Br64d"}
    sd = domain_for_series(DEFAULT_SIMULATED_DOMAINS, tags, None, estimate, None)
    assert sd.new and sd.like == "B30f" and sd.domain.kernel == "Br64d"  # the only Siemens domain
    canon = {"Manufacturer": "CANON_MEC", "ConvolutionKernel": "FC13"}
    assert domain_for_series(DEFAULT_SIMULATED_DOMAINS, canon, None, lambda: "BONE", None).like == "BONE"
