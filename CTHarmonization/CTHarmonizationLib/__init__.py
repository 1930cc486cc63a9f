"""Slicer-side logic of the CTHarmonization module that needs MRML but not the Slicer application.

`logic` checks volume nodes and turns them into jobs and results into nodes, `job` defines the job (its
fields, its folder, its errors and cancellation; no MRML), `worker` runs a job in a child process for the
GUI, `compare` builds the before/after comparison views, `render` writes them to a PNG offscreen,
`dependencies` checks and installs the Python packages the engine needs. Everything here runs with the
`slicer-core` package (real MRML, no Qt), so it is tested with plain pytest. It also runs on Python 3.9
(Slicer 5.6 and 5.8): see Testing/test_bundled_python39.py.
"""

from __future__ import annotations

import sys
from pathlib import Path


def ensureEnginePath() -> None:
    """Make `TextureStarGANCore` importable both when bundled and when run from the repository.

    The extension build copies the engine next to this package (it is then already on sys.path). Run from
    a source checkout (module path = <repo>/CTHarmonization), the engine lives at the repository root.
    """
    try:
        import TextureStarGANCore  # noqa: F401
        return
    except ImportError:
        pass
    repo_root = Path(__file__).resolve().parents[2]
    if (repo_root / "TextureStarGANCore" / "__init__.py").is_file() and str(repo_root) not in sys.path:
        sys.path.append(str(repo_root))
