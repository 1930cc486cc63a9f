"""Train the kernel-transfer model (default model v2) on paired reconstructions.

    python -m Training.train_kernel_transfer --config Training/configs/kernel_transfer.yaml --out RUN
        [--resume auto] [--max-iters N] [--set section.key=value ...] [--export MODEL.safetensors]

Data (see the config): simulated variants of real anatomy (``Training.simulate --anatomy``) and real
acquisitions reconstructed with several kernels (only the slices the config names: keep validation slices
out). SIGTERM or Ctrl-C saves a checkpoint; ``--resume auto`` continues the latest one in RUN. RUN gets
``history.csv`` and ``training_curve.png``; ``--export`` writes the model file the engine loads.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from TextureStarGANCore.fileio import write_json_atomic
from TextureStarGANCore.volume_io import InputError, read_volume

from .command import run_command
from .evaluation.real_pairs import parse_range
from .trainer.kernel_transfer_config import KTConfig, KTConfigError, load_kt_config
from .trainer.kernel_transfer_train import KTRun, fit_estimator, latest_checkpoint, train
from .trainer.paired_data import PairedGroup, load_simulated_groups, real_pair_group


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m Training.train_kernel_transfer",
                                 description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="run folder")
    ap.add_argument("--resume", choices=("auto",), default=None, help="continue the latest checkpoint")
    ap.add_argument("--max-iters", type=int, default=None, help="stop at this iteration (resumable)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--export", type=Path, default=None, help="write the model file when training ends")
    ap.add_argument("--card-metrics", type=Path, default=None,
                    help="with --export: a Training.validate_real results.json to store in the card")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="fine-tune: start from this checkpoint's generator (new optimizer, iteration 0, the "
                         "source estimator refitted on this config's data)")
    ap.add_argument("--keep-estimator", action="store_true",
                    help="with --init-from: keep that checkpoint's source estimator instead of refitting it "
                         "(same domains; saves the 3-7 min fit when the data did not change)")
    return ap.parse_args(argv)


def load_groups(cfg: KTConfig, progress: Any) -> tuple[list[PairedGroup], list[tuple[np.ndarray, Any, str]]]:
    """The paired groups and the estimator's extra single-kernel slices named by the config."""
    groups: list[PairedGroup] = []
    for folder in cfg.data.simulated:
        groups += load_simulated_groups(folder, cfg.domains,
                                        progress=lambda d, t, f=folder: progress(f"load {Path(f).name}", d,
                                                                                 t))
    for entry in cfg.data.real:
        vols = {dom: read_volume(path) for dom, path in entry["series"].items()}
        unknown = sorted(set(vols) - set(cfg.domains))
        if unknown:
            raise KTConfigError(f"data.real {entry['name']}: domain(s) {unknown} are not in domains")
        shapes = {v.hu.shape for v in vols.values()}
        if len(shapes) != 1:
            raise KTConfigError(f"data.real {entry['name']}: series differ in shape {shapes}")
        n = next(iter(shapes))[0]
        rows = parse_range(entry.get("slices"), n, (0, n), f"data.real {entry['name']} slices")
        groups.append(real_pair_group(entry["name"], vols, rows))
    extra = []
    for entry in cfg.data.estimator_real:
        vol = read_volume(entry["series"])
        extra.append((vol.hu, (float(vol.spacing[0]), float(vol.spacing[1])), entry["domain"]))
    return groups, extra


def _curve_png(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    from TextureStarGANCore.fileio import write_figure_png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("paired_rmse_hu", "all crops"), ("real_rmse_hu", "real crops")):
        it = [r["iteration"] for r in history if key in r]
        v = np.array([r[key] for r in history if key in r])
        k = min(25, max(1, len(v) // 4))
        if len(v):
            smooth = np.convolve(v, np.ones(k) / k, mode="valid")
            ax.plot(it[k - 1:], smooth, label=f"{label} (running mean of {k})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("paired RMSE (HU), crop interior")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    write_figure_png(fig, path)
    plt.close(fig)


def _init_generator(run_: Any, state: dict[str, Any]) -> None:
    """Start from another run's generator; a run without noise synthesis lacks only ``log_keep``. A run
    without ``split_residual`` starts both residual networks of a split one from its single network."""
    if run_.gen.config.split_residual and not any(k.startswith("out_up.") for k in state):
        state = {**state, **{_up_name(k): v for k, v in state.items() if k.split(".")[0] in
                             ("convs", "film", "out")}}
    missing, unexpected = run_.gen.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"log_keep"}:
        raise KTConfigError(f"--init-from: the generator does not match the config (missing {missing}, "
                            f"unexpected {unexpected})")


def _up_name(key: str) -> str:
    head, _, rest = key.partition(".")
    return f"{head}_up.{rest}"


def _fit_noise(run_: Any, groups: Any, out: Path, progress: Any) -> dict[str, Any]:
    """Fit the noise-synthesis curves on the trained generator (deterministic: same result on a rerun)."""
    from .trainer.kernel_transfer_noise import fit_noise
    from .trainer.kernel_transfer_train import save_checkpoint

    cfg = run_.cfg
    with torch.no_grad():
        run_.gen.log_keep.zero_()
    stats = fit_noise(run_.gen, groups, {d: i for i, d in enumerate(cfg.domains)}, crop=cfg.data.crop,
                      margin=cfg.data.margin, real_fraction=cfg.data.real_fraction, steps=cfg.noise.steps,
                      batch=cfg.noise.batch, lr=cfg.noise.lr, smooth=cfg.noise.smooth, seed=cfg.train.seed,
                      progress=progress)
    save_checkpoint(run_, out)
    return stats


def run(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    cfg = load_kt_config(args.config, overrides)
    torch.set_num_threads(max(1, cfg.train.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(args.out)
    if previous is not None and args.resume != "auto":
        raise KTConfigError(f"{args.out} holds checkpoints ({previous.name}); pass --resume auto or a new "
                            "--out")
    groups, extra = load_groups(cfg, progress)
    run_ = KTRun.create(cfg)
    if previous is not None:
        run_.load(torch.load(previous, map_location="cpu", weights_only=True))
    else:
        if args.keep_estimator and args.init_from is None:
            raise KTConfigError("--keep-estimator needs --init-from")
        if args.init_from is not None:
            state = torch.load(args.init_from, map_location="cpu", weights_only=True)
            _init_generator(run_, state["generator"])
        if args.keep_estimator:
            try:
                run_.est.load_state_dict(state["estimator"])
            except RuntimeError as exc:
                raise KTConfigError(f"--keep-estimator: the estimator does not match the config "
                                    f"({exc})") from None
            run_.estimator_stats = {**state.get("estimator_stats", {}), "kept_from": str(args.init_from)}
        else:
            run_.estimator_stats = fit_estimator(run_.est, groups, cfg, extra, progress=progress)
        write_json_atomic(args.out / "config.json", cfg.to_dict(), indent=2)
    stop = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        train(run_, groups, args.out, stop=lambda: stop["flag"], progress=progress, max_iters=args.max_iters)
    except KeyboardInterrupt:
        from .trainer.kernel_transfer_train import save_checkpoint

        save_checkpoint(run_, args.out)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
    noise_stats = None
    finished = run_.iteration >= cfg.train.iters and not stop["flag"]
    if cfg.model.noise_synthesis and cfg.noise.steps > 0 and finished:  # after training, not per stop
        noise_stats = _fit_noise(run_, groups, args.out, progress)
    _curve_png(run_.history, args.out / "training_curve.png")
    summary = {"iteration": run_.iteration, "estimator": run_.estimator_stats,
               "groups": {"simulated": sum(g.origin != "real" for g in groups),
                          "real": sum(g.origin == "real" for g in groups)}, "noise_fit": noise_stats,
               "last_100_rmse_hu": float(np.mean([r["paired_rmse_hu"] for r in run_.history[-100:]]))
               if run_.history else None}
    if args.export is not None:  # the state reached (the card records its iteration count)
        from .trainer.kernel_transfer_export import export_model, real_pair_metrics

        metrics = {"real_pairs": real_pair_metrics(args.card_metrics)} if args.card_metrics else None
        summary["model"] = str(export_model(run_, groups, args.export, metrics=metrics))
    write_json_atomic(args.out / "summary.json", summary, indent=2)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    code, summary = run_command(lambda bars: run(args, bars), desc="train", unit="it",
                                errors=(KTConfigError, InputError, ValueError, OSError),
                                interrupted="interrupted; a checkpoint was saved (continue with --resume "
                                            "auto)")
    if summary is not None:
        print(json.dumps(summary, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
