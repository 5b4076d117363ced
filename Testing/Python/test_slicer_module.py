"""The Slicer module MedCLIPSAM/MedCLIPSAM.py without the Slicer application.

What runs here: the module file is loaded with slicer-core (real MRML scene) and stand-ins for the three
names only the Slicer application provides - slicer.ScriptedLoadableModule (base classes),
slicer.i18n (tr/translate) and slicer.parameterNodeWrapper (the decorator and Choice) - see SLICER_APP_STUBS.
qt and ctk are not stubbed: the module must load without them (the widget imports them when it is built).

Checked: the .ui file against the names and classes the code uses; loading without torch or qt; the
Qt-free helpers in MedCLIPSAM/MedCLIPSAMModuleLib/ (prompts, output splitting, error messages, GPU query
parsing, the setup's model commands checked by the CLI's own parser); a finished run's files brought into
the scene as every job does (import, re-run into the same node, the evidence); the module's own self-test
(MedCLIPSAMTest: the local service with tiny-random models, training there and predicting with the trained
model); and the extension packaging (CMake with a stand-in Slicer, .s4ext, the ExtensionsIndex JSON, the icon).
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
sitk = pytest.importorskip("SimpleITK")

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "MedCLIPSAM" / "MedCLIPSAM.py"
sys.path.insert(0, str(MODULE_FILE.parent))  # MedCLIPSAMModuleLib, as Slicer puts the module folder on the path

from MedCLIPSAMModuleLib import dependencies, devices, modeljobs, prompts  # noqa: E402
from MedCLIPSAMModuleLib import setupprocess as process  # noqa: E402
UI_FILE = REPO / "Resources" / "UI" / "MedCLIPSAM.ui"

# Stand-ins for the parts of the `slicer` package that only the Slicer application has. Kept minimal on
# purpose: enough to define the module's classes and run the logic, nothing that imitates the GUI.
SLICER_APP_STUBS = textwrap.dedent('''
    import sys, types, unittest
    import slicer

    def _module(name, **attributes):
        module = types.ModuleType("slicer." + name)
        module.__dict__.update(attributes)
        sys.modules["slicer." + name] = module
        setattr(slicer, name, module)

    if "slicer.ScriptedLoadableModule" not in sys.modules:
        class ScriptedLoadableModule:
            def __init__(self, parent):
                self.parent = parent

        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None):
                self.parent = parent

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None):
                self.moduleName = type(self).__name__[: -len("Logic")]

        class ScriptedLoadableModuleTest(unittest.TestCase):
            def delayDisplay(self, message, requestedDelay=None, msec=None):
                print(message)

        _module("ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
                ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest=ScriptedLoadableModuleTest)
        _module("i18n", tr=lambda text: text, translate=lambda context, text: text)

        class Choice:
            def __init__(self, choices):
                self.choices = tuple(choices)

        class WithinRange:  # as Base/Python/slicer/parameterNodeWrapper/validators.py (v5.10.0)
            def __init__(self, minimum, maximum):
                self.minimum, self.maximum = minimum, maximum

        _module("parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls, Choice=Choice, WithinRange=WithinRange)
''')


def load_module_file():
    exec(SLICER_APP_STUBS, {})
    spec = importlib.util.spec_from_file_location("MedCLIPSAM", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mod():
    return load_module_file()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def small_phantom(seed=2):
    from MedCLIPSAMLib import phantoms

    return phantoms.make_volume("mr", shape=(8, 32, 28), spacing=(1.4, 1.1, 3.5), origin=(12.0, -40.0, 5.0),
                                direction="oblique", seed=seed, lesion={"size": "large"})


# ------------------------------------------------------------------------------------------- .ui file
UI_CLASSES = {  # what the code expects each looked-up widget to be
    "inputVolumeSelector": "qMRMLNodeComboBox", "outputSegmentationSelector": "qMRMLNodeComboBox",
    "promptsTextEdit": "QTextEdit", "promptSuggestionsComboBox": "QComboBox", "presetComboBox": "QComboBox",
    "axisComboBox": "QComboBox", "deviceComboBox": "QComboBox", "deviceRefreshButton": "QToolButton",
    "deviceInfoLabel": "QLabel", "show3DCheckBox": "QCheckBox", "uncertaintyCheckBox": "QCheckBox",
    "modelsLineEdit": "QLineEdit", "setupCheckButton": "QPushButton", "downloadModelsButton": "QPushButton",
    "registerModelsButton": "QPushButton", "setupStatusLabel": "QLabel", "applyButton": "QPushButton",
    "cancelButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
    "openSegmentEditorButton": "QPushButton", "exportLabelmapButton": "QPushButton",
    "exportFileButton": "QPushButton", "registerTrainedModelButton": "QPushButton",
    "removeTrainedModelButton": "QPushButton",
    "outputsCollapsibleButton": "ctkCollapsibleButton",  # the Evidence area goes below it
    "advancedCollapsibleButton": "ctkCollapsibleButton",  # the Service group is added to its layout in code
    # weak supervision section
    "weakSourceComboBox": "QComboBox", "weakSourceInfoLabel": "QLabel", "weakFolderLineEdit": "QLineEdit",
    "weakFolderBrowseButton": "QToolButton", "weakPromptsTextEdit": "QTextEdit", "weakEpochsSpinBox": "QSpinBox",
    "weakDimsComboBox": "QComboBox", "weakDeviceComboBox": "QComboBox", "weakModelNameLineEdit": "QLineEdit",
    "weakStartButton": "QPushButton", "weakCancelButton": "QPushButton", "weakProgressBar": "QProgressBar",
    "weakStatusLabel": "QLabel", "weakLogTextEdit": "QPlainTextEdit",
}
# widget class -> parameter types the parameter node wrapper can connect it to
CONNECTABLE = {"qMRMLNodeComboBox": "node", "QTextEdit": str, "QLineEdit": str, "QCheckBox": bool, "QSpinBox": int}


def ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    return root, widgets


def test_ui_parses_and_has_every_widget_the_code_uses():
    root, widgets = ui_widgets()
    assert root.tag == "ui" and root.find("widget").get("class") == "qMRMLWidget"
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the module looks up no widgets?"
    for panel in (MODULE_FILE.parent / "MedCLIPSAMModuleLib" / "panels").glob("*.py"):  # panel.ui.X, ui.X
        used |= set(re.findall(r"\bui\.(\w+)", panel.read_text())) - {"updateButtons"}
    missing = used - set(widgets)
    assert not missing, f"widgets used in the module's code but absent from the .ui file: {sorted(missing)}"
    assert used <= set(UI_CLASSES), f"add the expected class of {sorted(used - set(UI_CLASSES))} to UI_CLASSES"
    for name, expected in UI_CLASSES.items():
        assert widgets[name].get("class") == expected, name
    # custom (non-Qt) classes are declared, and MRML widgets get the scene
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {w.get("class") for w in widgets.values() if not w.get("class").startswith("Q")}
    assert custom <= declared
    scene_receivers = {c.findtext("receiver") for c in root.iter("connection")
                       if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    top = root.find("widget").get("name")
    assert scene_receivers == {n for n, w in widgets.items() if w.get("class").startswith("qMRML") and n != top}


def test_ui_parameter_names_match_the_parameter_node(mod):
    _root, widgets = ui_widgets()
    annotations = mod.MedCLIPSAMParameterNode.__annotations__
    connected = {}
    for name, widget in widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                connected[prop.findtext("string")] = widget.get("class")
    assert set(connected) <= set(annotations)
    for parameter, widget_class in connected.items():
        kind = CONNECTABLE[widget_class]
        annotation = annotations[parameter]
        if kind == "node":
            classes = [c for c in typing.get_args(annotation) or (annotation,) if c is not type(None)]
            assert all(isinstance(c, type) and c.__name__.startswith("vtkMRML") for c in classes), parameter
        else:
            assert (typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated
                    else annotation) is kind, parameter
    # the combos (translated labels) are kept in step by the widget, with the CLI's choices
    for parameter, choices in (("preset", mod.PRESETS), ("axis", mod.AXES), ("device", mod.DEVICES),
                               ("weakImageSource", mod.IMAGE_SOURCES), ("weakDims", mod.DIMS),
                               ("weakDevice", mod.DEVICES)):
        assert annotations[parameter].__metadata__[0].choices == choices
    assert set(mod.REMEMBERED_SETTINGS) <= set(annotations)


# ------------------------------------------------------------------------------ loading without torch
def test_module_loads_without_torch_or_qt():
    """Load the module file in a fresh interpreter where torch, open_clip, sam2, transformers, qt and ctk
    cannot be imported; use the logic's cheap parts; check nothing heavy got imported."""
    code = textwrap.dedent(f'''
        import importlib.abc, importlib.util, json, sys
        BLOCKED = {{"torch", "torchvision", "open_clip", "sam2", "transformers", "qt", "ctk", "PythonQt"}}

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked for this test: " + name)
                return None

        sys.meta_path.insert(0, Blocker())
        exec({SLICER_APP_STUBS!r}, {{}})
        spec = importlib.util.spec_from_file_location("MedCLIPSAM", {str(MODULE_FILE)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        after_load = sorted(m for m in sys.modules if m.startswith("MedCLIPSAMLib"))
        from MedCLIPSAMModuleLib import prompts
        logic = mod.MedCLIPSAMLogic()
        command = logic.serviceBackend.mode
        suggestions = prompts.promptSuggestions()
        missing = []
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"after_load": after_load, "heavy": heavy, "missing": missing,
                          "command": command, "suggestions": suggestions}}))
    ''')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["after_load"] == []  # MedCLIPSAMLib itself is only imported when used
    assert report["heavy"] == []
    assert report["command"] == "local"  # the panel's one backend: the service, local by default
    assert "brain tumor" in report["suggestions"]


# ------------------------------------------------------------------------------------ logic helpers
def test_clean_prompts(mod):
    assert prompts.cleanPrompts("  brain tumor \n\n Brain  Tumor\nleft kidney\n   \nliver") == [
        "brain tumor", "left kidney", "liver"]
    assert prompts.cleanPrompts(["a", "b", "A"]) == ["a", "b"]
    assert prompts.cleanPrompts("\n \n") == []


def test_line_splitter_joins_partial_chunks(mod):
    splitter = process.LineSplitter()
    record = '{"stage": "gate", "done": 1, "total": 2, "message": "über"}\n'.encode()
    lines = []
    for i in range(0, len(record), 7):  # cuts inside the JSON and inside the two-byte 'ü'
        lines += splitter.feed(record[i:i + 7])
    lines += splitter.feed(b"log one\r\nbar 10%|#  |\rbar 20%|##  |\r\n\nlast without newline")
    assert lines[0] == record.decode().strip() and json.loads(lines[0])["message"] == "über"
    assert lines[1:] == ["log one", "bar 10%|#  |", "bar 20%|##  |"]
    assert splitter.flush() == ["last without newline"]
    assert splitter.flush() == []


def test_error_message_from_output(mod):
    stderr = ["loading", "medclipsam: error: volume 'x.nrrd' has NaN voxels", ""]
    assert modeljobs.errorMessageFromOutput(stderr, 2) == "volume 'x.nrrd' has NaN voxels"
    traceback = ["Traceback (most recent call last):", '  File "a.py", line 1', "ImportError: cannot import x"]
    assert "ImportError: cannot import x" in modeljobs.errorMessageFromOutput(traceback, 1)
    assert "memory" in modeljobs.errorMessageFromOutput([], -9)
    assert "exit code 3" in modeljobs.errorMessageFromOutput([], 3)


def test_gpu_query_parsing_and_device_text(mod):
    gpus = devices.parseNvidiaSmi("NVIDIA RTX A6000, 40000, 49140\nbad line\nTesla T4, 2000, 15360\n")
    assert gpus == [{"name": "NVIDIA RTX A6000", "freeMiB": 40000, "totalMiB": 49140},
                    {"name": "Tesla T4", "freeMiB": 2000, "totalMiB": 15360}]
    text, warning = devices.describeDevice("auto", gpus)
    assert "RTX A6000" in text and not warning
    text, warning = devices.describeDevice("cuda", gpus[1:])
    assert "T4" in text and warning
    assert devices.describeDevice("cuda", [])[1]
    assert not devices.describeDevice("mps", [], appleSilicon=True)[1]
    assert devices.describeDevice("mps", [])[1]
    assert "CPU" in devices.describeDevice("cpu", [])[0]
    assert isinstance(devices.queryGpus(), list)  # no nvidia-smi here: an empty list


def test_environment_puts_the_shipped_library_first(mod):
    env = mod.MedCLIPSAMLogic().environment()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)  # the shipped MedCLIPSAMLib comes first


def test_model_commands_are_accepted_by_the_real_parser(mod):
    """The setup's model commands (verify, verify --adopt, download) parse with `medclipsam`'s own parser."""
    from MedCLIPSAMLib.cli import build_parser

    parser = build_parser()
    cli = [sys.executable, "-m", "MedCLIPSAMLib"]
    for action, extra in (("verify", ()), ("verify", ("--adopt",)), ("download", ())):
        args = parser.parse_args(modeljobs.command(cli, action, "biomedclip", *extra)[3:])
        assert args.command == "models" and "biomedclip" in json.dumps(vars(args), default=str)
        assert ("--adopt" in extra) == bool(getattr(args, "adopt", False))


def test_prompt_suggestions_from_shipped_and_odd_files(mod, tmp_path):
    shipped = prompts.promptSuggestions()
    assert shipped and "brain tumor" in shipped and len(shipped) == len(set(shipped))
    (tmp_path / "a.json").write_text(json.dumps({"targets": {"liver": {"sentences": ["a liver"]}}}))
    (tmp_path / "b.json").write_text(json.dumps({"spleen": ["the spleen"], "$schema": {}, "version": 1}))
    (tmp_path / "c.json").write_text(json.dumps([{"name": "lung"}, {"target": "liver"}, "x"]))
    (tmp_path / "broken.json").write_text("{not json")
    files = [str(tmp_path / n) for n in ("a.json", "b.json", "c.json", "broken.json", "missing.json")]
    assert prompts.promptSuggestions(files) == ["liver", "spleen", "lung"]
    assert prompts.promptSuggestions([]) == []


def test_python_packages_cover_pyproject(mod):
    """Setup installs what the CLI needs: every runtime dependency of pyproject.toml is in the list."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", d)[0].lower().replace("_", "-") for d in project["dependencies"]}
    listed = {distribution.lower().replace("_", "-") for _m, distribution, _v in dependencies.PYTHON_PACKAGES}
    assert names - listed == set()
    assert dependencies.missingPackages() == []  # this venv has them all, new enough


def test_required_models(mod):
    required = modeljobs.requiredModels
    assert required("tiny-random") == [] and required("random-biomedclip") == []
    from MedCLIPSAMLib.models import DEFAULT_CLIP, DEFAULT_SAM2

    assert required("") == [DEFAULT_CLIP, DEFAULT_SAM2]
    assert required("/some/folder,sam2.1-hiera-tiny") == ["sam2.1-hiera-tiny"]


# ------------------------------------------------------- a finished run's files into the scene
@pytest.fixture
def fake(tmp_path, mod, scene):
    """A logic on a real scene with a phantom volume, and the files a finished run hands to the scene."""
    from MedCLIPSAMLib import io, mrml

    phantom = small_phantom()
    volume = mrml.volume_node_from_sitk(scene, phantom.image, "phantom")

    def seg_file(name, masks):
        path = tmp_path / name
        io.write_segmentation(str(path), [{"name": n, "mask": m} for n, m in masks.items()], phantom.image)
        return str(path)

    uncertainty = sitk.GetImageFromArray(np.linspace(0, 1, int(np.prod(phantom.image.GetSize())),
                                                     dtype=np.float32).reshape(phantom.image.GetSize()[::-1]))
    uncertainty.CopyInformation(phantom.image)
    sitk.WriteImage(uncertainty, str(tmp_path / "unc.nrrd"))

    class Fake:
        pass

    f = Fake()
    f.logic, f.scene, f.volume, f.phantom, f.seg_file = mod.MedCLIPSAMLogic(scene=scene), scene, volume, phantom, seg_file
    f.tmp, f.uncertainty, f.source, f.runs = tmp_path, str(tmp_path / "unc.nrrd"), None, 0
    return f


def finished_run(fake, prompts, node=None, run=0, evidence=True, show3D=False):
    """What a zero-shot job ends with (jobs.importRun, as ServiceJob calls it): the segmentation, the
    uncertainty, and the evidence named and shaped as `segment` writes it (each run its own numbers)."""
    from MedCLIPSAMLib import evidence as ev
    from MedCLIPSAMModuleLib import results as jobs

    fake.runs += 1
    folder = fake.tmp / f"run{fake.runs}"
    folder.mkdir()
    saliency = report = None
    if evidence:
        saliency, report = str(folder / "saliency.nrrd"), str(folder / "report.json")
        files = ev.saliency_paths(saliency, prompts)
        for f in files:
            shutil.copy(fake.uncertainty, f)  # a [0, 1] map on the input's grid
        entries = [{"prompt": p, "axis": "axial", "slices": 8, "scored": list(range(1, 8)),
                    "similarity": [0.1 * (k + run) for k in range(7)], "lead": None,
                    "kept_slices": [2 + run, 3 + run], "key_slices": [3 + run],
                    "saliency_slices": [3 + run], "mask_slices": [2 + run, 3 + run], "found": i == 0,
                    "why": "no slice kept", "absent_winner": None, "voxels": 120, "volume_ml": 1.25 + run,
                    "mean_uncertainty": 0.2, "mode": "carry"} for i, p in enumerate(prompts)]
        ev.write_report(report, ev.report_document(entries, {"clip": "fake", "sam": None, "random": True}, files,
                                                   source="input.nrrd", output=fake.source))
    result = jobs.importRun(fake.logic, fake.volume, node, fake.source, fake.uncertainty, show3D, 1.0,
                            "wrote " + ", ".join(prompts), saliency, report)
    assert result.succeeded, result.message
    fake.report = report
    return result


def register_conversion_rules():
    """What Slicer's Segmentations module does at startup (slicer-core leaves the factory empty)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def exported_masks(scene, node, volume):
    from MedCLIPSAMLib import mrml

    segmentation = node.GetSegmentation()
    out = {}
    for name in mrml.segment_names(node):
        labelmap = mrml.export_segments_to_labelmap(
            scene, node, volume, labelmap_node=scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"),
            segment_ids=[segmentation.GetSegmentIdBySegmentName(name)])
        out[name] = sitk.GetArrayFromImage(mrml.sitk_image_from_volume_node(labelmap)) > 0
    return out


def test_a_run_s_files_are_imported_into_the_scene(fake):
    register_conversion_rules()
    labels = fake.phantom.labels
    fake.source = fake.seg_file("a.seg.nrrd", {"brain": labels["brain"], "tumor": labels["tumor"]})
    result = finished_run(fake, ["brain", "tumor"], evidence=False, show3D=True)
    assert result.message == "wrote brain, tumor"
    node = result.segmentationNode
    from MedCLIPSAMLib import mrml

    assert mrml.segment_names(node) == ["brain", "tumor"]
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is fake.volume
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")  # shown in 3D
    masks = exported_masks(fake.scene, node, fake.volume)
    np.testing.assert_array_equal(masks["brain"], labels["brain"] > 0)
    np.testing.assert_array_equal(masks["tumor"], labels["tumor"] > 0)
    assert result.uncertaintyVolumeNode is not None
    assert result.uncertaintyVolumeNode.GetImageData().GetDimensions() == fake.phantom.image.GetSize()


def test_logic_rerun_into_the_same_node(fake):
    labels = fake.phantom.labels
    fake.source = fake.seg_file("a.seg.nrrd", {"brain": labels["brain"], "tumor": labels["tumor"]})
    first = finished_run(fake, ["brain", "tumor"], evidence=False)
    node = first.segmentationNode
    counts = {c: fake.scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLSegmentationNode",)}
    grown = labels["tumor"] | labels["ventricles"]
    fake.source = fake.seg_file("b.seg.nrrd", {"tumor": grown, "ventricles": labels["ventricles"]})
    second = finished_run(fake, ["tumor", "ventricles"], node, evidence=False)
    assert second.succeeded and second.segmentationNode is node
    from MedCLIPSAMLib import mrml

    assert mrml.segment_names(node) == ["brain", "tumor", "ventricles"]
    assert {c: fake.scene.GetNumberOfNodesByClass(c) for c in counts} == counts
    masks = exported_masks(fake.scene, node, fake.volume)
    np.testing.assert_array_equal(masks["tumor"], grown > 0)
    np.testing.assert_array_equal(masks["brain"], labels["brain"] > 0)


# ------------------------------------------------------------------- the run's evidence (issue 21)
def slice_views(scene):
    """What a three-view layout holds: slice nodes and their composite nodes (slicer-core has no orientation
    presets: every view keeps the default plane, which is enough to see it move)."""
    for name in ("Red", "Yellow", "Green"):
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        node.SetName(name)
        node.SetLayoutName(name)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def evidence_run(fake, prompts, node=None, run=0):
    return finished_run(fake, prompts, node, run)


def test_evidence_is_imported_replaced_on_re_runs_shown_and_removed(fake):
    """Three runs on one volume and segmentation: one set of evidence nodes, the report on the result is
    the file the run wrote, a summary per prompt, saliency on the input's grid and not shown; the overlays
    toggle the views' foreground, a chart point moves the slice views, and removing the segmentation
    removes its evidence."""
    from MedCLIPSAMLib import evidence_mrml, mrml
    from MedCLIPSAMModuleLib import evidenceview

    composites = slice_views(fake.scene)
    fake.source = fake.seg_file("a.seg.nrrd", {"brain": fake.phantom.labels["brain"],
                                               "tumor": fake.phantom.labels["tumor"]})
    view = evidenceview.EvidenceView(fake.scene)
    first = evidence_run(fake, ["brain", "tumor"])
    node = first.segmentationNode
    view.setResult(first)
    chart = view.chartNode()  # the chart made once: re-runs update it
    after_first = node_ids(fake.scene)
    for run in (1, 2):
        result = evidence_run(fake, ["brain", "tumor"], node, run=run)
        assert result.segmentationNode is node and node_ids(fake.scene) == after_first  # no extra nodes
        assert result.report == json.loads(Path(fake.report).read_text())
        assert result.report["prompts"][0]["key_slices"] == [3 + run]
        assert list(result.summaries) == ["brain", "tumor"]
        assert result.summaries["brain"] == f"found on slices {2 + run}-{3 + run}, 2 of 8; {1.25 + run:.1f} ml"
        assert result.summaries["tumor"] == "not found: no slice kept"
        assert [result.saliencyVolumeNodes[p] for p in ("brain", "tumor")] == [
            first.saliencyVolumeNodes[p] for p in ("brain", "tumor")]
        view.setResult(result)
    assert view.summaryLines() == [f"brain: {result.summaries['brain']}", f"tumor: {result.summaries['tumor']}"]
    assert view.chartNode() is chart and node_ids(fake.scene) == after_first
    similarity = chart.GetNthPlotSeriesNode(1).GetTableNode().GetTable().GetColumnByName("similarity")
    assert similarity.GetValue(0) == pytest.approx(0.2)  # the last run's numbers (run=2)

    expected = mrml.ijk_to_ras_from_node(fake.volume)
    for saliency in result.saliencyVolumeNodes.values():
        np.testing.assert_allclose(mrml.ijk_to_ras_from_node(saliency), expected, atol=1e-9)
        assert saliency.GetImageData().GetDimensions() == fake.volume.GetImageData().GetDimensions()
    assert {c.GetForegroundVolumeID() for c in composites} == {None}  # loaded, not shown

    # the checkboxes: one heat map in the foreground at a time, for the chosen prompt
    assert view.setOverlay("saliency", True)
    assert {c.GetForegroundVolumeID() for c in composites} == {result.saliencyVolumeNodes["brain"].GetID()}
    view.setPrompt("tumor")
    assert {c.GetForegroundVolumeID() for c in composites} == {result.saliencyVolumeNodes["tumor"].GetID()}
    assert view.setOverlay("uncertainty", True) and not view.overlayShown("saliency")
    assert {c.GetForegroundVolumeID() for c in composites} == {result.uncertaintyVolumeNode.GetID()}
    assert not view.setOverlay("uncertainty", False)
    assert {c.GetForegroundVolumeID() for c in composites} == {None}

    # a chosen point of the key-slice series: the views go to that slice
    view.setPrompt("brain")
    chart = view.chartNode()
    key = chart.GetNthPlotSeriesNode(chart.GetNumberOfPlotSeriesNodes() - 1)
    red = fake.scene.GetFirstNodeByName("Red")
    before = [red.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
    assert view.jumpToSelection([key.GetID()], [[0]]) == 5
    target = evidence_mrml.slice_center_ras(result.saliencyVolumeNodes["brain"], "axial", 5)
    slice_to_ras = red.GetSliceToRAS()
    normal = np.array([slice_to_ras.GetElement(r, 2) for r in range(3)])
    origin = np.array([slice_to_ras.GetElement(r, 3) for r in range(3)])
    assert abs(normal @ (target - origin)) < 1e-6 and not np.allclose(origin, before)
    assert view.jumpToPlotPoint(key.GetID(), 7) is None  # no such point
    assert view.jumpToPlotPoint(fake.volume.GetID(), 0) is None  # not one of our series

    # a run with one prompt drops the other's evidence
    view.setOverlay("saliency", True)
    single = evidence_run(fake, ["tumor"], node, run=1)
    assert list(single.summaries) == ["tumor"] and list(single.saliencyVolumeNodes) == ["tumor"]
    assert {n.GetAttribute(evidence_mrml.PROMPT_ATTRIBUTE) for n in evidence_mrml.evidence_nodes(node)} == {"tumor"}
    assert not fake.scene.IsNodePresent(result.saliencyVolumeNodes["brain"]) and not fake.scene.IsNodePresent(chart)
    assert {c.GetForegroundVolumeID() for c in composites} == {None}  # the removed overlay left the views

    # removing the segmentation removes its evidence (the uncertainty volume stays, as before)
    removed = []
    cleaner = evidenceview.EvidenceCleaner(removed.append)
    cleaner.attach(fake.scene)
    remaining = [n.GetID() for n in evidence_mrml.evidence_nodes(node)]
    assert remaining
    fake.scene.RemoveNode(node)
    assert not any(fake.scene.GetNodeByID(i) for i in remaining) and removed == [node.GetID()]
    assert fake.scene.IsNodePresent(single.uncertaintyVolumeNode)
    cleaner.detach()


def test_evidence_files_from_a_service_and_unreadable_ones(fake, tmp_path):
    """importRun (what every backend calls) takes the saliency as the base path, a list or a dict; a
    report that cannot be read leaves the segmentation imported and the evidence out."""
    from MedCLIPSAMLib import evidence
    from MedCLIPSAMModuleLib import results as jobs

    seg = fake.seg_file("a.seg.nrrd", {"brain": fake.phantom.labels["brain"]})
    saliency = str(tmp_path / "unc.nrrd")
    entry = {"prompt": "brain", "axis": "axial", "slices": 8, "scored": [1, 2], "similarity": [0.1, 0.2],
             "lead": None, "kept_slices": [2], "key_slices": [2], "saliency_slices": [2], "mask_slices": [2],
             "found": True, "why": "", "absent_winner": None, "voxels": 3, "volume_ml": 0.5, "mode": "carry"}
    report = evidence.write_report(str(tmp_path / "r.json"), evidence.report_document([entry], {}, [saliency]))
    node = None
    for paths in (saliency, [saliency], {"brain": saliency}):
        result = jobs.importRun(fake.logic, fake.volume, node, seg, saliencyPaths=paths, reportPath=report)
        node = result.segmentationNode
        assert result.succeeded and list(result.saliencyVolumeNodes) == ["brain"]
        assert result.summaries == {"brain": "found on slice 2 of 8; 0.5 ml"}
    for bad in ("{not json", '{"prompts": [{"prompt": "brain"}]}', '{"prompts": 3}'):
        (tmp_path / "bad.json").write_text(bad)
        result = jobs.importRun(fake.logic, fake.volume, node, seg, saliencyPaths=saliency,
                                reportPath=str(tmp_path / "bad.json"))
        assert result.succeeded and result.report is None and result.summaries == {}
    assert result.saliencyVolumeNodes == {}  # no prompts to name the file by: the old overlay goes too
    from MedCLIPSAMLib import evidence_mrml

    assert evidence_mrml.evidence_nodes(node) == []


def test_logic_refuses_bad_input(fake):
    with pytest.raises(ValueError):
        fake.logic.startSegmentation(fake.volume, " \n ")
    with pytest.raises(ValueError):
        fake.logic.startSegmentation(None, "brain")


# ------------------------------------------------------------------- the module self-test
@pytest.mark.slow
def test_module_self_test_with_the_real_service(mod, monkeypatch, tmp_path):
    """MedCLIPSAMTest, the test Slicer runs: tiny-random models on a phantom through the local service
    (names, geometry, labelmap export, re-run, cancel, clicks), then training at the service on two
    phantoms (chart, the service's listing) and a prediction with the trained model through it."""
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    test = mod.MedCLIPSAMTest()
    test.runTest()


# --------------------------------------------------------------------------------------- packaging
def _extension_fields():
    fields = {}
    for line in (REPO / "MedCLIPSAM.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def _cmake_variable(name):
    match = re.search(rf'set\({name} "((?:[^"\\]|\\.)*)"\)', (REPO / "CMakeLists.txt").read_text())
    return match.group(1) if match else None


def test_extension_description_is_complete_and_consistent():
    fields = _extension_fields()
    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "enabled", "tier", "keywords"):
        assert fields.get(key), f"{key} is empty in MedCLIPSAM.s4ext"
    assert "screenshoturls" in fields  # may be empty: every URL listed must exist (test_slicer_defects)
    assert fields["scm"] == "git" and fields["depends"] == "PyTorch"
    assert fields["homepage"] == _cmake_variable("EXTENSION_HOMEPAGE")
    assert fields["iconurl"] == _cmake_variable("EXTENSION_ICONURL")
    assert fields["screenshoturls"] == _cmake_variable("EXTENSION_SCREENSHOTURLS")
    assert fields["description"] == _cmake_variable("EXTENSION_DESCRIPTION").replace('\\"', '"')
    assert fields["category"] == _cmake_variable("EXTENSION_CATEGORY")
    assert _cmake_variable("EXTENSION_DEPENDS") == "PyTorch"
    # the icon URL points at the file in this repository
    raw_prefix = fields["homepage"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert fields["iconurl"].startswith(raw_prefix)
    assert (REPO / fields["iconurl"][len(raw_prefix):]).is_file()
    assert all(url.startswith(raw_prefix) for url in fields["screenshoturls"].split())

    # the ExtensionsIndex entry (schema v1.0.1: only these keys are allowed)
    entry = json.loads((REPO / "MedCLIPSAM.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["scm_url"] == fields["scmurl"] and entry["category"] == fields["category"]
    assert entry["build_dependencies"] == ["PyTorch"] and 1 <= entry["tier"] <= 5


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(REPO / "Resources" / "Icons" / "MedCLIPSAM.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


FAKE_SLICER_CONFIG = textwrap.dedent('''
    # Stand-in for Slicer's build tree: enough variables and macros for the extension to configure,
    # recording what slicerMacroBuildScriptedModule is given.
    set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
    set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
    set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
    set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
    set(Slicer_FOUND TRUE)
    macro(slicerMacroBuildScriptedModule)
      cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
      file(WRITE ${CMAKE_BINARY_DIR}/module.txt "NAME=${MY_NAME}\\n")
      foreach(f ${MY_SCRIPTS})
        # as ctkMacroCompilePythonScript: relative to the module folder, absolute ones relative to the build folder
        if(IS_ABSOLUTE ${f})
          file(RELATIVE_PATH t ${CMAKE_CURRENT_BINARY_DIR} ${f})
          set(src ${f})
        else()
          set(t ${f})
          set(src ${CMAKE_CURRENT_SOURCE_DIR}/${f})
        endif()
        if(NOT EXISTS ${src})
          message(FATAL_ERROR "missing script ${src}")
        endif()
        file(APPEND ${CMAKE_BINARY_DIR}/module.txt "SCRIPT=${t}\\n")
      endforeach()
      foreach(f ${MY_RESOURCES})
        file(APPEND ${CMAKE_BINARY_DIR}/module.txt "RESOURCE=${f}\\n")
      endforeach()
    endmacro()
    macro(slicer_add_python_unittest)
    endmacro()
''')


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_with_a_stand_in_slicer(tmp_path):
    slicer_dir = tmp_path / "Slicer"
    slicer_dir.mkdir()
    (slicer_dir / "SlicerConfig.cmake").write_text(FAKE_SLICER_CONFIG)
    (slicer_dir / "empty.cmake").write_text("")
    build = tmp_path / "build"
    done = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={slicer_dir}",
                           "-DBUILD_TESTING=OFF"], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "No CMAKE_C_COMPILER could be found" in done.stderr + done.stdout:
        pytest.skip("no C compiler for CMake's project() check")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    recorded = (build / "module.txt").read_text().splitlines()
    assert recorded[0] == "NAME=MedCLIPSAM"
    scripts = {line.split("=", 1)[1] for line in recorded if line.startswith("SCRIPT=")}
    library = {str(p.relative_to(REPO)) for p in (REPO / "MedCLIPSAMLib").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert "MedCLIPSAM.py" in scripts and library <= scripts and "MedCLIPSAMLib/mrml.py" in scripts
    module_lib = {str(p.relative_to(MODULE_FILE.parent)) for p in (MODULE_FILE.parent / "MedCLIPSAMModuleLib").rglob("*.py")
                  if "__pycache__" not in p.parts}   # panels/ included
    assert module_lib and module_lib <= scripts  # every file of the module's own package is registered
    assert all(not s.startswith("..") for s in scripts)  # everything lands inside the module folder
    # data files copied beside the module, where resourcePath() finds them in an installed extension
    module_dir = build / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for relative in ("Resources/UI/MedCLIPSAM.ui", "Resources/Icons/MedCLIPSAM.png",
                     "MedCLIPSAMLib/resources/prompt_ensembles.json"):
        assert (module_dir / relative).is_file(), relative
