"""Valid small model files with random weights, for tests (never for harmonizing real data).

``make_model_file``: a StarGAN v2 model; ``make_kernel_transfer_file``: a kernel-transfer model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS, Domain
from TextureStarGANCore.kernel_transfer import KernelTransferConfig, KernelTransferGenerator, SourceEstimator
from TextureStarGANCore.model_file import (
    compute_domain_styles,
    make_model_card,
    save_kernel_transfer_model,
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


# Kernel transfer ------------------------------------------------------------------------------------------
KT_TINY = KernelTransferConfig(num_domains=3, width=8, depth=3)
# Gaussian-like MTFs, exp(-(f / f_c)^2), per domain of DEFAULT_SIMULATED_DOMAINS (cycles/mm): B30f smooth,
# BONE sharp, STANDARD in between.
KT_CUTOFFS = {"B30f": 0.45, "BONE": 0.9, "STANDARD": 0.6}


def kernel_transfer_networks(
    config: KernelTransferConfig | None = None,
    *,
    domains: Sequence[Domain] | None = None,
    seed: int = 0,
    residual: bool = True,
    log_mtf: torch.Tensor | None = None,
    log_keep: torch.Tensor | None = None,
) -> tuple[KernelTransferGenerator, SourceEstimator]:
    """A generator and source estimator with seeded, non-trivial weights (eval mode).

    ``log_mtf`` (num_domains, num_knots - 1): the learned log MTFs (default: ``KT_CUTOFFS`` Gaussians);
    ``residual`` False keeps the output layer at zero (an untrained residual: the output is the linear
    transfer). ``log_keep`` (same shape; configs with ``noise_synthesis``): the noise curves (default 0).
    The estimator's feature normalisation is set too, so every tensor of the file matters.
    """
    domains = list(domains) if domains is not None else list(DEFAULT_SIMULATED_DOMAINS)
    config = config or KT_TINY
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
        torch.manual_seed(seed)
        gen, est = KernelTransferGenerator(config), SourceEstimator(config)
        if log_mtf is None:
            f = config.knots[1:].float()
            log_mtf = torch.stack([-(f / KT_CUTOFFS.get(d.name, 0.6)) ** 2 for d in domains])
        gen.log_mtf.copy_(log_mtf)
        if log_keep is not None:
            gen.log_keep.copy_(log_keep)
        torch.nn.init.normal_(gen.film.weight, std=0.05)
        torch.nn.init.normal_(gen.film.bias, std=0.05)
        if residual:
            torch.nn.init.normal_(gen.out.weight, std=0.02)
            torch.nn.init.normal_(gen.out.bias, std=0.001)
        est.feature_mean.copy_(torch.randn(est.feature_mean.shape) * 0.5)
        est.feature_std.copy_(torch.rand(est.feature_std.shape) + 0.5)
    return gen.eval(), est.eval()


def make_kernel_transfer_file(
    path: str | os.PathLike[str],
    *,
    config: KernelTransferConfig | None = None,
    domains: Sequence[Domain] | None = None,
    iterations: int = 0,
    seed: int = 0,
    residual: bool = True,
    log_mtf: torch.Tensor | None = None,
    log_keep: torch.Tensor | None = None,
    supported_pixel_mm: tuple[float, float] = (0.4, 1.0),
    transfer_filters: list[dict] | None = None,
) -> Path:
    """Write a valid kernel-transfer model file (``kernel_transfer_networks``) and return its path.
    Marked untrained unless ``iterations > 0``."""
    domains = list(domains) if domains is not None else list(DEFAULT_SIMULATED_DOMAINS)
    gen, est = kernel_transfer_networks(config, domains=domains, seed=seed, residual=residual,
                                        log_mtf=log_mtf, log_keep=log_keep)
    training = {"data": "none (seeded test weights)", "iterations": int(iterations), "texture_loss": False,
                "code_version": "test"}
    return save_kernel_transfer_model(
        path, gen, est, domains, training, supported_pixel_mm=supported_pixel_mm,
        intended_use="Tests only: seeded weights.", transfer_filters=transfer_filters,
    )


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata (model card included) of a model file, as stored."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewrite_model_file(
    src: Path,
    dst: Path,
    *,
    card: Callable[[dict], None] | None = None,
    tensors: Callable[[dict], None] | None = None,
    metadata: Callable[[dict], None] | None = None,
    digest: bool = True,
) -> Path:
    """Copy a valid file with one targeted change; the checksum is recomputed (unless ``digest`` is False)
    so only that change is tested."""
    from TextureStarGANCore import model_file

    ts, meta = read_model_file(src)
    if card is not None:
        c = json.loads(meta["model_card"])
        card(c)
        meta["model_card"] = json.dumps(c)
    if tensors is not None:
        tensors(ts)
    if digest:
        meta["weights_sha256"] = model_file._weights_digest(ts)
    if metadata is not None:
        metadata(meta)
    save_file(ts, str(dst), metadata=meta)
    return dst
