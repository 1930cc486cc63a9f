"""Train the (texture-aware) StarGAN v2 harmonizer.

    python -m Training.train --config Training/configs/cpu_demo.yaml --data DATASET --out RUN_DIR
    torchrun --nproc_per_node=4 -m Training.train --config Training/configs/paper.yaml \
        --data DATASET --out RUN_DIR
    ... --resume auto       # continue the latest checkpoint in RUN_DIR

Multi-node: torchrun's usual rendezvous options (--nnodes, --node_rank, --rdzv_endpoint ...). SIGTERM or
Ctrl-C saves a checkpoint and exits; `--resume auto` continues from it. Export with
`python -m Training.export RUN_DIR --out MODEL.safetensors`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

from TextureStarGANCore.fileio import write_json_atomic, write_text_atomic

from .trainer import checkpointing as ckpt
from .trainer.config import ConfigError, TrainConfig, load_config
from .trainer.data_source import DataError, open_dataset
from .trainer.ddp import DistContext, barrier, init_distributed, seed_everything, shutdown
from .trainer.loop import NonFiniteLossError, Trainer


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m Training.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", type=Path, required=True, help="YAML config (see Training/configs/)")
    ap.add_argument("--data", type=Path, default=None, help="prepared dataset folder (default: data.root)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<config name>)")
    ap.add_argument("--max-iters", type=int, default=None,
                    help="stop after this iteration (absolute count; checkpointed, resumable)")
    ap.add_argument("--resume", default=None,
                    help="'auto' = latest checkpoint in the run folder (fresh start if none), or a path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value, e.g. --set train.batch_size=4 (repeatable)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def _resume_path(arg: str | None, run_dir: Path) -> Path | None:
    existing = ckpt.latest_checkpoint(run_dir)
    if arg is None:
        if existing is not None:
            raise ConfigError(
                f"{run_dir} already holds checkpoints (latest {existing.name}); pass --resume auto to "
                "continue it or choose another --out"
            )
        return None
    if arg == "auto":
        return existing
    path = Path(arg)
    if not path.is_file():
        raise ConfigError(f"--resume {arg}: no such checkpoint file; use --resume auto or a checkpoint path")
    return path


def make_eval_hook(dataset_root: Path, cfg: TrainConfig):
    """Every log.eval_every iterations (rank 0): export an EMA snapshot and evaluate it on validation slices.

    Failures are reported and training continues: evaluation is an observer, never a reason to lose a run.
    """

    def hook(trainer: Trainer) -> None:
        from .trainer.export import export_model

        it = trainer.iteration
        snap = trainer.run_dir / "snapshots" / f"iter_{it:06d}.safetensors"
        out_json = trainer.run_dir / "eval" / f"iter_{it:06d}.json"
        try:
            snap.parent.mkdir(parents=True, exist_ok=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            export_model(snap, ema=trainer.ema, model_config=trainer.model_config, iteration=it,
                         texture_loss=trainer.texture is not None, run_info=trainer.run_info,
                         train_config=cfg.to_dict(), num_latents=1024)
            from .evaluation.evaluate import quick_evaluate

            result = quick_evaluate(snap, dataset_root, out_json,
                                    max_slices_per_domain=cfg.log.eval_max_slices_per_domain,
                                    metrics=cfg.log.eval_metrics)
            flat = {f"eval/{k}": float(v) for k, v in _flatten(result).items()}
            trainer.monitor.scalars(it, flat)
        except Exception as exc:  # noqa: BLE001 - the hook must never stop training
            print(f"evaluation at iteration {it} failed ({type(exc).__name__}: {exc}); training continues",
                  file=sys.stderr)
            if os.environ.get("CTH_TRAIN_DEBUG"):
                traceback.print_exc()

    return hook


def _flatten(d: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix.rstrip("/")] = float(d)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.max_iters is not None and args.max_iters < 1:
        print("error: --max-iters must be a positive iteration count", file=sys.stderr)
        return 2
    data_root = args.data or (Path(cfg.data.root) if cfg.data.root else None)
    if data_root is None:
        print("error: no dataset given; pass --data DATASET (a folder written by Training.prepare) or set "
              "data.root in the config", file=sys.stderr)
        return 2
    run_dir = args.out or Path("runs") / args.config.stem
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ctx: DistContext | None = None
    try:
        resume = _resume_path(args.resume, run_dir)
        ctx = init_distributed(args.device)
        seed_everything(cfg.train.seed, ctx.rank)
        dataset = open_dataset(data_root, cfg, ctx)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            write_json_atomic(run_dir / "run.json", dataset.run_info, indent=2)
        barrier(ctx)
        hook = make_eval_hook(Path(data_root), cfg) if cfg.log.eval_every else None
        trainer = Trainer(cfg, run_dir, dataset.source, dataset.num_domains, ctx, run_info=dataset.run_info,
                          progress=not args.no_progress, eval_hook=hook)
        if resume is not None:
            trainer.resume(resume)
        result = trainer.run(args.max_iters)
    except (ConfigError, DataError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        if ctx is not None:
            shutdown(ctx)
    if ctx.is_main:
        print(f"{result.status} at iteration {result.iteration}; checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
