"""Fit the noise-synthesis curves (``log_keep``, ``TextureStarGANCore/noise_synthesis.py``) of a trained
kernel-transfer generator; everything else stays frozen.

On paired crops, in the target's uniform pixels (far from any edge, so that what is measured is noise and
not structure), the variance of the deterministic output plus the expected variance of the synthesized
noise should equal the real target's, in each of four difference-of-Gaussians bands that together reach
the corner of the frequency grid. The loss is the squared log ratio. The noise's variance is its
expectation (mean local level x band-weighted missing spectrum), so the fit draws no random numbers and is
exact to resume. Where the output already has the target's noise the curves settle where nothing is
missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from TextureStarGANCore.kernel_transfer import (
    HU_MAX,
    HU_MIN,
    KernelTransferGenerator,
    _domain_weights,
    radial_frequency_t,
)
from TextureStarGANCore.noise_synthesis import (
    highpass_response,
    local_noise_variance,
    missing_noise_spectrum,
    unit_highpass_variance,
)

from .paired_data import PairedGroup, PairSampler

BAND_SIGMAS_MM = (0.0, 0.35, 0.7, 1.4, 2.8)  # band k: Gaussian blur sigma[k] minus sigma[k + 1]
UNIFORM_GRADIENT_HU_PER_MM = 20.0  # a pixel is uniform when the 2 mm smoothed target changes slower
UNIFORM_MARGIN_MM = 4.0  # ... within this distance
_EPS_HU2 = 0.25  # variance floor (HU^2): bands a smooth kernel has cut do not dominate


def band_responses(freq: torch.Tensor) -> list[torch.Tensor]:
    """Difference-of-Gaussians bands that together pass everything above the coarsest blur: band k is the
    high-pass of sigma[k + 1] minus that of sigma[k]."""
    s = BAND_SIGMAS_MM
    return [highpass_response(freq, s[k + 1]) - highpass_response(freq, s[k]) for k in range(len(s) - 1)]


def uniform_mask(target_hu: np.ndarray, spacing_xy: Sequence[float]) -> np.ndarray:
    """Pixels of a target crop far from any edge: noise there is noise, not structure."""
    px = float(np.mean(spacing_xy))
    smooth_grad = ndimage.gaussian_gradient_magnitude(target_hu.astype(np.float32), 2.0 / px) / px
    near = ndimage.maximum_filter(smooth_grad, size=2 * int(round(UNIFORM_MARGIN_MM / px)) + 1)
    return (near < UNIFORM_GRADIENT_HU_PER_MM) & (target_hu > -1020.0)


def band_variance_pairs(a: torch.Tensor, b: torch.Tensor, bands: Sequence[torch.Tensor],
                        mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(variance of ``a``, variance of ``b``) in each band (``band_responses``) over the ``mask`` pixels, for
    two (rows, cols) HU images on one grid."""
    shape = a.shape[-2:]
    spec_a, spec_b = torch.fft.rfft2(a), torch.fft.rfft2(b)
    return [(torch.fft.irfft2(spec_a * band, s=shape)[mask].pow(2).mean(),
             torch.fft.irfft2(spec_b * band, s=shape)[mask].pow(2).mean()) for band in bands]


def noise_fit_loss(gen: KernelTransferGenerator, batch: dict[str, Any], margin: int,
                   min_pixels: int = 200) -> torch.Tensor:
    """Mean squared log ratio of band variances in uniform pixels (output + expected synthesized noise vs
    target) over the non-identity crops with at least ``min_pixels`` uniform pixels."""
    x = torch.clamp(torch.from_numpy(batch["source_hu"]), HU_MIN, HU_MAX)  # as the generator clips
    y = torch.from_numpy(batch["target_hu"])
    d = gen.config.num_domains
    src = _domain_weights(torch.from_numpy(batch["source"]), d, x.device)
    tgt = _domain_weights(torch.from_numpy(batch["target"]), d, x.device)
    with torch.no_grad():
        y_det = gen(x, batch["spacing_xy"], src, tgt)
    curves = gen.noise_curves(src, tgt)
    m = margin
    terms = []
    for i in range(x.shape[0]):
        if int(batch["source"][i]) == int(batch["target"][i]):
            continue
        sp = batch["spacing_xy"][i]
        rows, cols = x.shape[-2:]
        mask_np = np.zeros((rows, cols), bool)
        mask_np[m:-m, m:-m] = uniform_mask(batch["target_hu"][i, 0], sp)[m:-m, m:-m]
        if mask_np.sum() < min_pixels:
            continue
        mask = torch.from_numpy(mask_np)
        freq = radial_frequency_t(rows, cols, sp, x.device)
        log_nps_src, *rest = (gen.interp(c[i:i + 1], freq)[0] for c in curves)
        unit = unit_highpass_variance(freq, log_nps_src).clamp_min(1e-12)
        q = local_noise_variance(x[i, 0], sp, freq) / unit
        missing = missing_noise_spectrum(freq, *rest, soft=True)
        q_u = q[mask].mean()
        bands = band_responses(freq)
        for band, (v_det, v_tgt) in zip(bands, band_variance_pairs(y_det[i, 0], y[i, 0], bands, mask),
                                        strict=True):
            v_noise = q_u * (missing * band * band).mean()  # rfft-grid mean: the variance of white noise
            terms.append((torch.log(v_det + v_noise + _EPS_HU2) - torch.log(v_tgt + _EPS_HU2)) ** 2)
    if not terms:
        return gen.log_keep.sum() * 0.0
    return torch.stack(terms).mean()


EXCESS_TOLERANCE = math.log(1.1)  # band variance up to 10 % above the target's is not penalised
# Variance floor (HU^2) of the excess term: a band a smooth kernel has all but cut (a few tenths of a HU)
# must not turn a 1 HU residual texture into a large log ratio. Measured (MODEL_CARD.md): with a
# 0.25 HU^2 floor the term cost 0.62 HU RMSE on the real chest L -> B, with 4 HU^2 0.42 HU.
EXCESS_FLOOR_HU2 = 4.0


def noise_excess_loss(out: torch.Tensor, target: torch.Tensor, batch: dict[str, Any],
                      min_pixels: int = 200, include_real: bool = True,
                      items: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared excess of the log band variances of ``out`` over ``target`` (B, 1, h, w crop interiors,
    HU) in the target's edge-free pixels, beyond ``EXCESS_TOLERANCE``; non-identity crops only.

    A squared loss is minimised by an output with at most the target's noise (noise the input cannot
    predict is averaged away), so more noise than the target in flat regions is always an error: from
    smooth to sharp kernels the residual learned to amplify noise with the edges (simulated B30f -> GE
    BONE: 70 HU high-pass noise against 48). Less noise than the target is left to the noise synthesis.
    ``include_real`` False: simulated crops only (``batch["real"]``). ``items`` (B,) bool: those crops only.
    """
    terms = []
    for i in range(out.shape[0]):
        if int(batch["source"][i]) == int(batch["target"][i]) or (items is not None and not bool(items[i])):
            continue
        if not include_real and bool(batch["real"][i]):
            continue
        sp = batch["spacing_xy"][i]
        tgt_np = target[i, 0].detach().numpy()
        mask_np = uniform_mask(tgt_np, sp)
        if mask_np.sum() < min_pixels:
            continue
        mask = torch.from_numpy(mask_np)
        rows, cols = out.shape[-2:]
        freq = radial_frequency_t(rows, cols, sp, out.device)
        for v_out, v_tgt in band_variance_pairs(out[i, 0], target[i, 0], band_responses(freq), mask):
            excess = (torch.log(v_out + EXCESS_FLOOR_HU2) - torch.log(v_tgt + EXCESS_FLOOR_HU2)
                      - EXCESS_TOLERANCE)
            terms.append(torch.relu(excess) ** 2)
    if not terms:
        return out.sum() * 0.0
    return torch.stack(terms).mean()


def fit_noise(gen: KernelTransferGenerator, groups: Sequence[PairedGroup], domain_index: dict[str, int], *,
              crop: int, margin: int, real_fraction: float, steps: int, batch: int = 12, lr: float = 0.05,
              smooth: float = 0.1, decay: float = 0.01, seed: int = 0, rows: Sequence[int] | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, float]:
    """Fit ``gen.log_keep`` in place (``steps`` Adam steps on ``noise_fit_loss`` plus a second-difference
    smoothness penalty along the knots and a small pull towards 0); returns the mean loss of the first and
    last tenth of the steps. ``rows``: only these domains' curves change (calibration); default all."""
    if not gen.config.noise_synthesis:
        raise ValueError("the generator has no noise synthesis (config.noise_synthesis is false)")
    sampler = PairSampler(groups, domain_index, crop, real_fraction, 0.0, seed + 7919)
    for p in gen.parameters():
        p.requires_grad_(False)
    gen.log_keep.requires_grad_(True)
    opt = torch.optim.Adam([gen.log_keep], lr=lr)
    row_mask = None
    if rows is not None:
        row_mask = torch.zeros(gen.log_keep.shape[0], 1)
        row_mask[list(rows)] = 1.0
    losses: list[float] = []
    try:
        for step in range(steps):
            loss = noise_fit_loss(gen, sampler.batch(batch), margin)
            curve = gen.log_keep_knots()
            reg = smooth * ((curve[:, 2:] - 2 * curve[:, 1:-1] + curve[:, :-2]) ** 2).sum(1).mean()
            reg = reg + decay * curve.pow(2).mean()  # towards FBP (keep 1) where the data say nothing
            opt.zero_grad()
            (loss + reg).backward()
            if row_mask is not None:
                gen.log_keep.grad.mul_(row_mask)  # Adam leaves a parameter with zero gradient where it is
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress("noise fit", step + 1, steps)
    finally:
        for p in gen.parameters():
            p.requires_grad_(True)
    tenth = max(1, steps // 10)
    return {"steps": steps, "loss_first": float(np.mean(losses[:tenth])) if losses else math.nan,
            "loss_last": float(np.mean(losses[-tenth:])) if losses else math.nan}
