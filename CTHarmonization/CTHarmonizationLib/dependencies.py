"""Python packages the engine needs inside Slicer, installed on first use (never at startup).

torch comes from the PyTorch extension (`PyTorchUtilsLogic`), which picks the build matching the user's
CUDA driver; the rest from `Resources/requirements.txt` through `slicer.packaging.pip_ensure` (Slicer >=
5.12; `slicer.pydeps` in 5.11) or `slicer.util.pip_install`. Packages Slicer ships (SimpleITK, numpy, VTK,
pydicom) are pinned to their installed versions so an install can never replace them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "PROTECTED_PACKAGES",
    "REQUIREMENTS_FILE",
    "DependencyError",
    "ensureDependencies",
    "missingDependencies",
    "missingRequirements",
    "protectedConstraints",
    "readRequirements",
    "torchInstalled",
]

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
PROTECTED_PACKAGES = ("SimpleITK", "numpy", "vtk", "pydicom")
# load_state_dict(assign=True), used to load models without a second copy of the weights, needs torch 2.1.
TORCH_REQUIREMENT = ">=2.1"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class DependencyError(RuntimeError):
    """A required package is missing and could not be installed; the message says how to install it."""


def readRequirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _distributionName(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def missingRequirements(requirements: list[str]) -> list[str]:
    """The requirements whose distribution is not installed or whose version does not satisfy them."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip in every Slicer
        Requirement = None  # noqa: N806
    missing = []
    for requirement in requirements:
        name = _distributionName(requirement)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if Requirement is None:
            continue
        if not Requirement(requirement).specifier.contains(installed, prereleases=True):
            missing.append(requirement)
    return missing


def protectedConstraints() -> list[str]:
    """'name==installed-version' for the packages Slicer ships, to pass to pip as constraints."""
    constraints = []
    for name in PROTECTED_PACKAGES:
        try:
            constraints.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return constraints


def torchInstalled() -> bool:
    return importlib.util.find_spec("torch") is not None


def missingDependencies(requirements: list[str] | None = None,
                        torchRequirement: str = TORCH_REQUIREMENT) -> list[str]:
    """What the engine needs and does not have, as requirement lines ([] when everything is there).

    Checked without importing anything, so the GUI can ask before the first import of the engine.
    """
    if requirements is None:
        requirements = readRequirements()
    importlib.invalidate_caches()  # packages installed since the last call (Install dependencies)
    return missingRequirements([f"torch{torchRequirement}", *requirements])


def _ensureTorch() -> None:
    if torchInstalled():
        if missingRequirements([f"torch{TORCH_REQUIREMENT}"]):
            # PyTorch Utils would not replace a torch that is loaded already: the user upgrades and restarts.
            raise DependencyError(
                f"PyTorch {importlib.metadata.version('torch')} is too old: CT Harmonization needs torch"
                f"{TORCH_REQUIREMENT}. Open the PyTorch Utils module, uninstall PyTorch, set the version "
                f"requirement to '{TORCH_REQUIREMENT}', install it and restart Slicer."
            )
        return
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError(
            "PyTorch is not installed. Install the 'PyTorch' extension from the Extensions Manager, restart "
            "Slicer, then open PyTorch Utils and click 'Install PyTorch' (it picks the build matching your "
            "GPU driver). Without a GPU the CPU build works too."
        ) from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                          torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise DependencyError(
            "PyTorch was not installed (cancelled or failed). Install it from the PyTorch Utils module and "
            "try again."
        )


def _ensurePackages(requirements: list[str], confirm: Callable[[str], bool]) -> None:
    missing = missingRequirements(requirements)
    if not missing:
        return
    import slicer

    folder = tempfile.TemporaryDirectory(prefix="CTHarmonization-")
    constraints = Path(folder.name) / "constraints.txt"
    constraints.write_text("\n".join(protectedConstraints()) + "\n", encoding="utf-8")
    packaging = getattr(slicer, "packaging", None) or getattr(slicer, "pydeps", None)
    try:
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            # pip_ensure asks the user, shows progress and offers a restart when needed.
            packaging.pip_ensure(missing, constraints=str(constraints), requester="CTHarmonization")
        else:
            if not confirm("CT Harmonization needs these Python packages: " + ", ".join(missing)
                           + ". Install them now? (needs a network connection, may take a few minutes)"):
                raise DependencyError("Required packages were not installed: " + ", ".join(missing))
            slicer.util.pip_install([*missing, "-c", str(constraints)])
    except DependencyError:
        raise
    except Exception as exc:
        raise DependencyError(
            f"Installing {', '.join(missing)} failed ({exc}). Check the network connection, or install them "
            "from the Python console: slicer.util.pip_install('" + " ".join(missing) + "')"
        ) from exc
    finally:
        folder.cleanup()
    still = missingRequirements(missing)
    if still:
        raise DependencyError("These packages are still missing after installation: " + ", ".join(still)
                              + ". Restart Slicer and try again.")


def ensureDependencies(confirm: Callable[[str], bool] | None = None) -> None:
    """Install torch and the other requirements if needed (inside Slicer). Raises DependencyError."""
    if confirm is None:
        import slicer

        confirm = slicer.util.confirmOkCancelDisplay
    _ensureTorch()
    _ensurePackages(readRequirements(), confirm)
