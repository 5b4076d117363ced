"""A finished run's files into the scene: segments into one segmentation node (named by the prompts,
on the input volume's grid), and the uncertainty map as a volume."""

import os

from .paths import mrml


def importResult(scene, segmentationPath, inputVolume, segmentationNode=None, uncertaintyPath=None, show3D=False,
                 terminologiesLogic=None):
    """(segmentation node, segment IDs, uncertainty node)."""
    lib = mrml()
    imported = lib.import_segmentation_file(scene, segmentationPath, inputVolume, segmentationNode,
                                            replace_existing=True, terminologies_logic=terminologiesLogic)
    node, segmentIds = imported["node"], list(imported["segment_ids"])
    if show3D:
        node.CreateClosedSurfaceRepresentation()
    uncertainty = None
    if uncertaintyPath and os.path.isfile(uncertaintyPath):
        uncertainty = lib.load_uncertainty_volume(scene, uncertaintyPath, node)
    return node, segmentIds, uncertainty


def _evidenceLib():
    from .paths import useShippedLibrary

    useShippedLibrary()
    from MedCLIPSAMLib import evidence, evidence_mrml

    return evidence, evidence_mrml


def saliencyFiles(saliencyPaths, prompts):
    """{prompt: file} from what a run was given or returned: the --saliency-output path itself (S.nrrd for
    one prompt, S_<prompt>.nrrd each for several, as the CLI names them), a list in prompt order, or a
    dict. Files that do not exist are left out."""
    evidence, _ = _evidenceLib()
    if not saliencyPaths:
        return {}
    if isinstance(saliencyPaths, dict):
        files = dict(saliencyPaths)
    elif isinstance(saliencyPaths, (str, os.PathLike)):
        files = dict(zip(prompts, evidence.saliency_paths(saliencyPaths, list(prompts)))) if prompts else {}
    elif len(saliencyPaths) == len(prompts):
        files = dict(zip(prompts, saliencyPaths))
    elif len(saliencyPaths) == 1:  # the base path in a list
        return saliencyFiles(saliencyPaths[0], prompts)
    else:
        files = {}
    return {p: os.fspath(f) for p, f in files.items() if f and os.path.isfile(f)}


def importEvidence(scene, segmentationNode, uncertaintyNode=None, saliencyPaths=None, reportPath=None):
    """A run's evidence onto its segmentation node: (report dict or None, {prompt: summary line},
    {prompt: saliency volume node}).

    The nodes replace the previous run's on the same segmentation node: a prompt's saliency volume and
    chart are refilled, those of prompts this run did not have are removed (charts are made when first
    shown; an existing one is updated). The uncertainty volume is styled as the same heat map (entropy in
    bits: 0..1). Volumes are loaded but not shown. A report or file that cannot be read is logged and
    skipped: the old evidence goes, so nothing shown describes another run."""
    import logging

    evidence, evidence_mrml = _evidenceLib()
    if uncertaintyNode is not None:
        evidence_mrml.style_heat_map(scene, uncertaintyNode)
    report, summaries = None, {}
    if reportPath and os.path.isfile(reportPath):
        try:
            report = evidence.read_report(reportPath)
            summaries = {e["prompt"]: e.get("summary") or evidence.summary_line(e) for e in report["prompts"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logging.warning(f"MedCLIP-SAM: the run's report '{reportPath}' cannot be read: {exc}")
            report, summaries = None, {}
    entries = report["prompts"] if report else []
    prompts = [e["prompt"] for e in entries]
    if not prompts and isinstance(saliencyPaths, dict):
        prompts = list(saliencyPaths)

    files = saliencyFiles(saliencyPaths, prompts)
    saliency = {}
    for prompt, path in files.items():
        try:
            saliency[prompt] = evidence_mrml.load_evidence_volume(scene, path, segmentationNode, prompt)
        except Exception as exc:  # an unreadable file: no overlay for this prompt
            logging.warning(f"MedCLIP-SAM: the saliency file '{path}' cannot be loaded: {exc}")
    # what is left of an earlier run: prompts this run did not have, saliency this run did not bring, and
    # charts without this run's numbers
    for node in evidence_mrml.evidence_nodes(segmentationNode):
        if not scene.IsNodePresent(node):
            continue
        prompt = node.GetAttribute(evidence_mrml.PROMPT_ATTRIBUTE)
        kind = node.GetAttribute(evidence_mrml.KIND_ATTRIBUTE)
        if (kind == "saliency" and prompt not in saliency) or (kind != "saliency" and prompt not in summaries):
            evidence_mrml.remove_evidence(scene, segmentationNode, prompt, kind)
    # a chart already made (shown after an earlier run) follows this run's numbers
    for entry in entries:
        if evidence_mrml.evidence_nodes(segmentationNode, entry["prompt"], "chart"):
            try:
                evidence_mrml.update_evidence_chart(scene, segmentationNode, entry)
            except (KeyError, TypeError, ValueError) as exc:  # a report without the chart's numbers
                logging.warning(f"MedCLIP-SAM: no chart for '{entry['prompt']}': {exc}")
                evidence_mrml.remove_evidence(scene, segmentationNode, entry["prompt"], "chart")
    return report, summaries, saliency
