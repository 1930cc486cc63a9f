"""Multi-scale texture loss of the texture-aware StarGAN (paper section II-A/B, eqs. 4-14).

Pieces:
- `soft_glcm`: the explicit, normalized soft GLCM (eqs. 4-8). O(H*W*L^2) per offset; the reference path,
  also usable for descriptors other than contrast.
- `MultiScaleTextureExtractor`: the p x q grid T of GLCM contrasts (eqs. 9-10) through an exact closed form
  that never builds a GLCM (cost O(H*W*window) for soft moments + one FFT correlation for all offsets,
  independent of levels).
- `TextureAggregation`: SAGAN-style self-attention over the cells of Delta T (eqs. 12-14), constrained so it
  can never make the loss smaller than sum(Delta T).
- `TextureLoss`: L_txt(x_real, x_rec) (eqs. 11-14), the batch mean of per-sample sums.

Conventions
- Images are (B, 1, H, W) tensors; rows are the paper's v axis, columns its u axis. An offset (d, theta)
  pairs pixel (row r, col c) with (r + round(d sin theta), c + round(d cos theta)) (eqs. 6-7 rounded to whole
  pixels), so theta = 0 runs along the columns (to the right) and 90 degrees down the rows -- the same
  convention as scikit-image's `graycomatrix`. Pairs whose second pixel leaves the image are excluded
  (never wrapped).
- Bin k (k = 0..L-1) has centre b_k = lo + k * (hi - lo) / (L - 1); f(i, j) = (i - j)^2 in bin units, so
  contrast is in squared bins (at L = 256 on [-1, 1], one unit is (2/255)^2 in image values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "MultiScaleTextureExtractor",
    "TextureAggregation",
    "TextureLoss",
    "explicit_contrast_grid",
    "glcm_contrast",
    "glcm_offset",
    "soft_glcm",
]

# Bins farther than this many sigmas from a pixel are skipped by the closed form. The largest neglected
# term of any soft moment is ~7^3 exp(-24.5) ~ 1e-8 of the kept mass (W is ~2.5 sigma-in-bins), well below
# the 1e-5 agreement required with the explicit path (measured: ~2e-7, float32 rounding).
SUPPORT_SIGMAS = 7.0
# Pixels per chunk of samples processed together by the closed form (see MultiScaleTextureExtractor.forward).
CHUNK_PIXELS = 2**19


def glcm_offset(distance: int, angle_deg: float) -> tuple[int, int]:
    """(row, col) displacement of the second pixel of a pair for offset (distance, angle), eqs. 6-7."""
    rad = math.radians(angle_deg)
    # Python's round is exact for the paper's offsets (no .5 ties occur for d in 1..7 at 0/45/90/135).
    return int(round(distance * math.sin(rad))), int(round(distance * math.cos(rad)))


def _pair_slices(shape_hw: tuple[int, int], offset: tuple[int, int]) -> tuple[tuple[slice, slice], ...]:
    """Slices selecting the first and second pixel of every in-image pair for one offset."""
    h, w = shape_hw
    dr, dc = offset
    if abs(dr) >= h or abs(dc) >= w:
        raise ValueError(
            f"image of {h} x {w} pixels has no pixel pairs at offset (row {dr}, col {dc}); "
            "use a larger image or smaller distances"
        )
    first = (slice(max(0, -dr), h - max(0, dr)), slice(max(0, -dc), w - max(0, dc)))
    second = (slice(max(0, dr), h + min(0, dr)), slice(max(0, dc), w + min(0, dc)))
    return first, second


def _check_image(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 1, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(
            f"{name} must have shape (B, 1, H, W) (single-channel images), got {tuple(x.shape)}; "
            "add the channel axis with x.unsqueeze(1)"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}; convert with x.float()")


def _check_binning(
    levels: int, sigma: float | None, value_range: Sequence[float]
) -> tuple[float, float, float]:
    """Validate the binning; returns (lo, hi, bin_width)."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    if len(value_range) != 2:
        raise ValueError(f"value_range must be (low, high), got {value_range!r}")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"value_range must be finite with low < high, got {value_range!r}")
    if sigma is not None and not (math.isfinite(float(sigma)) and float(sigma) > 0):
        raise ValueError(f"sigma must be a positive number (or None for one bin width), got {sigma!r}")
    return lo, hi, (hi - lo) / (levels - 1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (gradcheck, references); bf16/fp16 (autocast) and float32 run in float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def soft_glcm(
    x: torch.Tensor,
    distance: int,
    angle: float,
    levels: int,
    sigma: float,
    value_range: Sequence[float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Explicit normalized soft GLCM of eqs. 4-8 for one offset: (B, 1, H, W) -> (B, levels, levels).

    G[b, i, j] = sum over pairs (p, q = p + offset) of a_i(x_p) a_j(x_q), divided by its total, with
    a_k(x) = exp(-(x - b_k)^2 / (2 sigma^2)). `angle` is in degrees (see the module docstring for the axes).
    Memory and time grow with H*W*levels (soft histograms) and H*W*levels^2 (products): use it for small
    images and as the reference for `MultiScaleTextureExtractor`.
    """
    _check_image(x)
    lo, hi, _ = _check_binning(levels, sigma, value_range)
    if sigma is None:
        raise ValueError("soft_glcm needs an explicit sigma")
    if isinstance(distance, bool) or not isinstance(distance, int) or distance < 1:
        raise ValueError(f"distance must be a positive integer number of pixels, got {distance!r}")
    dtype = _compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        img = x[:, 0].to(dtype)
        first, second = _pair_slices(tuple(img.shape[-2:]), glcm_offset(distance, angle))
        centres = torch.linspace(lo, hi, levels, dtype=dtype, device=x.device)
        b = img.shape[0]

        def soft_histograms(values: torch.Tensor) -> torch.Tensor:
            return torch.exp(-((values.reshape(b, -1, 1) - centres) ** 2) / (2.0 * float(sigma) ** 2))

        a_first = soft_histograms(img[:, first[0], first[1]])
        a_second = soft_histograms(img[:, second[0], second[1]])
        g = torch.bmm(a_first.transpose(1, 2), a_second)
        total = g.sum(dim=(1, 2), keepdim=True)
        return g / total.clamp_min(torch.finfo(dtype).tiny)


def glcm_contrast(glcm: torch.Tensor) -> torch.Tensor:
    """Contrast t(G) = sum_ij (i - j)^2 G(i, j) (eq. 9) of normalized GLCMs (..., L, L) -> (...)."""
    levels = glcm.shape[-1]
    idx = torch.arange(levels, dtype=glcm.dtype, device=glcm.device)
    weight = (idx[:, None] - idx[None, :]) ** 2
    return (glcm * weight).sum(dim=(-2, -1))


def _fft_size(n: int) -> int:
    """Smallest m >= n whose only prime factors are 2, 3 and 5 (fast FFT lengths)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


# Poisson summation turns the Gaussian lattice sums of pixels away from the range ends into a constant plus
# harmonics e^{-2 pi^2 n^2 s^2} (s = sigma in bins). Keeping n = 1 leaves e^{-8 pi^2 s^2} (~1e-12 relative at
# s = 0.6, 1e-34 at the default s = 1): below this, pixels use the windowed sum everywhere.
ANALYTIC_MIN_SIGMA_BINS = 0.6


def _window_moments(c0: torch.Tensor, levels: int, s: float, radius: int) -> tuple[torch.Tensor, ...]:
    """Centred soft moments sum_k u^j a_k (j = 0..3, u = k - c) over the existing bins near each c."""
    n = min(2 * radius, levels)
    # Window of n bins starting at floor(c) - radius + 1, slid inside 0..L-1 near the range ends: every
    # existing bin closer than `radius` bins to c is inside it, and no non-existent bin ever is.
    base = torch.clamp(torch.floor(c0) - (radius - 1), 0, levels - n)
    d = base - c0
    w, m1, m2, m3 = (torch.zeros_like(c0) for _ in range(4))
    u, a, t = (torch.empty_like(c0) for _ in range(3))
    inv = -0.5 / (s * s)
    # Loop over window bins with in-place ops: temporaries stay one image in size.
    for k in range(n):
        torch.add(d, float(k), out=u)
        torch.mul(u, u, out=a)
        a.mul_(inv).exp_()
        w += a
        torch.mul(a, u, out=t)
        m1 += t
        t.mul_(u)
        m2 += t
        m3.addcmul_(t, u)
    return w, m1, m2, m3


def _interior_moments(c0: torch.Tensor, s: float) -> tuple[torch.Tensor, ...]:
    """The same moments for a pixel whose Gaussian lies wholly inside the bin range, in closed form.

    Poisson summation of sum_k u^j exp(-u^2 / (2 s^2)) over the integer lattice, terms n = 0, +-1, with
    A = s sqrt(2 pi) and G = A exp(-2 pi^2 s^2):
    W = A + 2G cos, m1 = -4 pi s^2 G sin, m2 = A s^2 + 2G (s^2 - 4 pi^2 s^4) cos,
    m3 = 2G (8 pi^3 s^6 - 6 pi s^4) sin, with cos, sin of 2 pi c.
    """
    a0 = s * math.sqrt(2.0 * math.pi)
    g1 = a0 * math.exp(-2.0 * math.pi**2 * s * s)
    phase = (2.0 * math.pi) * (c0 - torch.floor(c0))
    cos, sin = torch.cos(phase), torch.sin(phase)
    s2 = s * s
    return (
        a0 + (2.0 * g1) * cos,
        (-4.0 * math.pi * s2 * g1) * sin,
        a0 * s2 + (2.0 * g1 * (s2 - 4.0 * math.pi**2 * s2 * s2)) * cos,
        (2.0 * g1 * (8.0 * math.pi**3 * s2 * s2 * s2 - 6.0 * math.pi * s2 * s2)) * sin,
    )


class _ContrastGrid(torch.autograd.Function):
    """Soft-GLCM contrast of every offset from pixel positions c (B, H, W) in bin units -> (B, n_offsets).

    Forward, with a_k = exp(-(k - c)^2 / (2 s^2)) over the existing bins k = 0..L-1:
    1. Per-pixel moments centred on the pixel (u = k - c, small numbers, input precision): in closed form for
       pixels away from the range ends (`_interior_moments`), by a windowed sum for the rest.
    2. Shift to a per-sample common centre cbar (v = c - cbar) in float64: W = sum a, M1 = sum (k - cbar) a,
       M2 = sum (k - cbar)^2 a. The pair sums cancel terms of size (L/2)^2 down to a few bins^2, which
       float32 cannot do to 1e-5.
    3. num(o) = corr(M2, W)(o) + corr(W, M2)(o) - 2 corr(M1, M1)(o), den(o) = corr(W, W)(o) for all offsets
       from one zero-padded FFT (padding >= the largest offset, so pairs leaving the image never wrap).
    Backward: the gradient maps of num and den are correlations of the same maps with a kernel holding
    weights at +-o (a product with the saved spectra, one inverse FFT); d a_k / d c = a_k u_k / s^2 turns them
    into d/dc with the centred m1, m2, m3 = sum u^3 a only. Nothing of size H*W*window is kept.
    """

    @staticmethod
    def forward(ctx, c, levels: int, s: float, radius: int, offsets: tuple, size: tuple):  # type: ignore[override]
        c0 = c.detach()
        if s >= ANALYTIC_MIN_SIGMA_BINS and 2 * radius < levels:
            w, m1, m2, m3 = _interior_moments(c0, s)
            # Pixels whose +-radius window would reach past bin 0 or bin L-1 take the windowed sum.
            edge = ((c0 < radius - 1) | (c0 >= levels - radius)).flatten()
            idx = torch.nonzero(edge).squeeze(1)
            if idx.numel():
                parts = _window_moments(c0.flatten()[idx], levels, s, radius)
                for full, part in zip((w, m1, m2, m3), parts):
                    full.view(-1).index_copy_(0, idx, part)
        else:
            w, m1, m2, m3 = _window_moments(c0, levels, s, radius)
        v = (c0 - c0.mean(dim=(-2, -1), keepdim=True)).double()
        w, m1, m2, m3 = w.double(), m1.double(), m2.double(), m3.double()
        b, h, wd = c0.shape
        # Zero-padded to the FFT size here (not by rfft2's `s`) to save a copy of the stack.
        maps = torch.zeros((b, 3, *size), dtype=torch.float64, device=c0.device)
        maps[:, 0, :h, :wd] = w
        torch.addcmul(m1, v, w, out=maps[:, 1, :h, :wd])
        torch.addcmul(m2, v, m1 + 0.5 * v * w, value=2.0, out=maps[:, 2, :h, :wd])  # m2 + 2 v m1 + v^2 w
        spec = torch.fft.rfft2(maps)
        f_w, f_1, f_2 = spec.unbind(1)
        # corr(A, B)(o) = sum_p A(p) B(p + o)  <->  conj(F_A) F_B. With y = corr(M2, W) - corr(M1, M1),
        # num(o) = y(o) + y(-o) (corr(W, M2)(o) = corr(M2, W)(-o)); den(o) = corr(W, W)(o).
        spectra = torch.stack([f_2.conj() * f_w - f_1.conj() * f_1, f_w.conj() * f_w], 1)
        corr = torch.fft.irfft2(spectra, s=size)
        rows = torch.tensor([dr % size[0] for dr, _ in offsets], device=c0.device)
        cols = torch.tensor([dc % size[1] for _, dc in offsets], device=c0.device)
        num = corr[:, 0, rows, cols] + corr[:, 0, (-rows) % size[0], (-cols) % size[1]]
        den = corr[:, 1, rows, cols].clamp_min(torch.finfo(torch.float64).tiny)
        contrast = num / den
        ctx.save_for_backward(spec, v, m1, m2, m3, contrast, den)
        ctx.s2, ctx.size, ctx.in_dtype, ctx.hw = s * s, size, c.dtype, (h, wd)
        # Flat positions of the +o and -o taps on the padded grid, for the backward kernels.
        ctx.taps = torch.cat([rows * size[1] + cols, ((-rows) % size[0]) * size[1] + (-cols) % size[1]])
        return contrast

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        spec, v, m1, m2, m3, contrast, den = ctx.saved_tensors
        g = g.to(torch.float64)
        alpha = g / den  # d contrast / d num
        beta = g * contrast / den  # -d contrast / d den
        b = g.shape[0]
        kernels = torch.zeros((b, 2, ctx.size[0] * ctx.size[1]), dtype=torch.float64, device=g.device)
        # Weights at +o and -o; index_add sums cells whose (d, angle) round to the same pixel offset.
        weights = torch.stack([alpha, beta], 1)  # (B, 2, n_offsets)
        kernels.index_add_(2, ctx.taps, torch.cat([weights, weights], 2))
        k_spec = torch.fft.rfft2(kernels.view(b, 2, *ctx.size)).conj()
        k_a, k_b = k_spec[:, 0], k_spec[:, 1]
        f_w, f_1, f_2 = spec.unbind(1)
        # sum_o k_o (X(r + o) + X(r - o)) = corr(kernel, X)(r)  <->  conj(F_kernel) F_X
        parts = torch.stack([f_2 * k_a - f_w * k_b, -2.0 * f_1 * k_a, f_w * k_a], 1)
        grads = torch.fft.irfft2(parts, s=ctx.size)
        h, wd = ctx.hw
        g_w, g_m1, g_m2 = grads[:, :, :h, :wd].unbind(1)
        # d/dc of W, M1, M2 (cbar held constant: the expansion holds for any centre).
        grad = g_w * m1 + g_m1 * torch.addcmul(m2, v, m1) + g_m2 * (m3 + v * (2.0 * m2 + v * m1))
        return (grad / ctx.s2).to(ctx.in_dtype), None, None, None, None, None


class MultiScaleTextureExtractor(nn.Module):
    """Grid T of soft-GLCM contrasts (eqs. 9-10): (B, 1, H, W) -> (B, len(distances), len(angles)).

    Exact closed form (derived below). Since sum_ij (i - j)^2 a_i(p) a_j(q) expands into products of
    per-pixel sums, with W = sum_k a_k, M1 = sum_k k a_k, M2 = sum_k k^2 a_k and q = p + offset:
        contrast = sum_p [M2(p) W(q) + W(p) M2(q) - 2 M1(p) M1(q)] / sum_p W(p) W(q).
    - The moments cost O(H*W), whatever the number of levels: in closed form (Poisson summation, exact to
      e^{-8 pi^2 sigma^2 / bin^2}) for pixels whose Gaussian lies inside the bin range, and summed over the
      bins within `SUPPORT_SIGMAS` sigmas (14 at the default sigma) for pixels near the range ends, such
      as CT air at -1.
    - The pair sums are cross-correlations of the W, M1, M2 maps at the offsets; one zero-padded FFT gives
      them for every offset at once (zero padding = pairs leaving the image are excluded, never wrapped).
    - They run in float64 on moments centred per sample, because the bracket cancels terms of size
      (L/2)^2 down to a contrast of a few bins^2. Result: equal to the explicit soft GLCM to ~1e-7 from
      float32 input (float32 rounding of the moments), ~1e-13 from float64 input.

    Default sigma = one bin width, (hi - lo) / (levels - 1). Why: (1) a Gaussian of at least one bin width
    summed over the bin grid is translation invariant to ~1e-8 (Poisson summation: ripple
    2 exp(-2 pi^2 sigma^2 / bin^2)), so contrast is a smooth function of the pixel values and not of their
    position between bin centres (at half a bin the ripple is 1.4%, at a quarter 58%); (2) inside the range
    the soft contrast is then the hard, continuous-valued contrast plus a constant 2 sigma^2 = 2 bins^2, so
    texture differences keep their full size. A wide sigma (0.5 on [-1, 1], ~64 bins) lets the range ends
    clip the Gaussians and compresses contrast until different textures look alike.
    """

    def __init__(
        self,
        distances: Sequence[int] = (1, 3, 5, 7),
        angles: Sequence[float] = (0, 45, 90, 135),
        levels: int = 256,
        sigma: float | None = None,
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        lo, hi, width = _check_binning(levels, sigma, value_range)
        distances = tuple(distances)
        angles = tuple(float(a) for a in angles)
        if not distances or not angles:
            raise ValueError("distances and angles must each name at least one offset")
        for d in distances:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ValueError(f"distances must be positive integers (pixels), got {d!r}")
        self.distances = distances
        self.angles = angles
        self.levels = levels
        self.value_range = (lo, hi)
        self.bin_width = width
        self.sigma = float(sigma) if sigma is not None else width
        self.offsets = [glcm_offset(d, a) for d in distances for a in angles]
        self._radius = max(1, math.ceil(SUPPORT_SIGMAS * self.sigma / width))

    def extra_repr(self) -> str:
        return (
            f"distances={self.distances}, angles={self.angles}, levels={self.levels}, "
            f"sigma={self.sigma:.6g}, value_range={self.value_range}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x)
        dtype = _compute_dtype(x)
        h, w = x.shape[-2:]
        for off in self.offsets:
            _pair_slices((h, w), off)  # a clear error for images smaller than an offset
        with torch.autocast(device_type=x.device.type, enabled=False):
            c = (x[:, 0].to(dtype) - self.value_range[0]) / self.bin_width
            pad_r = max(abs(dr) for dr, _ in self.offsets)
            pad_c = max(abs(dc) for _, dc in self.offsets)
            size = (_fft_size(h + pad_r), _fft_size(w + pad_c))
            s = self.sigma / self.bin_width
            # Samples are independent; chunks of ~CHUNK_PIXELS keep the float64 maps and spectra in cache
            # (measured on CPU: batch 8 at 512 x 512 in chunks of 1-2 samples runs ~1.5x faster).
            step = max(1, CHUNK_PIXELS // (h * w))
            parts = [
                _ContrastGrid.apply(c[i : i + step], self.levels, s, self._radius, tuple(self.offsets), size)
                for i in range(0, c.shape[0], step)
            ]
            contrast = torch.cat(parts) if len(parts) > 1 else parts[0]
            return contrast.to(dtype).reshape(x.shape[0], len(self.distances), len(self.angles))


def explicit_contrast_grid(
    x: torch.Tensor,
    distances: Sequence[int] = (1, 3, 5, 7),
    angles: Sequence[float] = (0, 45, 90, 135),
    levels: int = 256,
    sigma: float | None = None,
    value_range: Sequence[float] = (-1.0, 1.0),
) -> torch.Tensor:
    """The same grid as `MultiScaleTextureExtractor`, through explicit soft GLCMs (reference, slow)."""
    _, _, width = _check_binning(levels, sigma, value_range)
    sigma = width if sigma is None else sigma
    cells = [glcm_contrast(soft_glcm(x, d, a, levels, sigma, value_range)) for d in distances for a in angles]
    return torch.stack(cells, dim=-1).reshape(x.shape[0], len(distances), len(angles))


class TextureAggregation(nn.Module):
    """Self-attention aggregation of Delta T (eqs. 12-14): (B, p, q) -> per-sample L_txt (B,).

    The p*q cells are the tokens. 1x1 convolutions give queries and keys (`qk_channels` each) and values;
    A = softmax(Q^T K) (rows over keys); Delta T' = gamma * A V + Delta T; L_txt = sum of Delta T'.

    Blocking the degenerate direction: with free gamma and values the module could make L_txt small or
    negative while Delta T stays large (gamma < 0, or values with a bias cancelling Delta T). So
    - values are V = v * Delta T with v = sigmoid(raw) in (0, 1) (a bias-free, non-negative 1x1 conv), so
      V >= 0 and V = 0 exactly when Delta T = 0;
    - gamma = gamma_max * sigmoid(raw) in (0, gamma_max).
    Then L_txt = sum_m (1 + gamma v sum_n A[n, m]) Delta T[m]: a weighted sum of the cells with every weight
    in [1, 1 + gamma_max * p * q]. Hence sum(Delta T) <= L_txt <= (1 + gamma_max p q) sum(Delta T): the loss
    is 0 iff the grids match and can fall only by reducing Delta T.

    The module's own objective: trained to minimise the same loss, the lower bound would simply drive
    gamma to 0 (the attention would switch itself off, the pitfall of an untrained module). Trained to
    MAXIMISE it (`aggregation_objective`, like a critic), it learns to put weight on the cells where the
    generator's texture mismatch is largest, which is the "dynamic aggregation" the method is after; the
    bounds above keep that game finite. Queries and keys see Delta T divided by its per-sample mean, so
    the attention pattern depends on the shape of the mismatch, not on its overall scale (bins^2 units).
    """

    def __init__(
        self,
        grid_shape: tuple[int, int] = (4, 4),
        qk_channels: int = 8,
        gamma_max: float = 1.0,
        gamma_init: float = 0.1,
    ) -> None:
        super().__init__()
        if not (0 < gamma_init < gamma_max):
            raise ValueError(f"need 0 < gamma_init < gamma_max, got {gamma_init} and {gamma_max}")
        self.grid_shape = tuple(grid_shape)
        self.gamma_max = float(gamma_max)
        self.query = nn.Conv1d(1, qk_channels, kernel_size=1)
        self.key = nn.Conv1d(1, qk_channels, kernel_size=1)
        # Value conv weight and gamma are stored unconstrained and mapped through sigmoids (see docstring).
        self.value_raw = nn.Parameter(torch.zeros(1, 1, 1))
        self.gamma_raw = nn.Parameter(torch.tensor(math.log(gamma_init / (gamma_max - gamma_init))))
        self.last_attention: torch.Tensor | None = None

    @property
    def gamma(self) -> torch.Tensor:
        return self.gamma_max * torch.sigmoid(self.gamma_raw)

    @property
    def value_weight(self) -> torch.Tensor:
        return torch.sigmoid(self.value_raw)

    def refine(self, delta: torch.Tensor) -> torch.Tensor:
        """Delta T' = gamma * A V + Delta T, shape (B, p, q) like the input."""
        if delta.dim() != 3 or tuple(delta.shape[1:]) != self.grid_shape:
            raise ValueError(
                f"Delta T must have shape (B, {self.grid_shape[0]}, {self.grid_shape[1]}), "
                f"got {tuple(delta.shape)}"
            )
        b = delta.shape[0]
        tokens = delta.reshape(b, 1, -1)  # per-sample reshape: cells of sample i never mix with sample j
        scale = tokens.mean(dim=-1, keepdim=True).clamp_min(1e-12)
        normed = tokens / scale
        # The 1x1 convolutions and products are written out as broadcasts: with one input channel and 16
        # tokens, conv/bmm kernels cost milliseconds of threading overhead for a few hundred flops.
        q = self.query.weight.view(1, -1, 1) * normed + self.query.bias.view(1, -1, 1)  # (B, C, N)
        k = self.key.weight.view(1, -1, 1) * normed + self.key.bias.view(1, -1, 1)
        attn = torch.softmax((q.unsqueeze(3) * k.unsqueeze(2)).sum(1), dim=-1)  # (B, N, N), rows = queries
        v = self.value_weight.view(1, 1, 1) * tokens  # (B, 1, N): non-negative, 0 where Delta T is 0
        out = (attn * v).sum(-1, keepdim=True).transpose(1, 2)  # out[n] = sum_m A[n, m] V[m]
        self.last_attention = attn.detach()
        return (self.gamma * out + tokens).reshape_as(delta)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample L_txt = <1, vec(Delta T')> (eq. 12), shape (B,)."""
        return self.refine(delta).sum(dim=(-2, -1))

    def stats(self) -> dict[str, float]:
        """Scalars worth logging: gamma, value weight, mean attention entropy (max = log(p*q))."""
        out = {"gamma": float(self.gamma.detach()), "value_weight": float(self.value_weight.detach())}
        if self.last_attention is not None:
            a = self.last_attention
            ent = -(a * torch.log(a.clamp_min(1e-30))).sum(-1).mean()
            out["attention_entropy"] = float(ent)
            out["attention_entropy_max"] = math.log(a.shape[-1])
        return out


class TextureLoss(nn.Module):
    """L_txt(x_real, x_rec) (eqs. 11-14): scalar, the batch mean of per-sample aggregated |T - T~|.

    `aggregation.parameters()` must be stepped by the trainer with `aggregation_objective` (it maximises the
    loss within its bounds; see `TextureAggregation`). The generator minimises `forward`. Computation runs in
    float32 (float64 stays float64) with autocast disabled inside, on whatever device the inputs are on.
    Scale: contrast is in squared bins, so L_txt grows with `levels` (x4 per doubling); the paper adds it
    unweighted at 256 levels, and a trainer weight rescales it.
    """

    def __init__(
        self,
        distances: Sequence[int] = (1, 3, 5, 7),
        angles: Sequence[float] = (0, 45, 90, 135),
        levels: int = 256,
        sigma: float | None = None,
        value_range: Sequence[float] = (-1.0, 1.0),
        qk_channels: int = 8,
        gamma_max: float = 1.0,
        gamma_init: float = 0.1,
    ) -> None:
        super().__init__()
        self.extractor = MultiScaleTextureExtractor(distances, angles, levels, sigma, value_range)
        self.aggregation = TextureAggregation(
            (len(self.extractor.distances), len(self.extractor.angles)),
            qk_channels=qk_channels,
            gamma_max=gamma_max,
            gamma_init=gamma_init,
        )
        self.last_delta: torch.Tensor | None = None

    def delta_grid(self, x_real: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """Delta T = |T(x_real) - T(x_rec)| (eq. 11), shape (B, p, q)."""
        _check_image(x_real, "x_real")
        _check_image(x_rec, "x_rec")
        if x_real.shape != x_rec.shape:
            raise ValueError(
                f"x_real and x_rec must have the same shape, got {tuple(x_real.shape)} and "
                f"{tuple(x_rec.shape)}"
            )
        # Two calls, not one on the concatenation: x_real is usually data without grad, so its grid then
        # keeps nothing for backward and costs a forward only.
        return (self.extractor(x_real) - self.extractor(x_rec)).abs()

    def forward(self, x_real: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        delta = self.delta_grid(x_real, x_rec)
        self.last_delta = delta.detach()
        with torch.autocast(device_type=delta.device.type, enabled=False):
            return self.aggregation(delta).mean()

    def aggregation_objective(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Loss for the aggregation's optimizer: -L_txt on a detached Delta T (default: the last one).

        Minimising it maximises L_txt over the aggregation parameters only; no gradient reaches the images.
        """
        if delta is None:
            if self.last_delta is None:
                raise RuntimeError("call the loss once before aggregation_objective(), or pass delta")
            delta = self.last_delta
        with torch.autocast(device_type=delta.device.type, enabled=False):
            return -self.aggregation(delta.detach().float()).mean()

    def stats(self) -> dict[str, float]:
        """Aggregation scalars plus the mean Delta T of the last call (for TensorBoard)."""
        out = self.aggregation.stats()
        if self.last_delta is not None:
            out["delta_mean"] = float(self.last_delta.mean())
        return out
