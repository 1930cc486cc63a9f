"""Training configuration: a YAML file validated on load into typed sections.

Every field has a type and a range; unknown keys, wrong types and quoted booleans ("false" is a string, and
`bool("false")` is True) are rejected with a message naming the key and the fix, before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from TextureStarGANCore.config import ModelConfig


class ConfigError(ValueError):
    """A training configuration that cannot be used (the message names the key and what to do)."""


@dataclass(frozen=True)
class ModelSection:
    """Network sizes (num_domains comes from the dataset's domains.json)."""

    img_size: int = 512
    base_width: int = 32
    max_width: int = 512
    latent_dim: int = 16
    style_dim: int = 64
    mapping_hidden: int = 512
    residual: bool = False  # generator global skip (see ModelConfig); off in the paper's setting
    full_res_skip: bool = False  # stem features added before the generator's output layer (see ModelConfig)

    def model_config(self, num_domains: int) -> ModelConfig:
        return ModelConfig(num_domains=num_domains, **asdict(self))


@dataclass(frozen=True)
class DataSection:
    """Where the prepared dataset is and how it is read (training crops are model.img_size square)."""

    root: str | None = None
    train_split: str = "train"
    val_split: str = "test"
    num_workers: int = 0
    origin: str | None = None  # "real" / "simulated": train on one kind only (manifest origin); None: both


@dataclass(frozen=True)
class TrainSection:
    total_iters: int = 100000
    batch_size: int = 8  # in total over all processes (the paper's 8 over 4 GPUs)
    lr: float = 1e-4
    mapping_lr: float = 1e-6
    beta1: float = 0.0
    beta2: float = 0.99
    weight_decay: float = 1e-4
    ema_beta: float = 0.999
    seed: int = 777
    amp: bool = True  # bfloat16 autocast on CUDA only; CPU always runs float32
    threads: int = 0  # torch intra-op threads per process; 0 = leave torch's default


@dataclass(frozen=True)
class LossSection:
    """StarGAN v2 loss weights (reference defaults)."""

    lambda_adv: float = 1.0
    lambda_reg: float = 1.0
    lambda_sty: float = 1.0
    lambda_ds: float = 1.0
    ds_iter: int = 100000  # diversity weight decays linearly from lambda_ds to 0 over this many iterations
    lambda_cyc: float = 1.0


@dataclass(frozen=True)
class TextureSection:
    """The paper's multi-scale texture loss on (x_real, x_rec); `enabled: false` gives the baseline."""

    enabled: bool = True
    weight: float = 1.0
    # The weight ramps linearly from 0 to `weight` over the first `warmup_iters` iterations (0: full from the
    # start). Why: L_txt(x_real, x_rec) is zero at the identity and its |T - T~| has a constant-size gradient
    # there, so at full weight from iteration 0 it can hold a generator that starts near the identity (the
    # residual one) at the identity before the adversarial term has taught it anything (v1 card).
    warmup_iters: int = 0
    lr: float = 1e-4  # Adam learning rate of the attention-aggregation parameters
    params: dict[str, Any] = field(default_factory=dict)  # keyword arguments of TextureLoss(...)


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 5000
    keep_last: int = 3


@dataclass(frozen=True)
class LogSection:
    every: int = 10  # scalars to TensorBoard
    image_every: int = 1000  # image grids
    eval_every: int = 5000  # export a snapshot and run the evaluation hook; 0 = off
    eval_max_slices_per_domain: int = 20
    eval_metrics: tuple[str, ...] = ("paired",)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    texture: TextureSection = field(default_factory=TextureSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["log"]["eval_metrics"] = list(self.log.eval_metrics)
        return d


_SECTIONS = {f.name: f.default_factory for f in fields(TrainConfig)}  # type: ignore[misc]

# Ranges checked after type conversion: (low, high, low inclusive)
_POSITIVE_INTS = {
    ("train", "total_iters"), ("train", "batch_size"), ("loss", "ds_iter"), ("checkpoint", "every"),
    ("checkpoint", "keep_last"), ("log", "every"), ("log", "image_every"),
    ("log", "eval_max_slices_per_domain"),
    ("model", "img_size"), ("model", "base_width"), ("model", "max_width"), ("model", "latent_dim"),
    ("model", "style_dim"), ("model", "mapping_hidden"),
}
_NONNEG = {
    ("train", "mapping_lr"), ("train", "weight_decay"), ("train", "threads"), ("data", "num_workers"),
    ("loss", "lambda_adv"), ("loss", "lambda_reg"), ("loss", "lambda_sty"), ("loss", "lambda_ds"),
    ("loss", "lambda_cyc"), ("texture", "weight"), ("texture", "warmup_iters"), ("log", "eval_every"),
    ("train", "seed"),
}
_POSITIVE = {("train", "lr"), ("texture", "lr")}
_UNIT_INTERVAL = {("train", "beta1"), ("train", "beta2"), ("train", "ema_beta")}
_EVAL_METRICS = {"radiomics", "paired", "fid", "frd", "structure", "clinical"}  # = evaluate.ALL_METRICS


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(
                f"config: {where} must be true or false (a YAML boolean, unquoted), got {value!r}"
            )
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config: {where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept it since people write it that way.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config: {where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config: {where} must be a finite number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config: {where} must be a list of names, got {value!r}")
        return tuple(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config: {where} must be a mapping, got {value!r}")
        return dict(value)
    # str | None fields
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"config: {where} must be a string (or null), got {value!r}")
    return value


def _check_ranges(cfg: TrainConfig) -> None:
    for section, key in sorted(_POSITIVE_INTS | _NONNEG | _POSITIVE | _UNIT_INTERVAL):
        v = getattr(getattr(cfg, section), key)
        where = f"{section}.{key}"
        if (section, key) in _POSITIVE_INTS | _POSITIVE and not v > 0:
            raise ConfigError(f"config: {where} must be > 0, got {v}")
        if (section, key) in _NONNEG and v < 0:
            raise ConfigError(f"config: {where} must be >= 0, got {v}")
        if (section, key) in _UNIT_INTERVAL and not 0.0 <= v < 1.0:
            raise ConfigError(f"config: {where} must be in [0, 1), got {v}")
    if cfg.data.origin not in (None, "real", "simulated"):
        raise ConfigError(f"config: data.origin must be real, simulated or null, got {cfg.data.origin!r}")
    bad = sorted(set(cfg.log.eval_metrics) - _EVAL_METRICS)
    if bad:
        raise ConfigError(
            f"config: log.eval_metrics has unknown metric(s) {bad}; known: {sorted(_EVAL_METRICS)}"
        )
    try:  # the architecture's own checks (power-of-two img_size, widths), with a placeholder domain count
        cfg.model.model_config(num_domains=2)
    except ValueError as exc:
        raise ConfigError(f"config: model section: {exc}") from None
    if cfg.texture.enabled:
        from TextureStarGANCore.texture import TextureLoss

        try:  # unknown keys or bad values fail here, with the loss's own message
            TextureLoss(**cfg.texture.params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config: texture.params: {exc}") from None
    if cfg.texture.enabled and cfg.texture.weight == 0:
        raise ConfigError("config: texture.enabled is true but texture.weight is 0; use enabled: false")


def config_from_dict(raw: Any) -> TrainConfig:
    """Validate a parsed YAML mapping into a `TrainConfig` (ConfigError on the first problem)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: the file must hold a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"config: unknown section(s) {unknown}; known sections are {sorted(_SECTIONS)}")
    sections: dict[str, Any] = {}
    for name, factory in _SECTIONS.items():
        default = factory()
        given = raw.get(name) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"config: section '{name}' must be a mapping, got {given!r}")
        known = {f.name for f in fields(default)}
        extra = sorted(set(given) - known)
        if extra:
            raise ConfigError(
                f"config: unknown key(s) {extra} in section '{name}'; known keys are {sorted(known)}"
            )
        values = {k: _coerce(name, k, v, getattr(default, k)) for k, v in given.items()}
        sections[name] = type(default)(**{**{f.name: getattr(default, f.name) for f in fields(default)},
                                          **values})
    cfg = TrainConfig(**sections)
    _check_ranges(cfg)
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw config mapping."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.batch_size=4)")
        path, text = item.split("=", 1)
        section, key = path.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {item!r}: section '{section}' is not a mapping")
        raw[section][key] = yaml.safe_load(text)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read and validate a YAML training config (ConfigError naming the file and the problem)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (see Training/configs/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    try:
        return config_from_dict(apply_overrides(raw or {}, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
