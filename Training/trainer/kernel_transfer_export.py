"""Export a kernel-transfer training run to the engine's model file (safetensors + model card)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from TextureStarGANCore.domains import Domain

from .export import code_version
from .kernel_transfer_train import KTRun
from .paired_data import PairedGroup

__all__ = ["catalogue_domains", "export_model", "SUPPORTED_PIXEL_MM", "INTENDED_USE"]

SUPPORTED_PIXEL_MM = (0.4, 1.0)  # the pixel sizes of the training data (simulated and real)
INTENDED_USE = (
    "Research use: harmonize CT slices between reconstruction kernels for quantitative analysis. Not for "
    "clinical use, not for diagnosis. Trained on simulated reconstructions of real anatomy plus the fitting "
    "halves of two real Philips pairs (chest L/B, head phantom YA/UB); see MODEL_CARD.md for the data, the "
    "measured results and their limits."
)


def catalogue_domains(names: Sequence[str]) -> list[Domain]:
    """Model domains for catalogue kernels: one per (manufacturer, kernel tag)."""
    from Training.simulator.catalogue import catalogue_kernel

    out = []
    for i, name in enumerate(names):
        spec = catalogue_kernel(name)
        display = f"{spec.manufacturer} {spec.kernel} (kernel family, e.g. {spec.scanner_model})"
        out.append(Domain(i, name, display,
                          spec.manufacturer, spec.scanner_model, spec.kernel))
    return out


def _data_text(groups: Sequence[PairedGroup]) -> str:
    sim = [g for g in groups if g.origin != "real"]
    real = [g.name for g in groups if g.origin == "real"]
    slices = sum(g.slices for g in sim)
    return (f"{len(sim)} simulated variants of real anatomy ({slices} slices, every kernel of the model, "
            f"pixel 0.4-1.0 mm, dose x0.5-2) and real pairs: {', '.join(real) or 'none'}. Real data: "
            "Philips Brilliance 16 chest L/B pair (TCIA Lung-PET-CT-Dx, CC BY 4.0), Philips Brilliance Big "
            "Bore chest/abdomen (TCIA Pancreatic-CT-CBCT-SEG, CC BY 4.0), GE HiSpeed Dual head (BSD-2) as "
            "anatomy, Philips Ingenuity head phantom pair (BSD-2); attributions in MODEL_CARD.md")


ROW_KEYS = ("rmse_hu", "lowpass_rmse_hu", "hp_noise_hu", "hp_gap_closed", "nps_distance",
            "edge_width_10_90_mm", "lung_structure_dice")


def real_pair_metrics(results_json: Path) -> dict[str, Any]:
    """The card's ``metrics.real_pairs``: one row per pair, direction and method of a ``validate_real``
    results.json (evaluated slices only), with the fitting and evaluated slice ranges."""
    import json

    res = json.loads(Path(results_json).read_text())
    main = (res.get("models") or [None])[0]  # the validated model; a --compare model's rows are left out
    rows = []
    for p in res["pairs"]:
        for dd in p["directions"].values():
            for name, m in [*dd["methods"].items(), ("real target", dd["target"])]:
                method = name
                if m.get("kind") == "model":
                    if main is not None and m.get("params", {}).get("file") != main:
                        continue
                    method = "this model --no-noise" if name.endswith("--no-noise") else "this model"
                direction = f"{dd['source_kernel']} -> {dd['target_kernel']}"
                rows.append({"pair": p["pair"], "direction": direction, "method": method,
                             **{k: m.get(k) for k in ROW_KEYS}})
    first = res["pairs"][0]
    return {"source": "python -m Training.validate_real (evaluation halves; baselines fitted on the "
                      "fitting halves)",
            "fit_slices": {p["pair"]: p["fit_slices"] for p in res["pairs"]},
            "evaluated_slices": {p["pair"]: p["evaluated_slices"] for p in res["pairs"]},
            "rmse_window_hu": first.get("rmse_window_hu", res.get("rmse_window_hu")), "rows": rows}


def export_model(run: KTRun, groups: Sequence[PairedGroup], path: Path,
                 metrics: dict[str, Any] | None = None) -> Path:
    from TextureStarGANCore.model_file import save_kernel_transfer_model

    cfg = run.cfg
    training = {
        "data": _data_text(groups),
        "iterations": int(run.iteration),
        "texture_loss": bool(cfg.loss.texture > 0),
        "code_version": code_version(),
        "config": cfg.to_dict(),
        "source_estimator": dict(run.estimator_stats),
    }
    return save_kernel_transfer_model(
        path, run.gen, run.est, catalogue_domains(cfg.domains), training, metrics=metrics or {},
        supported_pixel_mm=SUPPORTED_PIXEL_MM, intended_use=INTENDED_USE,
    )
