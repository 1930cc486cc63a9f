"""StarGAN v2 networks for single-channel CT slices: generator, mapping network, style encoder, discriminator.

Follows the StarGAN v2 reference configuration (Choi et al., CVPR 2020, and its official defaults) with
1 input / output channel and without the face-specific high-pass / landmark masks (w_hpf = 0). All sizes
come from `ModelConfig`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_SLOPE = 0.2  # LeakyReLU negative slope used throughout StarGAN v2

NETWORK_NAMES = ("generator", "mapping_network", "style_encoder", "discriminator")


RESIDUAL_INIT_GAIN = 0.02  # scale of the residual generator's last conv at init (see Generator)


def _act(h: Tensor, *, fresh: bool) -> Tensor:
    """LeakyReLU, in place when `h` is a temporary of ours that autograd does not track.

    On CPU a fresh 512 x 512 activation costs more in page faults than in arithmetic, so inference reuses
    buffers; training (tensors that require grad) keeps the out-of-place op.
    """
    if fresh and not h.requires_grad:
        return F.leaky_relu_(h, _SLOPE)
    return F.leaky_relu(h, _SLOPE)


def _merge(skip: Tensor, res: Tensor, *, upsample: bool = False) -> Tensor:
    """(skip + res) / sqrt(2); with `upsample`, `skip` is at half resolution and is nearest-upsampled by
    broadcasting (no upsampled copy). Keeps the activation variance constant through the stack."""
    if upsample:
        b, c, h2, w2 = res.shape
        res6 = res.view(b, c, h2 // 2, 2, w2 // 2, 2)
        skip6 = skip[:, :, :, None, :, None]
        if not res.requires_grad:
            return res6.add_(skip6).mul_(_INV_SQRT2).view(b, c, h2, w2)
        return ((res6 + skip6) * _INV_SQRT2).view(b, c, h2, w2)
    if not res.requires_grad:
        return res.add_(skip).mul_(_INV_SQRT2)
    return (skip + res) * _INV_SQRT2


def _derived(owner: nn.Module, name: str, weight: Tensor, make) -> Tensor:
    """`make(weight)`, cached on `owner` while gradients are off (inference reuses it on every slice).

    The key holds the weight's storage and version, so an optimizer / EMA update, load_state_dict or a
    device move recomputes it. With gradients on it is never cached: the result must stay in the graph.
    """
    if torch.is_grad_enabled():
        return make(weight)
    key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
    cache = owner.__dict__.setdefault("_derived_weights", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, make(weight))
    return hit[1]


def _pooled_kernel(weight: Tensor) -> Tensor:
    """The 4x4 kernel equal to a 3x3 kernel followed by a 2x2 average (mean of the four offsets)."""
    return 0.25 * (
        F.pad(weight, (0, 1, 0, 1)) + F.pad(weight, (1, 0, 0, 1))
        + F.pad(weight, (0, 1, 1, 0)) + F.pad(weight, (1, 0, 1, 0))
    )


def conv3x3_then_avgpool(
    x: Tensor, weight: Tensor, bias: Tensor | None, kernel4: Tensor | None = None
) -> Tensor:
    """avg_pool2d(conv3x3(x, pad 1), 2) computed as one 4x4 stride-2 convolution (pad 1).

    Exact rewrite: the 2x2 box average of a 3x3 convolution is a 4x4 kernel, the mean of the 3x3 kernel at
    the four offsets. It needs 4/9 of the multiply-adds and never materialises the full-resolution output.
    """
    w4 = kernel4 if kernel4 is not None else _pooled_kernel(weight)
    return F.conv2d(x, w4, bias, stride=2, padding=1)


# Row / column mixing of a 3x3 kernel seen through nearest x2 upsampling: an even output row reads input
# rows (i-1, i) with kernel rows (0, 1+2); an odd one reads (i, i+1) with kernel rows (0+1, 2).
# (Explicit CPU device: a module-level tensor must not land on 'meta' if first imported inside a meta build.)
_PHASE_MIX = torch.tensor(
    [[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], device="cpu"
)


def _phase_kernels(weight: Tensor) -> Tensor:
    """(4 * out, in, 2, 2) kernels of the four output phases of conv3x3 after nearest x2 upsampling."""
    mix = _PHASE_MIX.to(device=weight.device, dtype=weight.dtype)
    # k[a, c, o, i, r, q] = sum_uv mix[a, r, u] * weight[o, i, u, v] * mix[c, q, v]
    k = torch.einsum("aru,oiuv,cqv->acoirq", mix, weight, mix)
    return k.reshape(4 * weight.shape[0], weight.shape[1], 2, 2)


def upsample_then_conv3x3(
    x: Tensor, weight: Tensor, bias: Tensor | None, phase_kernels: Tensor | None = None
) -> Tensor:
    """conv3x3(nearest_upsample_x2(x), pad 1) computed at the input resolution (sub-pixel convolution).

    Exact rewrite: each of the four output phases is a 2x2 convolution of the input. All phases run as one
    2x2 convolution with 4x the output channels on the zero-padded input, then are interleaved. It needs 4/9
    of the multiply-adds and never materialises the upsampled input.
    """
    b, _, h, w = x.shape
    c_out = weight.shape[0]
    k = phase_kernels if phase_kernels is not None else _phase_kernels(weight)
    out = F.conv2d(F.pad(x, (1, 1, 1, 1)), k, None if bias is None else bias.repeat(4))
    out = out.view(b, 2, 2, c_out, h + 1, w + 1)
    y = out.new_empty(b, c_out, h, 2, w, 2)
    for a in (0, 1):
        for c in (0, 1):
            y[:, :, :, a, :, c] = out[:, a, c, :, a : a + h, c : c + w]
    return y.view(b, c_out, 2 * h, 2 * w)


class ResBlock(nn.Module):
    """Pre-activation residual block, optionally instance-normalised and downsampling (avg-pool x 1/2).

    Same function as the StarGAN v2 block (conv3x3 -> avg-pool; 1x1 shortcut -> avg-pool), computed with
    exact cheaper rewrites: the pooled conv as one strided conv, the pool before the 1x1 shortcut.
    """

    def __init__(self, dim_in: int, dim_out: int, *, normalize: bool, downsample: bool) -> None:
        super().__init__()
        self.normalize = normalize
        self.downsample = downsample
        self.conv1 = nn.Conv2d(dim_in, dim_in, 3, 1, 1)
        self.conv2 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
        if normalize:
            self.norm1 = nn.InstanceNorm2d(dim_in, affine=True)
            self.norm2 = nn.InstanceNorm2d(dim_in, affine=True)
        # A learned 1x1 shortcut only where the channel count changes (identity otherwise).
        self.shortcut = nn.Conv2d(dim_in, dim_out, 1, 1, 0, bias=False) if dim_in != dim_out else None

    def _residual(self, x: Tensor) -> Tensor:
        h = _act(self.norm1(x), fresh=True) if self.normalize else _act(x, fresh=False)
        if self.downsample:
            w = self.conv1.weight
            h = conv3x3_then_avgpool(h, w, self.conv1.bias, _derived(self, "conv1", w, _pooled_kernel))
        else:
            h = self.conv1(h)
        if self.normalize:
            h = self.norm2(h)
        return self.conv2(_act(h, fresh=True))

    def _skip(self, x: Tensor) -> Tensor:
        if self.downsample:
            x = F.avg_pool2d(x, 2)  # a 1x1 conv commutes with the pool: pool first, 4x cheaper
        return self.shortcut(x) if self.shortcut is not None else x

    def forward(self, x: Tensor) -> Tensor:
        return _merge(self._skip(x), self._residual(x))


class AdaIN(nn.Module):
    """Adaptive instance norm: (1 + gamma(s)) * IN(x) + beta(s), so a zero style leaves plain IN."""

    def __init__(self, style_dim: int, num_features: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(num_features, affine=False)
        self.fc = nn.Linear(style_dim, 2 * num_features)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        gamma, beta = self.fc(s)[:, :, None, None].chunk(2, dim=1)
        n = self.norm(x)
        if not (n.requires_grad or gamma.requires_grad):
            return n.mul_(1.0 + gamma).add_(beta)
        return torch.addcmul(beta, 1.0 + gamma, n)


class AdaINResBlock(nn.Module):
    """Decoder residual block with AdaIN, optionally upsampling (nearest x 2) before the first conv.

    Same function as the StarGAN v2 block, computed with exact cheaper rewrites: the conv of the upsampled
    map as a sub-pixel convolution, the 1x1 shortcut before upsampling, the upsampled shortcut added by
    broadcasting.
    """

    def __init__(self, dim_in: int, dim_out: int, style_dim: int, *, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, 1, 1)
        self.norm1 = AdaIN(style_dim, dim_in)
        self.norm2 = AdaIN(style_dim, dim_out)
        self.shortcut = nn.Conv2d(dim_in, dim_out, 1, 1, 0, bias=False) if dim_in != dim_out else None

    def _residual(self, x: Tensor, s: Tensor) -> Tensor:
        h = _act(self.norm1(x, s), fresh=True)
        if self.upsample:
            w = self.conv1.weight
            h = upsample_then_conv3x3(h, w, self.conv1.bias, _derived(self, "conv1", w, _phase_kernels))
        else:
            h = self.conv1(h)
        h = _act(self.norm2(h, s), fresh=True)
        return self.conv2(h)

    def _skip(self, x: Tensor) -> Tensor:
        return self.shortcut(x) if self.shortcut is not None else x

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return _merge(self._skip(x), self._residual(x, s), upsample=self.upsample)


def _check_image(x: Tensor, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"{what}: expected a (batch, 1, H, W) tensor, got shape {tuple(x.shape)}")


def _check_domains(y: Tensor, batch: int, num_domains: int, what: str) -> None:
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"{what}: expected domain labels of shape ({batch},), got {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: domain labels must be integer (long) tensor, got {y.dtype}")
    if batch and not y.is_meta and (int(y.min()) < 0 or int(y.max()) >= num_domains):
        raise ValueError(f"{what}: domain labels must be in 0..{num_domains - 1}, got {y.tolist()}")


def _select(per_domain: Tensor, y: Tensor) -> Tensor:
    """Pick, for each sample, the output of its own domain's head: (B, K, ...) -> (B, ...)."""
    return per_domain[torch.arange(per_domain.shape[0], device=per_domain.device), y.long()]


class Generator(nn.Module):
    """Image-to-image translator G(x, s): instance-norm encoder, AdaIN decoder driven by a style code."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.widths(cfg.n_down)
        self.stem = nn.Conv2d(1, w[0], 3, 1, 1)
        down = [ResBlock(w[i], w[i + 1], normalize=True, downsample=True) for i in range(cfg.n_down)]
        plain = [ResBlock(w[-1], w[-1], normalize=True, downsample=False) for _ in range(2)]
        self.encoder = nn.ModuleList(down + plain)
        styled = [AdaINResBlock(w[-1], w[-1], cfg.style_dim, upsample=False) for _ in range(2)]
        up = [
            AdaINResBlock(w[i + 1], w[i], cfg.style_dim, upsample=True) for i in reversed(range(cfg.n_down))
        ]
        self.decoder = nn.ModuleList(styled + up)
        self.to_out = nn.Sequential(
            nn.InstanceNorm2d(w[0], affine=True), nn.LeakyReLU(_SLOPE), nn.Conv2d(w[0], 1, 1, 1, 0)
        )
        he_init(self)
        if cfg.residual:
            # Output x + to_out(h). The correction starts at about kernel-noise size (SD ~0.02, ~30 HU),
            # not at the full He init (SD ~0.9, ~1400 HU), which would bury the anatomy. (On the CPU demo
            # config both this start and a zero start settled on the identity, because D could not yet tell
            # the kernels apart: Training/baseline_models/stargan_v1/MODEL_CARD.md.)
            last = self.to_out[-1]
            if not last.weight.is_meta:
                with torch.no_grad():
                    last.weight.mul_(RESIDUAL_INIT_GAIN)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        _check_image(x, "Generator")
        m = self.cfg.canvas_multiple
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(
                f"Generator: height and width must be multiples of {m} for this model, got "
                f"{tuple(x.shape[2:])}; pad the canvas to a multiple of {m}"
            )
        if s.dim() != 2 or s.shape != (x.shape[0], self.cfg.style_dim):
            raise ValueError(
                f"Generator: expected style of shape ({x.shape[0]}, {self.cfg.style_dim}), "
                f"got {tuple(s.shape)}"
            )
        stem = self.stem(x)
        h = stem
        for block in self.encoder:
            h = block(h)
        for block in self.decoder:
            h = block(h, s)
        if self.cfg.full_res_skip:
            # Full-resolution skip: the output layer sees pixel-level detail (noise) next to the decoder's
            # style-dependent features; without it a denoising correction must be rebuilt from 1/4 resolution.
            h = h + stem
        out = self.to_out(h)
        return x + out if self.cfg.residual else out


class MappingNetwork(nn.Module):
    """F(z, y): latent code -> style code of domain y (shared trunk, one head per domain)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hid = cfg.mapping_hidden
        trunk: list[nn.Module] = [nn.Linear(cfg.latent_dim, hid), nn.ReLU()]
        for _ in range(3):
            trunk += [nn.Linear(hid, hid), nn.ReLU()]
        self.shared = nn.Sequential(*trunk)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hid, hid), nn.ReLU(),
                nn.Linear(hid, hid), nn.ReLU(),
                nn.Linear(hid, hid), nn.ReLU(),
                nn.Linear(hid, cfg.style_dim),
            )
            for _ in range(cfg.num_domains)
        )
        he_init(self)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(
                f"MappingNetwork: expected latent of shape (batch, {self.cfg.latent_dim}), "
                f"got {tuple(z.shape)}"
            )
        _check_domains(y, z.shape[0], self.cfg.num_domains, "MappingNetwork")
        h = self.shared(z)
        return _select(torch.stack([head(h) for head in self.heads], dim=1), y)


def _encoder_trunk(cfg: ModelConfig) -> tuple[nn.Sequential, int]:
    """Shared body of the style encoder and discriminator: img_size -> 4 x 4 -> 4x4 valid conv -> 1 x 1."""
    w = cfg.widths(cfg.n_down_encoder)
    layers: list[nn.Module] = [nn.Conv2d(1, w[0], 3, 1, 1)]
    layers += [
        ResBlock(w[i], w[i + 1], normalize=False, downsample=True) for i in range(cfg.n_down_encoder)
    ]
    layers += [nn.LeakyReLU(_SLOPE), nn.Conv2d(w[-1], w[-1], 4, 1, 0), nn.LeakyReLU(_SLOPE)]
    return nn.Sequential(*layers), w[-1]


def dc_free_(conv: nn.Conv2d) -> None:
    """Make each filter of `conv` sum to zero (in place): blind to flat levels, sensitive to edges and noise.

    Why, for the first conv of D and E: a CT crop is mostly a large flat level (tissue near -0.3 on the
    [-1, 1] scale) with kernel noise of ~0.01-0.05 on top. He-initialised filters pass that level, so the
    noise only shifts large pre-activations slightly and the LeakyReLU stays linear in it: its mean response,
    and D's view of the kernel, is zero. A zero-sum filter removes the level, so the rectified response
    measures noise power from the first step. Measured with discriminator_check on the CPU
    demo config: accuracy 0.68 after 300 steps, against 0.50 at 1500 and 0.67 at 5000 with the plain He
    init. It is only an initialisation; training may move the filters away from zero sum.
    """
    if conv.weight.is_meta:
        return
    with torch.no_grad():
        conv.weight -= conv.weight.mean(dim=(2, 3), keepdim=True)


def _check_square(x: Tensor, cfg: ModelConfig, what: str) -> None:
    _check_image(x, what)
    if tuple(x.shape[2:]) != (cfg.img_size, cfg.img_size):
        raise ValueError(
            f"{what}: expected {cfg.img_size} x {cfg.img_size} images for this model, got "
            f"{tuple(x.shape[2:])}"
        )


class StyleEncoder(nn.Module):
    """E(x, y): image -> style code of domain y (reference-guided style)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared, width = _encoder_trunk(cfg)
        self.heads = nn.ModuleList(nn.Linear(width, cfg.style_dim) for _ in range(cfg.num_domains))
        he_init(self)
        dc_free_(self.shared[0])

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_square(x, self.cfg, "StyleEncoder")
        _check_domains(y, x.shape[0], self.cfg.num_domains, "StyleEncoder")
        h = self.shared(x).flatten(1)
        return _select(torch.stack([head(h) for head in self.heads], dim=1), y)


class Discriminator(nn.Module):
    """D(x, y): one real/fake logit per domain; returns the logit of domain y, shape (batch,)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared, width = _encoder_trunk(cfg)
        self.head = nn.Conv2d(width, cfg.num_domains, 1, 1, 0)
        he_init(self)
        dc_free_(self.shared[0])

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_square(x, self.cfg, "Discriminator")
        _check_domains(y, x.shape[0], self.cfg.num_domains, "Discriminator")
        logits = self.head(self.shared(x)).flatten(1)  # (B, K)
        return _select(logits, y)


def he_init(module: nn.Module) -> None:
    """Kaiming-normal (fan_in, ReLU gain) weights and zero biases for every conv / linear layer."""
    for m in module.modules():
        # Meta tensors (shape-only builds) have no values; initialising them would pull in torch._dynamo.
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.is_meta:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_networks(cfg: ModelConfig) -> dict[str, nn.Module]:
    """The four networks of one model, He-initialised (build under `torch.device('meta')` for shapes only)."""
    return {
        "generator": Generator(cfg),
        "mapping_network": MappingNetwork(cfg),
        "style_encoder": StyleEncoder(cfg),
        "discriminator": Discriminator(cfg),
    }
