"""Architecture configuration of the StarGAN v2 networks (stored in every model file's card)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

MIN_IMG_SIZE = 64
MAX_IMG_SIZE = 512


def _is_int(value: Any) -> bool:
    # bool is an int subclass; a JSON `true` must not pass as a width of 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the four StarGAN v2 networks.

    `img_size` is the square size the style encoder and discriminator are built for (the generator is fully
    convolutional and accepts any canvas whose sides are multiples of `2 ** n_down`). Channels start at
    `base_width` after the first convolution and double per resolution level up to `max_width`.
    `residual` adds a global skip to the generator (output = input + learned correction, starting small),
    so the anatomy passes through and the networks only learn the kernel's change. `full_res_skip` adds the
    stem's full-resolution features to the decoder's output before the output layer, so the correction can
    use pixel-level detail (noise) that the downsampled bottleneck has lost. Both are off by default, as in
    the paper; Training/baseline_models/stargan_v1/MODEL_CARD.md reports the CPU demo runs made with them.
    """

    img_size: int
    base_width: int
    max_width: int
    num_domains: int
    latent_dim: int = 16
    style_dim: int = 64
    mapping_hidden: int = 512
    residual: bool = False
    full_res_skip: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise ValueError(f"model config: {f.name} must be true or false, got {value!r}")
                continue
            if not _is_int(value) or value < 1:
                raise ValueError(f"model config: {f.name} must be a positive integer, got {value!r}")
        if self.img_size not in {2**k for k in range(6, 10)}:
            raise ValueError(
                f"model config: img_size must be a power of 2 between {MIN_IMG_SIZE} and {MAX_IMG_SIZE}, "
                f"got {self.img_size}"
            )
        if self.max_width < self.base_width:
            raise ValueError(
                f"model config: max_width ({self.max_width}) must be >= base_width ({self.base_width})"
            )
        if self.num_domains < 2:
            raise ValueError(
                f"model config: num_domains must be at least 2 (harmonization maps between kernels), "
                f"got {self.num_domains}"
            )

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def n_down(self) -> int:
        """Generator downsampling levels: log2(img_size) - 4, so an img_size input reaches 16 x 16."""
        return int(math.log2(self.img_size)) - 4

    @property
    def canvas_multiple(self) -> int:
        """Generator inputs must have sides that are multiples of this (2 ** n_down)."""
        return 2**self.n_down

    @property
    def n_down_encoder(self) -> int:
        """Downsampling blocks of the style encoder and discriminator: log2(img_size) - 2 (to 4 x 4)."""
        return int(math.log2(self.img_size)) - 2

    def widths(self, levels: int) -> list[int]:
        """Channel count at each of `levels + 1` resolution levels, doubling from base to max width."""
        return [min(self.base_width * 2**i, self.max_width) for i in range(levels + 1)]

    # Serialization -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """Build from a card's `architecture` dict; ValueError naming the bad or missing field."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {unknown}; known fields are {sorted(names)}")
        required = ("img_size", "base_width", "max_width", "num_domains")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"model config: missing field(s) {missing}")
        return cls(**d)

    # Presets -------------------------------------------------------------------------------------
    @classmethod
    def paper(cls, num_domains: int = 3) -> ModelConfig:
        """The paper's size: StarGAN v2 defaults at 512 x 512 (widths 32 -> 512)."""
        return cls(img_size=512, base_width=32, max_width=512, num_domains=num_domains)

    @classmethod
    def small(
        cls,
        num_domains: int = 3,
        img_size: int = 64,
        base_width: int = 16,
        max_width: int = 128,
        latent_dim: int = 16,
        style_dim: int = 32,
        mapping_hidden: int = 128,
    ) -> ModelConfig:
        """A CPU-friendly configuration for tests, demos and simulated-data training."""
        return cls(
            img_size=img_size,
            base_width=base_width,
            max_width=max_width,
            num_domains=num_domains,
            latent_dim=latent_dim,
            style_dim=style_dim,
            mapping_hidden=mapping_hidden,
        )
