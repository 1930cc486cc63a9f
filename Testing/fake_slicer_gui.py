"""Stand-ins for the parts of Slicer that slicer-core lacks (Qt widgets, the scripted-module base classes,
parameterNodeWrapper, slicer.app), just enough to run CTHarmonization.py's widget headless on a real MRML
scene. They behave like the originals where the widget depends on it: a combo box selects its first item
when one is added to an empty list and signals every index change; the parameter node stores its values in
a real vtkMRMLScriptedModuleNode (singleton, so File > Close Scene resets it) and fires its Modified event.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import slicer

ROOT = Path(__file__).resolve().parents[1]


class Signal:
    def __init__(self) -> None:
        self.slots: list[Any] = []

    def emit(self, *args: Any) -> None:
        for slot in list(self.slots):
            slot(*args)


class Widget:
    """Any widget: connect(signature, slot) and the properties the module sets."""

    def __init__(self) -> None:
        self.signals: dict[str, Signal] = {}
        self.enabled = True
        self.visible = True
        self.text = ""
        self.toolTip = ""

    def connect(self, signature: str, slot: Any) -> None:
        self.signals.setdefault(signature.split("(")[0], Signal()).slots.append(slot)

    def emit(self, name: str, *args: Any) -> None:
        if name in self.signals:
            self.signals[name].emit(*args)

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def setMRMLScene(self, scene: Any) -> None:
        self.scene = scene


class ComboBox(Widget):
    def __init__(self) -> None:
        super().__init__()
        self.items: list[tuple[str, Any]] = []
        self.currentIndex = -1

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def currentData(self) -> Any:
        return self.items[self.currentIndex][1] if self.currentIndex >= 0 else None

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex][0] if self.currentIndex >= 0 else ""

    def setCurrentIndex(self, index: int) -> None:
        index = index if 0 <= index < len(self.items) else -1
        if index != self.currentIndex:
            self.currentIndex = index
            self.emit("currentIndexChanged", index)

    def clear(self) -> None:
        self.items = []
        self.setCurrentIndex(-1)

    def addItem(self, text: str, data: Any = None) -> None:
        self.items.append((text, data))
        if len(self.items) == 1:
            self.setCurrentIndex(0)  # Qt selects the first item added to an empty combo box

    def findData(self, data: Any) -> int:
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def choose(self, data: Any) -> None:
        """What a user's click does."""
        self.setCurrentIndex(self.findData(data))


class PathLineEdit(Widget):
    def __init__(self) -> None:
        super().__init__()
        self._path = ""

    @property
    def currentPath(self) -> str:
        return self._path

    @currentPath.setter
    def currentPath(self, path: str) -> None:
        if path != self._path:
            self._path = path
            self.emit("currentPathChanged", path)


class NodeSelector(Widget):
    def __init__(self, parameter: str) -> None:
        super().__init__()
        self.parameter = parameter
        self.owner: Any = None

    def currentNode(self) -> Any:
        return getattr(self.owner, self.parameter) if self.owner is not None else None


class ProgressBar(Widget):
    def setRange(self, low: int, high: int) -> None:
        self.range = (low, high)

    def setValue(self, value: int) -> None:
        self.value = value


def fake_ui() -> types.SimpleNamespace:
    ui = types.SimpleNamespace(
        progressBar=ProgressBar(), modelPathLineEdit=PathLineEdit(), defaultModelButton=Widget(),
        inputSelector=NodeSelector("inputVolume"), referenceSelector=NodeSelector("referenceVolume"),
        outputSelector=NodeSelector("outputVolume"), roiSelector=NodeSelector("zoomRegion"),
        targetKernelComboBox=ComboBox(), sourceKernelComboBox=ComboBox(), methodComboBox=ComboBox(),
        deviceComboBox=ComboBox(),
        applyButton=Widget(), showComparisonButton=Widget(), saveComparisonButton=Widget(),
        showDifferenceCheckBox=Widget(), statusLabel=Widget(), modelCardLabel=Widget(),
        detectedKernelLabel=Widget(),
    )
    return ui


class QTimer:
    def __init__(self) -> None:
        self.active = False
        self.slots: list[Any] = []

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def connect(self, signature: str, slot: Any) -> None:
        self.slots.append(slot)

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def fire(self) -> None:
        for slot in self.slots:
            slot()


def parameterNodeWrapper(cls: type) -> type:
    """Like slicer.parameterNodeWrapper: typed attributes stored in a vtkMRMLScriptedModuleNode."""
    names = list(cls.__annotations__)
    defaults = {n: getattr(cls, n, None) for n in names}
    nodeTypes = {n for n in names if str(cls.__annotations__[n]).startswith("vtkMRML")}

    class Wrapper:
        def __init__(self, node: Any) -> None:
            object.__setattr__(self, "parameterNode", node)

        def __getattr__(self, name: str) -> Any:
            node = object.__getattribute__(self, "parameterNode")
            if name in nodeTypes:
                return node.GetNodeReference(name)
            if name in defaults:
                if not node.GetParameterNames() or name not in node.GetParameterNames():
                    return defaults[name]
                value = node.GetParameter(name)
                return value == "True" if isinstance(defaults[name], bool) else value
            return getattr(node, name)  # AddObserver, RemoveObserver, ...

        def __setattr__(self, name: str, value: Any) -> None:
            node = object.__getattribute__(self, "parameterNode")
            if name in nodeTypes:
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(name, str(value))

        def connectGui(self, ui: Any) -> str:
            for widget in vars(ui).values():
                if isinstance(widget, NodeSelector):
                    widget.owner = self
            return "gui"

        def disconnectGui(self, tag: Any) -> None:
            pass

    Wrapper.__name__ = cls.__name__
    return Wrapper


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Any = None) -> None:
        self.parent = parent or types.SimpleNamespace(isEntered=True)
        self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

    def setup(self) -> None:
        pass

    def resourcePath(self, name: str) -> str:
        return str(ROOT / "CTHarmonization" / "Resources" / name)


class ScriptedLoadableModuleLogic:
    def getParameterNode(self) -> Any:
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode("CTHarmonization", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag("CTHarmonization")
            node.SetName("CTHarmonization")
            node = scene.AddNode(node)
        return node


def install(scene: Any, appLogic: Any) -> list[str]:
    """Put the stand-ins in sys.modules and on the slicer module; returns the module names to remove."""
    added = []

    def module(name: str, **attributes: Any) -> None:
        mod = types.ModuleType(name)
        mod.__dict__.update(attributes)
        sys.modules[name] = mod
        added.append(name)

    module("qt", QTimer=QTimer, QFileDialog=None, Qt=types.SimpleNamespace(WaitCursor=3))
    module("ctk")
    module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    module("slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper)
    module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=object,
           ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
           ScriptedLoadableModuleTest=object, ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget)
    slicer.mrmlScene = scene
    slicer.app = types.SimpleNamespace(processEvents=lambda: None, applicationLogic=lambda: appLogic,
                                       defaultScenePath=str(ROOT), setOverrideCursor=lambda cursor: None,
                                       restoreOverrideCursor=lambda: None)
    slicer.util.loadUI = lambda path: Widget()
    slicer.util.childWidgetVariables = lambda widget: fake_ui()
    return added

