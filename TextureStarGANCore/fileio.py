"""The one way this project writes a final output: atomically, with the permissions the umask gives.

Every file or folder is first written under a temporary name beside its target (same file system) and
then put in place with one ``os.replace``, so a reader never sees half a file and a failed or interrupted
write leaves the target as it was. Temporaries are created with ``open``/``mkdir`` (not ``mkstemp``, which
makes files private), so outputs get the same mode as any other tool's: 0666 / 0777 less the umask.

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TEMP_MARKER",
    "atomic_output",
    "json_safe",
    "write_bytes_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

# Temporary names: .<stem>.tmp-<pid>-<8 hex><suffix> (and .<stem>.old-<pid>-<8 hex> for a replaced folder);
# the pid lets a later run remove those of a process that no longer exists (killed with SIGKILL, a power cut)
# and leave those of a writer still running alone.
TEMP_MARKER = ".tmp-"
_TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(?P<suffix>[.a-zA-Z]*)$")
# Suffixes made of two parts that writers choose the format from; the temporary name must keep them whole.
_DOUBLE_SUFFIXES = (".nii.gz",)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in _DOUBLE_SUFFIXES:
        if name.endswith(s):
            return path.name[-len(s):]
    return path.suffix


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _remove_stale_temporaries(out: Path, stem: str) -> None:
    """Remove temporaries of ``out`` left behind by writers that no longer run."""
    with contextlib.suppress(OSError):
        for entry in out.parent.glob(f".{glob.escape(stem)}.*-*-*"):
            match = _TEMP_NAME.match(entry.name)
            if not match or match["stem"] != stem or _process_exists(int(match["pid"])):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one ``os.replace``.

    The temporary name keeps the suffix (writers pick the format from it). With ``folder=True`` the
    temporary folder exists when yielded. On any error, including KeyboardInterrupt, the temporary is
    removed and ``path`` is left as it was. Missing parent folders are created, and removed again if the
    write fails, so a failed run leaves nothing behind. Stale temporaries of ``path`` from writers that no
    longer run are removed first.
    """
    out = Path(path).absolute()
    suffix = "" if folder else _suffix(out)
    stem = out.name[: len(out.name) - len(suffix)] if suffix else out.name
    _remove_stale_temporaries(out, stem)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{stem}{TEMP_MARKER}{tag}{suffix}"
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder and out.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = out.parent / f".{stem}.old-{tag}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if still empty
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; ``fsync`` also flushes it to disk before the rename."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays to Python, NaN/Inf to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 1) -> Path:
    """Write ``data`` (made JSON-safe by :func:`json_safe`) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(json_safe(data), indent=indent) + "\n")


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV (one header row, then ``rows`` as given: format numbers before) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


def write_figure_png(fig: Any, path: str | os.PathLike, *, dpi: int = 110, **savefig: Any) -> Path:
    """Save a matplotlib figure as a PNG atomically and close it (also when saving fails)."""
    import matplotlib.pyplot as plt  # imported on use: the engine loads without matplotlib

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", **savefig)
    finally:
        plt.close(fig)
    return Path(path)
