"""Export a training run to the engine's model file.

    python -m Training.export RUN_DIR --out MODEL.safetensors


The file holds the EMA generator / mapping network / style encoder, one deterministic target style per
domain (mean EMA mapping-network style over `--num-latents` seeded latents), the domains and preprocessing
the run was trained with, provenance (data, iterations, texture loss on/off, code version, config) and the
latest validation metrics found in RUN_DIR/eval/. `Harmonizer.from_checkpoint` loads it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from TextureStarGANCore import __version__
from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.domains import Domain
from TextureStarGANCore.model_file import (
    DEFAULT_NUM_LATENTS,
    compute_domain_styles,
    instantiate,
    load_model_file,
    make_model_card,
    save_kernel_transfer_model,
    save_model_file,
    weights_from_networks,
)
from TextureStarGANCore.networks import build_networks
from TextureStarGANCore.preprocessing import PreprocessSpec

from .checkpointing import CheckpointError, load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
SIMULATED_USE = (
    "Demonstration model trained on simulated CT reconstruction kernels (digital phantoms), not on patient "
    "scans. It shows the method and the software working; it is not validated for real scanners and is "
    "not for clinical use."
)
RESEARCH_USE = (
    "Research use: harmonize CT slices between reconstruction kernels for quantitative analysis. "
    "Not for diagnosis."
)


def code_version() -> str:
    """`git describe` of the source tree when available, else the package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()
        if out:
            return f"ct-harmonization {__version__} (git {out})"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"ct-harmonization {__version__}"


def latest_metrics(run_dir: Path, up_to_iteration: int) -> dict[str, Any]:
    """Contents of the newest RUN_DIR/eval/iter_XXXXXX.json not newer than the exported iteration."""
    folder = Path(run_dir) / "eval"
    best: tuple[int, Path] | None = None
    for p in folder.glob("iter_*.json") if folder.is_dir() else []:
        try:
            it = int(p.stem.split("_", 1)[1])
        except ValueError:
            continue
        if it <= up_to_iteration and (best is None or it > best[0]):
            best = (it, p)
    if best is None:
        return {}
    try:
        data = json.loads(best[1].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {"iteration": best[0], "source": best[1].name, "results": data}


def export_model(
    out: Path,
    *,
    ema: Mapping[str, nn.Module],
    model_config: ModelConfig,
    iteration: int,
    texture_loss: bool,
    run_info: Mapping[str, Any],
    train_config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    num_latents: int = DEFAULT_NUM_LATENTS,
    style_seed: int = 0,
    transfer_filters: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the model file from EMA networks (used by the CLI below and by the trainer's snapshots).

    ``transfer_filters``: optional card entries from ``trainer.transfer_filters.fit_domain_filters``.
    """
    try:
        domains = [Domain.from_dict(d) for d in run_info["domains"]]
        spec = PreprocessSpec.from_dict(run_info["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"run information lacks valid domains/preprocessing ({exc}); "
                              "the run was not started by Training.train") from None
    if model_config.img_size < spec.canvas_size:
        # Trained on img_size crops: the generator's instance norm only knows crop statistics, so inference
        # runs it on tiles of the training size (TextureStarGANCore.inference.run_generator_tiled).
        spec = replace(spec, tile_size=model_config.img_size)
    styles = compute_domain_styles(ema["mapping_network"], model_config.num_domains,
                                   num_latents=num_latents, seed=style_seed)
    simulated = bool(run_info.get("simulated", False))
    card = make_model_card(
        config=model_config,
        domains=domains,
        preprocessing=spec,
        training={
            "data": str(run_info.get("data", "unknown")),
            "iterations": int(iteration),
            "texture_loss": bool(texture_loss),
            "code_version": code_version(),
            "config": dict(train_config),
            "simulated_data": simulated,
        },
        num_latents=num_latents,
        style_seed=style_seed,
        metrics=metrics,
        intended_use=SIMULATED_USE if simulated else RESEARCH_USE,
        transfer_filters=transfer_filters,
    )
    weights = weights_from_networks({k: ema[k] for k in ("generator", "mapping_network", "style_encoder")})
    return save_model_file(out, config=model_config, weights=weights, domain_styles=styles, card=card)


def export_checkpoint(
    checkpoint: Path, out: Path, *, run_dir: Path | None = None, num_latents: int = DEFAULT_NUM_LATENTS,
    style_seed: int = 0, transfer_filters: list[dict[str, Any]] | None = None,
) -> Path:
    """Export the EMA weights of one training checkpoint."""
    state = load_checkpoint(checkpoint)
    model_config = ModelConfig.from_dict(state["model_config"])
    nets = build_networks(model_config)
    ema = {}
    for k in ("generator", "mapping_network", "style_encoder"):
        nets[k].load_state_dict(state["ema"][k])
        ema[k] = nets[k].eval()
    iteration = int(state["iteration"])
    run_dir = Path(run_dir) if run_dir is not None else Path(checkpoint).resolve().parents[1]
    return export_model(
        out, ema=ema, model_config=model_config, iteration=iteration, texture_loss="texture" in state,
        run_info=state.get("run_info", {}), train_config=state["config"],
        metrics=latest_metrics(run_dir, iteration), num_latents=num_latents, style_seed=style_seed,
        transfer_filters=transfer_filters,
    )


def amend_model_card(
    path: Path, out: Path, *, metrics: Mapping[str, Any] | None = None,
    transfer_filters: list[dict[str, Any]] | None = None,
) -> Path:
    """Rewrite a model file with card additions (extra ``metrics`` keys, ``transfer_filters``); the
    weights, styles and every other card field stay exactly as they were (the weights checksum too)."""
    mf = load_model_file(path)
    card = dict(mf.card)
    if metrics:
        card["metrics"] = {**card.get("metrics", {}), **metrics}
    if transfer_filters is not None:
        card["transfer_filters"] = [dict(e) for e in transfer_filters]
    if mf.kind == "kernel_transfer":  # rebuilt from the file's own networks; the same weights and fields
        nets = instantiate(mf, "cpu")
        return save_kernel_transfer_model(
            out, nets["generator"], nets["source_estimator"], list(mf.domains), card["training"],
            metrics=card.get("metrics"), supported_pixel_mm=card["supported_pixel_mm"],
            intended_use=card["intended_use"], transfer_filters=card.get("transfer_filters"),
            created=card.get("created"))
    weights = {f"{net}.{k}": v for net, sd in mf.state_dicts.items() for k, v in sd.items()}
    return save_model_file(out, config=mf.config, weights=weights, domain_styles=mf.domain_styles, card=card)
