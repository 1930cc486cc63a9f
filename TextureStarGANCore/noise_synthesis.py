"""Noise synthesis for the kernel-transfer model: the noise a target kernel keeps and the source removed.

The deterministic transfer (linear part + residual, trained with a squared loss) predicts the mean target
image. Where the target kernel keeps noise that the source reconstruction removed (an iterative
reconstruction such as iDose or SAFIRE), that noise is not a function of the input, so the mean has too
little of it: iterative -> sharp looks too clean. This module adds it as random noise with the spectrum it
lacks and the local level of the input's own noise.

Noise model (filtered back projection): domain ``d`` at dose level ``q`` has the noise power spectrum::

    S_d(f) = q * f * MTF_d(f)^2 * keep_d(f)

(the ramp filter's ``f`` times the squared kernel), where ``keep_d`` is the share of that noise an
iterative reconstruction keeps (1 for plain FBP; one learned radial curve per domain). The deterministic
transfer carries the input's noise over as it carries the signal (for FBP kernels the linear part and the
residual restore the target's noise; measured on the real chest pair); what it cannot restore is the noise
an iterative source removed and the target keeps. The synthesized noise supplies that::

    F(f) = q * f * MTF_t(f)^2 * max(0, keep_t(f) - (1 + KEEP_MARGIN) keep_s(f))

``q`` is estimated per region from the input: the robust block variance of its high-pass image
(``local_noise_variance``) divided by the high-pass variance that unit-dose noise of the source kernel
has. The fit uses a smooth ``max(0, .)`` (softplus of sharpness ``SOFT_BETA``) so that curves starting
equal get a gradient.

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["HP_SIGMA_MM", "BLOCK_MM", "SOFT_BETA", "KEEP_MARGIN", "highpass_response", "local_noise_variance",
           "missing_noise_spectrum", "unit_highpass_variance", "synthesize_noise"]

HP_SIGMA_MM = 1.0  # high-pass = image minus its Gaussian blur of this sigma: noise above ~0.15 cycles/mm
BLOCK_MM = 8.0  # blocks of the local noise level: small enough to follow the body, large enough to be robust
SOFT_BETA = 20.0
# Noise is added only where the target keeps more than (1 + KEEP_MARGIN) times the source's share: small
# differences between two FBP kernels' fitted curves are fitting noise, and the deterministic transfer
# already restores an FBP source's noise (a large input noise level times a small difference would not).
KEEP_MARGIN = 0.15
_CHI2_1_Q25 = 0.101531  # 25 % quantile of z^2, z ~ N(0, 1): a block's quartile of hp^2 / this = variance
_CLIP = 3.0  # sigma clipping of edge pixels; Gaussian noise within +-3 sigma has 0.97334 of its variance
_CLIPPED_VARIANCE = 0.97334


def highpass_response(freq: torch.Tensor, sigma_mm: float = HP_SIGMA_MM) -> torch.Tensor:
    """Response of "image minus its Gaussian blur" at ``freq`` cycles/mm."""
    return 1.0 - torch.exp(-2.0 * math.pi ** 2 * sigma_mm ** 2 * freq * freq)


def local_noise_variance(x: torch.Tensor, spacing_xy: Sequence[float], freq: torch.Tensor) -> torch.Tensor:
    """Robust local variance (H, W) of the high-pass of one slice ``x`` (H, W) in HU, per block of
    ``BLOCK_MM`` and interpolated between block centres: a first estimate from the block's lower quartile of
    hp^2, then twice the variance of the pixels within 3 sigma (edges are far outside: they drop out), then
    the median over the block's 3 x 3 neighbourhood. Constant padding gives 0."""
    rows, cols = x.shape
    hp = torch.fft.irfft2(torch.fft.rfft2(x.float()) * highpass_response(freq), s=(rows, cols))
    block = max(4, int(round(BLOCK_MM / max(float(spacing_xy[0]), float(spacing_xy[1])))))
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    sq = F.pad((hp * hp)[None, None], (0, nc * block - cols, 0, nr * block - rows), mode="replicate")[0, 0]
    blocks = sq.reshape(nr, block, nc, block).permute(0, 2, 1, 3).reshape(nr, nc, -1)
    est = blocks.kthvalue(max(1, blocks.shape[-1] // 4), -1).values / _CHI2_1_Q25
    for _ in range(2):
        keep = (blocks <= _CLIP ** 2 * est[..., None]).float()
        est = (blocks * keep).sum(-1) / keep.sum(-1).clamp_min(1.0) / _CLIPPED_VARIANCE
    # Median of each block's 3 x 3 neighbourhood: a block filled by a bone or a border (where the high-pass
    # is structure, not noise) takes its neighbours' level.
    nb = F.unfold(F.pad(est[None, None], (1, 1, 1, 1), mode="replicate"), 3)[0]
    est = nb.median(0).values.reshape(nr, nc)
    var = F.interpolate(est[None, None], size=(nr * block, nc * block), mode="bilinear",
                        align_corners=False)[0, 0]
    return var[:rows, :cols]


def missing_noise_spectrum(freq: torch.Tensor, log_mtf2_tgt: torch.Tensor, log_keep_src: torch.Tensor,
                           log_keep_tgt: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """F(f) per unit dose on the rfft grid ``freq`` from the target's log MTF^2 and both domains' log keep,
    all on the same grid. ``soft`` (fitting): softplus instead of max(0, .), so that curves starting equal
    get a gradient; synthesis uses the exact max, which adds nothing where the target keeps no more noise
    than the source."""
    s_t = freq * torch.exp(log_mtf2_tgt + log_keep_tgt)
    short = 1.0 - (1.0 + KEEP_MARGIN) * torch.exp(log_keep_src - log_keep_tgt)
    if soft:
        return s_t * F.softplus(SOFT_BETA * short) / SOFT_BETA
    return s_t * torch.clamp(short, min=0.0)


def unit_highpass_variance(freq: torch.Tensor, log_src: torch.Tensor) -> torch.Tensor:
    """High-pass variance of unit-dose noise of spectrum f * exp(log_src) (mean over the grid)."""
    return (freq * torch.exp(log_src) * highpass_response(freq) ** 2).mean()


def synthesize_noise(x: torch.Tensor, spacing_xy: Sequence[float], freq: torch.Tensor,
                     curves: Sequence[torch.Tensor], seed: int, floor_hu: float = -1024.0) -> torch.Tensor:
    """Random noise (H, W) for one slice ``x`` (H, W) of clipped HU: ``curves`` = (log NPS/f of the source,
    log MTF^2 of the target, log keep of source and target) on the grid ``freq``; spectrum
    ``missing_noise_spectrum``,
    level from the input's local noise, none at the clipping floor (scanner padding, outside the
    reconstruction), reproducible from ``seed`` (the same on CPU and GPU: drawn on the CPU)."""
    rows, cols = x.shape
    log_nps_src, log_mtf2_tgt, log_keep_src, log_keep_tgt = curves
    q = local_noise_variance(x, spacing_xy, freq) / unit_highpass_variance(freq, log_nps_src).clamp_min(1e-12)
    amp = torch.sqrt(missing_noise_spectrum(freq, log_mtf2_tgt, log_keep_src, log_keep_tgt))
    gen = torch.Generator().manual_seed(int(seed))
    white = torch.randn((rows, cols), generator=gen).to(x.device)
    shaped = torch.fft.irfft2(torch.fft.rfft2(white) * amp, s=(rows, cols))
    inside = (x > floor_hu + 0.5).to(shaped.dtype)
    return torch.sqrt(q.clamp_min(0.0)) * shaped * inside
