"""The `medclipsam` command lines the panel runs (lists: no shell, prompts passed verbatim). Each takes
the CLI's prefix (`[python, "-m", "MedCLIPSAMLib"]`); a test parses every one with the CLI's own parser."""

import os

from .i18n import tr as _
from .prompts import cleanPrompts

PRESETS = ("v1", "v2", "fast")
AXES = ("axial", "coronal", "sagittal")
DEVICES = ("auto", "cuda", "mps", "cpu")
DIMS = (2, 3)


def _check(preset="v2", axis="axial", device="auto"):
    if preset not in PRESETS or axis not in AXES or device not in DEVICES:
        raise ValueError(_("Unknown preset, axis or device: {values}").format(values=(preset, axis, device)))


def segment(cli, inputPath, outputPath, prompts, preset="v2", axis="axial", device="auto", models="",
            uncertaintyPath=None, absentIf="", saliencyPath=None, reportPath=None):
    """`medclipsam segment VOLUME --prompt P... --output OUT`. saliencyPath / reportPath: the run's evidence
    (`--saliency-output`: S.nrrd for one prompt, S_<prompt>.nrrd each for several; `--report-output`)."""
    prompts = cleanPrompts(prompts)
    if not prompts:
        raise ValueError(_("Enter at least one prompt (one target per line)."))
    _check(preset, axis, device)
    command = list(cli) + ["segment", os.fspath(inputPath)]
    for prompt in prompts:
        command += ["--prompt", prompt]
    command += ["--output", os.fspath(outputPath), "--preset", preset, "--axis", axis, "--device", device,
                "--progress", "json"]
    # every core but one: Slicer's own window stays responsive while the run computes
    command += ["--threads", str(max(1, (os.cpu_count() or 2) - 1))]
    if models and models.strip():
        command += ["--models", models.strip()]
    if uncertaintyPath:
        command += ["--uncertainty-output", os.fspath(uncertaintyPath)]
    if absentIf and absentIf.strip():
        command += ["--absent-if", absentIf.strip()]
    if saliencyPath:
        command += ["--saliency-output", os.fspath(saliencyPath)]
    if reportPath:
        command += ["--report-output", os.fspath(reportPath)]
    return command


def predict(cli, modelDir, inputPath, outputPath, device="auto", uncertaintyPath=None):
    """`medclipsam predict MODEL_DIR VOLUME` for a train-weak model (segments named by its labels)."""
    _check(device=device)
    command = list(cli) + ["predict", os.fspath(modelDir), os.fspath(inputPath), "--output", os.fspath(outputPath),
                           "--device", device, "--progress", "json"]
    if uncertaintyPath:
        command += ["--uncertainty-output", os.fspath(uncertaintyPath)]
    return command


def medclipsegPredict(cli, modelDir, inputPath, prompt, outputPath, device="auto", uncertaintyPath=None,
                      samples=None):
    """`medclipsam medclipseg predict MODEL_DIR VOLUME --prompt P` (the CLI takes one prompt a run)."""
    prompts = cleanPrompts([prompt])
    if len(prompts) != 1:
        raise ValueError(_("Enter at least one prompt (one target per line)."))
    _check(device=device)
    command = list(cli) + ["medclipseg", "predict", os.fspath(modelDir), os.fspath(inputPath), "--prompt", prompts[0],
                           "--output", os.fspath(outputPath), "--device", device, "--progress", "json"]
    if uncertaintyPath:
        command += ["--uncertainty-output", os.fspath(uncertaintyPath)]
    if samples is not None:
        command += ["--samples", str(int(samples))]
    return command


def pseudoLabel(cli, dataPaths, outputDir, prompts, preset="v2", axis="axial", device="auto", models="",
                extraArgs=()):
    """`medclipsam pseudo-label DATA... --prompt P... --output-dir DIR` (zero-shot masks as labels)."""
    prompts = cleanPrompts(prompts)
    if not prompts:
        raise ValueError(_("Enter at least one prompt for weak supervision (one target per line)."))
    _check(preset, axis, device)
    command = list(cli) + ["pseudo-label"] + [os.fspath(d) for d in dataPaths]
    for prompt in prompts:
        command += ["--prompt", prompt]
    command += ["--output-dir", os.fspath(outputDir), "--preset", preset, "--axis", axis, "--device", device,
                "--progress", "json"]
    if models and models.strip():
        command += ["--models", models.strip()]
    return command + [str(a) for a in extraArgs]


def trainWeak(cli, images, labels, modelDir, labelNames, epochs=50, dims=2, axis="axial", device="auto",
              snapshots=None, batchSize=None, baseFilters=None, samplesPerEpoch=None, patchSize=None, extraArgs=()):
    """`medclipsam train-weak --images ... --labels ... --output MODEL_DIR` (labels named by the prompts)."""
    epochs, dims = int(epochs), int(dims)
    if epochs < 1:
        raise ValueError(_("Train for at least one epoch."))
    if dims not in DIMS or axis not in AXES or device not in DEVICES:
        raise ValueError(_("Unknown dimensions, axis or device: {values}").format(values=(dims, axis, device)))
    # the CLI's default of 5 snapshots needs at least 5 epochs
    snapshots = min(5, epochs) if snapshots is None else int(snapshots)
    command = list(cli) + ["train-weak", "--images", os.fspath(images), "--labels", os.fspath(labels), "--output",
                           os.fspath(modelDir), "--epochs", str(epochs), "--dims", str(dims), "--axis", axis,
                           "--device", device, "--snapshots", str(snapshots), "--progress", "json"]
    for name in cleanPrompts(labelNames):
        command += ["--label-name", name]
    for flag, value in (("--batch-size", batchSize), ("--base-filters", baseFilters),
                        ("--samples-per-epoch", samplesPerEpoch)):
        if value is not None:
            command += [flag, str(int(value))]
    if patchSize:
        command += ["--patch-size"] + [str(int(v)) for v in patchSize]
    return command + [str(a) for a in extraArgs]


def models(cli, action, name=None, *extra):
    """`medclipsam models ACTION [NAME] [flags]` (verify, download; verify --adopt)."""
    return list(cli) + ["models", action] + ([name] if name else []) + list(extra)
