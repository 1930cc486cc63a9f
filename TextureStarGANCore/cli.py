"""``ctharmonize``: harmonize a CT volume to a target reconstruction kernel, or show a model card.

    ctharmonize harmonize INPUT --target KERNEL --output OUT [--source KERNEL] [--model PATH]
                [--device auto|cpu|cuda] [--compare-png PNG] [--overwrite] [--series UID]
                [--batch-size N] [--allow-untrained]
    ctharmonize info [--model PATH]

Every check that can fail runs before anything is written; outputs are written atomically; Ctrl-C
cancels cleanly. Exit codes: 0 done, 2 bad input or usage (nothing written), 1 unexpected failure,
130 cancelled (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .domains import Domain, UnknownDomainError, describe_domains, resolve_domain
from .masks import BODY_THRESHOLD_HU
from .model_file import DEFAULT_MODEL_PATH, ModelFile, ModelFileError, load_model_file
from .volume_io import CTVolume, InputError, check_output_path, read_volume, write_volume

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


class _UsageError(Exception):
    """A problem the user can fix; printed as 'error: ...' with exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctharmonize",
        description="Harmonize CT scans between reconstruction kernels (texture-aware StarGAN v2).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("harmonize", help="harmonize a CT volume to a target kernel",
                       description="Harmonize a CT volume (NRRD, NIfTI, MHA or a DICOM series folder) to a "
                                   "target reconstruction kernel.")
    h.add_argument("input", type=Path, help="input: .nrrd/.nii.gz/.nii/.mha file, DICOM folder or DICOM file")
    h.add_argument("--target", required=True, help="target kernel: a domain name, kernel or id of the model")
    h.add_argument("--output", "-o", required=True, type=Path,
                   help="output: a .nrrd/.nii.gz/.nii/.mha file, or a folder for a DICOM derived series")
    h.add_argument("--source", help="source kernel; needed only when the input's DICOM tags do not tell it")
    h.add_argument("--model", type=Path, help="model file (.safetensors); default: the bundled model")
    h.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    h.add_argument("--compare-png", type=Path, help="also write a before/after figure with zoomed ROIs")
    h.add_argument("--overwrite", action="store_true", help="replace existing output files")
    h.add_argument("--series",
                   help="SeriesInstanceUID (or a unique prefix) when a folder holds several series")
    h.add_argument("--batch-size", type=_positive_int, help="slices per batch (default: chosen per device)")
    h.add_argument("--fine-detail", choices=("scaled", "keep", "drop"), default="scaled",
                   help="detail finer than the model's pixels: scale it like the model changed the finest "
                        "texture it sees (default), keep it, or drop it")
    h.add_argument("--method", choices=("model", "filter"), default="model",
                   help="model: the network (default); filter: the model file's fitted linear kernel-"
                        "transfer "
                        "filter for this (source, target) pair (fast, transparent, no GPU)")
    h.add_argument("--allow-untrained", action="store_true",
                   help="accept a model with untrained (random) weights; for tests only")
    i = sub.add_parser("info", help="print a model card", description="Print a model file's card.")
    i.add_argument("--model", type=Path, help="model file (.safetensors); default: the bundled model")
    return parser


def _load_model(path: Path | None) -> ModelFile:
    if path is None and not DEFAULT_MODEL_PATH.exists():
        raise _UsageError(
            f"the default model has not been trained yet (no file at {DEFAULT_MODEL_PATH}); pass --model "
            "PATH with a model file you trained (Training/train.py, then Training/export.py)."
        )
    try:
        return load_model_file(path)
    except ModelFileError as exc:
        raise _UsageError(str(exc)) from None


def _check_png_path(png: Path, overwrite: bool, output: Path, input_path: Path) -> None:
    if png.suffix.lower() != ".png":
        raise _UsageError(f"--compare-png {png}: the figure is a PNG; give a name ending in .png.")
    existing = next((p for p in png.absolute().parents if p.exists()), None)
    if existing is None or not existing.is_dir():  # missing folders are created when it is written
        raise _UsageError(f"--compare-png folder {png.parent} cannot be created: {existing} is not a folder.")
    if png.resolve() == output.resolve() or png.resolve() == input_path.resolve():
        raise _UsageError(f"--compare-png {png} must differ from the input and the output.")
    if png.is_dir():
        raise _UsageError(f"--compare-png {png} is a folder; give a file name ending in .png.")
    if png.exists() and not overwrite:
        raise _UsageError(f"--compare-png {png} already exists; pass --overwrite to replace it.")


def _source_domain(args: argparse.Namespace, volume: CTVolume, domains: list[Domain]) -> Domain:
    from .inference import detect_source

    if args.source is not None:
        return resolve_domain(domains, args.source)
    found = detect_source(volume, domains)
    if found is None:
        seen = ", ".join(f"{k}={volume.tags[k]!r}" for k in ("Manufacturer", "ManufacturerModelName",
                                                              "ConvolutionKernel") if volume.tags.get(k))
        why = f"its tags ({seen}) match no single domain" if seen else "it carries no DICOM tags"
        raise _UsageError(f"cannot tell the input's source kernel: {why}. Name it with --source; this model "
                          f"knows: {describe_domains(domains)}")
    return found


def _pick_slice(hu: np.ndarray) -> int:
    """The slice with the most body (voxels above BODY_THRESHOLD_HU): the most informative one to show."""
    area = (hu > BODY_THRESHOLD_HU).reshape(hu.shape[0], -1).sum(axis=1)
    return int(np.argmax(area))


def _filter_method(model: ModelFile, source: Domain, target: Domain) -> Any:
    from .filter_method import FilterHarmonizer

    return FilterHarmonizer(model, source, target)  # NoFilterError (a ValueError) names the fitted pairs


def _run_cancellable(func: Any, cancel: threading.Event) -> Any:
    """Run ``func`` in a worker thread so Ctrl-C in the main thread can set ``cancel`` and wait."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = func()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = exc

    worker = threading.Thread(target=work, name="harmonize", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        cancel.set()
        print("\ncancelling (finishing the current batch)...", file=sys.stderr)
        worker.join()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def _harmonize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .figures import save_comparison_png
    from .inference import HarmonizationCancelled, Harmonizer

    model = _load_model(args.model)
    if not model.trained and not args.allow_untrained:
        raise _UsageError(
            f"model {model.path} has untrained (random) weights (training.iterations = 0) and would produce "
            "meaningless images; train a model first (pass --allow-untrained only for tests)."
        )
    target = resolve_domain(model.domains, args.target)
    if args.source is not None:
        resolve_domain(model.domains, args.source)
    kind = check_output_path(args.output, overwrite=args.overwrite, inputs=[args.input])
    if args.compare_png is not None:
        _check_png_path(args.compare_png, args.overwrite, args.output, args.input)
    volume = read_volume(args.input, series_uid=args.series)
    if kind == "dicom" and volume.dicom is None:
        raise _UsageError(f"a DICOM output ({args.output}) needs a DICOM input, whose tags the derived "
                          "series copies; write a .nrrd, .nii.gz or .mha file instead.")
    source = _source_domain(args, volume, model.domains)
    for note in volume.notes:
        print(f"note: {note}", file=sys.stderr)
    if source.id == target.id:
        print(f"note: the input is already {target.name}; harmonizing to the same kernel.", file=sys.stderr)
    try:
        harmonizer = (_filter_method(model, source, target) if args.method == "filter"
                      else Harmonizer(model, device=args.device, batch_size=args.batch_size))
    except ValueError as exc:
        raise _UsageError(str(exc)) from None

    n = volume.shape[0]
    print(f"{args.input}: {n} slices of {volume.shape[1]} x {volume.shape[2]}, spacing "
          f"{', '.join(f'{v:.3g}' for v in volume.spacing)} mm; {source.name} -> {target.name} on "
          f"{harmonizer.device}", file=sys.stderr)
    cancel = threading.Event()
    t0 = time.perf_counter()
    with tqdm(total=n, unit="slice", desc="harmonizing", file=sys.stderr, disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        def work() -> np.ndarray:
            return harmonizer.harmonize(volume.hu, volume.spacing, target.id, source=source.id,
                                        progress=progress, cancel=cancel, fine_detail=args.fine_detail)

        try:
            result = _run_cancellable(work, cancel)
        except HarmonizationCancelled:
            raise KeyboardInterrupt from None
    seconds = time.perf_counter() - t0
    description = f"Harmonized to {target.name} (kernel {target.kernel}) from {source.name}"
    write_volume(args.output, volume, result, description=description, overwrite=args.overwrite)
    print(f"wrote {args.output} ({'DICOM derived series' if kind == 'dicom' else kind}) in {seconds:.1f} s "
          f"({n / max(seconds, 1e-9):.1f} slices/s)", file=sys.stderr)
    if args.compare_png is not None:
        k = _pick_slice(volume.hu)
        kernel_tag = volume.tags.get("ConvolutionKernel")
        before_title = f"Before: {source.name}"
        if kernel_tag and kernel_tag != source.name:
            before_title += f" ({kernel_tag})"
        save_comparison_png(
            args.compare_png, volume.hu[k], result[k].astype(np.float32),
            titles=[before_title, f"After: {target.name}"], pixel_spacing=volume.spacing[:2],
            difference=True, suptitle=f"{args.input.name}: slice {k + 1} of {n}",
        )
        print(f"wrote {args.compare_png}", file=sys.stderr)
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    model = _load_model(args.model)
    card = model.card
    cfg = model.config
    spec = model.preprocessing
    print(f"model file: {model.path}")
    if not model.trained:
        print("WARNING: untrained (random) weights; `harmonize` refuses this model.")
    print(f"architecture: img_size {cfg.img_size}, widths {cfg.base_width}->{cfg.max_width}, "
          f"style {cfg.style_dim}, latent {cfg.latent_dim}")
    print(f"preprocessing: canvas {spec.canvas_size} px at {spec.pixel_spacing_mm:g} mm, HU window "
          f"{spec.hu_window[0]:g}..{spec.hu_window[1]:g}, background {spec.background_hu:g} HU")
    print("domains:")
    for d in model.domains:
        print(f"  {d.id}: {d.name}  ({d.display_name}; manufacturer {d.manufacturer}, "
              f"model {d.scanner_model}, kernel {d.kernel})")
    pairs = ", ".join(f"{a} -> {b}" for a, b in model.transfer_filter_pairs)
    print(f"transfer filters (--method filter): {pairs or 'none'}")
    training = card.get("training", {})
    print(f"training: {training.get('iterations')} iterations, texture loss "
          f"{'on' if training.get('texture_loss') else 'off'}, data: {training.get('data')}")
    print("model card:")
    print(json.dumps(card, indent=2, sort_keys=True))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ctharmonize``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _harmonize(args) if args.command == "harmonize" else _info(args)
    except (_UsageError, InputError, UnknownDomainError, ModelFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.command == "harmonize":
            print("nothing was written.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cancelled; nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
