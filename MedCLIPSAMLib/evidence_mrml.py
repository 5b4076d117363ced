"""The evidence of a run as MRML nodes (slicer-core or Slicer; no Qt): heat-map overlays, the per-slice
similarity chart, and jumping the slice views to a chosen slice.

- Saliency and uncertainty are scalar volumes in [0, 1] shown in the slice views' foreground layer with a
  perceptual colour table (Inferno, else Viridis, else the built-in Iron) and an opacity; voxels under a
  small threshold are transparent, so the anatomy shows where there is no evidence.
- Per prompt, a table node of the scored slices (slice, similarity, lead over the absent sentences), small
  tables of the kept range (shaded bars) and of the kept and key slices, plot series of each and one plot
  chart node.
- Every node made here is referenced from the segmentation node under EVIDENCE_ROLE and carries the prompt
  and its kind as attributes, so a re-run updates the same nodes instead of adding more, and
  remove_evidence finds them all.
"""

import numpy as np

from . import mrml

EVIDENCE_ROLE = "MedCLIPSAM.evidence"
PROMPT_ATTRIBUTE = "MedCLIPSAM.prompt"
KIND_ATTRIBUTE = "MedCLIPSAM.evidenceKind"
# heat maps in order of preference: Slicer's perceptual tables (loaded from its ColorFiles), else Iron
HEAT_MAP_FILES = ("Inferno.txt", "Viridis.txt")
FALLBACK_COLOR_ID = "vtkMRMLColorTableNodeIron"
SERIES_STYLE = {  # kind: (label, rgb, draw a line, marker, marker size); drawn in this order
    "range": ("kept range", (0.6, 0.85, 0.6), False, "bar", 0),
    "similarity": ("similarity to the prompt", (0.12, 0.47, 0.71), True, "none", 0),
    "lead": ("lead over the absent sentences", (1.0, 0.5, 0.05), True, "none", 0),
    "kept": ("kept slices", (0.17, 0.63, 0.17), False, "circle", 7),
    "key": ("key slices", (0.84, 0.15, 0.16), False, "diamond", 12),
}


def _slicer():
    import slicer

    return slicer


# ------------------------------------------------------------------------------------ bookkeeping
def evidence_nodes(segmentation_node, prompt=None, kind=None):
    """The evidence nodes of a segmentation, optionally only those of one prompt and / or kind."""
    nodes = []
    for i in range(segmentation_node.GetNumberOfNodeReferences(EVIDENCE_ROLE)):
        node = segmentation_node.GetNthNodeReference(EVIDENCE_ROLE, i)
        if node is None:
            continue
        if prompt is not None and node.GetAttribute(PROMPT_ATTRIBUTE) != prompt:
            continue
        if kind is not None and node.GetAttribute(KIND_ATTRIBUTE) != kind:
            continue
        nodes.append(node)
    return nodes


def _evidence_node(scene, segmentation_node, prompt, kind, class_name, name):
    """The node of this prompt and kind made by an earlier run, or a new one referenced from the segmentation."""
    found = evidence_nodes(segmentation_node, prompt, kind)
    if found:
        found[0].SetName(name)
        return found[0]
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAttribute(PROMPT_ATTRIBUTE, prompt)
    node.SetAttribute(KIND_ATTRIBUTE, kind)
    segmentation_node.AddNodeReferenceID(EVIDENCE_ROLE, node.GetID())
    return node


def remove_evidence(scene, segmentation_node, prompt=None, kind=None):
    """Remove the evidence nodes of a segmentation (of one prompt and / or kind, or all), their display and
    storage nodes included, and take them off the slice views first."""
    remove_evidence_nodes(scene, evidence_nodes(segmentation_node, prompt, kind))


def remove_evidence_nodes(scene, nodes):
    """Remove these evidence nodes (those still in the scene) as remove_evidence does; for a segmentation
    node that has already left the scene, whose references are gone."""
    for node in nodes:
        if node is None or not scene.IsNodePresent(node):
            continue
        if node.IsA("vtkMRMLVolumeNode"):
            hide_overlay(scene, node)
        _remove_node(scene, node)


def _remove_node(scene, node):
    # a volume's display and storage nodes go with it; Slicer removes them only in the application
    helpers = []
    if node.IsA("vtkMRMLDisplayableNode"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


# ------------------------------------------------------------------------------------ overlays
def heat_map_color_id(scene):
    """The ID of the first heat-map colour table the scene has (Inferno, Viridis, Iron), or None."""
    slicer = _slicer()

    ids = [slicer.vtkMRMLColorLogic.GetFileColorNodeID(f) for f in HEAT_MAP_FILES] + [FALLBACK_COLOR_ID]
    return next((i for i in ids if scene.GetNodeByID(i) is not None), None)


def style_heat_map(scene, volume_node, threshold=0.05):
    """Show a [0, 1] map as a heat map: fixed window 0..1 (comparable between slices and runs), voxels
    under `threshold` transparent."""
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    was_modifying = display.StartModify()
    color_id = heat_map_color_id(scene)
    if color_id:
        display.SetAndObserveColorNodeID(color_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetThreshold(threshold, 1.0)
    display.ApplyThresholdOn()
    display.EndModify(was_modifying)
    return display


def load_evidence_volume(scene, path, segmentation_node, prompt, kind="saliency", threshold=0.05):
    """Load a saliency (kind 'saliency', one per prompt) or uncertainty (kind 'uncertainty', prompt '' for
    the run's single map) file into the evidence volume of that prompt and kind, styled as a heat map.
    An earlier run's node is refilled, not duplicated. Placed under the segmentation's parent transform."""
    name = f"{segmentation_node.GetName()} {kind}" + (f" '{prompt}'" if prompt else "")
    existing = evidence_nodes(segmentation_node, prompt, kind)
    # read first: a bad file raises before the scene changes
    node = mrml.read_volume_into_node(scene, path, name, existing[0] if existing else None)
    if not existing:
        node.SetAttribute(PROMPT_ATTRIBUTE, prompt)
        node.SetAttribute(KIND_ATTRIBUTE, kind)
        segmentation_node.AddNodeReferenceID(EVIDENCE_ROLE, node.GetID())
    node.SetName(name)
    node.SetAndObserveTransformNodeID(segmentation_node.GetTransformNodeID())
    style_heat_map(scene, node, threshold)
    return node


def _composite_nodes(scene):
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def show_overlay(scene, volume_node, opacity=0.5):
    """Show a volume in the foreground layer of every slice view (as slicer.util.setSliceViewerLayers
    does), over the background the user chose. The foreground holds one volume: showing the saliency
    replaces the uncertainty overlay and the other way round."""
    for composite in _composite_nodes(scene):
        composite.SetForegroundVolumeID(volume_node.GetID())
        composite.SetForegroundOpacity(float(opacity))


def hide_overlay(scene, volume_node):
    """Clear the foreground layer of the slice views that show this volume (others are left alone)."""
    for composite in _composite_nodes(scene):
        if composite.GetForegroundVolumeID() == volume_node.GetID():
            composite.SetForegroundVolumeID(None)


# ------------------------------------------------------------------------------------ chart
def _fill_table(table_node, columns):
    """Replace a table node's columns with {name: values} (doubles), all of one length."""
    import vtk

    table = table_node.GetTable()
    while table.GetNumberOfColumns():
        table.RemoveColumn(0)
    for name, values in columns.items():
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        array.SetNumberOfTuples(len(values))
        for row, value in enumerate(values):
            array.SetValue(row, float(value))
        table.AddColumn(array)
    table.Modified()
    table_node.Modified()


def update_evidence_chart(scene, segmentation_node, report):
    """The chart of one prompt's report (one entry of the report JSON's 'prompts'): similarity and lead
    per scored slice, the kept and the key slices marked on the similarity curve, the kept range shaded
    (bars). Returns the chart node.
    A re-run updates the same nodes; the lead series is there only when the prompt had absent sentences."""
    slicer = _slicer()

    prompt, label = report["prompt"], f"{segmentation_node.GetName()} '{report['prompt']}'"
    scored = [int(k) for k in report["scored"]]
    similarity = dict(zip(scored, report["similarity"]))
    rows = {"similarity": {"slice": scored, "similarity": report["similarity"]}}
    if report.get("lead") is not None:
        rows["lead"] = {"slice": scored, "lead": report["lead"]}
    for kind, field in (("kept", "kept_slices"), ("key", "key_slices")):
        marked = [int(k) for k in report[field] if int(k) in similarity]
        rows[kind] = {"slice": marked, "similarity": [similarity[k] for k in marked]}
    # the kept range shaded: a bar up to the top of the similarity curve on every kept slice. vtkChartXY
    # makes bars |x1 - x0| * 0.8 wide from the first two x values, so the table has a row for every slice
    # (height 0 off the kept range): bars 0.8 slice wide
    top = max(report["similarity"], default=0.0)
    kept = {int(k) for k in report["kept_slices"]}
    every = list(range(int(report.get("slices") or (max(scored, default=-1) + 1))))
    rows["range"] = {"slice": every, "kept": [top if k in kept else 0.0 for k in every]}

    chart = _evidence_node(scene, segmentation_node, prompt, "chart", "vtkMRMLPlotChartNode", f"{label} per slice")
    chart.RemoveAllPlotSeriesNodeIDs()
    for kind in SERIES_STYLE:
        table_kind, series_kind = f"table-{kind}", f"series-{kind}"
        if kind not in rows:  # no absent sentences this time: no lead
            for node in evidence_nodes(segmentation_node, prompt, table_kind) + evidence_nodes(
                    segmentation_node, prompt, series_kind):
                _remove_node(scene, node)
            continue
        title, color, line, marker, size = SERIES_STYLE[kind]
        # each series has its own table, so a plot point's index is a row of that table (slice_of_plot_point)
        table = _evidence_node(scene, segmentation_node, prompt, table_kind, "vtkMRMLTableNode", f"{label} {title}")
        _fill_table(table, rows[kind])
        series = _evidence_node(scene, segmentation_node, prompt, series_kind, "vtkMRMLPlotSeriesNode", title)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("slice")
        series.SetYColumnName(list(rows[kind])[1])
        # ScatterBar: bars at the x column's values (qMRMLPlotView; Bar would place them by row index)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatterBar if marker == "bar"
                           else slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetOpacity(0.5 if marker == "bar" else 1.0)
        series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid if line
                            else slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if marker == "circle"
                              else slicer.vtkMRMLPlotSeriesNode.MarkerStyleDiamond if marker == "diamond"
                              else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        if size:
            series.SetMarkerSize(size)
        series.SetColor(*color)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(f"'{prompt}': {report['summary']}" if report.get("summary") else f"'{prompt}'")
    chart.SetXAxisTitle(f"{report.get('axis', 'axial')} slice")
    chart.SetYAxisTitle("cosine")
    return chart


def show_evidence(scene, segmentation_node, document):
    """Charts for every prompt of a report document; {prompt: chart node}."""
    return {r["prompt"]: update_evidence_chart(scene, segmentation_node, r) for r in document["prompts"]}


# ------------------------------------------------------------------------------------ jumping
def slice_of_plot_point(scene, series_node_id, point_index):
    """The slice index of a point of an evidence series (qMRMLPlotView's dataSelected gives both)."""
    series = scene.GetNodeByID(series_node_id)
    table_node = series.GetTableNode() if series is not None else None
    if table_node is None:
        return None
    column = table_node.GetTable().GetColumnByName("slice")
    if column is None or not 0 <= int(point_index) < column.GetNumberOfTuples():
        return None
    return int(column.GetValue(int(point_index)))


def slice_center_ras(volume_node, view, k):
    """World RAS of the centre of slice k along the `view` (axial / coronal / sagittal) slicing axis of the
    volume, the same axis the CLI sliced along (it follows the direction matrix, not the array axes)."""
    import vtk

    from .io.geometry import VIEW_ROWS, patient_axes

    slicer = _slicer()
    ijk_to_ras = mrml.ijk_to_ras_from_node(volume_node)
    _, _, direction = mrml._geometry_from_ijk_to_ras(ijk_to_ras)
    index_axis = patient_axes(np.reshape(direction, (3, 3)))[VIEW_ROWS[view]]
    ijk = (np.array(volume_node.GetImageData().GetDimensions(), float) - 1) / 2
    ijk[index_axis] = k
    ras = (ijk_to_ras @ np.append(ijk, 1.0))[:3]
    parent = volume_node.GetParentTransformNode()
    if parent is not None:  # the slice views show world coordinates
        to_world = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, to_world)
        ras = np.array(to_world.TransformPoint(*ras))
    return ras


def jump_to_slice(scene, volume_node, view, k):
    """Move every slice view to slice k (each view keeps its own jump mode); returns the RAS position."""
    slicer = _slicer()

    ras = slice_center_ras(volume_node, view, k)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *[float(v) for v in ras])
    return ras
