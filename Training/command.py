"""What every ``python -m Training.<command>`` shares: progress bars and the mapping of errors to exit codes.

A command module parses its arguments, calls one library function through :func:`run_command` and
prints its summary. Exit codes: 0 done, 2 a clear error (the message is printed, no traceback),
130 interrupted by Ctrl-C (or the library's own cancellation exception).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class ProgressBars:
    """A progress callback drawing tqdm bars: ``progress(done, total)`` or ``progress(stage, done, total)``.

    The staged form opens one bar per stage name (e.g. "scan", then "series").
    """

    def __init__(self, desc: str, unit: str, stage_units: dict[str, str] | None = None) -> None:
        self.desc, self.unit = desc, unit
        self.stage_units = stage_units or {}
        self._bars: dict[str, Any] = {}

    def _bar(self, stage: str, total: int):
        if stage not in self._bars:
            from tqdm import tqdm

            self._bars[stage] = tqdm(total=total, desc=stage, unit=self.stage_units.get(stage, self.unit))
        return self._bars[stage]

    def __call__(self, *args: Any) -> None:
        stage, done, total = args if len(args) == 3 else (self.desc, *args)
        bar = self._bar(stage, total)
        bar.total = total
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def fail(message: str) -> int:
    """Print ``error: message`` on stderr and return the error exit code."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def run_command(
    task: Callable[[ProgressBars], T],
    *,
    desc: str,
    unit: str,
    errors: tuple[type[BaseException], ...] = (ValueError,),
    interrupted: str = "interrupted; nothing was written",
    cancelled: tuple[type[BaseException], ...] = (),
    stage_units: dict[str, str] | None = None,
) -> tuple[int, T | None]:
    """Run ``task(progress)``; return ``(exit code, result)``, the result being None unless it succeeded.

    ``errors`` are the library's expected failures (printed as one line, exit 2); Ctrl-C and the
    ``cancelled`` exceptions print ``interrupted`` and give exit 130. Bars are closed before returning,
    so the caller's summary prints below them.
    """
    bars = ProgressBars(desc, unit, stage_units)
    try:
        return EXIT_OK, task(bars)
    except (KeyboardInterrupt, *cancelled):
        bars.close()
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except errors as exc:
        bars.close()
        return fail(str(exc)), None
    finally:
        bars.close()
