"""The linear kernel-transfer filter as a user-facing method: fitted by the exporter on paired simulated
slices, stored (optionally) in the model card, and run by ``ctharmonize harmonize --method filter``."""

from __future__ import annotations

import numpy as np
import pytest
from model_factory import make_kernel_transfer_file, make_model_file
from simdata import shared_dataset

from TextureStarGANCore import cli
from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS
from TextureStarGANCore.model_file import ModelFileError, load_model_file
from TextureStarGANCore.preprocessing import PreprocessSpec
from TextureStarGANCore.transfer_filter import TransferFilter
from TextureStarGANCore.volume_io import read_volume
from Training.trainer.transfer_filters import fit_domain_filters

TINY = ModelConfig.small(img_size=64, base_width=8, max_width=32, style_dim=16, mapping_hidden=32)
SPEC = PreprocessSpec(canvas_size=64, pixel_spacing_mm=4.0)
FREQS = np.linspace(0.0, 2.0, 81)
BLUR = TransferFilter(FREQS, np.exp(-2.0 * (np.pi * 0.8 * FREQS) ** 2), "Gaussian, sigma 0.8 mm")


def _entry(source: str, target: str, f: TransferFilter = BLUR) -> dict:
    return {"source": source, "target": target, "filter": f.to_dict(), "fitted_on": "test"}


@pytest.fixture(scope="module")
def model_with_filter(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "filters.safetensors"
    return make_model_file(path, config=TINY, spec=SPEC, iterations=10,
                           transfer_filters=[_entry("BONE", "B30f")])


@pytest.mark.slow  # simulates and prepares the shared tiny dataset (~30 s) unless another test did
def test_exporter_fits_every_ordered_domain_pair_on_paired_simulated_slices():
    entries = fit_domain_filters(shared_dataset())
    names = [d.name for d in DEFAULT_SIMULATED_DOMAINS]
    assert {(e["source"], e["target"]) for e in entries} == {(a, b) for a in names for b in names if a != b}
    by_pair = {(e["source"], e["target"]): TransferFilter.from_dict(e["filter"]) for e in entries}
    down, up = by_pair[("BONE", "B30f")], by_pair[("B30f", "BONE")]
    f = np.array([0.0, 0.06, 0.12])  # the tiny dataset's 4 mm canvas: Nyquist 0.125 cycles/mm
    assert down.response(f)[0] == pytest.approx(1.0, abs=0.05)  # anatomy (low frequencies) is kept
    assert down.response(f)[2] < down.response(f)[1] < 1.0  # sharp -> smooth attenuates high frequencies
    assert up.response(np.array(0.047)) > 1.2  # the way back boosts them (where the smooth kernel passes
    assert up.max_gain <= 8.0  # signal: the regularised inverse rolls off where it does not) and is bounded
    assert all(e["fit_rmse_hu"] >= 0 for e in entries)


def test_filters_are_optional_in_the_card_and_validated(model_with_filter, tmp_path):
    m = load_model_file(model_with_filter)
    bone, b30f, std = (next(d for d in m.domains if d.name == n) for n in ("BONE", "B30f", "STANDARD"))
    assert m.transfer_filter_pairs == [("BONE", "B30f")]
    np.testing.assert_allclose(m.transfer_filter(bone, b30f).gain, BLUR.gain, atol=1e-6)
    assert m.transfer_filter(std, b30f) is None
    plain = load_model_file(make_model_file(tmp_path / "plain.safetensors", config=TINY, spec=SPEC))
    assert plain.transfer_filter_pairs == [] and plain.transfer_filter(bone, b30f) is None
    with pytest.raises(ModelFileError, match="must name the model's domains"):
        load_model_file(make_model_file(tmp_path / "bad.safetensors", config=TINY, spec=SPEC,
                                        transfer_filters=[_entry("BONE", "B45f")]))


def test_cli_method_filter_applies_the_stored_filter(model_with_filter, ct_small_path, tmp_path, capsys):
    out = tmp_path / "out.nrrd"
    rc = cli.main(["harmonize", str(ct_small_path), "--target", "B30f", "--source", "BONE", "--method",
                   "filter", "--model", str(model_with_filter), "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    src, res = read_volume(ct_small_path), read_volume(out)
    expected = BLUR.apply(src.hu, src.spacing[:2])
    assert np.abs(res.hu - expected).max() <= 1.0  # integer storage rounds
    assert res.hu.std() < src.hu.std()


def test_cli_method_filter_refuses_a_pair_without_a_fitted_filter(model_with_filter, ct_small_path, tmp_path,
                                                                  capsys):
    out = tmp_path / "out.nrrd"
    rc = cli.main(["harmonize", str(ct_small_path), "--target", "B30f", "--method", "filter",
                   "--model", str(model_with_filter), "--output", str(out)])  # CT_small is GE STANDARD
    err = capsys.readouterr().err
    assert rc == 2
    assert "no fitted transfer filter for STANDARD -> B30f" in err and "BONE -> B30f" in err
    assert "Use --method model for this pair." in err
    assert not out.exists()


def test_amending_a_model_card_keeps_the_weights(tmp_path):
    import torch

    from Training.trainer.export import amend_model_card

    src = make_model_file(tmp_path / "a.safetensors", config=TINY, spec=SPEC, iterations=3)
    out = amend_model_card(src, tmp_path / "b.safetensors", metrics={"real_pairs": {"x": 1.0}},
                           transfer_filters=[_entry("BONE", "B30f")])
    a, b = load_model_file(src), load_model_file(out)
    assert b.transfer_filter_pairs == [("BONE", "B30f")] and b.card["metrics"]["real_pairs"] == {"x": 1.0}
    assert b.card["training"] == a.card["training"] and b.card["created"] == a.card["created"]
    for net, sd in a.state_dicts.items():
        assert all(torch.equal(v, b.state_dicts[net][k]) for k, v in sd.items())
    assert torch.equal(a.domain_styles, b.domain_styles)
    # A kernel-transfer file (the bundled kind): the same, through its own writer.
    src = make_kernel_transfer_file(tmp_path / "kt.safetensors", iterations=2)
    out = amend_model_card(src, tmp_path / "kt2.safetensors", metrics={"real_pairs": {"y": 2.0}})
    a, b = load_model_file(src), load_model_file(out)
    assert b.kind == "kernel_transfer" and b.card["metrics"]["real_pairs"] == {"y": 2.0}
    def rest(card: dict) -> dict:
        return {k: v for k, v in card.items() if k != "metrics"}

    assert rest(b.card) == rest(a.card)
    for net, sd in a.state_dicts.items():
        assert all(torch.equal(v, b.state_dicts[net][k]) for k, v in sd.items())
