"""Static checks of the Slicer extension files: they compile, the .ui has every widget the code uses, the
CMake lists bundle every engine file, the extension metadata and description are complete."""

from __future__ import annotations

import json
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "CTHarmonization"
ENGINE = ROOT / "TextureStarGANCore"
CMAKE = MODULE / "CMakeLists.txt"


def cmake_list(text: str, variable: str) -> list[str]:
    """Entries of `set(VARIABLE ...)` in a CMakeLists.txt (comments removed, ${MODULE_NAME} expanded)."""
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    body = "\n".join(line.split("#", 1)[0] for line in match.group(1).splitlines())
    return [entry.replace("${MODULE_NAME}", "CTHarmonization") for entry in body.split()]


def module_python_files() -> list[Path]:
    return sorted(p for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", module_python_files(), ids=lambda p: str(p.relative_to(MODULE)))
def test_module_files_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_ui_has_every_widget_the_module_uses():
    ui = MODULE / "Resources" / "UI" / "CTHarmonization.ui"
    root = ET.parse(ui).getroot()
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "CTHarmonization.py").read_text()))
    assert used, "the module uses no widgets?"
    assert used <= names, f"widgets used in CTHarmonization.py but missing in the .ui: {sorted(used - names)}"
    # Widgets bound to the parameter node name parameters that exist.
    source = (MODULE / "CTHarmonization.py").read_text()
    start = source.index("class CTHarmonizationParameterNode")
    wrapper = source[start:source.index("class CTHarmonizationWidget")]
    parameters = set(re.findall(r"^\s+(\w+):", wrapper, re.M))
    bound = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= parameters, sorted(bound - parameters)
    # MRML combo boxes get the scene from the top-level widget.
    combos = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    assert combos <= receivers, sorted(combos - receivers)


def test_cmake_lists_bundle_every_module_and_engine_file():
    text = CMAKE.read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    expected = sorted(str(p.relative_to(MODULE)) for p in module_python_files() if "Testing" not in p.parts)
    assert sorted(scripts) == expected
    for resource in cmake_list(text, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE / resource).is_file(), f"resource {resource} listed but missing"

    engine_scripts = cmake_list(text, "ENGINE_PYTHON_SCRIPTS")
    on_disk = sorted(str(p.relative_to(ENGINE)) for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(engine_scripts) == on_disk, (
        f"not listed: {sorted(set(on_disk) - set(engine_scripts))}, "
        f"listed but missing: {sorted(set(engine_scripts) - set(on_disk))}"
    )
    data = cmake_list(text, "ENGINE_DATA_FILES")
    assert "models/default.safetensors" in data
    shipped = [ENGINE / "models" / "default.safetensors", ENGINE / "models" / "MODEL_CARD.md"]
    samples = ENGINE / "samples" / "chest_l_sharp"
    if samples.is_dir():
        shipped += [p for p in samples.rglob("*") if p.is_file()]
    for path in shipped:
        if path.exists():
            assert str(path.relative_to(ENGINE)) in data, f"{path.relative_to(ROOT)} is not bundled"
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    tests = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for script in re.findall(r"SCRIPT\s+(\S+?)\)", tests):
        assert (MODULE / "Testing" / "Python" / script).is_file()


def test_extension_metadata_and_description():
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({key} "[^"]+"\)', top), key
    assert "find_package(Slicer REQUIRED)" in top and "add_subdirectory(CTHarmonization)" in top
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in top and "${Slicer_EXTENSION_CPACK}" in top
    entry = json.loads((MODULE / "CTHarmonization.json").read_text())
    assert {"$schema", "category", "scm_url"} <= set(entry)
    # The catalog schema (slicer-extension-catalog-entry-schema-v1.0.1) allows no other keys: the supported
    # Slicer versions are stated in the description and the README, not here.
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "build_subdirectory", "enabled", "tier"}
    assert "Slicer 5.6 or later" in re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', top).group(1)
    assert "cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)" in top  # the 5.10 template's
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', top).group(1)
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]+)"\)', top).group(1).split()
    assert entry["build_dependencies"] == depends


def test_icon_is_128_square_png():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "CTHarmonization.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def test_requirements_never_touch_packages_slicer_ships():
    import sys

    sys.path.insert(0, str(MODULE))
    try:
        from CTHarmonizationLib import dependencies
    finally:
        sys.path.remove(str(MODULE))
    names = {re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower() for r in dependencies.readRequirements()}
    assert names and not names & {"simpleitk", "torch", "numpy", "vtk", "pydicom"}
    assert dependencies.missingRequirements(dependencies.readRequirements()) == []  # satisfied in this venv
    assert dependencies.missingRequirements(["safetensors>=999"]) == ["safetensors>=999"]
    assert any(c.lower().startswith("simpleitk==") for c in dependencies.protectedConstraints())


_STUB_USE_SLICER = r"""
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
# Like Slicer's macro: every listed file must exist; absolute paths are placed relative to the build dir.
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;VERBOSE;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(v ${MY_SCRIPTS} ${MY_RESOURCES})
    if(IS_ABSOLUTE ${v})
      file(RELATIVE_PATH rel ${CMAKE_CURRENT_BINARY_DIR} ${v})
      set(a ${v})
    else()
      set(rel ${v})
      set(a ${CMAKE_CURRENT_SOURCE_DIR}/${v})
    endif()
    if(NOT EXISTS ${a})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file ${v}")
    endif()
    message(STATUS "BUNDLE ${rel}")
  endforeach()
  # Like ctkMacroCompilePythonScript (NO_INSTALL_SUBDIR): the whole module build directory is installed.
  install(DIRECTORY ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/
    DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} COMPONENT RuntimeLibraries)
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT})
    message(FATAL_ERROR "nonexistent test script ${MY_SCRIPT}")
  endif()
  message(STATUS "TEST ${MY_SCRIPT}")
endfunction()
"""


def test_cmake_configures_against_a_stub_slicer(tmp_path):
    """The real CMake files configure and install (Slicer's macros replaced by checking stand-ins)."""
    import shutil
    import subprocess

    if shutil.which("cmake") is None or shutil.which("cc") is None:
        pytest.skip("cmake and a C compiler are needed to configure the extension")
    stub = tmp_path / "slicer"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(
        "set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)\n"
        "set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)\n"
        "set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)\n")
    (stub / "UseSlicer.cmake").write_text(_STUB_USE_SLICER)
    (stub / "Empty.cmake").write_text("")
    build, prefix = tmp_path / "build", tmp_path / "install"
    command = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={stub}", "-DBUILD_TESTING=ON"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    bundled = set(re.findall(r"BUNDLE (\S+)", done.stdout))
    engine = {f"TextureStarGANCore/{p.relative_to(ENGINE)}" for p in ENGINE.rglob("*.py")
              if "__pycache__" not in p.parts}
    assert engine <= bundled and "CTHarmonizationLib/logic.py" in bundled
    tests = set(re.findall(r"TEST (\S+)", done.stdout))
    assert {"CTHarmonization.py", "CTHarmonizationComparisonTest.py"} <= tests
    installed = subprocess.run(["cmake", "--install", str(build), "--prefix", str(prefix)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # Each engine data file installed once (issue 19, point 10).
    data = [line for line in installed.stdout.splitlines() if "TextureStarGANCore/samples/" in line
            and line.endswith(".dcm")]
    assert data and len(data) == len(set(data)) == len(list(ENGINE.glob("samples/chest_l_sharp/*.dcm"))), data
    sample = ENGINE / "samples" / "chest_l_sharp"
    target = prefix / "lib" / "Slicer" / "qt-scripted-modules" / "TextureStarGANCore"
    for path in sample.glob("*") if sample.is_dir() else []:
        assert (target / path.relative_to(ENGINE)).is_file()
    model = ENGINE / "models" / "default.safetensors"
    assert (target / "models" / "default.safetensors").is_file() == model.is_file()
