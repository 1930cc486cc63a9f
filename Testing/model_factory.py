"""Valid small model files with random weights, for tests (never for harmonizing real data)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS, Domain
from TextureStarGANCore.model_file import (
    compute_domain_styles,
    make_model_card,
    save_model_file,
    weights_from_networks,
)
from TextureStarGANCore.networks import build_networks
from TextureStarGANCore.preprocessing import PreprocessSpec

# Few latents keep file creation fast; the style is still the documented mean over seeded latents.
TEST_NUM_LATENTS = 256


def make_model_file(
    path: str | os.PathLike[str],
    *,
    config: ModelConfig | None = None,
    domains: Sequence[Domain] | None = None,
    spec: PreprocessSpec | None = None,
    iterations: int = 0,
    seed: int = 0,
    transfer_filters: list[dict] | None = None,
) -> Path:
    """Write a valid model file with He-initialised weights (seeded) and return its path.

    Defaults: the three simulated domains, `ModelConfig.small`, and a canvas of `img_size` pixels covering
    512 mm (the paper's field of view) so tests stay fast. Marked untrained unless `iterations > 0`.
    """
    domains = list(domains) if domains is not None else list(DEFAULT_SIMULATED_DOMAINS)
    config = config or ModelConfig.small(num_domains=len(domains))
    spec = spec or PreprocessSpec(canvas_size=config.img_size, pixel_spacing_mm=512.0 / config.img_size)
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        nets = build_networks(config)
    styles = compute_domain_styles(
        nets["mapping_network"], config.num_domains, num_latents=TEST_NUM_LATENTS, seed=seed
    )
    card = make_model_card(
        config=config,
        domains=domains,
        preprocessing=spec,
        training={
            "data": "none (random weights for tests)",
            "iterations": int(iterations),
            "texture_loss": False,
            "code_version": "test",
            "config": {},
        },
        num_latents=TEST_NUM_LATENTS,
        style_seed=seed,
        intended_use="Tests only: random weights.",
        transfer_filters=transfer_filters,
    )
    return save_model_file(
        path, config=config, weights=weights_from_networks(nets), domain_styles=styles, card=card
    )
