"""The StarGAN v2 blocks written plainly (conv3x3 -> avg-pool, upsample -> conv3x3, out-of-place ops).

A reference for tests (the optimised blocks in TextureStarGANCore.networks must give the same function)
and for the benchmark (speed of the optimised blocks against this textbook form, in one run). Uses the
parameters of the real modules, so both compute with identical weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from TextureStarGANCore.networks import AdaIN, AdaINResBlock, Generator, ResBlock

INV_SQRT2 = 1.0 / math.sqrt(2.0)


def reference_resblock(b: ResBlock, x: torch.Tensor) -> torch.Tensor:
    h = b.norm1(x) if b.normalize else x
    h = F.conv2d(F.leaky_relu(h, 0.2), b.conv1.weight, b.conv1.bias, padding=1)
    if b.downsample:
        h = F.avg_pool2d(h, 2)
    if b.normalize:
        h = b.norm2(h)
    h = F.conv2d(F.leaky_relu(h, 0.2), b.conv2.weight, b.conv2.bias, padding=1)
    sc = F.conv2d(x, b.shortcut.weight) if b.shortcut is not None else x
    if b.downsample:
        sc = F.avg_pool2d(sc, 2)
    return (sc + h) * INV_SQRT2


def reference_adain(a: AdaIN, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    gamma, beta = a.fc(s).chunk(2, dim=1)
    return (1 + gamma[:, :, None, None]) * F.instance_norm(x) + beta[:, :, None, None]


def reference_adain_block(b: AdaINResBlock, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=2.0, mode="nearest") if b.upsample else t

    h = F.leaky_relu(reference_adain(b.norm1, x, s), 0.2)
    h = F.conv2d(up(h), b.conv1.weight, b.conv1.bias, padding=1)
    h = F.leaky_relu(reference_adain(b.norm2, h, s), 0.2)
    h = F.conv2d(h, b.conv2.weight, b.conv2.bias, padding=1)
    sc = up(x)
    if b.shortcut is not None:
        sc = F.conv2d(sc, b.shortcut.weight)
    return (sc + h) * INV_SQRT2


def reference_generator_forward(g: Generator, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    h = g.stem(x)
    for block in g.encoder:
        h = reference_resblock(block, h)
    for block in g.decoder:
        h = reference_adain_block(block, h, s)
    return g.to_out(h)
