"""CTHarmonization.py's widget on a real MRML scene, with only the Qt widgets and Slicer's scripted-module
classes replaced by stand-ins (Testing/fake_slicer_gui.py). The run goes through the real child process.

Issue 19: GUI choices bound to the parameter node both ways, also after File > Close Scene (3); after
installing the dependencies the user chooses the target (4); closing the scene during a run kills the child
and deletes the job folder (5); Cancel is not re-enabled (8); an "Install dependencies" state instead of a
traceback (2).
"""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest

pytest.importorskip("slicer", reason="slicer-core is needed for the Slicer module tests")

import fake_slicer_gui  # noqa: E402
import slicer  # noqa: E402
from slicer_helpers import (  # noqa: E402
    DEFAULT_MODEL_KERNELS,
    V1_MODEL_PATH,
    add_volume,
    body_phantom,
    new_scene,
)

MODULE_DIR = fake_slicer_gui.ROOT / "CTHarmonization"


@pytest.fixture()
def gui(monkeypatch):
    """(widget, scene, dependencies, worker), the module loaded as Slicer loads it (folder on sys.path)."""
    scene, app, keep = new_scene()
    saved = {name: sys.modules.get(name) for name in list(sys.modules)
             if name.split(".")[0] in ("CTHarmonizationLib", "CTHarmonizationModule")}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    for attribute in ("mrmlScene", "app"):
        monkeypatch.setattr(slicer, attribute, getattr(slicer, attribute, None), raising=False)
    for attribute in ("loadUI", "childWidgetVariables", "errorDisplay", "confirmYesNoDisplay"):
        monkeypatch.setattr(slicer.util, attribute, getattr(slicer.util, attribute, None), raising=False)
    added = fake_slicer_gui.install(scene, app)
    errors = []
    slicer.util.errorDisplay = lambda text, **kwargs: errors.append(str(text))
    spec = importlib.util.spec_from_file_location("CTHarmonizationModule", MODULE_DIR / "CTHarmonization.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["CTHarmonizationModule"] = module
    spec.loader.exec_module(module)
    from CTHarmonizationLib import dependencies, worker

    widget = module.CTHarmonizationWidget()
    widget.errors = errors
    yield widget, scene, dependencies, worker
    if widget._run is not None:
        widget._run.abort()
    widget.cleanup()
    for name in added + [n for n in sys.modules if n.split(".")[0] in ("CTHarmonizationLib",
                                                                      "CTHarmonizationModule")]:
        sys.modules.pop(name, None)
    sys.modules.update({k: v for k, v in saved.items() if v is not None})
    del keep, app


def poll_until_done(widget, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while widget._run is not None and time.monotonic() < deadline:
        widget._timer.fire()
        time.sleep(0.05)
    assert widget._run is None, "the run did not end"


def choose(widget, scene, target="SIEMENS_B30f", source="GE_BONE", device="cpu"):
    """An input and the user's choices; the kernels are the bundled default model's domains."""
    node = add_volume(scene, body_phantom(slices=4, size=64), name="chest")
    widget._parameterNode.inputVolume = node
    widget.ui.targetKernelComboBox.choose(target)
    widget.ui.sourceKernelComboBox.choose(source)
    widget.ui.deviceComboBox.choose(device)
    return node


def test_gui_and_parameter_node_stay_bound_both_ways_also_after_close_scene(gui):
    widget, scene, _deps, _worker = gui
    widget.setup()
    ui, node = widget.ui, widget._parameterNode
    # The bundled default model's kernels, no choice yet.
    assert [data for _text, data in ui.targetKernelComboBox.items] == DEFAULT_MODEL_KERNELS
    assert ui.targetKernelComboBox.currentIndex == -1
    assert [data for _text, data in ui.sourceKernelComboBox.items] == ["", *DEFAULT_MODEL_KERNELS]
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Select an input CT volume"
    choose(widget, scene)
    # GUI -> node
    assert (node.targetKernel, node.sourceKernel, node.device) == ("SIEMENS_B30f", "GE_BONE", "cpu")
    assert ui.applyButton.enabled and ui.applyButton.text == "Harmonize"

    scene.Clear(0)  # File > Close Scene: the parameter node is reset
    node = widget._parameterNode
    assert node.targetKernel == "" and ui.targetKernelComboBox.currentIndex == -1  # not the old choice
    assert ui.sourceKernelComboBox.currentData == "" and ui.deviceComboBox.currentData == "auto"
    # Values stored in a loaded scene are shown (node -> GUI).
    node.targetKernel, node.sourceKernel, node.device = "GE_STANDARD", "SIEMENS_B30f", "cpu"
    assert (ui.targetKernelComboBox.currentData, ui.sourceKernelComboBox.currentData,
            ui.deviceComboBox.currentData) == ("GE_STANDARD", "SIEMENS_B30f", "cpu")
    node.inputVolume = add_volume(scene, body_phantom(slices=4, size=64))
    assert ui.applyButton.enabled
    # Kernel names of a scene saved with model v1 show as the domains they resolve to, as a run resolves them.
    node.targetKernel, node.sourceKernel = "STANDARD", "B30f"
    assert (ui.targetKernelComboBox.currentData, ui.sourceKernelComboBox.currentData) == ("GE_STANDARD",
                                                                                          "SIEMENS_B30f")
    assert ui.applyButton.enabled
    # A target the model does not know shows as no choice, and Harmonize waits for one.
    node.targetKernel = "B45f"
    assert ui.targetKernelComboBox.currentIndex == -1
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Choose the target kernel"
    ui.targetKernelComboBox.choose("PHILIPS_B")
    assert node.targetKernel == "PHILIPS_B" and ui.applyButton.enabled


def test_missing_packages_show_install_then_the_user_chooses_the_target(gui, monkeypatch):
    widget, scene, dependencies, _worker = gui
    missing = ["torch>=2.1", "safetensors>=0.4"]
    monkeypatch.setattr(dependencies, "missingDependencies", lambda *a, **k: list(missing))
    installs = []

    def install(confirm=None):
        installs.append(True)
        missing.clear()

    monkeypatch.setattr(dependencies, "ensureDependencies", install)
    widget.setup()  # no traceback: the model is not loaded while packages are missing
    ui = widget.ui
    assert ui.applyButton.text == "Install dependencies" and ui.applyButton.enabled
    assert "safetensors" in ui.modelCardLabel.text and ui.targetKernelComboBox.count == 0
    widget._parameterNode.inputVolume = add_volume(scene, body_phantom(slices=4, size=64))

    widget.onApplyButton()
    assert installs == [True] and widget._run is None  # installed, nothing run
    assert ui.targetKernelComboBox.count == len(DEFAULT_MODEL_KERNELS)
    assert widget._parameterNode.targetKernel == ""
    assert ui.applyButton.text == "Harmonize" and not ui.applyButton.enabled
    assert ui.applyButton.toolTip == "Choose the target kernel" and "Choose the target" in ui.statusLabel.text
    ui.targetKernelComboBox.choose("PHILIPS_B")
    assert ui.applyButton.enabled


def test_method_choice_is_bound_both_ways_and_the_card_lists_the_filters(gui):
    widget, scene, _deps, _worker = gui
    widget.setup()
    ui, node = widget.ui, widget._parameterNode
    assert [data for _text, data in ui.methodComboBox.items] == ["model", "filter"]
    assert node.method == "model" and ui.methodComboBox.currentData == "model" and ui.deviceComboBox.enabled
    # The bundled kernel-transfer model: its filter is its own linear part, and the methods say so.
    assert ("Linear transfer filters (Method: linear transfer filter): every other pair: the model's own "
            "linear transfer") in ui.modelCardLabel.text
    assert [text for text, _data in ui.methodComboBox.items] == [
        "Network model (kernel transfer: MTF transfer + residual)",
        "Linear transfer filter (the model's own linear part, CPU)"]
    # A StarGAN v2 file with fitted filters (model v1): the card lists its pairs; the method stays chosen.
    ui.methodComboBox.choose("filter")
    node.modelPath = str(V1_MODEL_PATH)
    assert "Linear transfer filters (Method: linear transfer filter): BONE -> B30f" in ui.modelCardLabel.text
    assert [text for text, _data in ui.methodComboBox.items] == [
        "Network model (texture-aware StarGAN)", "Linear transfer filter (fitted per kernel pair, CPU)"]
    assert node.method == "filter" and ui.methodComboBox.currentData == "filter"
    ui.methodComboBox.choose("model")
    ui.methodComboBox.choose("filter")  # GUI -> node
    assert node.method == "filter" and not ui.deviceComboBox.enabled  # the filter runs on the CPU
    node.method = "model"  # node -> GUI (e.g. a loaded scene)
    assert ui.methodComboBox.currentData == "model" and ui.deviceComboBox.enabled
    node.method = "filter"
    scene.Clear(0)  # File > Close Scene: back to the network model
    assert widget._parameterNode.method == "model" and ui.methodComboBox.currentData == "model"


def test_a_filter_run_through_the_widget_and_a_refused_pair(gui, tmp_path):
    from model_factory import make_model_file

    widget, scene, _deps, _worker = gui
    widget.setup()
    node = choose(widget, scene)
    widget.ui.methodComboBox.choose("filter")
    widget.onApplyButton()
    assert widget.ui.statusLabel.text.endswith("with the linear transfer filter...")
    poll_until_done(widget)
    assert not widget.errors, widget.errors
    output = widget._parameterNode.lastOutputVolume
    assert output is not None and output.GetID() != node.GetID()
    assert output.GetAttribute("CTHarmonization.Method") == "filter"
    assert output.GetAttribute("CTHarmonization.SourceKernel") == "GE_BONE"
    assert widget.ui.statusLabel.text.endswith("(GE_BONE -> SIEMENS_B30f, linear transfer filter).")
    # A model file without filters: refused with the engine's message, nothing started.
    widget._parameterNode.modelPath = str(make_model_file(tmp_path / "plain.safetensors", iterations=5))
    assert "none, network model only" in widget.ui.modelCardLabel.text
    widget.ui.targetKernelComboBox.choose("B30f")
    widget.ui.sourceKernelComboBox.choose("BONE")
    widget.onApplyButton()
    assert widget._run is None and len(widget.errors) == 1
    assert "no fitted transfer filter for BONE -> B30f" in widget.errors[0]


def test_a_run_through_the_widget_adds_the_output(gui):
    widget, scene, _deps, _worker = gui
    widget.setup()
    node = choose(widget, scene)
    widget.onApplyButton()
    assert widget._run is not None and widget._timer.active and widget.ui.applyButton.text == "Cancel"
    poll_until_done(widget)
    assert not widget._timer.active and not widget.errors, widget.errors
    output = widget._parameterNode.lastOutputVolume
    assert output is not None and output.GetID() != node.GetID()
    assert output.GetAttribute("CTHarmonization.TargetKernel") == "SIEMENS_B30f"
    assert output.GetAttribute("CTHarmonization.Method") == "model"
    assert widget.ui.statusLabel.text.startswith("Done in") and widget.ui.applyButton.text == "Harmonize"
    assert widget.ui.statusLabel.text.endswith(
        "(GE_BONE -> SIEMENS_B30f, cpu, kernel transfer, source chosen).")


def test_cancel_stays_disabled_until_the_run_ends(gui):
    widget, scene, _deps, _worker = gui
    widget.setup()
    choose(widget, scene)
    widget.onApplyButton()
    widget.onApplyButton()  # Cancel
    assert widget.ui.applyButton.text == "Cancel" and not widget.ui.applyButton.enabled
    widget._parameterNode.device = "auto"  # any parameter change during the run
    widget._parameterNode.showDifference = True
    assert not widget.ui.applyButton.enabled
    poll_until_done(widget)
    assert widget.ui.statusLabel.text == "Cancelled. Nothing was added to the scene."
    assert widget._parameterNode.lastOutputVolume is None
    assert widget.ui.applyButton.text == "Harmonize" and widget.ui.applyButton.enabled


def test_closing_the_scene_during_a_run_kills_the_child_and_deletes_the_job(gui):
    widget, scene, _deps, _worker = gui
    widget.setup()
    choose(widget, scene)
    widget.onApplyButton()
    run = widget._run
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    assert run.running() and run.folder.is_dir() and volumes == 1
    scene.Clear(0)
    assert widget._run is None and not widget._timer.active
    assert run.process.poll() is not None and not run.folder.exists()
    assert widget.ui.statusLabel.text.startswith("Stopped: the scene was closed")
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    widget.cleanup()  # then Slicer exits: nothing left to stop, no error


def test_model_path_is_bound_both_ways(gui, tmp_path):
    from model_factory import make_model_file

    widget, _scene, _deps, _worker = gui
    widget.setup()
    ui = widget.ui
    assert "untrained" not in ui.modelCardLabel.text  # the bundled default model
    tiny = str(make_model_file(tmp_path / "tiny.safetensors", seed=3))
    widget._parameterNode.modelPath = tiny  # e.g. a loaded scene
    assert ui.modelPathLineEdit.currentPath == tiny and "untrained" in ui.modelCardLabel.text
    widget.onDefaultModel()  # the user's click
    assert widget._parameterNode.modelPath == "" and "untrained" not in ui.modelCardLabel.text
    ui.modelPathLineEdit.currentPath = tiny  # the user picks a file
    assert widget._parameterNode.modelPath == tiny and "untrained" in ui.modelCardLabel.text
