"""The paper's 102 pyradiomics features per 2D slice, extracted in parallel with a cache.

Images are canvases mapped back to HU (the model's window) at the canvas pixel spacing; the mask is the body
(``masks.body_mask``: largest region above -500 HU, holes filled). The body rather than the lungs is
used because every slice has a body while many have no lungs, and kernel texture shows in all tissue.
Slices whose body has fewer than ``MIN_MASK_PIXELS`` pixels get a row of NaN (ignored by the Welch tests).

pyradiomics costs ~0.5 s per 512^2 slice, so extraction runs in a process pool (``workers``) and the
features of the real images are cached on disk, keyed by the dataset's manifest and preprocessing, the
parameter file, this module's mask version and the pyradiomics version.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from TextureStarGANCore.fileio import atomic_output
from TextureStarGANCore.masks import BODY_THRESHOLD_HU, body_mask

PARAMS_PATH = Path(__file__).resolve().parents[2] / "params" / "radiomics_2d.yaml"
MIN_MASK_PIXELS = 64
MASK_VERSION = "body>-500HU,largest,filled;v1"  # change when the mask definition changes (busts the cache)


def _quiet_radiomics() -> None:
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)


@lru_cache(maxsize=4)
def _extractor(params_path: str):
    from radiomics import featureextractor

    _quiet_radiomics()
    return featureextractor.RadiomicsFeatureExtractor(params_path)


def _run(hu: np.ndarray, mask: np.ndarray, spacing_mm: float, params_path: str) -> dict:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(hu, np.float32)[None])
    msk = sitk.GetImageFromArray(mask.astype(np.uint8)[None])
    for im in (img, msk):
        im.SetSpacing((float(spacing_mm), float(spacing_mm), 1.0))
    result = _extractor(params_path).execute(img, msk)
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


@lru_cache(maxsize=4)
def feature_names(params_path: str | Path = PARAMS_PATH) -> tuple[str, ...]:
    """The feature names the parameter file yields, in a fixed (sorted) order."""
    yy, xx = np.mgrid[:48, :48]
    rng = np.random.default_rng(0)
    hu = np.where((yy - 24) ** 2 + (xx - 24) ** 2 < 400, 40.0 + 30 * rng.standard_normal((48, 48)), -1000.0)
    return tuple(sorted(_run(hu, hu > BODY_THRESHOLD_HU, 1.0, str(params_path))))


def slice_features(
    hu: np.ndarray,
    spacing_mm: float = 1.0,
    params_path: str | Path = PARAMS_PATH,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Feature vector (in ``feature_names`` order) of one 2D HU slice; NaN when the mask is too small."""
    names = feature_names(params_path)
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"expected one 2D slice, got shape {hu.shape}")
    mask = body_mask(hu) if mask is None else np.asarray(mask, bool)
    if int(mask.sum()) < MIN_MASK_PIXELS:
        return np.full(len(names), np.nan)
    values = _run(hu, mask, spacing_mm, str(params_path))
    return np.array([values.get(n, np.nan) for n in names], dtype=np.float64)


def _worker(args: tuple[np.ndarray, tuple[float, float], float, str]) -> np.ndarray:
    canvas, window, spacing_mm, params_path = args
    lo, hi = window
    hu = (np.clip(canvas.astype(np.float32), -1.0, 1.0) + 1.0) * 0.5 * (hi - lo) + lo
    return slice_features(hu, spacing_mm, params_path)


def _single_thread_blas() -> contextlib.AbstractContextManager:
    """pyradiomics' GLCM MCC feature runs numpy eigvals per slice; on a busy machine a multi-threaded BLAS
    makes it ~4x slower, and the parallelism belongs to the process pool anyway."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed-up
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _pool_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    global _POOL_LIMIT
    _POOL_LIMIT = _single_thread_blas()  # kept for the worker's lifetime
    _quiet_radiomics()


_POOL_LIMIT: Any = None


@contextlib.contextmanager
def feature_pool(workers: int) -> Iterator[Any]:
    """A process pool for ``extract_features`` (None for one worker); reuse it across calls because
    starting a worker imports pyradiomics (seconds)."""
    if workers <= 1:
        yield None
        return
    # spawn: the parent may hold torch threads, which fork does not copy safely.
    pool = mp.get_context("spawn").Pool(workers, initializer=_pool_init)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def extract_features(
    canvases: np.ndarray | Sequence[np.ndarray],
    hu_window: tuple[float, float],
    spacing_mm: float,
    *,
    workers: int = 1,
    pool: Any = None,
    params_path: str | Path = PARAMS_PATH,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """(N, F) features of canvases in [-1, 1] (model window ``hu_window``), in ``workers`` processes
    (or in ``pool`` from ``feature_pool``)."""
    n = len(canvases)
    names = feature_names(params_path)
    out = np.full((n, len(names)), np.nan)
    jobs = ((canvases[i], tuple(hu_window), float(spacing_mm), str(params_path)) for i in range(n))
    if pool is None and workers > 1 and n > 1:
        with feature_pool(workers) as own:
            return extract_features(
                canvases,
                hu_window,
                spacing_mm,
                pool=own,
                params_path=params_path,
                progress=progress,
                cancel=cancel,
            )
    return _collect(_worker, jobs, out, pool, progress, cancel)


def _collect(
    worker: Callable[[Any], np.ndarray],
    jobs: Iterator[Any],
    out: np.ndarray,
    pool: Any,
    progress: Callable[[int, int], None] | None,
    cancel: threading.Event | None,
) -> np.ndarray:
    """Fill ``out`` row by row with ``worker(job)``, in ``pool`` or in this process."""
    n = len(out)
    rows = map(worker, jobs) if pool is None else pool.imap(worker, jobs, chunksize=2)
    with _single_thread_blas() if pool is None else contextlib.nullcontext():
        for i, row in enumerate(rows):
            if cancel is not None and cancel.is_set():
                raise InterruptedError(f"feature extraction cancelled after {i} of {n} images")
            out[i] = row
            if progress is not None:
                progress(i + 1, n)
    return out


def _patch_worker(args: tuple[np.ndarray, float, str]) -> np.ndarray:
    patch, spacing_mm, params_path = args
    return slice_features(patch, spacing_mm, params_path, mask=np.ones(patch.shape, bool))


def extract_patch_features(
    patches_hu: Sequence[np.ndarray],
    spacing_mm: float,
    *,
    workers: int = 1,
    pool: Any = None,
    params_path: str | Path = PARAMS_PATH,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """(N, F) features of 2D HU patches, each patch whole as the region (matched ROIs placed identically
    in several images), in ``workers`` processes or in ``pool`` from ``feature_pool``."""
    n = len(patches_hu)
    out = np.full((n, len(feature_names(params_path))), np.nan)
    jobs = ((np.asarray(p, np.float32), float(spacing_mm), str(params_path)) for p in patches_hu)
    if pool is None and workers > 1 and n > 1:
        with feature_pool(workers) as own:
            return _collect(_patch_worker, jobs, out, own, progress, cancel)
    return _collect(_patch_worker, jobs, out, pool, progress, cancel)


class FeatureCache:
    """Features of real dataset slices on disk, one .npz per (dataset, parameters) key.

    Rows are addressed by slice id (``array:row``) so runs on different subsets share and extend it.
    """

    def __init__(
        self, cache_dir: str | Path, dataset_root: str | Path, params_path: str | Path = PARAMS_PATH
    ) -> None:
        import radiomics

        root = Path(dataset_root)
        h = hashlib.sha256()
        for part in (root / "manifest.csv", root / "preprocessing.json", Path(params_path)):
            h.update(part.read_bytes() if part.is_file() else b"-")
        h.update(MASK_VERSION.encode())
        h.update(str(radiomics.__version__).encode())
        self.key = h.hexdigest()[:24]
        self.path = Path(cache_dir) / f"radiomics_{self.key}.npz"
        self.names = list(feature_names(params_path))
        self._rows: dict[str, np.ndarray] = {}
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as z:
                if list(z["names"]) == self.names:
                    self._rows = dict(zip(z["ids"].tolist(), z["features"], strict=True))

    def get(self, ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """(len(ids), F) table with cached rows filled; indices of the ids still missing."""
        table = np.full((len(ids), len(self.names)), np.nan)
        missing = []
        for i, sid in enumerate(ids):
            if sid in self._rows:
                table[i] = self._rows[sid]
            else:
                missing.append(i)
        return table, missing

    def put(self, ids: Sequence[str], rows: np.ndarray) -> None:
        for sid, row in zip(ids, rows, strict=True):
            self._rows[sid] = np.asarray(row, dtype=np.float64)
        keys = sorted(self._rows)
        with atomic_output(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                ids=np.array(keys),
                names=np.array(self.names),
                features=np.stack([self._rows[k] for k in keys]) if keys else np.zeros((0, 0)),
            )
