"""3D Slicer scripted module "CT Color": colorize a CT and register two CTs, with napari-ctcolor's jobs.

Add this folder to Slicer's additional module paths (Edit > Application Settings > Modules) after installing the
package into Slicer's Python (``slicer.util.pip_install("napari-ctcolor[slicer]")``, or ``pip install -e`` of a
checkout). The widget only gathers choices and shows progress; all work is `napari_ctcolor.slicer.logic`, which
the project's tests run against Slicer's real MRML core.
"""

from __future__ import annotations

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from napari_ctcolor.slicer.logic import colorize_node, register_nodes

#: Pre-alignment choices: "auto" is the model card's default (on for the CT weights, off for an official checkpoint).
PREALIGN = {"auto": None, "on": True, "off": False}
WINDOWS = ("DICOM default", "abdomen", "lung", "bone", "liver", "mediastinum", "brain", "cta")
PALETTES = ("anatomical", "dicom")


class CTColor(ScriptedLoadableModule):
    def __init__(self, parent):
        super().__init__(parent)
        parent.title = "CT Color"
        parent.categories = ["Registration", "Utilities"]
        parent.contributors = ["napari-ctcolor"]
        parent.helpText = (
            "Colorize volume: colour classes from a CNN, luminance exactly the windowed CT. "
            "Register & checkerboard: SYMNet registration, a grid transform, checkerboard and Jacobian."
        )
        parent.acknowledgementText = "TotalSegmentator example data: Wasserthal et al., Radiology: AI 2023."


class CTColorWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        from napari_ctcolor.app.register_job import MAX_REFINE_ITERATIONS  # torch's import when the module opens

        super().setup()
        self.logic = CTColorLogic()

        color = qt.QGroupBox("Colorize volume")
        form = qt.QFormLayout(color)
        self.ctSelector = self._volume_selector()
        self.windowBox = qt.QComboBox()
        self.windowBox.addItems(list(WINDOWS))
        self.paletteBox = qt.QComboBox()
        self.paletteBox.addItems(list(PALETTES))
        self.colorizeButton = qt.QPushButton("Colorize")
        form.addRow("CT volume:", self.ctSelector)
        form.addRow("Window:", self.windowBox)
        form.addRow("Palette:", self.paletteBox)
        form.addRow(self.colorizeButton)
        self.layout.addWidget(color)

        register = qt.QGroupBox("Register & checkerboard")
        form = qt.QFormLayout(register)
        self.fixedSelector = self._volume_selector()
        self.movingSelector = self._volume_selector()
        self.prealignBox = qt.QComboBox()
        self.prealignBox.addItems(list(PREALIGN))
        self.refineBox = qt.QSpinBox()
        self.refineBox.minimum, self.refineBox.maximum, self.refineBox.value = -1, MAX_REFINE_ITERATIONS, -1
        self.refineBox.specialValueText = "auto"  # Qt shows it at the minimum, -1: the model card's default
        self.registerButton = qt.QPushButton("Register")
        form.addRow("Fixed:", self.fixedSelector)
        form.addRow("Moving:", self.movingSelector)
        form.addRow("Pre-alignment:", self.prealignBox)
        form.addRow("Refine (demons its):", self.refineBox)
        form.addRow(self.registerButton)
        self.layout.addWidget(register)

        self.progress = qt.QProgressBar()
        self.status = qt.QLabel("")
        self.layout.addWidget(self.progress)
        self.layout.addWidget(self.status)
        self.layout.addStretch(1)
        self.colorizeButton.connect("clicked(bool)", self.onColorize)
        self.registerButton.connect("clicked(bool)", self.onRegister)

    def _volume_selector(self):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        selector.noneEnabled = False
        selector.addEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        return selector

    def _progress(self, done, total):
        self.progress.maximum = total
        self.progress.value = done
        slicer.app.processEvents()

    def _run(self, what, call):
        self.status.text = f"{what}..."
        try:
            with slicer.util.tryWithErrorDisplay(f"{what} failed", waitCursor=True):
                message = call()
                self.status.text = message
        finally:
            self.progress.value = 0

    def onColorize(self):
        window = None if self.windowBox.currentText == "DICOM default" else self.windowBox.currentText
        self._run(
            "Colorize volume",
            lambda: self.logic.colorize(
                self.ctSelector.currentNode(), window, self.paletteBox.currentText, self._progress
            ),
        )

    def onRegister(self):
        fixed, moving = self.fixedSelector.currentNode(), self.movingSelector.currentNode()
        affine = PREALIGN[self.prealignBox.currentText]
        refine = None if self.refineBox.value < 0 else self.refineBox.value
        self._run("Register & checkerboard", lambda: self.logic.register(fixed, moving, affine, refine, self._progress))


class CTColorLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic class for this module: the project's tested logic, plus what the views should show."""

    def colorize(self, node, window, palette, progress=None):
        color = colorize_node(node, window=window, palette=palette, progress=progress)
        slicer.util.setSliceViewerLayers(background=color, fit=True)
        return f"Colorize volume: {color.GetName()}"

    def register(self, fixed, moving, affine=None, refine=None, progress=None):
        result = register_nodes(fixed, moving, affine=affine, refine=refine, progress=progress)
        slicer.util.setSliceViewerLayers(background=result.checkerboard, fit=True)
        m = result.metrics
        text = (
            f"NCC {m['ncc_before']:.3f} -> {m['ncc_after']:.3f}, folding {100 * m['folding_fraction']:.3f} %, "
            f"pre-alignment {'on' if m['affine'] else 'off'}, refine {m['refine_iterations']}"
        )
        warnings = m.get("warnings", [])  # a doubtful registration: the outputs are added, the user is told why
        if warnings:
            slicer.util.warningDisplay("\n".join(warnings), windowTitle="Register & checkerboard")
        return "\n".join([text, *(f"warning: {w}" for w in warnings)])


class CTColorTest(ScriptedLoadableModuleTest):
    """Run in Slicer (Developer mode > Reload and Test): a phantom CT colorized and registered to itself."""

    def runTest(self):
        import numpy as np

        from napari_ctcolor.phantom import make_phantom
        from napari_ctcolor.slicer.logic import node_from_volume

        slicer.mrmlScene.Clear(0)
        volume = make_phantom(seed=3, shape=(16, 64, 64), spacing=(3.0, 1.5, 1.5)).volume
        node = node_from_volume(volume, slicer.mrmlScene, "phantom")
        color = colorize_node(node, window=(40, 400))
        self.assertEqual(slicer.util.arrayFromVolume(color).shape, (*volume.shape, 3))
        result = register_nodes(node, node)
        self.assertTrue(np.allclose(slicer.util.arrayFromVolume(result.warped), volume.array, atol=40))
        self.delayDisplay("CT Color test passed")
