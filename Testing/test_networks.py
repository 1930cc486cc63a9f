"""StarGAN v2 networks: shapes (paper and small configs), structure, initialisation, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from reference_blocks import reference_adain_block as _ref_adainblock
from reference_blocks import reference_generator_forward
from reference_blocks import reference_resblock as _ref_resblock
from torch import nn

from TextureStarGANCore.config import ModelConfig
from TextureStarGANCore.networks import (
    AdaIN,
    AdaINResBlock,
    Discriminator,
    Generator,
    MappingNetwork,
    ResBlock,
    StyleEncoder,
    build_networks,
    conv3x3_then_avgpool,
    upsample_then_conv3x3,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def small() -> tuple[ModelConfig, dict[str, nn.Module]]:
    torch.manual_seed(0)
    # Narrower than ModelConfig.small to keep the behaviour tests quick on a shared 2-core machine.
    cfg = ModelConfig.small(num_domains=3, base_width=8, max_width=32, mapping_hidden=64)
    return cfg, {k: v.eval() for k, v in build_networks(cfg).items()}


# ---------------------------------------------------------------------------------------------- config
def test_config_round_trip_and_presets() -> None:
    paper = ModelConfig.paper()
    assert (paper.img_size, paper.base_width, paper.max_width, paper.num_domains) == (512, 32, 512, 3)
    assert (paper.latent_dim, paper.style_dim, paper.mapping_hidden) == (16, 64, 512)
    assert paper.n_down == 5 and paper.canvas_multiple == 32 and paper.n_down_encoder == 7
    assert ModelConfig.from_dict(paper.to_dict()) == paper
    small = ModelConfig.small(num_domains=4, img_size=128)
    assert ModelConfig.from_dict(small.to_dict()) == small and small.n_down == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"img_size": 100}, "power of 2"),
        ({"img_size": 1024}, "power of 2"),
        ({"img_size": 32}, "power of 2"),
        ({"base_width": 0}, "base_width"),
        ({"max_width": 8}, "max_width"),
        ({"num_domains": 1}, "num_domains"),
        ({"style_dim": True}, "style_dim"),
        ({"latent_dim": 16.0}, "latent_dim"),
        ({"bogus": 1}, "unknown field"),
        ({"residual": 1}, "residual must be true or false"),
        ({"full_res_skip": "yes"}, "full_res_skip must be true or false"),
    ],
)
def test_config_rejects_bad_values(change: dict, message: str) -> None:
    d = ModelConfig.small().to_dict() | change
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(d)


def test_config_missing_field() -> None:
    d = ModelConfig.small().to_dict()
    del d["num_domains"]
    with pytest.raises(ValueError, match="missing field.*num_domains"):
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError, match="JSON object"):
        ModelConfig.from_dict([1, 2])


# ---------------------------------------------------------------------------------------------- paper size
def test_paper_size_networks_build_and_run_on_cpu() -> None:
    """The paper's 512 x 512 configuration (widths 32 -> 512): one forward pass of each network."""
    cfg = ModelConfig.paper(num_domains=3)
    torch.manual_seed(0)
    nets = build_networks(cfg)
    g = nets["generator"]
    # Channel schedule: 32 after the stem, doubling per level, capped at 512 at the 16 x 16 bottleneck.
    assert g.stem.out_channels == 32
    assert [b.conv2.out_channels for b in g.encoder] == [64, 128, 256, 512, 512, 512, 512]
    assert sum(isinstance(b, ResBlock) and not b.downsample for b in g.encoder) == 2
    assert [b.upsample for b in g.decoder] == [False, False] + [True] * 5
    assert [b.conv2.out_channels for b in g.decoder] == [512, 512, 512, 256, 128, 64, 32]
    counts = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
    # Same order of magnitude as the StarGAN v2 reference networks (tens of millions of weights).
    assert 25e6 < counts["generator"] < 45e6
    assert 15e6 < counts["style_encoder"] < 30e6 and 15e6 < counts["discriminator"] < 30e6
    assert 2e6 < counts["mapping_network"] < 5e6

    x = torch.rand(1, 1, 512, 512) * 2 - 1
    y = torch.tensor([2])
    with torch.inference_mode():
        s = nets["mapping_network"](torch.randn(1, cfg.latent_dim), y)
        assert s.shape == (1, 64)
        out = g(x, s)
        assert out.shape == (1, 1, 512, 512) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert nets["style_encoder"](x, y).shape == (1, 64)
        logit = nets["discriminator"](x, y)
        assert logit.shape == (1,) and torch.isfinite(logit).all()


# ---------------------------------------------------------------------------------------------- small config
def test_small_preset_shapes_batch_and_domains() -> None:
    cfg = ModelConfig.small(num_domains=3)
    nets = build_networks(cfg)
    b = 5
    x = torch.rand(b, 1, 64, 64) * 2 - 1
    y = torch.tensor([0, 1, 2, 1, 0])
    z = torch.randn(b, cfg.latent_dim)
    with torch.no_grad():
        s = nets["mapping_network"](z, y)
        assert s.shape == (b, cfg.style_dim)
        assert nets["generator"](x, s).shape == (b, 1, 64, 64)
        assert nets["style_encoder"](x, y).shape == (b, cfg.style_dim)
        assert nets["discriminator"](x, y).shape == (b,)


def test_generator_accepts_canvases_larger_than_img_size(small) -> None:
    cfg, nets = small
    g = nets["generator"]
    s = torch.randn(2, cfg.style_dim)
    with torch.no_grad():
        out = g(torch.rand(2, 1, 128, 96), s)
    assert out.shape == (2, 1, 128, 96)
    with pytest.raises(ValueError, match="multiples of 4"):
        g(torch.rand(1, 1, 66, 64), s[:1])
    with pytest.raises(ValueError, match=r"\(batch, 1, H, W\)"):
        g(torch.rand(1, 3, 64, 64), s[:1])
    with pytest.raises(ValueError, match="style of shape"):
        g(torch.rand(1, 1, 64, 64), torch.randn(1, cfg.style_dim + 1))


def test_style_encoder_and_discriminator_need_img_size(small) -> None:
    cfg, nets = small
    y = torch.tensor([0])
    for name in ("style_encoder", "discriminator"):
        with pytest.raises(ValueError, match="64 x 64"):
            nets[name](torch.rand(1, 1, 128, 128), y)
        with pytest.raises(ValueError, match=r"0\.\.2"):
            nets[name](torch.rand(1, 1, 64, 64), torch.tensor([3]))


def test_per_domain_outputs_select_the_right_head(small) -> None:
    cfg, nets = small
    f, e, d = nets["mapping_network"], nets["style_encoder"], nets["discriminator"]
    z = torch.randn(1, cfg.latent_dim).repeat(3, 1)
    x = (torch.rand(1, 1, 64, 64) * 2 - 1).repeat(3, 1, 1, 1)
    y = torch.arange(3)
    with torch.no_grad():
        s = f(z, y)
        h = f.shared(z[:1])
        for k in range(3):
            assert torch.allclose(s[k], f.heads[k](h)[0], atol=1e-6)
        assert not torch.allclose(s[0], s[1])  # distinct heads per domain
        se = e(x, y)
        assert not torch.allclose(se[0], se[1]) and not torch.allclose(se[1], se[2])
        logits_all = d.head(d.shared(x[:1])).flatten(1)[0]
        assert torch.allclose(d(x, y), logits_all, atol=1e-6)
    # Mapping network: 4 shared layers, 3 hidden + 1 output layer per domain.
    assert sum(isinstance(m, nn.Linear) for m in f.shared) == 4
    assert len(f.heads) == 3 and all(sum(isinstance(m, nn.Linear) for m in h) == 4 for h in f.heads)


def test_generator_output_depends_on_style(small) -> None:
    cfg, nets = small
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        a = nets["generator"](x, torch.zeros(1, cfg.style_dim))
        b = nets["generator"](x, torch.randn(1, cfg.style_dim))
    assert (a - b).abs().max() > 1e-3


def test_deterministic_in_eval_mode_and_independent_of_batch(small) -> None:
    cfg, nets = small
    g = nets["generator"]
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    s = torch.randn(2, cfg.style_dim)
    with torch.inference_mode():
        a = g(x, s)
        b = g(x, s)
        single = g(x[1:2], s[1:2])
    assert torch.equal(a, b)
    # Instance norm has no batch statistics: each slice's result does not depend on its batch mates.
    assert torch.allclose(a[1:2], single, atol=1e-5)
    g.train()
    try:
        with torch.no_grad():
            assert torch.allclose(g(x, s), a, atol=1e-5)  # no dropout / batch norm: train == eval
    finally:
        g.eval()


def test_gradients_reach_every_parameter() -> None:
    cfg = ModelConfig.small(num_domains=2, base_width=8, max_width=32, mapping_hidden=64)
    torch.manual_seed(1)
    nets = build_networks(cfg)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    y = torch.tensor([0, 1])
    s = nets["mapping_network"](torch.randn(2, cfg.latent_dim), y)
    fake = nets["generator"](x, s)
    loss = nets["discriminator"](fake, y).sum() + nets["style_encoder"](fake, y).pow(2).sum()
    loss.backward()
    for name, net in nets.items():
        for pname, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"


def test_residual_generator_adds_its_correction_to_the_input() -> None:
    """The global skip: residual output = input + the plain generator's output with the same weights."""
    cfg = ModelConfig.small(num_domains=2, base_width=8, max_width=32, mapping_hidden=64)
    res_cfg = ModelConfig.from_dict(cfg.to_dict() | {"residual": True})
    assert res_cfg.residual and not cfg.residual and ModelConfig.from_dict(res_cfg.to_dict()) == res_cfg
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "residual"}) == cfg
    torch.manual_seed(2)
    g = build_networks(res_cfg)["generator"]
    plain = build_networks(cfg)["generator"]
    plain.load_state_dict(g.state_dict())
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    s = torch.randn(2, cfg.style_dim)
    with torch.no_grad():
        out = g(x, s)
        assert torch.allclose(out, plain(x, s) + x, atol=1e-6)
        # The correction starts small (kernel-noise size), neither zero nor the He init's ~0.9 SD.
        assert 0.002 < float((out - x).std()) < 0.1
        last = g.to_out[-1]
        last.weight.zero_()
        last.bias.zero_()
        assert torch.equal(g(x, s), x)  # a zero correction is the identity


def test_full_res_skip_feeds_the_stem_to_the_output_layer() -> None:
    """With full_res_skip the output layer sees decoder features + stem features (same weights otherwise)."""
    cfg = ModelConfig.small(num_domains=2, base_width=8, max_width=32, mapping_hidden=64)
    skip_cfg = ModelConfig.from_dict(cfg.to_dict() | {"full_res_skip": True})
    assert ModelConfig.from_dict(skip_cfg.to_dict()) == skip_cfg
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "full_res_skip"}) == cfg
    torch.manual_seed(4)
    g = Generator(skip_cfg).eval()
    plain = Generator(cfg).eval()
    plain.load_state_dict(g.state_dict())  # same parameters: the skip adds none
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    s = torch.randn(2, cfg.style_dim)
    with torch.no_grad():
        h = g.stem(x)
        feats = h
        for block in g.encoder:
            feats = block(feats)
        for block in g.decoder:
            feats = block(feats, s)
        assert torch.allclose(g(x, s), g.to_out(feats + h), atol=1e-5)
        assert torch.allclose(plain(x, s), g.to_out(feats), atol=1e-5)
        assert not torch.allclose(g(x, s), plain(x, s), atol=1e-3)


# ------------------------------------------------------------------------------------------ building blocks
def test_he_init_statistics() -> None:
    torch.manual_seed(0)
    g = Generator(ModelConfig.small(base_width=32, max_width=128))
    w = g.encoder[2].conv1.weight  # 128 channels, 3x3: 147k weights, std known to ~0.2 %
    fan_in = w.shape[1] * 9
    assert abs(w.std().item() - math.sqrt(2.0 / fan_in)) < 0.02 * math.sqrt(2.0 / fan_in)
    assert torch.count_nonzero(g.encoder[2].conv1.bias) == 0
    fc = MappingNetwork(ModelConfig.paper()).shared[2]
    assert abs(fc.weight.std().item() - math.sqrt(2.0 / 512)) < 0.05 * math.sqrt(2.0 / 512)


def test_discriminator_and_style_encoder_first_filters_ignore_flat_levels(small) -> None:
    """D and E start with zero-sum first filters, so a flat tissue level gives no response but noise does."""
    cfg, _ = small
    torch.manual_seed(1)
    for net in (Discriminator(cfg), StyleEncoder(cfg)):
        first = net.shared[0]
        sums = first.weight.sum(dim=(1, 2, 3))
        assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-6)
        assert first.weight.abs().sum() > 0  # still random filters, not zeros
        flat = torch.full((1, 1, 16, 16), -0.3)
        inner = first(flat)[..., 1:-1, 1:-1]  # away from the zero padding
        assert torch.allclose(inner, first.bias.view(1, -1, 1, 1).expand_as(inner), atol=1e-6)
        noisy = first(flat + 0.02 * torch.randn_like(flat))[..., 1:-1, 1:-1]
        assert (noisy - inner).abs().mean() > 1e-3
    # The generator's stem keeps the plain He init: it must pass the anatomy's levels through.
    assert Generator(cfg).stem.weight.sum(dim=(1, 2, 3)).abs().max() > 1e-3


def test_residual_blocks_scale_by_inverse_sqrt2() -> None:
    x = torch.randn(2, 8, 16, 16)
    block = ResBlock(8, 8, normalize=False, downsample=False)
    for conv in (block.conv1, block.conv2):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    with torch.no_grad():
        assert torch.allclose(block(x), x / math.sqrt(2.0), atol=1e-6)
    down = ResBlock(8, 16, normalize=True, downsample=True)
    up = AdaINResBlock(16, 8, style_dim=4, upsample=True)
    with torch.no_grad():
        h = down(x)
        assert h.shape == (2, 16, 8, 8)
        assert up(h, torch.randn(2, 4)).shape == (2, 8, 16, 16)


def test_adain_formula() -> None:
    adain = AdaIN(style_dim=3, num_features=4)
    x = torch.randn(2, 4, 8, 8) * 5 + 2
    s = torch.randn(2, 3)
    normed = nn.functional.instance_norm(x)
    with torch.no_grad():
        gamma, beta = adain.fc(s).chunk(2, dim=1)
        expected = (1 + gamma[:, :, None, None]) * normed + beta[:, :, None, None]
        assert torch.allclose(adain(x, s), expected, atol=1e-5)
        nn.init.zeros_(adain.fc.weight)
        nn.init.zeros_(adain.fc.bias)
        assert torch.allclose(adain(x, s), normed, atol=1e-5)  # zero style -> plain instance norm


def test_networks_build_on_meta_device_without_memory() -> None:
    with torch.device("meta"):
        nets = build_networks(ModelConfig.paper())
    assert all(p.is_meta for net in nets.values() for p in net.parameters())
    assert isinstance(nets["style_encoder"], StyleEncoder)
    assert isinstance(nets["discriminator"], Discriminator)


# ----------------------------------------------------------------------- exact rewrites vs textbook blocks
F = nn.functional


def test_rewritten_convolutions_are_exact() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, 10, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    ref = F.avg_pool2d(F.conv2d(x, w, b, padding=1), 2)
    assert torch.allclose(conv3x3_then_avgpool(x, w, b), ref, atol=1e-12)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    out = upsample_then_conv3x3(x, w, None)
    assert out.shape == (2, 7, 24, 20)
    assert torch.allclose(out, ref - b[None, :, None, None], atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    ("dims", "down"), [((6, 10), True), ((6, 6), True), ((6, 6), False), ((6, 10), False)]
)
def test_resblock_matches_reference_forward_and_backward(normalize: bool, dims, down: bool) -> None:
    torch.manual_seed(1)
    block = ResBlock(*dims, normalize=normalize, downsample=down).double()
    if normalize:  # non-trivial affine parameters
        for n in (block.norm1, block.norm2):
            nn.init.normal_(n.weight, 1.0, 0.3)
            nn.init.normal_(n.bias, 0.0, 0.3)
    x = torch.randn(2, dims[0], 8, 12, dtype=torch.float64, requires_grad=True)
    ref = _ref_resblock(block, x)
    out = block(x)
    assert torch.allclose(out, ref, atol=1e-10)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, block.conv1.weight])
    g_out = torch.autograd.grad(out.square().sum(), [x, block.conv1.weight])
    for a, b in zip(g_out, g_ref):  # noqa: B905 (runs on Python 3.9 too)
        assert torch.allclose(a, b, atol=1e-9)
    x0 = x.detach().clone()
    with torch.inference_mode():  # in-place path, cached kernels; the input must stay untouched
        assert torch.allclose(block(x0), ref.detach(), atol=1e-10)
        assert torch.allclose(block(x0), ref.detach(), atol=1e-10)
    assert torch.equal(x0, x.detach())


@pytest.mark.parametrize(("dims", "up"), [((10, 6), True), ((6, 6), True), ((6, 6), False), ((10, 6), False)])
def test_adain_block_matches_reference_forward_and_backward(dims, up: bool) -> None:
    torch.manual_seed(2)
    block = AdaINResBlock(*dims, style_dim=4, upsample=up).double()
    x = torch.randn(2, dims[0], 6, 8, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 4, dtype=torch.float64)
    ref = _ref_adainblock(block, x, s)
    out = block(x, s)
    assert torch.allclose(out, ref, atol=1e-10)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, block.conv1.weight])
    g_out = torch.autograd.grad(out.square().sum(), [x, block.conv1.weight])
    for a, b in zip(g_out, g_ref):  # noqa: B905 (runs on Python 3.9 too)
        assert torch.allclose(a, b, atol=1e-9)
    x0 = x.detach().clone()
    with torch.no_grad():
        assert torch.allclose(block(x0, s), ref.detach(), atol=1e-10)
    assert torch.equal(x0, x.detach())


def test_generator_matches_reference_formulation(small) -> None:
    cfg, nets = small
    g = nets["generator"]
    x = torch.rand(2, 1, 64, 96) * 2 - 1
    s = torch.randn(2, cfg.style_dim)
    with torch.no_grad():
        ref = reference_generator_forward(g, x, s)
    with torch.inference_mode():
        out = g(x, s)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


def test_cached_kernels_follow_weight_updates() -> None:
    """Inference caches derived kernels; an in-place update (optimizer / EMA step) must invalidate them."""
    torch.manual_seed(3)
    block = AdaINResBlock(4, 4, style_dim=3, upsample=True)
    down = ResBlock(4, 4, normalize=True, downsample=True)
    x, s = torch.randn(1, 4, 8, 8), torch.randn(1, 3)
    with torch.no_grad():
        a1, b1 = block(x, s), down(x)
        block.conv1.weight.mul_(0.5)
        down.conv1.weight.mul_(0.5)
        a2, b2 = block(x, s), down(x)
        assert torch.allclose(a2, _ref_adainblock(block, x, s), atol=1e-5)
        assert torch.allclose(b2, _ref_resblock(down, x), atol=1e-5)
    assert not torch.allclose(a1, a2) and not torch.allclose(b1, b2)
    # A frozen network used inside a training graph (gradient w.r.t. the input only) still works.
    xg = x.clone().requires_grad_(True)
    block.requires_grad_(False)
    block(xg, s).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
