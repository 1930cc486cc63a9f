"""``ctharmonize``: harmonize a CT volume to a target reconstruction kernel, or show a model card.

    ctharmonize harmonize INPUT --target KERNEL --output OUT [--source KERNEL] [--model PATH]
                [--device auto|cpu|cuda] [--compare-png PNG] [--overwrite] [--series UID]
                [--batch-size N] [--allow-untrained]
    ctharmonize info [--model PATH]
    ctharmonize cohort INPUT_ROOT --target KERNEL --output OUTPUT_ROOT [...]   (see cohort.py)

Every check that can fail (including whether the outputs can be written) runs before the computation;
outputs are written atomically; Ctrl-C or SIGTERM cancels cleanly at any point. Exit codes: 0 done,
2 bad input, usage or a failed write (nothing written), 1 unexpected failure, 130 cancelled by Ctrl-C,
143 stopped by SIGTERM (nothing written).

Heavy modules (numpy, torch) are imported inside ``main`` once the signal handlers are in place, so a
Ctrl-C during start-up ends like any other cancellation.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_types import positive_int

if TYPE_CHECKING:
    import numpy as np

    from .domains import Domain
    from .model_file import ModelFile
    from .volume_io import CTVolume

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_TERMINATED = 0, 1, 2, 130, 143
# The bundled model (model_file.DEFAULT_MODEL_PATH) when None; tests point it elsewhere.
DEFAULT_MODEL_PATH: Path | None = None


class _UsageError(Exception):
    """A problem the user can fix; printed as 'error: ...' with exit code 2."""


class _Interrupts:
    """SIGINT and SIGTERM handling for one run, in the main thread (no worker thread whose join a signal
    could disturb: on Python 3.11 an interrupted ``Thread.join`` let the interpreter exit under a running
    torch kernel, "terminate called without an active exception").

    While harmonizing, the first signal sets ``cancel``: the current batch finishes, then the run stops.
    At any other time, or on a second signal, it raises KeyboardInterrupt where the program is, so
    ``atomic_output`` removes its temporaries; later signals are ignored so the cleanup completes.
    """

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.computing = False
        self.received: int | None = None
        self._raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if first and self.computing:
            self.cancel.set()
            print("\ncancelling (finishing the current batch; press Ctrl-C again to stop now)...",
                  file=sys.stderr)
            return
        if not self._raised:
            self._raised = True
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return EXIT_TERMINATED if self.received == signal.SIGTERM else EXIT_CANCELLED


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
    h.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file, or a folder holding only a DICOM series an earlier "
                        "run wrote (a folder holding anything else is refused)")
    h.add_argument("--series",
                   help="SeriesInstanceUID (or a unique prefix) when a folder holds several series")
    h.add_argument("--batch-size", type=positive_int, help="slices per batch (default: chosen per device)")
    h.add_argument("--fine-detail", choices=("scaled", "keep", "drop"), default="scaled",
                   help="detail finer than the model's pixels: scale it like the model changed the finest "
                        "texture it sees (default), keep it, or drop it")
    h.add_argument("--no-noise", action="store_true",
                   help="kernel-transfer models with noise synthesis: leave out the synthesized noise (the "
                        "deterministic mean image; smoother than the target kernel where the source removed "
                        "noise)")
    h.add_argument("--method", choices=("model", "filter"), default="model",
                   help="model: the network (default); filter: the model file's fitted linear kernel-"
                        "transfer "
                        "filter for this (source, target) pair (fast, transparent, no GPU)")
    h.add_argument("--allow-untrained", action="store_true",
                   help="accept a model with untrained (random) weights; for tests only")
    c = sub.add_parser("cohort", help="harmonize every CT series of a folder tree (resumable, parallel)",
                       description="Harmonize every CT series under INPUT_ROOT into a mirrored tree under "
                                   "OUTPUT_ROOT, with manifest.csv and report.md.")
    from . import cohort

    cohort.add_arguments(c)
    i = sub.add_parser("info", help="print a model card", description="Print a model file's card.")
    i.add_argument("--model", type=Path, help="model file (.safetensors); default: the bundled model")
    return parser


def _load_model(path: Path | None) -> ModelFile:
    from . import model_file

    default = DEFAULT_MODEL_PATH or model_file.DEFAULT_MODEL_PATH
    if path is None and not default.exists():
        raise _UsageError(
            f"the default model has not been trained yet (no file at {default}); pass --model "
            "PATH with a model file you trained (Training/train.py, then Training/export.py)."
        )
    return model_file.load_model_file(path)


def _check_png_path(png: Path, overwrite: bool, output: Path, input_path: Path) -> None:
    from .volume_io import check_apart_from_inputs

    if png.suffix.lower() != ".png":
        raise _UsageError(f"--compare-png {png}: the figure is a PNG; give a name ending in .png.")
    existing = next((p for p in png.absolute().parents if p.exists()), None)
    if existing is None or not existing.is_dir():  # missing folders are created when it is written
        raise _UsageError(f"--compare-png folder {png.parent} cannot be created: {existing} is not a folder.")
    check_apart_from_inputs(png, [input_path], what="--compare-png")
    if png.resolve() == output.resolve() or output.resolve() in png.resolve().parents:
        raise _UsageError(f"--compare-png {png} must lie outside the output {output}.")
    if png.is_dir():
        raise _UsageError(f"--compare-png {png} is a folder; give a file name ending in .png.")
    if png.exists() and not overwrite:
        raise _UsageError(f"--compare-png {png} already exists; pass --overwrite to replace it.")


SOURCE_USER, SOURCE_TAGS, SOURCE_ESTIMATE, SOURCE_FOREIGN = "user", "tags", "estimate", "foreign"
SOURCE_FAMILY = "family"
ESTIMATED_LABEL = "source kernel estimated from the image"


def _source_domain(args: argparse.Namespace, volume: CTVolume,
                   model: ModelFile) -> tuple[Domain | None, str, str]:
    """The source domain (None for a kernel the model was not trained on, or one still to be estimated; for
    a kernel-transfer model, the nearest of the kernel's family when it has one), how to name the source,
    and where it came from (``SOURCE_*``).

    A StarGAN v2 generator takes only the target style, so a foreign source kernel does not change the
    output; it is accepted with a note, since the model never saw that kernel. A kernel-transfer model needs
    the source: when neither --source nor the tags name one of its kernels it is estimated from the image."""
    from .domains import describe_domains, resolve_domain
    from .inference import detect_family, detect_source
    from .model_file import KIND_KERNEL_TRANSFER

    domains = model.domains
    if args.source is not None:
        domain = resolve_domain(domains, args.source)
        return domain, domain.name, SOURCE_USER
    found = detect_source(volume, domains)
    if found is not None:
        return found, found.name, SOURCE_TAGS
    kernel = volume.tags.get("ConvolutionKernel", "").strip()
    scanner = " ".join(volume.tags.get(k, "") for k in ("Manufacturer", "ManufacturerModelName")).strip()
    what = (f"the input's reconstruction kernel is {kernel}{f' ({scanner})' if scanner else ''}, which is "
            f"not one of this model's training kernels ({', '.join(d.kernel for d in domains)})")
    if model.kind == KIND_KERNEL_TRANSFER:
        family = detect_family(volume, domains)
        if family is not None:
            print(f"note: {what}; the nearest of its vendor's kernel family, {family.name}, is used (name "
                  "another with --source; a paired acquisition calibrates the real kernels: "
                  "python -m Training.calibrate_kernels).", file=sys.stderr)
            return family, family.name, SOURCE_FAMILY
        why = what if kernel else "no DICOM tags tell the input's kernel"
        print(f"note: {why}; the source kernel is estimated from the image (or name it with --source).",
              file=sys.stderr)
        return None, ESTIMATED_LABEL, SOURCE_ESTIMATE
    if kernel:
        print(f"note: {what}; it is harmonized all the same (the source kernel does not change the output), "
              "but the result may be less reliable.", file=sys.stderr)
        return None, f"kernel {kernel} (not a training kernel of the model)", SOURCE_FOREIGN
    raise _UsageError("cannot tell the input's source kernel: it carries no DICOM tags. Name it with "
                      f"--source; this model knows: {describe_domains(domains)}")


def _pick_slice(hu: np.ndarray) -> int:
    """The slice with the most body (voxels above the body threshold): the most informative one to show."""
    import numpy as np

    from .masks import BODY_THRESHOLD_HU

    area = (hu > BODY_THRESHOLD_HU).reshape(hu.shape[0], -1).sum(axis=1)
    return int(np.argmax(area))


def _axial(volume: CTVolume) -> tuple[tuple[int, int, int], np.ndarray, tuple[float, float, float]]:
    """(axis order, voxels, spacing) of the volume as axial slices (see ``axial_permutation``)."""
    from .volume_io import axial_permutation

    order = axial_permutation(volume.direction, str(volume.source or "the input"))
    per_axis = volume.spacing[::-1]  # spacing of array axes 0, 1, 2 (z, y, x)
    spacing = (per_axis[order[2]], per_axis[order[1]], per_axis[order[0]])
    return order, volume.hu.transpose(order), spacing


def _filter_method(model: ModelFile, source: Domain | None, target: Domain) -> Any:
    from .filter_method import FilterHarmonizer, NoFilterError

    if source is None:
        raise _UsageError("--method filter needs the input's kernel to be one of the model's kernels (its "
                          "filters are fitted per pair of them); pass --source naming one, or use "
                          "--method model")
    try:
        return FilterHarmonizer(model, source, target)
    except NoFilterError as exc:  # names the fitted pairs
        raise _UsageError(f"{exc} Use --method model for this pair.") from None


def _check_can_write(args: argparse.Namespace, volume: CTVolume, kind: str) -> None:
    from .volume_io import check_output_writable, output_size_estimate

    check_output_writable(args.output, output_size_estimate(volume, kind))
    if args.compare_png is not None:
        check_output_writable(args.compare_png, 2_000_000)


@dataclass
class _Plan:
    """A checked harmonization request: everything is known to be valid before computing."""

    target: Domain
    source: Domain | None  # None: a kernel the model was not trained on, or one to estimate
    source_label: str
    source_from: str  # SOURCE_*
    volume: CTVolume
    kind: str  # output kind
    order: tuple[int, int, int]  # array axes that make the volume axial
    axial_hu: np.ndarray
    spacing: tuple[float, float, float]  # of the axial view


def _prepare(args: argparse.Namespace, model: ModelFile) -> _Plan:
    """Every check that can fail, in the order that costs least: arguments, paths, then the input."""
    from .domains import resolve_domain
    from .volume_io import check_output_path, read_volume, validate_ct_spacing

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
    order, axial_hu, spacing = _axial(volume)
    validate_ct_spacing(spacing, str(args.input))
    _check_can_write(args, volume, kind)
    source, label, source_from = _source_domain(args, volume, model)
    return _Plan(target, source, label, source_from, volume, kind, order, axial_hu, spacing)


def _compute(plan: _Plan, harmonizer: Any, args: argparse.Namespace, interrupts: _Interrupts) -> np.ndarray:
    """Harmonize in the main thread; a signal sets ``cancel`` and the run stops after the current batch."""
    import numpy as np
    from tqdm import tqdm

    from .inference import HarmonizationCancelled, PixelSizeWarning

    # A kernel-transfer model chooses the source itself from the tags (or estimates it) and records how;
    # a user's --source is passed on. A StarGAN v2 model only records the source.
    source = plan.source.id if plan.source is not None else None
    if getattr(harmonizer, "kind", None) == "kernel_transfer" and plan.source_from != SOURCE_USER:
        source = None
    with tqdm(total=plan.axial_hu.shape[0], unit="slice", desc="harmonizing", file=sys.stderr,
              disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        interrupts.computing = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PixelSizeWarning)  # printed before the run
                result = harmonizer.harmonize(
                    plan.axial_hu, plan.spacing, plan.target.id, source=source, progress=progress,
                    cancel=interrupts.cancel, fine_detail=args.fine_detail, tags=plan.volume.tags,
                    noise=not args.no_noise,
                )
        except HarmonizationCancelled:
            raise KeyboardInterrupt from None
        finally:
            interrupts.computing = False
    if interrupts.received is not None:  # a signal after the last batch's check
        raise KeyboardInterrupt
    return result.transpose(np.argsort(plan.order))


_SOURCE_FROM_TEXT = {"user": "given with --source", "tags": "from the DICOM tags"}


def _harmonize(args: argparse.Namespace, interrupts: _Interrupts) -> int:
    from .domains import harmonization_description
    from .inference import Harmonizer, pixel_size_note

    model = _load_model(args.model)
    plan = _prepare(args, model)
    for note in plan.volume.notes:
        print(f"note: {note}", file=sys.stderr)
    if plan.order != (0, 1, 2):
        print("note: the volume's slices are not axial; it is harmonized as axial slices (the plane in "
              "which reconstruction kernels act) and written back in its own orientation.", file=sys.stderr)
    if plan.source is not None and plan.source.id == plan.target.id:
        what = (f"the nearest of the input kernel's family is the target {plan.target.name}: the output will "
                "be close to the input" if plan.source_from == SOURCE_FAMILY else
                f"the input is already {plan.target.name}; harmonizing to the same kernel")
        print(f"note: {what}.", file=sys.stderr)
    try:
        harmonizer = (_filter_method(model, plan.source, plan.target) if args.method == "filter"
                      else Harmonizer(model, device=args.device, batch_size=args.batch_size))
    except ValueError as exc:
        raise _UsageError(str(exc)) from None

    n, rows, cols = plan.axial_hu.shape
    print(f"{args.input}: {n} slices of {rows} x {cols}, spacing "
          f"{', '.join(f'{v:.3g}' for v in plan.spacing)} mm; {plan.source_label} -> {plan.target.name} on "
          f"{harmonizer.device}", file=sys.stderr)
    if getattr(harmonizer, "filter_origin", None):
        print(f"note: linear transfer filter: {harmonizer.filter_origin}", file=sys.stderr)
    note = pixel_size_note(model, plan.spacing[:2]) if args.method == "model" else None
    if note is not None:
        print(f"warning: {note}", file=sys.stderr)
    t0 = time.perf_counter()
    result = _compute(plan, harmonizer, args, interrupts)
    seconds = time.perf_counter() - t0
    run = harmonizer.last_run
    if run.get("source_from"):  # kernel transfer: the source the model used, and how it was chosen
        plan.source_label = run["source"]
        how = _SOURCE_FROM_TEXT.get(run["source_from"], run["source_from"])
        print(f"source kernel: {run['source']} ({how})", file=sys.stderr)
    _write_outputs(args, plan.volume, result, harmonization_description(plan.target, plan.source_label),
                   (plan.source_label, plan.target.name))
    print(f"wrote {args.output} ({'DICOM derived series' if plan.kind == 'dicom' else plan.kind}) in "
          f"{seconds:.1f} s ({n / max(seconds, 1e-9):.1f} slices/s)", file=sys.stderr)
    if args.compare_png is not None:
        print(f"wrote {args.compare_png}", file=sys.stderr)
    return EXIT_OK


def _write_outputs(args: argparse.Namespace, volume: CTVolume, result: np.ndarray, description: str,
                   names: tuple[str, str]) -> None:
    """Write the volume and the figure as one: the figure goes to a temporary file first and is put in
    place only once the volume is written, so a failure of either leaves neither behind."""
    from .fileio import atomic_output
    from .volume_io import write_volume

    if args.compare_png is None:
        write_volume(args.output, volume, result, description=description, overwrite=args.overwrite)
        return
    try:
        with atomic_output(args.compare_png) as png:
            _save_figure(png, args, volume, result, names)
            write_volume(args.output, volume, result, description=description, overwrite=args.overwrite)
    except OSError as exc:
        raise _UsageError(f"writing {args.compare_png} failed ({exc.strerror or exc}); nothing was kept.") \
            from None


def _save_figure(png: Path, args: argparse.Namespace, volume: CTVolume, result: np.ndarray,
                 names: tuple[str, str]) -> None:
    import numpy as np

    from .figures import save_comparison_png

    k = _pick_slice(volume.hu)
    before_title = f"Before: {names[0]}"
    kernel_tag = volume.tags.get("ConvolutionKernel")
    if kernel_tag and kernel_tag not in names[0]:
        before_title += f" ({kernel_tag})"
    save_comparison_png(
        png, volume.hu[k], result[k].astype(np.float32),
        titles=[before_title, f"After: {names[1]}"], pixel_spacing=volume.spacing[:2],
        difference=True, suptitle=f"{args.input.name}: slice {k + 1} of {volume.shape[0]}",
    )


def _info(args: argparse.Namespace) -> int:
    model = _load_model(args.model)
    card = model.card
    cfg = model.config
    spec = model.preprocessing
    print(f"model file: {model.path}")
    if not model.trained:
        print("WARNING: untrained (random) weights; `harmonize` refuses this model.")
    if spec is None:  # kernel transfer: native pixel size, no canvas
        lo, hi = model.supported_pixel_mm or (0.0, 0.0)
        print("kind: kernel transfer (learned linear MTF transfer + residual network, at the input's own "
              "pixel size; source kernel from --source, the DICOM tags, the nearest of the kernel's vendor "
              "family (a Siemens, GE or Philips kernel it has no domain for), or estimated from the image)")
        print(f"architecture: width {cfg.width}, depth {cfg.depth}, max gain {cfg.max_gain:g}, "
              f"{cfg.num_knots} MTF knots every {cfg.knot_step_per_mm:g} cycles/mm")
        print(f"supported pixel size: {lo:g} to {hi:g} mm (other sizes are harmonized with a warning)")
    else:
        print("kind: StarGAN v2 (texture-aware generator on a fixed canvas)")
        print(f"architecture: img_size {cfg.img_size}, widths {cfg.base_width}->{cfg.max_width}, "
              f"style {cfg.style_dim}, latent {cfg.latent_dim}")
        print(f"preprocessing: canvas {spec.canvas_size} px at {spec.pixel_spacing_mm:g} mm, HU window "
              f"{spec.hu_window[0]:g}..{spec.hu_window[1]:g}, background {spec.background_hu:g} HU")
    print("domains:")
    for d in model.domains:
        print(f"  {d.id}: {d.name}  ({d.display_name}; manufacturer {d.manufacturer}, "
              f"model {d.scanner_model}, kernel {d.kernel})")
    pairs = ", ".join(f"{a} -> {b}" for a, b in model.transfer_filter_pairs)
    if spec is None:
        print(f"transfer filters (--method filter): {pairs + '; ' if pairs else ''}every other pair: the "
              "model's own linear transfer")
    else:
        print(f"transfer filters (--method filter): {pairs or 'none'}")
    training = card.get("training", {})
    print(f"training: {training.get('iterations')} iterations, texture loss "
          f"{'on' if training.get('texture_loss') else 'off'}, data: {training.get('data')}")
    print("model card:")
    print(json.dumps(card, indent=2, sort_keys=True))
    return EXIT_OK


def _run(args: argparse.Namespace, interrupts: _Interrupts) -> int:
    from .domains import UnknownDomainError
    from .model_file import ModelFileError
    from .volume_io import InputError

    try:
        return _harmonize(args, interrupts) if args.command == "harmonize" else _info(args)
    except (InputError, UnknownDomainError, ModelFileError) as exc:
        raise _UsageError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ctharmonize``; returns the exit code."""
    with _Interrupts() as interrupts:
        try:
            args = build_parser().parse_args(argv)
            if args.command != "cohort":
                return _run(args, interrupts)
        except _UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if args.command == "harmonize":
                print("nothing was written.", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("cancelled; nothing was written.", file=sys.stderr)
            return interrupts.exit_code
    # A cohort handles its own signals: its workers finish the series they are writing.
    from . import cohort

    return cohort.run_command(args)


if __name__ == "__main__":
    sys.exit(main())
