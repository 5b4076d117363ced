"""The model cache: one folder per model under MEDCLIPSAM_HOME/models, and a manifest of checksums.

Every file that came from a publisher is listed in `manifest.json` with its sha256 (the hub's own LFS
checksum where it publishes one, else the hash of the file as downloaded) and the commit it came from.
Loaders call `verify()` before they read a weight file, so a truncated or swapped checkpoint is refused
before it is unpickled.
"""

import hashlib
import json
import os
from pathlib import Path

from ..errors import MedCLIPSAMError
from ..runtime import log

MANIFEST = "manifest.json"


def home():
    """MEDCLIPSAM_HOME, or the user cache folder (~/.cache/medclipsam, or XDG_CACHE_HOME)."""
    env = os.environ.get("MEDCLIPSAM_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medclipsam"


def model_dir(name):
    return home() / "models" / name


def holds_files(folder):
    """Whether a model folder holds any file of its own (huggingface_hub's .cache bookkeeping aside): a
    folder without one is no cached model, for `models list`, `models verify` and download's clean-up alike."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(p.is_file() and ".cache" not in p.relative_to(folder).parts for p in folder.rglob("*"))


def offline():
    return os.environ.get("MEDCLIPSAM_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


_hash_memo = {}


def sha256_of(path):
    """sha256 of a file, remembered per (path, size, mtime) so repeated loads in one process hash once."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _hash_memo[key] = h.hexdigest()
    return _hash_memo[key]


def read_manifest(folder):
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedCLIPSAMError(f"the model manifest '{path}' is unreadable ({exc}); delete the folder and download again") from exc


def write_manifest(folder, manifest):
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)


def record_files(folder, files, source, extra=None):
    """Add files (relative paths -> expected sha256, or None to hash them now) to the folder's manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder) or {"files": {}}
    for rel, expected in files.items():
        actual = sha256_of(folder / rel)
        if expected and actual != expected:
            raise MedCLIPSAMError(
                f"checksum mismatch for '{folder / rel}': the publisher lists {expected}, the file has {actual}; "
                "delete it and download again")
        manifest["files"][rel] = {"sha256": actual, "source": source}
    manifest.update(extra or {})
    write_manifest(folder, manifest)
    return manifest


def verify(folder, required, name, how_to_get=""):
    """Check that every required file is present and matches the manifest; raise one clear error if not."""
    folder = Path(folder)
    missing = [rel for rel in required if not (folder / rel).is_file()]
    if missing:
        raise MedCLIPSAMError(missing_files_message(name, folder, missing, how_to_get))
    manifest = read_manifest(folder)
    if manifest is None:
        raise MedCLIPSAMError(
            f"model '{name}' in '{folder}' has no {MANIFEST}; run 'medclipsam models verify --adopt {name}' to "
            "record checksums for files you placed there by hand")
    for rel in required:
        known = manifest["files"].get(rel)
        if known is None:
            raise MedCLIPSAMError(f"'{folder / rel}' is not listed in {folder / MANIFEST}; download the model again")
        actual = sha256_of(folder / rel)
        if actual != known["sha256"]:
            raise MedCLIPSAMError(
                f"checksum mismatch for '{folder / rel}' (expected {known['sha256'][:12]}..., found {actual[:12]}...): "
                "the file is corrupt or was replaced; delete it and run 'medclipsam models download' again")
    log.debug("verified %d files of %s", len(required), name)
    return manifest


def missing_files_message(name, folder, missing, how_to_get=""):
    files = ", ".join(missing)
    msg = f"model '{name}' is not available: missing {files} in '{folder}'"
    return msg + (f"; {how_to_get}" if how_to_get else "")
