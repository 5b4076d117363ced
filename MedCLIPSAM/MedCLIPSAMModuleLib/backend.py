"""Where segmentation runs. LocalProcessBackend: the CLI as a child process of Slicer's Python, on this
computer (trained models, the "off" service setting, a Slicer without fastapi / uvicorn). The Logic calls
only startSegmentation(); ServiceBackend (servicebackend.py) has the same signature and returns a job with
the same surface (poll/wait/cancel, a SegmentationResult); servicebackend.useService() chooses."""

import logging
import os
import shutil

from . import commands
from .i18n import tr as _
from .jobs import SegmentationJob
from .paths import mrml
from .process import BackgroundProcess, ProcessChain
from .prompts import cleanPrompts
from . import trained


class LocalProcessBackend:
    def __init__(self, logic):
        self.logic = logic  # cliCommand(), environment(), temporaryDirectory(), importResult()

    def startSegmentation(self, inputVolume, prompts, segmentationNode=None, preset="v2", axis="axial",
                          device="auto", models="", computeUncertainty=False, show3D=False, progressCallback=None,
                          logCallback=None, completedCallback=None, trainedModel=None, samples=None, absentIf=""):
        """Write the input, start the process, return a SegmentationJob.

        trainedModel: a registered model instead of the zero-shot preset. A weak-supervision model
        segments what it was trained on (its labels; prompts are not needed); a MedCLIPSeg model runs
        once per prompt (its first training prompt when none is given), the results merged into one
        segmentation. samples: MedCLIPSeg's stochastic passes. absentIf: sentences ('|' between) that
        describe a slice without the target (zero-shot only).
        """
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError(_("Select an input volume that has image data."))
        prompts = cleanPrompts(prompts)
        entry = trained.usable(trainedModel) if trainedModel else None
        if entry is not None and entry["kind"] == "weak":
            prompts = list(entry["labels"])
        elif entry is not None and not prompts:
            prompts = list(entry["labels"][:1])
        tempDir = self.logic.temporaryDirectory()
        try:
            inputPath = os.path.join(tempDir, "input.nrrd")
            chain, outputs, uncertainties = self.commands(entry, inputPath, tempDir, prompts, preset, axis, device,
                                                          models, computeUncertainty, samples, absentIf)
            saliency, report = self.evidencePaths(entry, tempDir)
            mrml().write_volume_node(inputVolume, inputPath)
            for command in chain:
                logging.info("MedCLIP-SAM: running " + " ".join(command))
            env = self.logic.environment()
            if len(chain) == 1:
                process = BackgroundProcess(chain[0], env=env, cwd=tempDir)
                outputs = outputs[0]
                uncertainties = uncertainties[0] if uncertainties else None
            else:
                process = ProcessChain(chain, env=env, cwd=tempDir)
            process.start()
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return SegmentationJob(self.logic, process, tempDir, inputVolume, prompts, segmentationNode, outputs,
                               uncertainties, show3D, progressCallback, logCallback, completedCallback,
                               saliencyPath=saliency, reportPath=report)

    @staticmethod
    def evidencePaths(entry, tempDir):
        """(saliency, report) paths in the run's folder for a zero-shot run, else (None, None). Always
        asked for: the saliency maps are those the run computes anyway (kept, not recomputed), and the report
        is a few kB; the cost is one float32 volume the size of the input per prompt, on disk (compressed,
        mostly zeros) and in the scene once loaded."""
        if entry is not None:  # trained models write no saliency or report
            return None, None
        return os.path.join(tempDir, "saliency.nrrd"), os.path.join(tempDir, "report.json")

    def commands(self, entry, inputPath, tempDir, prompts, preset, axis, device, models, computeUncertainty,
                 samples, absentIf=""):
        """(commands, output paths, uncertainty paths) for the zero-shot pipeline or a trained model."""
        cli = self.logic.cliCommand()

        def paths(k):
            output = os.path.join(tempDir, f"output-{k}.seg.nrrd")
            return output, (os.path.join(tempDir, f"uncertainty-{k}.nrrd") if computeUncertainty else None)

        if entry is None or entry["kind"] == "weak":
            output, uncertainty = paths(0)
            if entry is None:
                saliency, report = self.evidencePaths(entry, tempDir)
                command = commands.segment(cli, inputPath, output, prompts, preset, axis, device, models, uncertainty,
                                           absentIf, saliency, report)
            else:
                command = commands.predict(cli, entry["folder"], inputPath, output, device, uncertainty)
            return [command], [output], [uncertainty] if uncertainty else []
        if not prompts:
            raise ValueError(_("Enter at least one prompt (one target per line)."))
        chain, outputs, uncertainties = [], [], []
        for k, prompt in enumerate(prompts):
            output, uncertainty = paths(k)
            chain.append(commands.medclipsegPredict(cli, entry["folder"], inputPath, prompt, output, device,
                                                    uncertainty, samples))
            outputs.append(output)
            uncertainties += [uncertainty] if uncertainty else []
        return chain, outputs, uncertainties
