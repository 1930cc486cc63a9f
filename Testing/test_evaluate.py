"""End-to-end evaluation on a tiny simulated dataset with untrained models (pipeline test only), the
trainer's quick hook, the training curves, and bad input that must write nothing."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from eval_dataset_factory import make_eval_dataset
from model_factory import make_kernel_transfer_file, make_model_file

from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.kernel_transfer import KernelTransferConfig
from TextureStarGANCore.preprocessing import PreprocessSpec, hu_to_unit
from Training import curves
from Training.evaluate import main
from Training.evaluation.curves import read_run
from Training.evaluation.evaluate import EvaluationError, evaluate, quick_evaluate
from Training.evaluation.metrics.harmonize import CanvasHarmonizer

CANVAS = 128  # 4 mm pixels: big enough for lungs and NPS regions, small enough to be quick


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("eval")
    # Patient 0 is the test split; patient 1 (train) is what the classical baselines are fitted on.
    ds = make_eval_dataset(root / "ds", canvas=CANVAS, patients=2, test_patients=1, slices=3,
                           domains=("B30f", "BONE"))
    cfg = ModelConfig.small(img_size=CANVAS)
    # Untrained (random) models: the numbers below test the pipeline, not the method.
    m1 = make_model_file(root / "texture.safetensors", config=cfg, seed=0)
    m2 = make_model_file(root / "baseline.safetensors", config=cfg, seed=1)
    return root, ds, m1, m2


@pytest.fixture(scope="module")
def full_run(setup):
    root, ds, m1, m2 = setup
    out = root / "out"
    rc = main(
        [
            "--dataset",
            str(ds),
            "--model",
            str(m1),
            "--compare",
            str(m2),
            "--out",
            str(out),
            "--inception-weights",
            "random-for-testing",
            "--fid-dims",
            "64",
            "--workers",
            "1",
            "--cache-dir",
            str(root / "cache"),
        ]
    )
    assert rc == 0
    return out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_outputs_in_the_papers_table_shape(full_run):
    out = full_run
    for name in (
        "table_fid.csv",
        "table_radiomics.csv",
        "structure.csv",
        "table_frd.csv",
        "paired.csv",
        "report.md",
        "results.json",
        "fig_B30f_to_BONE.png",
        "fig_BONE_to_B30f.png",
        "nps_B30f_to_BONE.png",
        "nps_BONE_to_B30f.png",
        "table_clinical.csv",
        "clinical_B30f_to_BONE_m0_bland_altman.png",
        "clinical_BONE_to_B30f_m1_ccc_lung.png",
    ):
        assert (out / name).is_file(), name
    fid_rows = _rows(out / "table_fid.csv")
    assert fid_rows[0][0] == "kernels" and len(fid_rows[0]) == 4  # before / model / model2
    assert all("NOT COMPARABLE" in h for h in fid_rows[0][1:])
    assert [r[0] for r in fid_rows[1:]] == ["B30f<->BONE"]
    rad = _rows(out / "table_radiomics.csv")
    assert rad[0][1] == "|R| (of 102)" and len(rad[0]) == 4
    report = (out / "report.md").read_text()
    assert "NOT COMPARABLE" in report and "UNTRAINED" in report
    assert "Table I" in report and "Table II" in report and "fig_B30f_to_BONE.png" in report
    clin = _rows(out / "table_clinical.csv")
    assert clin[0][:2] == ["kernels", "%LAA-950 abs. bias before"] and "texture" in clin[0][2]
    assert "Clinical quantities B30f->BONE" in report and "Bland-Altman" in report


def test_results_json_numbers_and_provenance(full_run, setup):
    _, _, m1, m2 = setup
    res = json.loads((full_run / "results.json").read_text())
    assert res["slices_per_domain"] == {"B30f": 3, "BONE": 3}
    assert [m["path"] for m in res["models"]] == [str(m1), str(m2)]
    assert all(len(m["sha256"]) == 64 and m["trained"] is False for m in res["models"])
    assert res["fid_settings"]["comparable"] is False and "NOT COMPARABLE" in res["labels"]["fid"]
    assert any("NOT COMPARABLE" in n for n in res["notes"])
    assert res["provenance"]["packages"]["pyradiomics-bhklab"] == "3.1.4"
    pair = res["pairs"]["B30f<->BONE"]
    assert pair["fid"]["before"] >= 0
    for lab in (m["label"] for m in res["models"]):
        assert set(pair["fid"]["models"][lab]["directions"]) == {"B30f->BONE", "BONE->B30f"}
        rad = pair["radiomics"]["models"][lab]
        for d in rad["directions"].values():
            assert d["n_R"] == pair["radiomics"]["n_R"] and set(d["aligned"]) <= set(d["differing"])
        st = pair["structure"]["models"][lab]["mean"]
        assert st["slices_with_lungs"] == 6 and 0 <= st["structure_dice"] <= 1
        pd = pair["paired"]["models"][lab]["mean"]
        # Kernels of the same phantom slice are close; a random generator is far from the truth.
        assert pd["psnr_before"] > pd["psnr_after"]
        assert pair["paired"]["models"][lab]["directions"]["B30f->BONE"]["nps_rois"] > 0
        clin = pair["clinical"]["models"][lab]
        d = clin["directions"]["BONE->B30f"]
        assert d["methods"] == ["before", "harmonized"] and d["target"] == "true target"
        assert d["lungs"]["slices_with_lungs"] == 3 and d["radiomics"]["rois"]["lung"] > 0
        # Same phantom slice, two kernels: the input is closer to the truth than a random generator.
        assert clin["mean"]["pd15_bias_before"] < clin["mean"]["pd15_bias_after"]
    # Classical baselines fitted on the training patients, scored on the same test slices.
    base = pair["paired"]["baselines"]
    assert set(base["linear filter"]["directions"]) == {"B30f->BONE", "BONE->B30f"}
    assert set(base["gaussian blur"]["directions"]) == {"BONE->B30f"}  # blur only where it smooths
    smooth = base["linear filter"]["directions"]["BONE->B30f"]
    assert smooth["psnr_after"] > smooth["psnr_before"]
    assert base["gaussian blur"]["directions"]["BONE->B30f"]["fitted_params"]["sigma_px"] > 0
    assert any("classical baselines" in n for n in res["notes"])
    summary = res["summary"][res["models"][0]["label"]]
    assert set(summary) == {"B30f<->BONE", "mean"}
    assert "fid_NOT_COMPARABLE" in summary["B30f<->BONE"] and "fid" not in summary["B30f<->BONE"]
    assert "clinical_laa950_bias" in summary["B30f<->BONE"]


def test_quick_evaluate_and_curves(setup, tmp_path):
    root, ds, m1, _ = setup
    run = tmp_path / "run"
    res = quick_evaluate(
        m1, ds, run / "eval" / "iter_000100.json", max_slices_per_domain=2, cache_dir=root / "cache"
    )
    assert res["metrics"] == ["radiomics", "paired"]
    data = json.loads((run / "eval" / "iter_000100.json").read_text())
    lab = data["models"][0]["label"]
    # A second checkpoint with other values (same format) to draw a curve through.
    for pair in data["summary"][lab].values():
        for k in pair:
            if isinstance(pair[k], float):
                pair[k] += 1.0
    (run / "eval" / "iter_000200.json").write_text(json.dumps(data))
    series = read_run(run)
    assert [p[0] for p in series["psnr_after"]["B30f<->BONE"]] == [100, 200]
    assert "average" in series["psnr_after"]
    assert curves.main([str(run), "--out", str(tmp_path / "curves")]) == 0
    assert (tmp_path / "curves" / "curve_psnr_after.png").is_file()
    assert (tmp_path / "curves" / "curves.csv").is_file()
    assert curves.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "c2")]) == 2
    assert not (tmp_path / "c2").exists()


def test_quick_evaluate_a_kernel_transfer_model(setup, tmp_path):
    """The evaluation's CanvasHarmonizer runs a kernel-transfer model from each direction's source domain
    at the dataset's pixel spacing."""
    root, ds, _, _ = setup
    kt = make_kernel_transfer_file(tmp_path / "kt.safetensors")
    quick_evaluate(kt, ds, tmp_path / "eval.json", max_slices_per_domain=2, cache_dir=root / "cache")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["models"][0]["path"] == str(kt)
    pair = data["summary"][data["models"][0]["label"]]["B30f<->BONE"]
    assert 10 < pair["psnr_after"] < 80


def test_bad_input_writes_nothing(setup, tmp_path, monkeypatch, capsys):
    root, ds, m1, _ = setup
    out = tmp_path / "out"
    with pytest.raises(EvaluationError, match="manifest.csv"):
        evaluate(tmp_path / "missing", [m1], out)
    with pytest.raises(EvaluationError, match="unknown metric"):
        evaluate(ds, [m1], out, metrics="fid,psnr")
    real = tmp_path / "real"
    shutil.copytree(ds, real)
    (real / "dataset.json").write_text(json.dumps({"simulated": False}))
    with pytest.raises(EvaluationError, match="simulated"):
        evaluate(real, [m1], out, metrics="paired")
    with pytest.raises(EvaluationError, match="'clinical' needs a simulated dataset"):
        evaluate(real, [m1], out, metrics="clinical")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    rc = main(["--dataset", str(ds), "--model", str(m1), "--out", str(out), "--metrics", "fid"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and str(tmp_path / "torch") in err
    bad_model = tmp_path / "bad.safetensors"
    bad_model.write_bytes(b"not a model")
    assert main(["--dataset", str(ds), "--model", str(bad_model), "--out", str(out)]) == 2
    assert not out.exists()


def _kt_chest() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    vol = np.full((3, 64, 64), -1000.0, dtype=np.float32)
    vol[:, ((yy - 32) / 26) ** 2 + ((xx - 32) / 27) ** 2 < 1] = 40.0
    return vol + rng.normal(0, 40, vol.shape).astype(np.float32)


def _hf_power(img: np.ndarray, spacing_mm: float, above: float = 0.3) -> float:
    spec = np.abs(np.fft.rfft2(img - img.mean(axis=(-2, -1), keepdims=True))) ** 2
    f = np.hypot(np.fft.rfftfreq(img.shape[-1], spacing_mm)[None],
                 np.fft.fftfreq(img.shape[-2], spacing_mm)[:, None])
    return float(spec[..., f > above].mean())


def test_canvas_harmonizer_runs_a_kernel_transfer_model(tmp_path):
    config = KernelTransferConfig(num_domains=3, width=8, depth=3, max_gain=8.0)
    same = -(config.knots[1:].float() / 0.5) ** 2
    ident = make_kernel_transfer_file(tmp_path / "id.safetensors", config=config, residual=False,
                                      log_mtf=same.expand(3, -1).clone())
    spec = PreprocessSpec(canvas_size=64, pixel_spacing_mm=0.8)
    canvases = hu_to_unit(_kt_chest(), spec)
    h = CanvasHarmonizer(ident, batch_size=2)
    assert h.kind == "kernel_transfer" and h.spec is None
    h.check_compatible(spec, ["B30f", "BONE"])  # any canvas: the model runs at its pixel size
    np.testing.assert_allclose(h(canvases, "BONE", source="B30f", spec=spec), canvases, atol=1e-5)
    with pytest.raises(ValueError, match="spec="):
        h(canvases, "BONE", source="B30f")
    lin = CanvasHarmonizer(make_kernel_transfer_file(tmp_path / "l.safetensors", residual=False))
    smooth = lin(canvases, "B30f", source="BONE", spec=spec)
    assert smooth.dtype == np.float32 and smooth.min() >= -1 and smooth.max() <= 1
    assert _hf_power(smooth, 0.8) < _hf_power(canvases, 0.8)
    estimated = lin(canvases, "B30f", spec=spec)  # source estimated per slice
    assert estimated.shape == canvases.shape
