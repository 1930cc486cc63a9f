"""Maintainer smoke test in a real Slicer: the GUI's own code path, end to end. Prints one PASS/FAIL line.

    Slicer --python-script CTHarmonization/Testing/smoke.py [--series DICOM_FOLDER] [--source KERNEL]
           [--target PHILIPS_B] [--screenshot out.png] [--timeout 900]

Loads the module, imports a DICOM series (default: the bundled sample; for example the shared real GE head
CT with `--series .../real_ct/ge_hispeed_dual_head_std_plus --source STANDARD`, its STD+ kernel is not one
of the model's), sets the module's parameters, presses Harmonize through the widget (the job runs in a
PythonSlicer child process), waits for it, checks the output node, opens the comparison layout and saves a
screenshot. Exits 0 on PASS and 1 on FAIL. The Python packages must be installed already (module: 'Install
dependencies').
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import slicer
import vtk


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="smoke.py", description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=None,
                        help="DICOM folder (default: the bundled sample)")
    parser.add_argument("--source", default="", help="source kernel (default: read from DICOM)")
    parser.add_argument("--target", default="PHILIPS_B")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--screenshot", type=Path, default=Path("CTHarmonization-smoke.png"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run")
    return parser.parse_args(argv)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def sameGeometry(a, b) -> bool:
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(ma)
    b.GetIJKToRASMatrix(mb)
    return all(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) < 1e-6 for r in range(4) for c in range(4))


def smoke(args: argparse.Namespace) -> str:
    from DICOMLib import DICOMUtils

    slicer.util.selectModule("CTHarmonization")
    widget = slicer.modules.ctharmonization.widgetRepresentation().self()
    from CTHarmonizationLib import dependencies

    missing = dependencies.missingDependencies()
    check(not missing, f"missing Python packages {missing}: press 'Install dependencies' in the module first")
    series = args.series
    if series is None:
        import TextureStarGANCore

        series = Path(TextureStarGANCore.__file__).resolve().parent / "samples" / "chest_l_sharp"
    with DICOMUtils.TemporaryDICOMDatabase() as db:
        DICOMUtils.importDicom(str(series), db)
        nodeIDs = DICOMUtils.loadPatientByUID(db.patients()[0])
        volumes = [slicer.mrmlScene.GetNodeByID(i) for i in nodeIDs]
        volumes = [v for v in volumes if v is not None and v.IsA("vtkMRMLScalarVolumeNode")]
        check(bool(volumes), f"no volume loaded from {series}")
        node = volumes[0]
        before = slicer.util.arrayFromVolume(node).copy()

        parameters = widget._parameterNode
        parameters.inputVolume = node
        parameters.targetKernel = args.target
        parameters.sourceKernel = args.source
        parameters.device = args.device
        slicer.app.processEvents()
        # The GUI shows what the parameter node holds (issue 19, point 3).
        check(widget.ui.targetKernelComboBox.currentData == args.target,
              "the target kernel combo does not show the parameter node's value")
        check(widget.ui.applyButton.enabled and widget.ui.applyButton.text == "Harmonize",
              f"Harmonize not available: {widget.ui.applyButton.toolTip}")
        widget.onApplyButton()  # the source kernel is read from DICOM here, inside the temporary database
    check(widget._run is not None, f"the run did not start: {widget.ui.statusLabel.text}")
    folder = widget._run.folder
    deadline = time.monotonic() + args.timeout
    while widget._run is not None and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.05)
    check(widget._run is None, f"no result after {args.timeout:.0f} s: {widget.ui.statusLabel.text}")
    check(not folder.exists(), f"job folder {folder} left behind")
    output = parameters.lastOutputVolume
    check(output is not None, f"no output volume: {widget.ui.statusLabel.text}")
    after = slicer.util.arrayFromVolume(output)
    check(after.shape == before.shape, f"output shape {after.shape} != input {before.shape}")
    check(sameGeometry(node, output), "output geometry differs from the input")
    check(output.GetAttribute("CTHarmonization.TargetKernel") == args.target, "target attribute missing")
    check((slicer.util.arrayFromVolume(node) == before).all(), "input voxels changed")
    check(widget._comparison is not None, "the comparison layout was not opened")
    slicer.app.processEvents()
    slicer.util.forceRenderAllViews()
    args.screenshot.parent.mkdir(parents=True, exist_ok=True)
    check(slicer.app.layoutManager().viewport().grab().save(str(args.screenshot)), "screenshot not saved")
    return (f"{node.GetName()} {before.shape} -> '{output.GetName()}' ({widget.ui.statusLabel.text}); "
            f"screenshot {args.screenshot.resolve()}")


def main() -> None:
    args = parseArguments(sys.argv[1:])
    try:
        detail = smoke(args)
    except Exception as exc:
        traceback.print_exc()
        print(f"CTHarmonization smoke: FAIL: {exc}", flush=True)
        slicer.util.exit(1)
        return
    print(f"CTHarmonization smoke: PASS: {detail}", flush=True)
    slicer.util.exit(0)


main()
