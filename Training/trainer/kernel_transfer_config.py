"""Configuration of a kernel-transfer training run (YAML, validated on load; configs/kernel_transfer.yaml)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KTConfig", "load_kt_config", "KTConfigError"]


class KTConfigError(ValueError):
    """A config value that cannot be used, named with its section and key."""


@dataclass
class ModelSection:
    width: int = 24
    depth: int = 6
    embed_dim: int = 16
    max_gain: float = 4.0
    smooth_origin: bool = True  # see KernelTransferConfig.smooth_origin
    noise_synthesis: bool = True  # see KernelTransferConfig.noise_synthesis; fitted after training
    flat_zero_residual: bool = False  # see KernelTransferConfig.flat_zero_residual
    split_residual: bool = False  # see KernelTransferConfig.split_residual


@dataclass
class DataSection:
    simulated: list[str] = field(default_factory=list)  # Training.simulate --anatomy output folders
    # Real acquisitions with several kernels: {name, series: {DOMAIN: folder}, slices: "A:B"}.
    real: list[dict[str, Any]] = field(default_factory=list)
    # Real single-kernel series for the source estimator only: {series: folder, domain: DOMAIN}.
    estimator_real: list[dict[str, Any]] = field(default_factory=list)
    crop: int = 128
    margin: int = 16  # loss only on the crop's interior: the FFT filter of a crop differs at its border
    real_fraction: float = 0.3
    identity_fraction: float = 0.05


@dataclass
class TrainSection:
    iters: int = 3000
    batch: int = 12
    lr: float = 1.0e-3
    mtf_lr: float = 3.0e-3
    seed: int = 0
    threads: int = 2
    # Generator parts that stay as they are (top-level parameter names, e.g. [log_mtf, embed, convs, film,
    # out]): a fine-tune of a split model can train only the sharpening network (convs_up, film_up, out_up)
    frozen: list[str] = field(default_factory=list)


@dataclass
class LossSection:
    paired: float = 1.0
    texture: float = 0.0  # weight of the GLCM texture loss (0: off)
    texture_warmup: int = 300
    texture_window_hu: list[float] = field(default_factory=lambda: [-160.0, 240.0])
    texture_levels: int = 64
    # Weight of the one-sided noise term (kernel_transfer_noise.noise_excess_loss): the deterministic output
    # must not carry more noise than the target in its edge-free pixels (0: off).
    noise_excess: float = 0.0
    noise_excess_real: bool = True  # the term on real crops too (False: simulated crops only)
    noise_excess_sharpening_only: bool = False  # the term only where the linear transfer sharpens


@dataclass
class EstimatorSection:
    steps: int = 3000
    lr: float = 3.0e-3
    slice_stride: int = 2


@dataclass
class NoiseSection:
    """Fit of the noise-synthesis curves after training (kernel_transfer_noise.py)."""

    steps: int = 300
    batch: int = 12
    lr: float = 0.05
    smooth: float = 0.1


@dataclass
class KTConfig:
    domains: list[str]
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    estimator: EstimatorSection = field(default_factory=EstimatorSection)
    noise: NoiseSection = field(default_factory=NoiseSection)
    checkpoint_every: int = 100

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "loss": LossSection,
             "estimator": EstimatorSection, "noise": NoiseSection}


def _section(cls: type, raw: Any, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise KTConfigError(f"{name}: must be a mapping")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise KTConfigError(f"{name}: unknown key(s) {unknown}; known: {sorted(known)}")
    obj = cls(**raw)
    for key, default in asdict(cls()).items():
        value = getattr(obj, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise KTConfigError(f"{name}.{key}: must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise KTConfigError(f"{name}.{key}: must be a non-negative number, got {value!r}")
    return obj


def load_kt_config(path: str | Path, overrides: dict[str, Any] | None = None) -> KTConfig:
    """Read and validate a config; ``overrides`` as {"section.key": value}."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KTConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise KTConfigError(f"{path}: a YAML mapping is needed")
    for key, value in (overrides or {}).items():
        sec, _, k = key.partition(".")
        raw.setdefault(sec, {})[k] = value
    unknown = sorted(set(raw) - {"domains", "checkpoint_every", *_SECTIONS})
    if unknown:
        raise KTConfigError(f"{path}: unknown section(s) {unknown}")
    domains = raw.get("domains")
    if not isinstance(domains, list) or len(domains) < 2 or not all(isinstance(d, str) for d in domains):
        raise KTConfigError("domains: a list of at least two catalogue kernel names is needed")
    if len(set(domains)) != len(domains):
        raise KTConfigError("domains: names must be unique")
    cfg = KTConfig(domains=domains, **{k: _section(c, raw.get(k), k) for k, c in _SECTIONS.items()},
                   checkpoint_every=int(raw.get("checkpoint_every", 100)))
    if cfg.data.crop <= 2 * cfg.data.margin + 16:
        raise KTConfigError("data.crop must exceed 2 x data.margin + 16")
    if not cfg.data.simulated and not cfg.data.real:
        raise KTConfigError("data: give simulated folders and/or real paired acquisitions")
    if not all(isinstance(n, str) for n in cfg.train.frozen):
        raise KTConfigError("train.frozen: a list of generator parameter names is needed")
    if cfg.model.max_gain <= 1:
        raise KTConfigError("model.max_gain must be above 1")
    return cfg
