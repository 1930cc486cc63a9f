"""Render the extension's screenshot (EXTENSION_SCREENSHOTURLS) headless with slicer-core.

The bundled sample (real Philips chest, sharp kernel L) harmonized to the smooth kernel B with the bundled
default model, shown in the module's comparison layout: before/after, linked, with the zoomed region below.

    .venv/bin/python CTHarmonization/Testing/make_screenshot.py [--model PATH] [--out PNG]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

from slicer_helpers import FolderDicomDatabase, new_scene, node_from_ct_volume  # noqa: E402

from CTHarmonization.CTHarmonizationLib import compare, logic, render  # noqa: E402
from TextureStarGANCore.volume_io import read_volume  # noqa: E402

SAMPLE = ROOT / "TextureStarGANCore" / "samples" / "chest_l_sharp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the bundled model)")
    parser.add_argument("--target", default="PHILIPS_B")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "CTHarmonization" / "Resources" / "Screenshots" / "comparison.png")
    parser.add_argument("--allow-untrained", action="store_true", help="only to try the script itself")
    args = parser.parse_args()

    scene, app, keep = new_scene()
    db = FolderDicomDatabase(sorted(SAMPLE.glob("*.dcm")))
    node = node_from_ct_volume(scene, read_volume(SAMPLE), name="Sample chest CT")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(db.uids))
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(400, 40)  # soft tissue, where kernel noise texture shows
    result = logic.harmonizeVolumeNode(node, args.target, modelPath=args.model, device="cpu",
                                       dicomDatabase=db, allowUntrained=args.allow_untrained)
    views = compare.setupComparison(node, result, appLogic=app, viewSize=(480, 480))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render.renderComparisonPNG(views, args.out, cellSize=(480, 480))
    print(f"wrote {args.out}")
    views.cleanup()
    del keep


if __name__ == "__main__":
    main()
