"""StarGAN v2 objectives (Choi et al. 2020) plus the paper's texture loss on (x_real, x_rec).

One code path for the baseline and the texture-aware model: `texture` is None for the baseline.
Each function returns the total loss to back-propagate and a dict of detached terms for logging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LossSection


@dataclass
class Nets:
    """The training networks (possibly DDP-wrapped); `texture` is the texture loss module or None."""

    generator: nn.Module
    mapping_network: nn.Module
    style_encoder: nn.Module
    discriminator: nn.Module
    texture: nn.Module | None = None
    texture_weight: float = 0.0


def adversarial_loss(logits: Tensor, target: float) -> Tensor:
    """Non-saturating GAN loss: binary cross-entropy with logits against an all-`target` label."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def r1_penalty(d_real: Tensor, x_real: Tensor) -> Tensor:
    """R1: 0.5 * E[||grad_x D(x)||^2] on real images (x_real must require grad)."""
    (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
    return 0.5 * grad.float().pow(2).flatten(1).sum(1).mean()


def texture_weight(iteration: int, weight: float, warmup_iters: int) -> float:
    """Texture-loss weight at `iteration`: a linear ramp from 0 to `weight` over `warmup_iters` (0 = none)."""
    if warmup_iters <= 0:
        return weight
    return weight * min(1.0, iteration / warmup_iters)


def diversity_weight(iteration: int, lam: float, ds_iter: int) -> float:
    """lambda_ds decays linearly to 0 over ds_iter iterations (then stays 0)."""
    return max(0.0, lam * (1.0 - iteration / ds_iter))


def _target_style(nets: Nets, y_trg: Tensor, z: Tensor | None, x_ref: Tensor | None) -> Tensor:
    if (z is None) == (x_ref is None):
        raise ValueError("give exactly one of a latent code (latent-guided) or a reference image")
    return nets.mapping_network(z, y_trg) if z is not None else nets.style_encoder(x_ref, y_trg)


def discriminator_loss(
    nets: Nets,
    x_real: Tensor,
    y_org: Tensor,
    y_trg: Tensor,
    lw: LossSection,
    *,
    z_trg: Tensor | None = None,
    x_ref: Tensor | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Tensor, dict[str, float]]:
    """Real images of y_org vs fakes translated to y_trg (latent- or reference-guided), with R1 on reals."""
    x_real = x_real.detach().requires_grad_(True)
    with autocast():
        d_real = nets.discriminator(x_real, y_org)
    loss_real = adversarial_loss(d_real.float(), 1.0)
    loss_reg = r1_penalty(d_real, x_real)
    with torch.no_grad(), autocast():
        s_trg = _target_style(nets, y_trg, z_trg, x_ref)
        x_fake = nets.generator(x_real.detach(), s_trg)
    with autocast():
        d_fake = nets.discriminator(x_fake.detach(), y_trg)
    loss_fake = adversarial_loss(d_fake.float(), 0.0)
    loss = lw.lambda_adv * (loss_real + loss_fake) + lw.lambda_reg * loss_reg
    terms = {"real": loss_real.detach(), "fake": loss_fake.detach(), "r1": loss_reg.detach()}
    return loss, {k: float(v) for k, v in terms.items()}


@dataclass
class GeneratorOutputs:
    loss: Tensor
    terms: dict[str, float]
    x_fake: Tensor
    x_rec: Tensor


def generator_loss(
    nets: Nets,
    x_real: Tensor,
    y_org: Tensor,
    y_trg: Tensor,
    lw: LossSection,
    lambda_ds: float,
    *,
    z_trgs: tuple[Tensor, Tensor] | None = None,
    x_refs: tuple[Tensor, Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> GeneratorOutputs:
    """Adversarial + style reconstruction - diversity + cycle (+ texture on (x_real, x_rec)) losses."""
    z1, z2 = z_trgs if z_trgs is not None else (None, None)
    r1, r2 = x_refs if x_refs is not None else (None, None)
    with autocast():
        s_trg = _target_style(nets, y_trg, z1, r1)
        x_fake = nets.generator(x_real, s_trg)
        loss_adv = adversarial_loss(nets.discriminator(x_fake, y_trg).float(), 1.0)
        s_pred = nets.style_encoder(x_fake, y_trg)
        loss_sty = (s_pred.float() - s_trg.float()).abs().mean()
        # Diversity: two styles of the same domain should give different images (second image detached).
        s_trg2 = _target_style(nets, y_trg, z2, r2)
        x_fake2 = nets.generator(x_real, s_trg2).detach()
        loss_ds = (x_fake.float() - x_fake2.float()).abs().mean()
        s_org = nets.style_encoder(x_real, y_org)
        x_rec = nets.generator(x_fake, s_org)
        loss_cyc = (x_rec.float() - x_real.float()).abs().mean()
    loss = (
        lw.lambda_adv * loss_adv + lw.lambda_sty * loss_sty - lambda_ds * loss_ds + lw.lambda_cyc * loss_cyc
    )
    terms = {"adv": loss_adv.detach(), "sty": loss_sty.detach(), "ds": loss_ds.detach(),
             "cyc": loss_cyc.detach()}
    if nets.texture is not None:
        # Texture statistics are precision-sensitive (soft GLCM), so they run in float32 outside autocast.
        with torch.autocast(device_type=x_real.device.type, enabled=False):
            loss_txt = nets.texture(x_real.float(), x_rec.float())
        loss = loss + nets.texture_weight * loss_txt
        terms["txt"] = loss_txt.detach()
    return GeneratorOutputs(loss, {k: float(v) for k, v in terms.items()}, x_fake.detach(), x_rec.detach())
