"""Calibrate a kernel-transfer model to a scanner it has not seen, from one real acquisition reconstructed
with two (or more) kernels.

The model's kernels are families: a kernel curve estimated for one scanner is only roughly right on another
vendor's or model's scanner. A paired acquisition (the same raw data reconstructed twice, which a scanner
console can do in minutes) pins down both kernels: this module fine-tunes only what belongs to the
kernels of the pair, i.e. their rows of the log MTF curves, of the domain embeddings and (noise synthesis)
of the noise curves, with the paired loss of training on crops of the fitting slices. Everything shared
(the residual network, the other kernels) stays as it was, so every direction between two other kernels
gives the same output (to float rounding). A kernel the model does not know becomes a new domain, named
from its DICOM tags and started from the most similar known kernel (``like``, else the source estimator's
choice). The source estimator is not refitted: it never proposes a new domain (its tags name it).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from TextureStarGANCore.domains import Domain, UnknownDomainError, detect_domain, resolve_domain
from TextureStarGANCore.kernel_families import family_domain
from TextureStarGANCore.kernel_transfer import HU_SCALE, KernelTransferGenerator, SourceEstimator
from TextureStarGANCore.model_file import KIND_KERNEL_TRANSFER, ModelFile

from .kernel_transfer_train import paired_error
from .paired_data import PairedGroup, PairSampler

__all__ = ["CalibrationError", "SeriesDomain", "domain_for_series", "extend_domains", "calibrate_networks",
           "paired_rmse"]

Progress = Callable[[str, int, int], None]
NEVER_LOGIT = 30.0  # a new domain's estimator logit sits this far below the lowest bias: never proposed


class CalibrationError(ValueError):
    """The model or the pair cannot be calibrated (wrong model kind, one kernel for both series, ...)."""


@dataclass(frozen=True)
class SeriesDomain:
    """The model domain a calibration series belongs to; ``like`` (new domains): the known domain its
    curves start from."""

    domain: Domain
    new: bool
    how: str
    like: str | None = None


def _new_name(manufacturer: str, kernel: str, taken: set[str]) -> str:
    word = (manufacturer.split() or ["SCANNER"])[0].upper()
    base = re.sub(r"[^A-Z0-9]+", "_", f"{word}_{kernel}".upper()).strip("_")
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def domain_for_series(domains: Sequence[Domain], tags: dict[str, Any], choice: str | None,
                      estimate: Callable[[], str], like: str | None, pending: Sequence[Domain] = ()
                      ) -> SeriesDomain:
    """The domain of one series: the user's ``choice`` (a known domain), else the model's detection from
    the tags, else a new domain named from the tags (``like``, else the nearest of the kernel's family
    (``kernel_families``), else ``estimate()``: where its curves start)."""
    known = [*domains, *pending]
    if choice is not None:
        return SeriesDomain(resolve_domain(known, choice), False, "named by the user")
    manufacturer = str(tags.get("Manufacturer") or "").strip()
    model = str(tags.get("ManufacturerModelName") or "").strip()
    kernel = str(tags.get("ConvolutionKernel") or "").strip()
    found = detect_domain(known, manufacturer, model, kernel)
    if found is not None:
        return SeriesDomain(found, False, "from the DICOM tags")
    if not kernel:
        raise CalibrationError("a series has no ConvolutionKernel tag: name its domain")
    if like is not None:
        start = resolve_domain(domains, like).name
    else:  # the nearest of the kernel's vendor family; the image-based estimate for other vendors
        family = family_domain(domains, manufacturer, kernel)
        start = family.name if family is not None else estimate()
    name = _new_name(manufacturer, kernel, {d.name for d in known})
    display = f"{manufacturer or 'unknown'} {kernel} (calibrated on {model or 'an unnamed scanner'})"
    domain = Domain(len(known), name, display, manufacturer or "unknown", model or "unknown", kernel)
    return SeriesDomain(domain, True, "new: kernel not in the model", start)


def extend_domains(gen: KernelTransferGenerator, est: SourceEstimator, like_rows: Sequence[int]
                   ) -> tuple[KernelTransferGenerator, SourceEstimator]:
    """Networks with one more domain per entry of ``like_rows``, whose curves and embedding copy that
    domain's; every existing weight is kept. The estimator's new outputs are never the most probable."""
    cfg = replace(gen.config, num_domains=gen.config.num_domains + len(like_rows))
    new_gen, new_est = KernelTransferGenerator(cfg), SourceEstimator(cfg)
    state = {k: v.clone() for k, v in gen.state_dict().items()}
    idx = torch.as_tensor(list(like_rows), dtype=torch.long)
    for key in ("log_mtf", "embed", "log_keep"):
        if key in state:
            state[key] = torch.cat([state[key], state[key][idx]], 0)
    new_gen.load_state_dict(state)
    est_state = {k: v.clone() for k, v in est.state_dict().items()}
    w, b = est_state["mlp.2.weight"], est_state["mlp.2.bias"]
    est_state["mlp.2.weight"] = torch.cat([w, w.new_zeros(len(like_rows), w.shape[1])], 0)
    est_state["mlp.2.bias"] = torch.cat([b, b.new_full((len(like_rows),), float(b.min()) - NEVER_LOGIT)])
    new_est.load_state_dict(est_state)
    return new_gen.eval(), new_est.eval()


def _fixed_batches(groups: Sequence[PairedGroup], index: dict[str, int], crop: int, count: int,
                   seed: int) -> list[dict[str, Any]]:
    sampler = PairSampler(groups, index, crop, 1.0, 0.0, seed)
    return [sampler.batch(12) for _ in range(max(1, count // 12))]


@torch.no_grad()
def paired_rmse(gen: KernelTransferGenerator, batches: Sequence[dict[str, Any]], margin: int) -> float:
    """RMSE (HU) of the deterministic output on fixed paired crops."""
    errs = [paired_error(gen, b, margin)[0].mean() for b in batches]
    return float(torch.stack(errs).mean()) ** 0.5 * HU_SCALE


def calibrate_networks(gen: KernelTransferGenerator, groups: Sequence[PairedGroup], index: dict[str, int],
                       rows: Sequence[int], *, iters: int, noise_steps: int, crop: int = 128,
                       margin: int = 16, lr: float = 3e-3, seed: int = 0,
                       stop: Callable[[], bool] = lambda: False,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Fit the ``rows`` domains' log MTF, embedding and noise curves of ``gen`` in place on ``groups``;
    the RMSE on fixed crops of the same slices before and after."""
    from .kernel_transfer_noise import fit_noise

    probe = _fixed_batches(groups, index, crop, 48, seed + 104729)
    before = paired_rmse(gen, probe, margin)
    mask = torch.zeros(gen.config.num_domains, 1)
    mask[list(rows)] = 1.0
    params = [gen.log_mtf, gen.embed]
    frozen = [p for p in gen.parameters() if all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([{"params": [gen.log_mtf], "lr": lr}, {"params": [gen.embed], "lr": lr / 3}])
    sampler = PairSampler(groups, index, crop, 1.0, 0.05, seed)
    done = 0
    try:
        for it in range(iters):
            if stop():
                raise KeyboardInterrupt
            sampler.rng = np.random.default_rng([seed, it])
            loss = paired_error(gen, sampler.batch(12), margin)[0].mean()
            opt.zero_grad()
            loss.backward()
            for p in params:
                p.grad.mul_(mask)  # zero gradient: Adam leaves the other domains' rows exactly as they were
            opt.step()
            done = it + 1
            if progress:
                progress("calibrate", done, iters)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    noise = None
    if gen.config.noise_synthesis and noise_steps > 0:
        noise = fit_noise(gen, groups, index, crop=crop, margin=margin, real_fraction=1.0, steps=noise_steps,
                          seed=seed, rows=rows, progress=progress)
    gen.eval()
    return {"iterations": done, "fit_rmse_hu_before": round(before, 2),
            "fit_rmse_hu_after": round(paired_rmse(gen, probe, margin), 2), "noise_fit": noise}


def check_model(model: ModelFile) -> None:
    if model.kind != KIND_KERNEL_TRANSFER:
        raise CalibrationError(f"{model.path}: calibration needs a kernel-transfer model, this one is "
                               f"{model.kind!r}")


def resolve_like(domains: Sequence[Domain], like: str | None) -> str | None:
    if like is None:
        return None
    try:
        return resolve_domain(domains, like).name
    except UnknownDomainError as exc:
        raise CalibrationError(str(exc)) from exc


def training_record(model: ModelFile, record: dict[str, Any]) -> dict[str, Any]:
    """The calibrated file's ``training``: the base model's, with this calibration appended."""
    training = dict(model.card["training"])
    training["calibrations"] = [*training.get("calibrations", []), record]
    training["data"] = f"{training['data']}; calibrated on {record['pairs']}"
    return training


def output_path(out: str | Path, model_path: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.resolve() == Path(model_path).resolve():
        raise CalibrationError(f"--out {out} is the model being calibrated; write a new file")
    if out.exists() and not overwrite:
        raise CalibrationError(f"{out} exists; pass --overwrite to replace it")
    return out


def calibrate_model(model: str | Path | None, pairs: Sequence[tuple[str, str]], out: str | Path, *,
                    fit_slices: str | None = None, sharp_domain: str | None = None,
                    smooth_domain: str | None = None, like_sharp: str | None = None,
                    like_smooth: str | None = None, iters: int = 400, noise_steps: int = 150, seed: int = 0,
                    overwrite: bool = False, stop: Callable[[], bool] = lambda: False,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Calibrate ``model`` (None: the bundled one) on the ``fit_slices`` (default the first half) of each
    (sharp, smooth) DICOM pair and write the result to ``out`` (a new file, atomically); a summary."""
    from TextureStarGANCore.domains import harmonization_record
    from TextureStarGANCore.inference import Harmonizer
    from TextureStarGANCore.model_file import instantiate, load_model_file, save_kernel_transfer_model
    from Training.evaluation.real_pairs import load_pair, parse_range

    from .paired_data import real_pair_group

    if iters < 0 or noise_steps < 0:
        raise CalibrationError("--iters and --noise-steps must not be negative")
    base = load_model_file(model)
    check_model(base)
    path = output_path(out, base.path, overwrite)
    # The estimator is needed only to start a new kernel's curves: load it then.
    harmonizer = functools.cache(lambda: Harmonizer.from_checkpoint(base.path, device="cpu"))
    likes = {"sharp": resolve_like(base.domains, like_sharp),
             "smooth": resolve_like(base.domains, like_smooth)}
    choice = {"sharp": sharp_domain, "smooth": smooth_domain}
    new_series: list[SeriesDomain] = []
    assigned: list[tuple[Any, range, dict[str, SeriesDomain]]] = []
    for sharp_dir, smooth_dir in pairs:
        pair = load_pair(sharp_dir, smooth_dir)
        rows = parse_range(fit_slices, pair.slices, (0, pair.slices // 2), "--fit-slices")
        found: dict[str, SeriesDomain] = {}
        for role, vol in (("sharp", pair.sharp), ("smooth", pair.smooth)):
            if harmonization_record(vol.tags.get("DerivationDescription")) is not None:
                raise CalibrationError(f"{vol.source} was harmonized by ctharmonize: calibrate on the "
                                       "scanner's own reconstructions")
            sd = domain_for_series(
                base.domains, vol.tags, choice[role],
                lambda v=vol, r=rows: harmonizer().estimate_source(v.hu[list(r)], v.spacing)[0].name,
                likes[role], [n.domain for n in new_series])
            if sd.new:
                new_series.append(sd)
            found[role] = sd
        if found["sharp"].domain.name == found["smooth"].domain.name:
            raise CalibrationError(f"{pair.name}: both series map to domain {found['sharp'].domain.name}; "
                                   "a pair needs two kernels (name them with --sharp-domain/--smooth-domain)")
        assigned.append((pair, rows, found))
    nets = instantiate(base)
    gen, est = nets["generator"], nets["source_estimator"]
    names = [d.name for d in base.domains]
    if new_series:
        gen, est = extend_domains(gen, est, [names.index(str(sd.like)) for sd in new_series])
    domains = [*base.domains, *(sd.domain for sd in new_series)]
    index = {d.name: d.id for d in domains}
    groups = [real_pair_group(f"{pair.name} (slices {rows.start}:{rows.stop})",
                              {found[r].domain.name: vol for r, vol in (("sharp", pair.sharp),
                                                                         ("smooth", pair.smooth))},
                              rows) for pair, rows, found in assigned]
    calibrated = sorted({index[sd.domain.name] for _, _, found in assigned for sd in found.values()})
    gen.requires_grad_(True).train()
    stats = calibrate_networks(gen, groups, index, calibrated, iters=iters, noise_steps=noise_steps,
                               seed=seed, stop=stop, progress=progress)
    record = {
        "pairs": ", ".join(g.name for g in groups), "iterations": stats["iterations"],
        "domains": {sd.domain.name: {"new": sd.new, "how": sd.how, **({"started_from": sd.like} if sd.new
                                                                      else {})}
                    for _, _, found in assigned for sd in found.values()},
        "fit_rmse_hu_before": stats["fit_rmse_hu_before"], "fit_rmse_hu_after": stats["fit_rmse_hu_after"],
        "base_model": base.path.name,
    }
    written = save_kernel_transfer_model(
        path, gen, est, domains, training_record(base, record), metrics={},  # the base's metrics are not ours
        supported_pixel_mm=base.supported_pixel_mm or (0.4, 1.0), intended_use=base.card["intended_use"])
    return {"model": str(written), **record, "noise_fit": stats["noise_fit"]}
