"""What the Slicer extension bundles must run on Python 3.9 (Slicer 5.6 and 5.8 ship 3.9.10).

Byte-compiling with 3.11 does not catch 3.10+ run-time features (`isinstance(x, int | float)`,
`zip(strict=True)`, `datetime.UTC`), so the bundled files are checked statically with vermin, and ruff
checks them with target-version py39 (pyproject.toml). Where a Python 3.9 with the engine's dependencies
is available (.venv39, made by .ci/setup through .ci/python39, or CTH_PYTHON39=/path/to/python), the
engine's tests also run under it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = [ROOT / "CTHarmonization", ROOT / "TextureStarGANCore"]
MINIMUM = "3.9"
# The engine's tests for what runs inside Slicer (model loading, preprocessing, inference, volume I/O, the
# bundled default model, kernel-transfer models); they need only the engine's own dependencies. Not here: the
# command line (test_cli.py: tqdm, and its tests use 3.10+ features; test_kernel_transfer.py skips its
# command-line tests without tqdm), figures (matplotlib), the trainer and evaluation.
ENGINE_TESTS = ["test_domains.py", "test_preprocessing.py", "test_model_file.py", "test_inference.py",
                "test_tiling.py", "test_volume_io.py", "test_networks.py", "test_texture.py",
                "test_default_model.py", "test_kernel_transfer.py", "test_kernel_families.py"]


def _vermin() -> list[str]:
    exe = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if exe is None:
        pytest.fail("vermin is not installed: pip install -r .ci/requirements.lock")
    return [exe]


def _unevaluatedAnnotationLines(path: Path) -> set[int]:
    """Lines of annotations that Python never evaluates: the file has `from __future__ import annotations`
    and the class is not a parameterNodeWrapper (which evaluates them with typing.get_type_hints)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    if not future:
        return set()
    lines: set[int] = set()

    def add(annotation: ast.AST | None) -> None:
        if annotation is not None:
            lines.update(range(annotation.lineno, annotation.end_lineno + 1))

    def visit(node: ast.AST, evaluated: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                names = {ast.unparse(d) for d in child.decorator_list}
                visit(child, evaluated or any("parameterNodeWrapper" in n for n in names))
                continue
            if isinstance(child, ast.AnnAssign) and not evaluated:
                add(child.annotation)
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = child.args
                for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                    if arg is not None:
                        add(arg.annotation)
                add(child.returns)
            visit(child, evaluated)

    visit(tree, False)
    return lines


def python39Violations(paths: list[Path]) -> list[str]:
    """'file:line: feature' for every feature newer than Python 3.9 that would run in `paths`."""
    command = [*_vermin(), f"-t={MINIMUM}-", "--violations", "--no-tips", "--no-parse-comments",
               "--feature", "union-types", "--format", "parsable", *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    found = []
    for line in done.stdout.splitlines():
        file, lineno, _col, _py2, _py3, feature = line.split(":", 5)
        if not file or not lineno:
            continue  # per-file and overall summaries
        if feature.startswith("union types") and int(lineno) in _unevaluatedAnnotationLines(Path(file)):
            continue  # a string under `from __future__ import annotations`
        found.append(f"{Path(file).relative_to(ROOT) if Path(file).is_relative_to(ROOT) else file}:"
                     f"{lineno}: {feature}")
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stdout + done.stderr  # 1: found
    return found


def test_bundled_code_needs_no_python_newer_than_3_9():
    assert python39Violations(BUNDLED) == []


def test_the_check_finds_run_time_features_and_ignores_unevaluated_annotations(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from __future__ import annotations\n"           # 1
        "import datetime\n"                                # 2
        "from dataclasses import dataclass\n"              # 3
        "def f(x: int | None = None) -> str | None:\n"     # 4  fine: never evaluated
        "    return isinstance(x, int | float)\n"          # 5  TypeError on 3.9
        "Alias = int | str\n"                              # 6  TypeError on 3.9
        "pairs = list(zip([1], [2], strict=True))\n"       # 7  TypeError on 3.9
        "now = datetime.datetime.now(datetime.UTC)\n"      # 8  AttributeError on 3.9
        "@dataclass\n"                                     # 9
        "class A:\n"                                       # 10
        "    z: int | None = None\n"                       # 11 fine: never evaluated
        "@parameterNodeWrapper\n"                          # 12
        "class P:\n"                                       # 13
        "    w: int | None = None\n"                       # 14 evaluated by get_type_hints
    )
    lines = sorted(int(v.split(":")[1]) for v in python39Violations([sample]))
    assert lines == [5, 6, 7, 8, 14]


def _python39() -> str | None:
    """CTH_PYTHON39, else the .venv39 that .ci/setup makes when the machine has a Python 3.9."""
    exe = os.environ.get("CTH_PYTHON39")
    if not exe:
        default = ROOT / ".venv39" / "bin" / "python"
        if not (ROOT / ".venv39" / ".setup-stamp").is_file():  # absent, or its install did not finish
            return None
        exe = str(default)
    version = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=60).stdout.strip()
    assert version == "(3, 9)", f"CTH_PYTHON39={exe} is Python {version}, not 3.9"
    return exe


@pytest.mark.slow
def test_engine_tests_pass_under_python39():
    exe = _python39()
    if exe is None:
        pytest.skip("no Python 3.9 (.venv39 or CTH_PYTHON39): `bash .ci/python39` makes one and runs this")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([exe, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           *[str(ROOT / "Testing" / t) for t in ENGINE_TESTS]],
                          capture_output=True, text=True, timeout=3600, cwd=str(ROOT), env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
