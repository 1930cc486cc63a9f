"""The kernel-transfer generator (default model v2): a learned linear kernel transfer plus a learned residual.

Two reconstructions of the same raw data differ mostly by the ratio of their kernels' transfer functions, so
the generator starts from physics and learns only what is not linear::

    x_lin = IFFT( H_{s->t}(|f|) FFT(x) ),   H_{s->t}(f) = min~(MTF_t(f) / MTF_s(f), max_gain)
    y     = x_lin + HU_SCALE * R(x, x_lin | e_s, e_t)

- ``MTF_d`` is one learned radial response per domain (log values at ``knots`` in cycles/mm, fixed at 1 for
  f = 0 so mean HU are kept), initialised from the simulator's calibrated kernels and refined on paired
  data. Because it is a function of cycles/mm, the model runs at the input's own pixel size.
- ``min~`` is a smooth upper bound on the gain: the sharpening direction is a regularised inverse.
- ``R`` is a small fully convolutional network whose layers are modulated (FiLM) by the source and target
  domain embeddings; its output layer starts at zero, so an untrained model is exactly the linear transfer.
- The source domain is an index (known from the DICOM tags) or a probability vector over the domains
  (estimated from the image by ``SourceEstimator``, whose input is the slice's radial power spectrum).

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .noise_synthesis import synthesize_noise
from .transfer_filter import TransferFilter

__all__ = ["KernelTransferConfig", "KernelTransferGenerator", "SourceEstimator", "spectral_features",
           "linear_transfer_filter", "HU_SCALE", "HU_MIN", "HU_MAX", "PAD_MM"]

HU_SCALE = 500.0  # network inputs and residual in units of 500 HU: soft tissue and lung within a few units
HU_MIN, HU_MAX = -1024.0, 3071.0  # inputs are clipped to the 12-bit CT range (scanner padding included)
PAD_MM = 16.0  # reflected border before the FFT, so opposite edges do not blend

DomainRef = Union[torch.Tensor, Sequence[int]]


@dataclass(frozen=True)
class KernelTransferConfig:
    """Architecture of a kernel-transfer model (stored in the model card's ``architecture``)."""

    num_domains: int
    width: int = 24
    depth: int = 6
    embed_dim: int = 16
    max_gain: float = 4.0
    knot_step_per_mm: float = 0.05
    num_knots: int = 37  # 0 .. 1.8 cycles/mm: the corner frequency of 0.4 mm pixels is 1.77
    feature_bands: int = 34  # SourceEstimator: radial bands of 0.05 cycles/mm from 0.1
    estimator_hidden: int = 64
    # The log curves (gain, noise) below the second knot: quadratic in f through 0 and the second knot (True;
    # a transfer function is even and smooth at 0, and the first knot is then not free) or piecewise linear
    # (False, the first v2 files). Linear puts a kink at 0, and a free first knot learns a low-frequency
    # dip: both take 1-3 % off the contrast of large objects, 10-30 HU on a 1000 HU bone or air border.
    smooth_origin: bool = False
    # Random noise for what the target kernel keeps and the source removed (noise_synthesis.py): adds the
    # per-domain ``log_keep`` curves. Off in the first v2 files.
    noise_synthesis: bool = False
    # The residual is exactly zero on a constant image: R minus its own response to a flat image at each
    # pixel's linear-transfer level. Every kernel keeps a flat region's HU (MTF = 1 at f = 0), so a residual
    # that shifts flat air or tissue is a bias (2.4 HU in flat air on the real head pair). On from v2.3.
    flat_zero_residual: bool = False
    # Two residual networks: one for directions that sharpen (the linear transfer raises the power of the
    # source's noise), one for the others. Sharpening amplifies noise along with edges and smoothing removes
    # it, and one shared network had to trade the two (the noise-excess ablation in MODEL_CARD.md). Off in the
    # first v2 files.
    split_residual: bool = False
    kind: str = field(default="kernel_transfer")

    def __post_init__(self) -> None:
        if self.kind != "kernel_transfer":
            raise ValueError(f"not a kernel-transfer architecture: kind {self.kind!r}")
        for name in ("num_domains", "width", "depth", "embed_dim", "num_knots", "feature_bands",
                     "estimator_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.depth < 2:
            raise ValueError(f"depth must be at least 2, got {self.depth}")
        if self.num_knots < 2:
            raise ValueError(f"num_knots must be at least 2, got {self.num_knots}")
        if not (isinstance(self.max_gain, (int, float)) and self.max_gain > 1.0):
            raise ValueError(f"max_gain must be above 1, got {self.max_gain!r}")
        if not (isinstance(self.knot_step_per_mm, (int, float)) and self.knot_step_per_mm > 0):
            raise ValueError(f"knot_step_per_mm must be positive, got {self.knot_step_per_mm!r}")
        for name in ("smooth_origin", "noise_synthesis", "flat_zero_residual", "split_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def knots(self) -> torch.Tensor:
        return torch.arange(self.num_knots, dtype=torch.float64) * self.knot_step_per_mm

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> KernelTransferConfig:
        if not isinstance(d, dict):
            raise ValueError(f"architecture must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown architecture field(s) {unknown}")
        if "num_domains" not in d:
            raise ValueError("architecture is missing 'num_domains'")
        return cls(**d)


def radial_frequency_t(
    rows: int, cols: int, spacing_xy: Sequence[float], device: torch.device
) -> torch.Tensor:
    """|f| in cycles/mm of every ``torch.fft.rfft2`` coefficient of a (rows, cols) image."""
    fy = torch.fft.fftfreq(rows, d=float(spacing_xy[1]), device=device)[:, None]
    fx = torch.fft.rfftfreq(cols, d=float(spacing_xy[0]), device=device)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def _interp_knots(values: torch.Tensor, freq: torch.Tensor, step: float,
                  smooth_origin: bool = False) -> torch.Tensor:
    """Piecewise-linear interpolation of per-item knot ``values`` (B, K) at ``freq`` (H, W): (B, H, W);
    the last value beyond the last knot. ``smooth_origin`` (K >= 3): below the second knot, the parabola
    in ``freq`` through the values at 0 and at the second knot instead (the first knot's value unused)."""
    k = values.shape[1]
    pos = torch.clamp(freq / step, 0.0, k - 1.0)
    left = torch.clamp(pos.floor().long(), 0, k - 2)
    w = (pos - left).to(values.dtype)
    out = values[:, left] * (1 - w) + values[:, left + 1] * w
    if smooth_origin and k >= 3:
        shape = (-1,) + (1,) * freq.ndim
        v0, v2 = values[:, 0].reshape(shape), values[:, 2].reshape(shape)
        out = torch.where(pos < 2.0, v0 + (v2 - v0) * (pos / 2.0).to(values.dtype) ** 2, out)
    return out


def _domain_weights(ref: DomainRef, num_domains: int, device: torch.device) -> torch.Tensor:
    """(B, D) weights from indices (one-hot) or probabilities (rows summing to 1)."""
    if isinstance(ref, torch.Tensor) and ref.is_floating_point():
        if ref.ndim != 2 or ref.shape[1] != num_domains:
            raise ValueError(
                f"domain probabilities must have shape (batch, {num_domains}), got {tuple(ref.shape)}")
        return ref.to(device=device, dtype=torch.float32)
    idx = torch.as_tensor(ref, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_domains):
        raise ValueError(f"domain index out of range 0..{num_domains - 1}: {idx.tolist()}")
    return F.one_hot(idx, num_domains).float()


def _residual_layers(c: KernelTransferConfig) -> tuple[nn.ModuleList, nn.Linear, nn.Conv2d]:
    """The residual network's convolutions, FiLM layer and output layer; FiLM and output start at zero."""
    convs = nn.ModuleList([nn.Conv2d(2, c.width, 3, padding=1)]
                          + [nn.Conv2d(c.width, c.width, 3, padding=1) for _ in range(c.depth - 2)])
    film = nn.Linear(2 * c.embed_dim, 2 * c.width * (c.depth - 1))
    nn.init.zeros_(film.weight)
    nn.init.zeros_(film.bias)
    out = nn.Conv2d(c.width, 1, 3, padding=1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return convs, film, out


def _flat_response(convs: nn.ModuleList, out: nn.Conv2d, level: torch.Tensor, film: torch.Tensor,
                   points: int = 16385) -> torch.Tensor:
    """A residual network on a constant image at each pixel's ``level`` (B, 1, H, W; HU / HU_SCALE): on a
    flat input a 3 x 3 convolution is a 1 x 1 convolution with the kernel's sum (the linear transfer keeps
    the level). That is a function of the level alone, piecewise linear (leaky ReLU), so it is evaluated at
    ``points`` levels spanning each item's range and interpolated: per pixel it cost as much as the network
    itself; on the grid the error is under 0.01 HU (a test compares it with the per-pixel form)."""
    b = level.shape[0]
    flat = level.reshape(b, -1)
    lo, hi = flat.amin(1, keepdim=True).detach(), flat.amax(1, keepdim=True).detach()
    step = torch.clamp((hi - lo) / (points - 1), min=1e-12)
    grid = lo + step * torch.arange(points, device=level.device, dtype=level.dtype)  # (B, P)
    h = grid[:, None, :, None].expand(b, 2, points, 1)
    for k, conv in enumerate(convs):
        h = F.conv2d(h, conv.weight.sum((2, 3), keepdim=True), conv.bias)
        h = F.leaky_relu(h * (1 + film[:, k, 0]) + film[:, k, 1], 0.2)
    table = F.conv2d(h, out.weight.sum((2, 3), keepdim=True), out.bias).reshape(b, points)
    pos = torch.clamp((flat - lo) / step, 0.0, points - 1.0)
    left = torch.clamp(pos.floor().long(), max=points - 2)
    w = pos - left
    value = torch.gather(table, 1, left) * (1 - w) + torch.gather(table, 1, left + 1) * w
    return value.reshape(level.shape)


class KernelTransferGenerator(nn.Module):
    """y = H_{s->t} x + HU_SCALE * R(x, H x | e_s, e_t) on HU slices of any size and pixel spacing."""

    def __init__(self, config: KernelTransferConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.log_mtf = nn.Parameter(torch.zeros(c.num_domains, c.num_knots - 1))  # knot 0 is fixed at 0
        self.embed = nn.Parameter(torch.randn(c.num_domains, c.embed_dim) * 0.1)
        self.convs, self.film, self.out = _residual_layers(c)
        if c.split_residual:  # the sharpening directions' network (same layout, names ending in _up)
            self.convs_up, self.film_up, self.out_up = _residual_layers(c)
        if c.noise_synthesis:  # log of the noise power an iterative reconstruction keeps (0: plain FBP)
            self.log_keep = nn.Parameter(torch.zeros(c.num_domains, c.num_knots - 1))

    def log_mtf_knots(self) -> torch.Tensor:
        """(D, K) log MTF of every domain at the knots (0 at f = 0)."""
        return torch.cat([self.log_mtf.new_zeros(self.log_mtf.shape[0], 1), self.log_mtf], 1)

    def log_keep_knots(self) -> torch.Tensor:
        """(D, K) log share of FBP noise power each domain keeps (0 at f = 0; noise synthesis only)."""
        return torch.cat([self.log_keep.new_zeros(self.log_keep.shape[0], 1), self.log_keep], 1)

    def interp(self, knot_values: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
        """(B, H, W) values of per-item knot curves (B, K) at ``freq`` cycles/mm."""
        return _interp_knots(knot_values, freq, self.config.knot_step_per_mm, self.config.smooth_origin)

    def log_gain(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """(B, K) log gain of the linear transfer at the knots for (B, D) source/target weights."""
        lm = self.log_mtf_knots()
        d = tgt @ lm - src @ lm
        cap = math.log(self.config.max_gain)
        return cap - F.softplus(cap - d, beta=8.0)  # smooth min(d, log max_gain); 1e-4 off at d = 0

    def sharpening(self, source: DomainRef, target: DomainRef) -> torch.Tensor:
        """(B,) bool: the linear transfer raises the power of the source's noise (white noise through the
        source MTF, f-weighted for a 2-D spectrum); domains as indices (B,) or weights (B, D). A mean of the
        log gain would be ruled by the knots where both MTFs are near 0 (e.g. Philips L -> UB "sharpened")."""
        n, dev = self.config.num_domains, self.log_mtf.device
        src, tgt = _domain_weights(source, n, dev), _domain_weights(target, n, dev)
        with torch.no_grad():
            w = self.config.knots.to(self.log_mtf) * torch.exp(2 * (src @ self.log_mtf_knots()))
            return (w * torch.exp(2 * self.log_gain(src, tgt))).sum(1) > w.sum(1)

    def linear(self, x: torch.Tensor, spacing_xy: Sequence[Sequence[float]], src: torch.Tensor,
               tgt: torch.Tensor) -> torch.Tensor:
        """The linear transfer of (B, 1, H, W) clipped HU, one pixel spacing (x, y) mm per item."""
        lg = self.log_gain(src, tgt)
        rows, cols = x.shape[-2:]
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            sx, sy = float(spacing_xy[i][0]), float(spacing_xy[i][1])
            pr = min(int(math.ceil(PAD_MM / sy)), rows - 1)
            pc = min(int(math.ceil(PAD_MM / sx)), cols - 1)
            padded = F.pad(x[i:i + 1], (pc, pc, pr, pr), mode="reflect")
            freq = radial_frequency_t(rows + 2 * pr, cols + 2 * pc, (sx, sy), x.device)
            gain = torch.exp(self.interp(lg[i:i + 1], freq))
            spec = torch.fft.rfft2(padded.float()) * gain[:, None]
            filt = torch.fft.irfft2(spec, s=padded.shape[-2:])
            out[i:i + 1] = filt[..., pr:pr + rows, pc:pc + cols].to(x.dtype)
        return out

    def residual(self, x: torch.Tensor, x_lin: torch.Tensor, src: torch.Tensor,
                 tgt: torch.Tensor) -> torch.Tensor:
        cond = torch.cat([src @ self.embed, tgt @ self.embed], 1)
        smoothing = (self.convs, self.film, self.out)
        if not self.config.split_residual:
            return self._residual_branch(smoothing, x, x_lin, cond)
        up = self.sharpening(src, tgt)
        out = torch.empty_like(x)
        for chosen, layers in ((~up, smoothing), (up, (self.convs_up, self.film_up, self.out_up))):
            if bool(chosen.any()):  # each item through its own direction's network
                out[chosen] = self._residual_branch(layers, x[chosen], x_lin[chosen], cond[chosen])
        return out

    def _residual_branch(self, layers: tuple[nn.ModuleList, nn.Linear, nn.Conv2d], x: torch.Tensor,
                         x_lin: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        convs, film_layer, out = layers
        film = film_layer(cond).view(x.shape[0], len(convs), 2, self.config.width, 1, 1)
        h = torch.cat([x, x_lin], 1) / HU_SCALE
        for k, conv in enumerate(convs):
            h = conv(h)
            h = F.leaky_relu(h * (1 + film[:, k, 0]) + film[:, k, 1], 0.2)
        r = out(h)
        if self.config.flat_zero_residual:
            r = r - _flat_response(convs, out, x_lin / HU_SCALE, film)
        return HU_SCALE * r

    def noise_curves(self, src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(log NPS/f of the source at unit dose, log MTF^2 of the target, log keep of the source, log keep
        of the target) at the knots, each (B, K): the curves ``noise_synthesis`` needs."""
        lm, lk = self.log_mtf_knots(), self.log_keep_knots()
        return src @ (2 * lm + lk), tgt @ (2 * lm), src @ lk, tgt @ lk

    def noise(self, x: torch.Tensor, spacing_xy: Sequence[Sequence[float]], src: torch.Tensor,
              tgt: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Synthesized noise (B, 1, H, W) for clipped HU ``x``: one reproducible draw per seed."""
        curves = self.noise_curves(src, tgt)
        out = torch.zeros_like(x)
        for i in range(x.shape[0]):
            sx, sy = float(spacing_xy[i][0]), float(spacing_xy[i][1])
            freq = radial_frequency_t(x.shape[-2], x.shape[-1], (sx, sy), x.device)
            grid = [self.interp(c[i:i + 1], freq)[0] for c in curves]
            out[i, 0] = synthesize_noise(x[i, 0], (sx, sy), freq, grid, int(seeds[i])).to(x.dtype)
        return out

    def forward(self, x_hu: torch.Tensor, spacing_xy: Sequence[Sequence[float]], source: DomainRef,
                target: DomainRef, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Harmonize (B, 1, H, W) HU slices: ``source``/``target`` as indices (B,) or probabilities (B, D).
        ``seeds`` (one per slice): add synthesized noise (models with ``noise_synthesis``); None: the
        deterministic mean image."""
        if x_hu.ndim != 4 or x_hu.shape[1] != 1:
            raise ValueError(f"expected (batch, 1, rows, cols) HU, got shape {tuple(x_hu.shape)}")
        if len(spacing_xy) != x_hu.shape[0]:
            raise ValueError(
                f"need one pixel spacing per slice: {len(spacing_xy)} for {x_hu.shape[0]} slices")
        src = _domain_weights(source, self.config.num_domains, x_hu.device)
        tgt = _domain_weights(target, self.config.num_domains, x_hu.device)
        x = torch.clamp(x_hu, HU_MIN, HU_MAX)
        x_lin = self.linear(x, spacing_xy, src, tgt)
        y = x_lin + self.residual(x, x_lin, src, tgt)
        if seeds is not None and self.config.noise_synthesis:
            if len(seeds) != x.shape[0]:
                raise ValueError(f"need one noise seed per slice: {len(seeds)} for {x.shape[0]} slices")
            y = y + self.noise(x, spacing_xy, src, tgt, seeds)
        return y


@torch.no_grad()
def linear_transfer_filter(generator: KernelTransferGenerator, source: int, target: int,
                           description: str = "") -> TransferFilter:
    """The generator's linear part from domain index ``source`` to ``target`` as a ``TransferFilter``: the
    gain exp(log_gain) at the knots (``config.knots``, cycles/mm), the last gain beyond the last knot.

    The generator interpolates the log gain between knots and the filter the gain itself, so the two differ
    slightly between knots (knots are 0.05 cycles/mm apart by default); at the knots they agree."""
    d, device = generator.config.num_domains, generator.log_mtf.device
    src = _domain_weights([int(source)], d, device)
    tgt = _domain_weights([int(target)], d, device)
    knots = generator.config.knots.to(device=device, dtype=torch.float32)
    log_gain = generator.interp(generator.log_gain(src, tgt), knots)[0]
    gain = np.exp(log_gain.detach().double().cpu().numpy())
    return TransferFilter(generator.config.knots.numpy(), gain, description)


def spectral_features(x_hu: torch.Tensor, spacing_xy: Sequence[float], bands: int,
                      step: float = 0.05, first: float = 0.1) -> torch.Tensor:
    """What tells a kernel from an image: log10 mean power of the soft-tissue-windowed slice in radial bands
    of ``step`` cycles/mm from ``first``, and a mask of the bands the grid reaches. (B, 2 * bands)."""
    x = torch.clamp(x_hu.float(), -200.0, 300.0)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    rows, cols = x.shape[-2:]
    power = torch.fft.rfft2(x).abs().pow(2).reshape(x.shape[0], -1) / (rows * cols)
    freq = radial_frequency_t(rows, cols, spacing_xy, x.device).reshape(-1)
    band = torch.floor((freq - first) / step).long()
    nyquist = 0.5 / max(float(spacing_xy[0]), float(spacing_xy[1]))
    feats, mask = [], []
    for b in range(bands):
        sel = band == b
        reach = first + (b + 1) * step <= nyquist and bool(sel.any())
        if reach:
            feats.append(torch.log10(power[:, sel].mean(1) + 1e-3))
        else:
            feats.append(power.new_zeros(power.shape[0]))
        mask.append(power.new_full((power.shape[0],), 1.0 if reach else 0.0))
    return torch.cat([torch.stack(feats, 1), torch.stack(mask, 1)], 1)


class SourceEstimator(nn.Module):
    """Domain probabilities of a slice from ``spectral_features`` (an MLP), for inputs without usable tags."""

    def __init__(self, config: KernelTransferConfig) -> None:
        super().__init__()
        self.config = config
        f = 2 * config.feature_bands
        self.register_buffer("feature_mean", torch.zeros(f))
        self.register_buffer("feature_std", torch.ones(f))
        self.mlp = nn.Sequential(nn.Linear(f, config.estimator_hidden), nn.ReLU(),
                                 nn.Linear(config.estimator_hidden, config.num_domains))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.feature_mean) / self.feature_std)

    def forward(self, x_hu: torch.Tensor, spacing_xy: Sequence[float]) -> torch.Tensor:
        """(B, D) probabilities for (B, 1, H, W) HU slices of one pixel spacing."""
        feats = spectral_features(x_hu[:, 0], spacing_xy, self.config.feature_bands)
        return torch.softmax(self.logits(feats), 1)
