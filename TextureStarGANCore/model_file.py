"""The model file: one `.safetensors` file with the inference weights and a JSON model card.

Two kinds of model share the format; the card's ``architecture.kind`` tells them apart (see DESIGN.md):

- StarGAN v2 (no ``kind``, or ``"stargan_v2"``): layout below, canvas preprocessing, stored target styles.
- Kernel transfer (``"kernel_transfer"``, ``kernel_transfer.py``): tensors ``generator.*`` (the
  ``KernelTransferGenerator``) and ``source_estimator.*`` (the ``SourceEstimator``, buffers included); the
  card has ``supported_pixel_mm`` instead of ``preprocessing`` and ``target_styles``. Written by
  ``save_kernel_transfer_model``.

StarGAN v2 layout: tensors `generator.*`, `mapping_network.*`, `style_encoder.*` (the EMA copies, float32) and
`domain_styles` (num_domains, style_dim); metadata `{"format": "ct-harmonization-model", "model_card": <json>,
"weights_sha256": <hex>}`. safetensors stores raw tensors only, so loading can never execute code, and pickle
files are recognised by their first bytes and refused without being read further.

Target styles: harmonization needs one deterministic style per domain. `compute_domain_styles` takes the mean
of the (EMA) mapping network's styles over `num_latents` latents z ~ N(0, I) drawn with a fixed seed; the card
records the method, count and seed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from .config import ModelConfig
from .domains import Domain
from .fileio import write_bytes_atomic
from .kernel_transfer import KernelTransferConfig, KernelTransferGenerator, SourceEstimator
from .networks import build_networks
from .preprocessing import PreprocessSpec
from .transfer_filter import TransferFilter

FORMAT_VERSION = 1
FILE_FORMAT = "ct-harmonization-model"
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "default.safetensors"

INFERENCE_NETWORKS = ("generator", "mapping_network", "style_encoder")
STYLES_KEY = "domain_styles"
DEFAULT_NUM_LATENTS = 4096
TARGET_STYLE_METHOD = "mean of EMA mapping-network styles over N latents z~N(0,I) per domain"

CARD_FIELDS = (
    "format_version", "architecture", "domains", "preprocessing", "target_styles", "training", "metrics",
    "intended_use", "created",
)

KIND_STARGAN = "stargan_v2"
KIND_KERNEL_TRANSFER = "kernel_transfer"
MODEL_KINDS = (KIND_STARGAN, KIND_KERNEL_TRANSFER)
KERNEL_TRANSFER_NETWORKS = ("generator", "source_estimator")
KERNEL_TRANSFER_CARD_FIELDS = (
    "format_version", "architecture", "domains", "supported_pixel_mm", "training", "metrics", "intended_use",
    "created",
)
DEFAULT_SUPPORTED_PIXEL_MM = (0.4, 1.0)
DEFAULT_INTENDED_USE = (
    "Research use: harmonize CT slices between reconstruction kernels for quantitative analysis. "
    "Not for diagnosis."
)

# First bytes of files that must never be handed to a deserializer that can run code.
_PICKLE_SIGNATURES = {
    b"PK\x03\x04": "a zip-based PyTorch checkpoint (torch.save)",
    b"\x80": "a Python pickle (e.g. a legacy torch.save checkpoint)",
    b"\x93NUMPY": "a NumPy .npy array file",
}


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the problem and what to do."""


@dataclass
class ModelFile:
    """A loaded and fully validated model file (weights on CPU).

    ``config`` is a ``ModelConfig`` (StarGAN v2) or a ``KernelTransferConfig``; ``preprocessing`` and
    ``domain_styles`` exist for StarGAN v2 models only (None for kernel transfer, which runs at the input's
    own pixel size). ``state_dicts`` holds one entry per network (``INFERENCE_NETWORKS`` or
    ``KERNEL_TRANSFER_NETWORKS``).
    """

    path: Path
    config: ModelConfig | KernelTransferConfig
    card: dict[str, Any]
    domains: list[Domain]
    preprocessing: PreprocessSpec | None
    state_dicts: dict[str, dict[str, Tensor]]
    domain_styles: Tensor | None

    @property
    def kind(self) -> str:
        """``KIND_STARGAN`` ("stargan_v2") or ``KIND_KERNEL_TRANSFER`` ("kernel_transfer")."""
        return KIND_KERNEL_TRANSFER if isinstance(self.config, KernelTransferConfig) else KIND_STARGAN

    @property
    def supported_pixel_mm(self) -> tuple[float, float] | None:
        """(min, max) in-plane pixel size in mm a kernel-transfer model was trained for; None for StarGAN v2
        (its canvas resamples every input)."""
        if self.kind != KIND_KERNEL_TRANSFER:
            return None
        lo, hi = self.card["supported_pixel_mm"]
        return float(lo), float(hi)

    @property
    def trained(self) -> bool:
        """False for untrained (random) weights: `training.iterations == 0`."""
        return int(self.card["training"]["iterations"]) > 0

    @property
    def transfer_filter_pairs(self) -> list[tuple[str, str]]:
        """(source, target) domain names that have a fitted linear transfer filter (optional in cards)."""
        return [(e["source"], e["target"]) for e in self.card.get("transfer_filters", [])]

    def transfer_filter(self, source: Domain, target: Domain) -> TransferFilter | None:
        """The fitted linear transfer filter from ``source`` to ``target``; None if the file has none."""
        for e in self.card.get("transfer_filters", []):
            if e["source"] == source.name and e["target"] == target.name:
                return TransferFilter.from_dict(e["filter"])
        return None


# --------------------------------------------------------------------------------------------------
# Card
# --------------------------------------------------------------------------------------------------
def make_model_card(
    *,
    config: ModelConfig,
    domains: list[Domain] | tuple[Domain, ...],
    preprocessing: PreprocessSpec,
    training: Mapping[str, Any],
    num_latents: int = DEFAULT_NUM_LATENTS,
    style_seed: int = 0,
    metrics: Mapping[str, Any] | None = None,
    intended_use: str = DEFAULT_INTENDED_USE,
    created: str | None = None,
    transfer_filters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A complete StarGAN v2 model card (see DESIGN.md) ready for `save_model_file`.

    ``transfer_filters``: optional fitted linear filters, entries ``{"source", "target": domain names,
    "filter": TransferFilter.to_dict(), "fitted_on": text}``.
    """
    return _card(config, domains, training, metrics, intended_use, created, transfer_filters, {
        "preprocessing": preprocessing.to_dict(),
        "target_styles": {"method": TARGET_STYLE_METHOD, "num_latents": num_latents, "seed": style_seed},
    })


def _card(
    config: Any, domains: Sequence[Domain], training: Mapping[str, Any], metrics: Mapping[str, Any] | None,
    intended_use: str, created: str | None, transfer_filters: list[dict[str, Any]] | None,
    kind_fields: Mapping[str, Any],
) -> dict[str, Any]:
    """The card fields every model kind has, with ``kind_fields`` after the domains."""
    card = {
        "format_version": FORMAT_VERSION,
        "architecture": config.to_dict(),
        "domains": [d.to_dict() for d in domains],
        **kind_fields,
        "training": dict(training),
        "metrics": dict(metrics or {}),
        "intended_use": intended_use,
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if transfer_filters:
        card["transfer_filters"] = [dict(e) for e in transfer_filters]
    return card


def _card_error(msg: str) -> ModelFileError:
    return ModelFileError(f"model card: {msg}; re-export the model with Training/export.py")


def _require(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise _card_error(f"missing field '{where}{key}'")
    value = d[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _card_error(f"field '{where}{key}' must be {types}, got {value!r}")
    if not isinstance(value, types):
        raise _card_error(f"field '{where}{key}' has the wrong type ({type(value).__name__}: {value!r})")
    return value


def card_kind(card: Mapping[str, Any]) -> str:
    """The model kind a card describes: ``architecture.kind``, absent in StarGAN v2 cards."""
    arch = card.get("architecture")
    kind = arch.get("kind", KIND_STARGAN) if isinstance(arch, dict) else KIND_STARGAN
    if kind not in MODEL_KINDS:
        raise ModelFileError(
            f"model card: unknown model kind {kind!r} ('architecture.kind'); this software reads "
            f"{', '.join(repr(k) for k in MODEL_KINDS)}: update this software or re-export the model"
        )
    return kind


def validate_card(
    card: Any,
) -> tuple[ModelConfig | KernelTransferConfig, list[Domain], PreprocessSpec | None]:
    """Check every card field; return the architecture, domains and preprocessing (None for a
    kernel-transfer model) it describes."""
    if not isinstance(card, dict):
        raise _card_error(f"must be a JSON object, got {type(card).__name__}")
    kind = card_kind(card)
    fields = KERNEL_TRANSFER_CARD_FIELDS if kind == KIND_KERNEL_TRANSFER else CARD_FIELDS
    missing = [k for k in fields if k not in card]
    if missing:
        raise _card_error(f"missing field(s) {missing}")
    version = _require(card, "format_version", int, "")
    if version != FORMAT_VERSION:
        hint = "update this software" if version > FORMAT_VERSION else "re-export the model"
        raise ModelFileError(
            f"model file format version {version} is not supported (this software reads version "
            f"{FORMAT_VERSION}); {hint}"
        )
    config: ModelConfig | KernelTransferConfig
    spec = None
    arch = card["architecture"]
    try:
        if kind == KIND_KERNEL_TRANSFER:
            config = KernelTransferConfig.from_dict(arch)
        else:  # StarGAN v2 cards carry no kind; an explicit "stargan_v2" is accepted as well
            config = ModelConfig.from_dict({k: v for k, v in arch.items() if k != "kind"}
                                           if isinstance(arch, dict) else arch)
    except (ValueError, TypeError) as exc:
        raise _card_error(f"bad 'architecture': {exc}") from None
    domains = _check_domains(card, config.num_domains)
    if isinstance(config, ModelConfig):
        spec = _check_stargan_fields(card, config)
    else:
        _check_pixel_range(card.get("supported_pixel_mm"))
    training = _require(card, "training", dict, "")
    _require(training, "data", str, "training.")
    iterations = _require(training, "iterations", int, "training.")
    if iterations < 0:
        raise _card_error(f"'training.iterations' must be >= 0, got {iterations}")
    _require(training, "texture_loss", bool, "training.")
    _require(training, "code_version", str, "training.")
    _require(card, "metrics", dict, "")
    _check_transfer_filters(card.get("transfer_filters", []), domains)
    _require(card, "intended_use", str, "")
    created = _require(card, "created", str, "")
    try:
        _dt.datetime.fromisoformat(created)
    except ValueError:
        raise _card_error(f"'created' must be an ISO date, got {created!r}") from None
    return config, domains, spec


def _check_domains(card: Mapping[str, Any], num_domains: int) -> list[Domain]:
    raw_domains = _require(card, "domains", list, "")
    try:
        domains = [Domain.from_dict(d) for d in raw_domains]
    except (ValueError, TypeError) as exc:
        raise _card_error(f"bad 'domains': {exc}") from None
    if len(domains) != num_domains:
        raise _card_error(
            f"{len(domains)} domains listed but the architecture has num_domains={num_domains}"
        )
    if [d.id for d in domains] != list(range(len(domains))):
        raise _card_error(f"domain ids must be 0..{len(domains) - 1} in order, got {[d.id for d in domains]}")
    names = [d.name.strip().upper() for d in domains]
    if len(set(names)) != len(names):
        raise _card_error(f"domain names must be unique (case-insensitive), got {[d.name for d in domains]}")
    return domains


def _check_stargan_fields(card: Mapping[str, Any], config: ModelConfig) -> PreprocessSpec:
    """A StarGAN v2 card's 'preprocessing' (canvas) and 'target_styles'."""
    try:
        spec = PreprocessSpec.from_dict(_require(card, "preprocessing", dict, ""))
    except (ValueError, TypeError) as exc:
        raise _card_error(f"bad 'preprocessing': {exc}") from None
    if spec.canvas_size % config.canvas_multiple:
        raise _card_error(
            f"preprocessing.canvas_size {spec.canvas_size} is not a multiple of {config.canvas_multiple}, "
            f"which this generator needs"
        )
    if spec.tile_size is not None and spec.tile_size % config.canvas_multiple:
        raise _card_error(
            f"preprocessing.tile_size {spec.tile_size} is not a multiple of {config.canvas_multiple}, "
            f"which this generator needs (use the training crop size, model img_size {config.img_size})"
        )
    styles = _require(card, "target_styles", dict, "")
    method = _require(styles, "method", str, "target_styles.")
    if not method.strip():
        raise _card_error("'target_styles.method' must describe how the target styles were computed")
    return spec


def _check_pixel_range(value: Any) -> tuple[float, float]:
    """A kernel-transfer card's 'supported_pixel_mm': [min, max] in-plane pixel size in mm."""
    ok = (isinstance(value, list) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    if ok:
        lo, hi = float(value[0]), float(value[1])
        ok = math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= hi <= 10.0
    if not ok:
        raise _card_error(
            f"'supported_pixel_mm' must be [min, max] pixel sizes in mm with 0 < min <= max <= 10, got "
            f"{value!r}"
        )
    return lo, hi


def _check_transfer_filters(entries: Any, domains: list[Domain]) -> None:
    """The optional 'transfer_filters' field (older cards lack it): each names two of the model's domains."""
    if not isinstance(entries, list):
        raise _card_error("'transfer_filters' must be a list")
    names = {d.name for d in domains}
    seen = set()
    for i, e in enumerate(entries):
        where = f"transfer_filters[{i}]."
        if not isinstance(e, dict):
            raise _card_error(f"'transfer_filters[{i}]' must be an object")
        pair = (_require(e, "source", str, where), _require(e, "target", str, where))
        if not set(pair) <= names:
            raise _card_error(f"'{where}source/target' {pair} must name the model's domains {sorted(names)}")
        if pair in seen:
            raise _card_error(f"two transfer filters for {pair[0]} -> {pair[1]}")
        seen.add(pair)
        try:
            TransferFilter.from_dict(_require(e, "filter", dict, where))
        except ValueError as exc:
            raise _card_error(f"bad '{where}filter': {exc}") from None


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
def _build(config: ModelConfig | KernelTransferConfig) -> dict[str, nn.Module]:
    """The inference networks of either kind, freshly built (call under a device context)."""
    if isinstance(config, KernelTransferConfig):
        return {"generator": KernelTransferGenerator(config), "source_estimator": SourceEstimator(config)}
    return build_networks(config)


def _network_names(config: ModelConfig | KernelTransferConfig) -> tuple[str, ...]:
    return KERNEL_TRANSFER_NETWORKS if isinstance(config, KernelTransferConfig) else INFERENCE_NETWORKS


def expected_shapes(config: ModelConfig | KernelTransferConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model file of this architecture holds (built on 'meta': no memory)."""
    with torch.device("meta"):
        nets = _build(config)
    shapes = {
        f"{net}.{name}": tuple(t.shape)
        for net in _network_names(config)
        for name, t in nets[net].state_dict().items()
    }
    if isinstance(config, ModelConfig):
        shapes[STYLES_KEY] = (config.num_domains, config.style_dim)
    return shapes


def _check_tensor_names_shapes(
    shapes: Mapping[str, tuple[int, ...]], config: ModelConfig | KernelTransferConfig, fix: str
) -> None:
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise ModelFileError(
            f"weights do not match the architecture {config.to_dict()}: {'; '.join(parts)}; {fix}"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            what = "domain styles" if name == STYLES_KEY else f"tensor '{name}'"
            raise ModelFileError(
                f"{what} has shape {tuple(shapes[name])} but the architecture needs {shape}; {fix}"
            )


def _weights_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, shapes and bytes: catches corruption inside the data that parses fine."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{list(t.shape)}|{t.dtype}\n".encode())
        h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def weights_from_networks(nets: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """Flatten the inference networks (pass the EMA copies) into `generator.*`-style tensor names."""
    missing = [n for n in INFERENCE_NETWORKS if n not in nets]
    if missing:
        raise ValueError(f"networks missing for the model file: {missing}")
    return {f"{net}.{k}": v for net in INFERENCE_NETWORKS for k, v in nets[net].state_dict().items()}


@torch.no_grad()
def compute_domain_styles(
    mapping_network: nn.Module,
    num_domains: int,
    *,
    num_latents: int = DEFAULT_NUM_LATENTS,
    seed: int = 0,
    batch: int = 1024,
) -> Tensor:
    """Deterministic target style per domain: mean of F(z, y) over `num_latents` seeded z ~ N(0, I).

    Returns (num_domains, style_dim) float32 on CPU. The latents are drawn on CPU with a private generator so
    the result does not depend on the device or on the global random state.
    """
    if num_latents < 1:
        raise ValueError(f"num_latents must be >= 1, got {num_latents}")
    param = next(mapping_network.parameters())
    latent_dim = mapping_network.cfg.latent_dim
    gen = torch.Generator().manual_seed(seed)
    z_all = torch.randn(num_latents, latent_dim, generator=gen)
    was_training = mapping_network.training
    mapping_network.eval()
    try:
        styles = []
        for k in range(num_domains):
            acc = torch.zeros(mapping_network.cfg.style_dim, dtype=torch.float64)
            for start in range(0, num_latents, batch):
                z = z_all[start : start + batch].to(param.device, param.dtype)
                y = torch.full((z.shape[0],), k, dtype=torch.long, device=param.device)
                acc += mapping_network(z, y).double().sum(0).cpu()
            styles.append((acc / num_latents).float())
    finally:
        mapping_network.train(was_training)
    return torch.stack(styles)


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------
def save_model_file(
    path: str | os.PathLike[str],
    *,
    config: ModelConfig,
    weights: Mapping[str, Tensor],
    domain_styles: Tensor,
    card: Mapping[str, Any],
) -> Path:
    """Validate and write a StarGAN v2 model file atomically (temp file in the same folder + os.replace).

    `weights` are the EMA inference weights named `generator.*`, `mapping_network.*`, `style_encoder.*`
    (see `weights_from_networks`). The card's `format_version` and `architecture` are filled in from
    `config` when absent and must agree with it when present. Nothing is written if anything is invalid.
    Kernel-transfer models are written by `save_kernel_transfer_model`.
    """
    if not isinstance(config, ModelConfig):
        raise ModelFileError(
            f"save_model_file writes StarGAN v2 models (ModelConfig), got {type(config).__name__}; use "
            "save_kernel_transfer_model for kernel-transfer models"
        )
    path = _checked_output_path(path)
    card = _json_copy(card)
    card.setdefault("format_version", FORMAT_VERSION)
    card.setdefault("architecture", config.to_dict())
    if card["architecture"] != config.to_dict():
        raise ModelFileError(
            f"card architecture {card['architecture']} differs from the config {config.to_dict()}; "
            f"pass matching values"
        )
    validate_card(card)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    tensors[STYLES_KEY] = domain_styles.detach().to("cpu", torch.float32).contiguous()
    return _write_model(path, config, tensors, card,
                        "pass the EMA networks of this architecture (weights_from_networks)")


def make_kernel_transfer_card(
    *,
    config: KernelTransferConfig,
    domains: list[Domain] | tuple[Domain, ...],
    training: Mapping[str, Any],
    supported_pixel_mm: tuple[float, float] | list[float] = DEFAULT_SUPPORTED_PIXEL_MM,
    metrics: Mapping[str, Any] | None = None,
    intended_use: str = DEFAULT_INTENDED_USE,
    created: str | None = None,
    transfer_filters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A complete kernel-transfer model card (see DESIGN.md); ``save_kernel_transfer_model`` builds it."""
    return _card(config, domains, training, metrics, intended_use, created, transfer_filters,
                 {"supported_pixel_mm": [float(v) for v in supported_pixel_mm]})


def save_kernel_transfer_model(
    path: str | os.PathLike[str],
    generator: KernelTransferGenerator,
    estimator: SourceEstimator,
    domains: list[Domain] | tuple[Domain, ...],
    training: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    supported_pixel_mm: tuple[float, float] | list[float] = DEFAULT_SUPPORTED_PIXEL_MM,
    intended_use: str = DEFAULT_INTENDED_USE,
    transfer_filters: list[dict[str, Any]] | None = None,
    created: str | None = None,
) -> Path:
    """Validate and write a kernel-transfer model file atomically; nothing is written if anything is invalid.

    ``generator`` and ``estimator`` must share one ``KernelTransferConfig`` (it becomes the card's
    ``architecture``). ``domains``: one per ``num_domains``, ids 0.. in order. ``training``: at least
    ``data`` (text), ``iterations`` (int), ``texture_loss`` (bool), ``code_version`` (text).
    ``supported_pixel_mm``: the [min, max] in-plane pixel size (mm) the model was trained for; inputs
    outside it are harmonized with a warning. ``transfer_filters``: optional fitted linear filters, as in
    ``make_model_card``.
    """
    if not isinstance(generator, KernelTransferGenerator) or not isinstance(estimator, SourceEstimator):
        raise ModelFileError(
            f"need a KernelTransferGenerator and a SourceEstimator, got {type(generator).__name__} and "
            f"{type(estimator).__name__}"
        )
    config = generator.config
    if estimator.config != config:
        raise ModelFileError(
            f"the generator and the source estimator have different architectures ({config.to_dict()} vs "
            f"{estimator.config.to_dict()}); build both from one KernelTransferConfig"
        )
    path = _checked_output_path(path)
    card = _json_copy(make_kernel_transfer_card(
        config=config, domains=domains, training=training, supported_pixel_mm=supported_pixel_mm,
        metrics=metrics, intended_use=intended_use, created=created, transfer_filters=transfer_filters,
    ))
    validate_card(card)
    tensors = {
        f"{net}.{k}": v.detach().to("cpu", torch.float32).contiguous()
        for net, module in (("generator", generator), ("source_estimator", estimator))
        for k, v in module.state_dict().items()
    }
    return _write_model(path, config, tensors, card, "pass the networks of one KernelTransferConfig")


def _checked_output_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(
            f"model files end in .safetensors, got '{path.name}'; choose a .safetensors name"
        )
    if not path.parent.is_dir():
        raise ModelFileError(f"output folder '{path.parent}' does not exist; create it first")
    return path


def _json_copy(card: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy that also proves the card is strict JSON (no NaN, no numpy scalars)."""
    try:
        return json.loads(json.dumps(dict(card), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ModelFileError(
            f"model card is not valid JSON ({exc}); convert values to plain numbers"
        ) from None


def _write_model(path: Path, config: ModelConfig | KernelTransferConfig, tensors: dict[str, Tensor],
                 card: Mapping[str, Any], fix: str) -> Path:
    """Check names, shapes and finiteness of the (CPU float32) tensors, then write the file atomically."""
    _check_tensor_names_shapes({k: tuple(v.shape) for k, v in tensors.items()}, config, fix)
    _check_finite(tensors, "refusing to save")
    metadata = {
        "format": FILE_FORMAT,
        "model_card": json.dumps(card, sort_keys=True),
        "weights_sha256": _weights_digest(tensors),
    }
    # Serialised in memory (the file is small): safetensors' own writer creates 0600 files.
    write_bytes_atomic(path, save(tensors, metadata=metadata))
    return path


def _check_finite(tensors: Mapping[str, Tensor], action: str) -> None:
    # NumPy on the CPU copies: many small tensors, and torch's per-call threading overhead dominated here.
    bad = [k for k, t in tensors.items() if not np.isfinite(t.numpy()).all()]
    if bad:
        raise ModelFileError(
            f"{action}: non-finite values (NaN/Inf) in {len(bad)} tensor(s), e.g. {bad[:3]}; the training "
            f"run diverged, export an earlier checkpoint"
        )


def _sniff(path: Path) -> None:
    """Refuse what is not a safetensors file by its first bytes, before any parser sees it.

    A safetensors file starts with a little-endian u64 header length and then '{'. Only when that structure
    is absent are the pickle / zip signatures consulted (the length's first byte may well be 0x80).
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise ModelFileError(f"model file '{path}' is empty; copy or export it again")
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if head[8:9] == b"{" and 2 <= header_len <= size - 8:
        return
    for sig, what in _PICKLE_SIGNATURES.items():
        if head.startswith(sig):
            raise ModelFileError(
                f"'{path}' is {what}, not a .safetensors model file. It was not loaded: pickle-based files "
                f"can run code when opened. Export the model with Training/export.py (safetensors)"
            )
    if head[8:9] == b"{" or len(head) < 9:
        raise ModelFileError(
            f"model file '{path}' is truncated or corrupt ({size} bytes, header incomplete); copy or export "
            f"it again"
        )
    raise ModelFileError(
        f"'{path}' is not a safetensors file (no safetensors header); it is corrupt or another format"
    )


def load_model_file(path: str | os.PathLike[str] | None = None) -> ModelFile:
    """Read and validate a model file (None = the bundled default). Raises ModelFileError; never unpickles."""
    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    if not path.exists():
        hint = (
            "the bundled default model has not been trained yet; train one (Training/train.py) and pass "
            "--model PATH" if path == DEFAULT_MODEL_PATH else "check the path"
        )
        raise ModelFileError(f"model file '{path}' not found; {hint}")
    if not path.is_file():
        raise ModelFileError(f"model file '{path}' is not a file; pass the .safetensors file itself")
    _sniff(path)
    corrupt = f"model file '{path}' is truncated or corrupt; copy or export it again"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FILE_FORMAT:
                raise ModelFileError(
                    f"'{path}' is a safetensors file but not a CT harmonization model (metadata 'format' "
                    f"is {metadata.get('format')!r}, expected {FILE_FORMAT!r}); export it with "
                    f"Training/export.py"
                )
            try:
                card = json.loads(metadata.get("model_card", ""))
            except json.JSONDecodeError as exc:
                raise ModelFileError(f"model card in '{path}' is not valid JSON ({exc}); {corrupt}") from None
            config, domains, spec = validate_card(card)
            names = list(f.keys())
            fix = "the file does not belong to this architecture; re-export it"
            _check_tensor_names_shapes({n: tuple(f.get_slice(n).get_shape()) for n in names}, config, fix)
            dtypes = {n: f.get_slice(n).get_dtype() for n in names}
            wrong = sorted(n for n, dt in dtypes.items() if dt != "F32")
            if wrong:
                raise ModelFileError(
                    f"tensors must be float32, got {dtypes[wrong[0]]} for {wrong[:3]}; re-export the model"
                )
            tensors = {n: f.get_tensor(n) for n in names}
    except SafetensorError as exc:
        raise ModelFileError(f"{corrupt} ({exc})") from None
    if metadata.get("weights_sha256") != _weights_digest(tensors):
        raise ModelFileError(f"{corrupt} (weights checksum mismatch)")
    _check_finite(tensors, f"model file '{path}' is unusable")
    state_dicts: dict[str, dict[str, Tensor]] = {net: {} for net in _network_names(config)}
    for name, t in tensors.items():
        if name != STYLES_KEY:
            net, key = name.split(".", 1)
            state_dicts[net][key] = t
    return ModelFile(
        path=path,
        config=config,
        card=card,
        domains=domains,
        preprocessing=spec,
        state_dicts=state_dicts,
        domain_styles=tensors.get(STYLES_KEY),
    )


def instantiate(model_file: ModelFile, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """The inference networks with the file's weights, in eval mode with gradients off: generator,
    mapping_network, style_encoder (StarGAN v2) or generator (``KernelTransferGenerator``) and
    source_estimator (``SourceEstimator``). Built on 'meta' and given the loaded tensors directly: no random
    init, no copy.
    """
    with torch.device("meta"):
        nets = _build(model_file.config)
    out: dict[str, nn.Module] = {}
    for name in _network_names(model_file.config):
        net = nets[name]
        net.load_state_dict(model_file.state_dicts[name], strict=True, assign=True)
        out[name] = net.to(device).eval().requires_grad_(False)
    return out
