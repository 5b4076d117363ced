"""The panel's Evidence area (built in code, below Outputs): why and how sure for the last run.

One checkbox each for the saliency and the uncertainty heat maps (the slice views' foreground layer), a
prompt chooser when the run had several, a button that shows the chosen prompt's per-slice chart in the
layout's plot view (a click on a point moves the slice views to that slice), and one summary line per
prompt. What it does to the scene is in evidenceview.py (Qt-free, tested in slicer-core); qt and ctk are
imported where used.
"""

import slicer

from ..evidenceview import EvidenceCleaner, EvidenceView
from ..i18n import tr as _

DATA_SELECTED = "dataSelected(vtkStringArray*, vtkCollection*)"  # qMRMLPlotView's signal


class EvidenceSection:
    def __init__(self, panel):
        self.panel = panel  # the MedCLIPSAMWidget
        self.view = EvidenceView(slicer.mrmlScene)
        self.cleaner = EvidenceCleaner(self.onEvidenceRemoved)
        self._plotViews = []
        self._layoutManager = None      # watched for layoutChanged while a chart is shown
        self._chartShown = False

    # ------------------------------------------------------------------------------ widgets
    def setup(self, uiWidget, after):
        """Build the area and insert it into the panel's layout below the widget `after`."""
        import ctk
        import qt

        self.button = ctk.ctkCollapsibleButton()
        self.button.text = _("Evidence")
        self.button.toolTip = _("Why and how sure: where the text matched the image, how certain the mask is, "
                                "and on which slices the target was found")
        form = qt.QFormLayout(self.button)
        self.summaryLabel = qt.QLabel()
        self.summaryLabel.wordWrap = True
        self.summaryLabel.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        form.addRow(self.summaryLabel)
        self.promptLabel = qt.QLabel(_("Prompt:"))
        self.promptCombo = qt.QComboBox()
        self.promptCombo.toolTip = _("The prompt whose saliency and chart are shown")
        form.addRow(self.promptLabel, self.promptCombo)
        self.saliencyCheckBox = qt.QCheckBox(_("Show saliency (why)"))
        self.saliencyCheckBox.toolTip = _(
            "Heat map over the image: where BiomedCLIP matched the prompt's text, on the slices that got a "
            "saliency map (the key slices, or every kept slice). Bright = strong match; dark or clear = none.")
        self.uncertaintyCheckBox = qt.QCheckBox(_("Show uncertainty (how sure)"))
        self.uncertaintyCheckBox.toolTip = _(
            "Heat map over the image: the entropy of the mask probability (0 = certain, 1 = a coin toss). "
            "Bright along a border means the border is unsure there. Needs 'Uncertainty volume' in Outputs.")
        self.chartButton = qt.QPushButton(_("Show presence chart"))
        self.chartButton.toolTip = _(
            "Per slice: similarity of the slice to the prompt and its lead over the absent sentences; the kept "
            "slices and the key slices are marked. Click a point to move the slice views to that slice.")
        form.addRow(self.saliencyCheckBox)
        form.addRow(self.uncertaintyCheckBox)
        form.addRow(self.chartButton)
        layout = uiWidget.layout()
        layout.insertWidget(layout.indexOf(after) + 1, self.button)

        self.saliencyCheckBox.connect("toggled(bool)", lambda on: self.onOverlayToggled("saliency", on))
        self.uncertaintyCheckBox.connect("toggled(bool)", lambda on: self.onOverlayToggled("uncertainty", on))
        self.promptCombo.connect("currentIndexChanged(int)", self.onPromptChanged)
        self.chartButton.connect("clicked(bool)", self.onShowChart)
        self.cleaner.attach(slicer.mrmlScene)
        self.refresh()

    def cleanup(self):
        self.cleaner.detach()
        self._disconnectPlotViews()
        if self._layoutManager is not None:
            try:
                self._layoutManager.disconnect("layoutChanged(int)", self._onLayoutChanged)
            except (RuntimeError, ValueError):
                pass
            self._layoutManager = None

    # ------------------------------------------------------------------------------ state
    def showResult(self, result):
        """After a run: its evidence, with the overlay shown that was shown before the run, else the
        uncertainty when the run made it (as before the Evidence area)."""
        shown = [kind for kind in ("saliency", "uncertainty") if self.view.overlayShown(kind)]
        self.view.setResult(result)
        self._chartShown = self._chartShown and self.view.entry() is not None
        for kind in shown + ["uncertainty"]:
            if self.view.overlayNode(kind) is not None:
                self.view.setOverlay(kind, True)
                break
        if self._chartShown:  # a chart on screen follows the new run
            self.onShowChart()
        self.refresh()

    def clear(self):
        """Scene close: nothing to show."""
        self.view.clear()
        self._chartShown = False
        self.refresh()

    def onEvidenceRemoved(self, segmentationNodeId):
        result = self.view.result
        if result is not None and result.segmentationNode is not None and \
                result.segmentationNode.GetID() == segmentationNodeId:
            self.clear()

    def refresh(self):
        """The widgets from the view: the prompts, the summary lines, which overlays are shown."""
        prompts = self.view.prompts()
        self.promptCombo.blockSignals(True)
        self.promptCombo.clear()
        for prompt in prompts:
            self.promptCombo.addItem(prompt)
        if self.view.prompt in prompts:
            self.promptCombo.currentIndex = prompts.index(self.view.prompt)
        self.promptCombo.blockSignals(False)
        self.promptLabel.visible = self.promptCombo.visible = len(prompts) > 1
        lines = self.view.summaryLines()
        self.summaryLabel.text = "\n".join(lines) if lines else _(
            "After a zero-shot run: one line per prompt (where it was found, its volume, or why not).")
        for kind, box in (("saliency", self.saliencyCheckBox), ("uncertainty", self.uncertaintyCheckBox)):
            box.blockSignals(True)
            box.enabled = self.view.overlayNode(kind) is not None
            box.checked = self.view.overlayShown(kind)
            box.blockSignals(False)
        self.chartButton.enabled = self.view.entry() is not None

    # ------------------------------------------------------------------------------ actions
    def onOverlayToggled(self, kind, on):
        self.view.setOverlay(kind, on)
        self.refresh()  # one foreground: showing one heat map unticks the other

    def onPromptChanged(self, index):
        if 0 <= index < len(self.view.prompts()):
            self.view.setPrompt(self.view.prompts()[index])
            if self._chartShown:
                self.onShowChart()
            self.refresh()

    def onShowChart(self):
        """The chosen prompt's chart in the layout's plot view (the layout switched to one that has one, as
        the weak-supervision chart does), its points connected to the slice views."""
        chart = self.view.chartNode()
        plots = getattr(slicer.modules, "plots", None)
        if chart is None or plots is None:
            return
        plots.logic().ShowChartInLayout(chart)
        self._chartShown = True
        self._connectPlotViews()

    def _connectPlotViews(self):
        self._disconnectPlotViews()
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and self._layoutManager is not layoutManager:
            # a layout may bring plot views that did not exist when the chart was shown: connect them too
            # (qMRMLLayoutManager::layoutChanged(int), Libs/MRML/Widgets/qMRMLLayoutManager.h:274, v5.10.0)
            layoutManager.connect("layoutChanged(int)", self._onLayoutChanged)
            self._layoutManager = layoutManager
        for i in range(layoutManager.plotViewCount if layoutManager else 0):
            plotView = layoutManager.plotWidget(i).plotView()
            plotView.connect(DATA_SELECTED, self.onDataSelected)
            self._plotViews.append(plotView)

    def _onLayoutChanged(self, layout=None):
        if self._chartShown:
            self._connectPlotViews()

    def _disconnectPlotViews(self):
        for plotView in self._plotViews:
            try:
                plotView.disconnect(DATA_SELECTED, self.onDataSelected)
            except (RuntimeError, ValueError):  # the view went with a layout change
                pass
        self._plotViews = []

    def onDataSelected(self, seriesIds, selection):
        """qMRMLPlotView::dataSelected(vtkStringArray* series IDs, vtkCollection* of vtkIdTypeArray point IDs)."""
        ids = [seriesIds.GetValue(i) for i in range(seriesIds.GetNumberOfValues())]
        points = []
        for i in range(selection.GetNumberOfItems()):
            array = selection.GetItemAsObject(i)
            points.append([int(array.GetValue(j)) for j in range(array.GetNumberOfValues())])
        self.view.jumpToSelection(ids, points)
