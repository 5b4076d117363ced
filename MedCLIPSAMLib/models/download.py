"""Download registry models from the Hugging Face hub into the cache, with progress, resume and checksums.

huggingface_hub does the transfer (progress bar, resume of partial files); this module pins each file to
the commit the revision resolves to and records the hub's published sha256 in the manifest.
"""

import shutil

from ..errors import MedCLIPSAMError
from ..runtime import log
from . import cache
from .registry import get_entry


def hub_url(repo, filename="", revision="main"):
    return f"https://huggingface.co/{repo}/resolve/{revision}/{filename}" if filename else f"https://huggingface.co/{repo}"


def required_files(entry):
    """Relative paths (inside the model folder) that the entry needs."""
    return [f"{src.subfolder}/{f}" if src.subfolder else f for src in entry.sources for f in src.files]


def how_to_get(entry):
    """One sentence telling a user without internet exactly which files to put where."""
    parts = []
    for src in entry.sources:
        where = cache.model_dir(entry.name) / src.subfolder if src.subfolder else cache.model_dir(entry.name)
        files = ", ".join(src.files)
        parts.append(f"{files} from {hub_url(src.repo)} into '{where}'")
    return ("download it with 'medclipsam models download " + entry.name + "' on a machine with internet, or put "
            + "; and ".join(parts) + f", then run 'medclipsam models verify --adopt {entry.name}'")


def download(name, force=False):
    """Fetch every file of a registry model into the cache (skipping verified ones) and return its folder."""
    entry = get_entry(name)
    folder = cache.model_dir(entry.name)
    if not force:
        try:
            cache.verify(folder, required_files(entry), entry.name)
            log.info("%s is already downloaded and verified in %s", name, folder)
            return folder
        except MedCLIPSAMError:
            pass
    if cache.offline():
        raise MedCLIPSAMError(f"cannot download '{name}': offline mode (MEDCLIPSAM_OFFLINE/HF_HUB_OFFLINE is set); "
                              + how_to_get(entry))
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError as exc:
        raise MedCLIPSAMError("downloading models needs the package 'huggingface_hub'") from exc
    api = HfApi()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(entry, api, hf_hub_download, folder)
    except MedCLIPSAMError:
        # nothing came: leave no folder behind (`models verify` would take it for a broken model); a partial
        # download stays, so that running the command again resumes it
        if not cache.holds_files(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _fetch(entry, api, hf_hub_download, folder):
    for src in entry.sources:
        try:
            commit = api.model_info(src.repo, revision=src.revision).sha
            infos = api.get_paths_info(src.repo, list(src.files), revision=commit, expand=True)
        except Exception as exc:  # network errors come in many types; the user needs the same advice for each
            raise MedCLIPSAMError(f"cannot reach the model hub for '{src.repo}' ({type(exc).__name__}); "
                                  + how_to_get(entry)) from exc
        published = {info.path: (info.lfs.sha256 if getattr(info, "lfs", None) else None) for info in infos}
        target = folder / src.subfolder if src.subfolder else folder
        for filename in src.files:
            log.info("downloading %s/%s (revision %s)", src.repo, filename, commit[:10])
            try:
                hf_hub_download(src.repo, filename, revision=commit, local_dir=target)
            except Exception as exc:
                raise MedCLIPSAMError(f"download of {src.repo}/{filename} failed ({exc}); run the command again to resume") from exc
            rel = f"{src.subfolder}/{filename}" if src.subfolder else filename
            cache.record_files(folder, {rel: published.get(filename)}, source=f"{src.repo}@{commit}",
                               extra={"name": entry.name, "licence": entry.licence})
