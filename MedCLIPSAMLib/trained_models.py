"""Trained models the Slicer panel (and `medclipsam models trained`) can segment with.

A small JSON file, MEDCLIPSAM_HOME/trained_models.json, lists model folders made by `train-weak` (kind
"weak") or `medclipseg train` (kind "medclipseg"):

    {"models": [{"name", "kind", "folder", "labels", "date"}, ...]}

labels are the weak model's label names or the MedCLIPSeg training prompts. A damaged file (not JSON, not
this layout) is an error that names it, and is never overwritten; every write replaces the file atomically
and keeps the previous version as trained_models.json.bak. The kind is read from the
folder's files, never taken from the caller, and a folder that is not a complete model (no snapshot, no
weights, a foreign config) is refused with one sentence. Only the standard library: it runs in Slicer's
process, where torch must not be imported.
"""

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MedCLIPSAMError

REGISTRY_FILE = "trained_models.json"
KINDS = ("weak", "medclipseg")
# The files each kind's trainer writes; training/weak.py and training/medclipseg.py import these, so the
# format has one definition and listing models imports no training code.
WEAK_CONFIG, WEAK_FORMAT = "config.json", "medclipsam-weak-v1"
MEDCLIPSEG_CONFIG, MEDCLIPSEG_WEIGHTS, MEDCLIPSEG_FORMAT = "medclipseg.json", "medclipseg.safetensors", "medclipseg/1"


def registry_path():
    from .models import cache

    return cache.home() / REGISTRY_FILE


def default_output_dir():
    """Where the panel puts new models when the user names no folder."""
    from .models import cache

    return cache.home() / "trained"


def _read_json(path):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def describe_folder(folder):
    """{kind, folder, labels} of a complete model folder; MedCLIPSAMError (one sentence) otherwise."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MedCLIPSAMError(f"model folder '{folder}' does not exist")
    folder = folder.resolve()
    if (folder / WEAK_CONFIG).is_file():
        config = _read_json(folder / WEAK_CONFIG)
        if config is None or config.get("format") != WEAK_FORMAT:
            raise MedCLIPSAMError(f"'{folder / WEAK_CONFIG}' is not a train-weak model description")
        files = [s.get("file") for s in config.get("snapshots") or [] if isinstance(s, dict)]
        if not files:
            raise MedCLIPSAMError(f"'{folder}' has no finished snapshot yet (training stopped too early)")
        missing = [f for f in files if not (folder / str(f)).is_file()]
        if missing:
            raise MedCLIPSAMError(f"'{folder}' is incomplete: {', '.join(map(str, missing))} missing")
        return {"kind": "weak", "folder": str(folder), "labels": [str(n) for n in config.get("label_names") or []]}
    if (folder / MEDCLIPSEG_CONFIG).is_file():
        config = _read_json(folder / MEDCLIPSEG_CONFIG)
        if config is None or config.get("format") != MEDCLIPSEG_FORMAT:
            raise MedCLIPSAMError(f"'{folder / MEDCLIPSEG_CONFIG}' is not a MedCLIPSeg model description")
        if not (folder / MEDCLIPSEG_WEIGHTS).is_file():
            raise MedCLIPSAMError(f"'{folder}' is incomplete: {MEDCLIPSEG_WEIGHTS} missing")
        return {"kind": "medclipseg", "folder": str(folder), "labels": [str(p) for p in config.get("prompts") or []]}
    raise MedCLIPSAMError(f"'{folder}' is not a trained model folder (no {WEAK_CONFIG} from train-weak or "
                          f"{MEDCLIPSEG_CONFIG} from medclipseg train)")


def _read_registry():
    """The registry's entries as stored (a missing file is an empty registry). A file that cannot be read
    or is not {"models": [...]} raises one sentence: it is the user's list, so nothing may replace it."""
    path = registry_path()
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        reason = f"not valid JSON: {exc}" if isinstance(exc, ValueError) else f"unreadable: {exc}"
        raise MedCLIPSAMError(f"the trained-model registry '{path}' is damaged ({reason}); repair it or move it "
                              f"away (the previous version, if any, is '{path}.bak')") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise MedCLIPSAMError(f"the trained-model registry '{path}' is damaged (no \"models\" list); repair it or "
                              f"move it away (the previous version, if any, is '{path}.bak')")
    return data["models"]


def _usable(entry):
    return isinstance(entry, dict) and {"name", "kind", "folder"} <= set(entry) and entry["kind"] in KINDS


def list_models():
    """The registered models, each with 'present': whether its folder still holds a complete model."""
    models = []
    for entry in _read_registry():
        if not _usable(entry):
            continue  # a hand-edited or foreign entry: not listed, but kept in the file
        try:
            present = describe_folder(entry["folder"])["kind"] == entry["kind"]
        except MedCLIPSAMError:
            present = False
        models.append({"labels": [], "date": "", **entry, "present": present})
    return models


def get(name):
    for entry in list_models():
        if entry["name"] == name:
            return entry
    raise MedCLIPSAMError(f"no trained model named '{name}' is registered")


def _write(entries):
    """Replace the registry atomically (temp file, fsync, rename); the old file becomes the .bak."""
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".trained_models-", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"models": entries}, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copy2(path, str(path) + ".bak")
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add(folder, name=None):
    """Register a model folder (again: its entry is updated); returns the entry. The name defaults to the
    folder's name; a name taken by another folder gets a suffix (-2, -3...)."""
    info = describe_folder(folder)
    entries = [e for e in _read_registry()
               if not (_usable(e) and Path(e["folder"]) == Path(info["folder"]))]
    base = " ".join((name or Path(info["folder"]).name).split())
    if not base:
        raise MedCLIPSAMError("the model name is empty")
    taken = {e["name"] for e in entries if _usable(e)}
    unique, k = base, 2
    while unique in taken:
        unique, k = f"{base}-{k}", k + 1
    entry = {"name": unique, **info, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    _write(entries + [entry])
    return {**entry, "present": True}


def remove(name):
    """Forget a registered model (its folder is left alone)."""
    entries = _read_registry()
    kept = [e for e in entries if not (_usable(e) and e["name"] == name)]
    if len(kept) == len(entries):
        raise MedCLIPSAMError(f"no trained model named '{name}' is registered")
    _write(kept)
