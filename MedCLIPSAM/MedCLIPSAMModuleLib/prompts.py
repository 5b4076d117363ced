"""Prompt text: the lines of the prompt box, and the target names of the shipped prompt ensembles."""

import json
import logging
import os
import re

from .paths import candidateRoots


def cleanPrompts(text):
    """Prompts from the text box: one per line, trimmed, blank lines and repeats (any case) dropped."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    prompts, seen = [], set()
    for line in lines:
        prompt = " ".join(line.split())
        if prompt and prompt.lower() not in seen:
            seen.add(prompt.lower())
            prompts.append(prompt)
    return prompts


def safeName(text, fallback="case"):
    """A file/folder name from a node or model name (letters, digits, - _ . only)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text or "").strip("._")
    return name or fallback


def promptEnsembleFiles():
    """The shipped prompt ensembles: Resources/Prompts/*.json and MedCLIPSAMLib/resources/*prompt*.json."""
    files = []
    for root in candidateRoots():
        folder = os.path.join(root, "Resources", "Prompts")
        if os.path.isdir(folder):
            files += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".json")]
        folder = os.path.join(root, "MedCLIPSAMLib", "resources")
        if os.path.isdir(folder):
            files += [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                      if f.endswith(".json") and "prompt" in f.lower()]
    return files


def promptSuggestions(files=None):
    """Target names of the prompt ensembles (read when asked; missing or odd files are skipped).

    Accepts {"targets": {name: ...}}, {name: [sentences] | {...}} and [{"name"|"target": ...}, ...].
    """
    names = []
    for path in promptEnsembleFiles() if files is None else files:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            logging.warning(f"MedCLIP-SAM: prompt ensembles '{path}' skipped: {exc}")
            continue
        if isinstance(data, dict) and isinstance(data.get("targets"), (dict, list)):
            data = data["targets"]
        if isinstance(data, dict):
            found = [k for k, v in data.items() if isinstance(v, (list, dict)) and not k.startswith("$")]
        elif isinstance(data, list):
            found = [d.get("name") or d.get("target") for d in data if isinstance(d, dict)]
        else:
            found = []
        for name in found:
            if isinstance(name, str) and name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names
