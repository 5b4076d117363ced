"""Sentence embeddings kept on disk, per model identity and sentence, so that a new process (every
`medclipsam segment` run) skips the text tower for sentences it has seen (an ensemble is 8-20 sentences).

Where: <MEDCLIPSAM_HOME>/text-embeddings/<model identity>/<sha256 of the sentence>.npz, or under
$MEDCLIPSAM_TEXT_CACHE ("off" turns the cache off). The identity hashes the checksums of the model's files
(its manifest, or the weights themselves), the device type and the torch version: other weights or
numerics never read another model's vectors. Each file holds the sentence too, so a file that does not
belong to its name is not used. Writes go to a temporary file renamed into place (concurrent writers
each write a complete file; the last rename wins, with the same numbers); an unreadable, truncated or
otherwise invalid file is ignored, recomputed and rewritten.
"""

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..runtime import log, owned_prefix, remove_stale

ENV = "MEDCLIPSAM_TEXT_CACHE"
FORMAT = 1   # bump when the way sentences are encoded changes (pipeline/text.py encode_sentences)


def cache_root():
    """The folder for all models' entries, or None when the cache is turned off."""
    from ..models import cache

    value = os.environ.get(ENV, "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    return Path(value).expanduser() if value else cache.home() / "text-embeddings"


def model_identity(clip):
    """A short hash naming the model's weights and tower files, its device type and torch's version."""
    import torch

    from ..models import cache
    from ..models.builders import weights_file

    folder = Path(clip.folder)
    try:
        manifest = cache.read_manifest(folder)
    except Exception:  # an unreadable manifest: hash the files themselves
        manifest = None
    if manifest and manifest.get("files"):
        files = sorted((rel, info.get("sha256")) for rel, info in manifest["files"].items())
    else:
        files = [(p.name, cache.sha256_of(p)) for p in (weights_file(folder), folder / "open_clip_config.json")
                 if p is not None and p.is_file()]
    text = json.dumps({"files": files, "device": clip.device.type, "torch": torch.__version__, "format": FORMAT})
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class DiskTextCache:
    """get(sentence) -> float32 tensor [D] or None; put(sentence, tensor). Never raises on I/O problems."""

    def __init__(self, clip, root=None):
        root = cache_root() if root is None else Path(root)
        self.folder = None if root is None else root / model_identity(clip)
        self.hits = self.misses = 0
        if self.folder is not None:
            remove_stale(self.folder, ".")  # a killed writer's temporary file

    def _path(self, sentence):
        return self.folder / (hashlib.sha256(sentence.encode()).hexdigest()[:32] + ".npz")

    def get(self, sentence):
        import torch

        if self.folder is None:
            return None
        path = self._path(sentence)
        try:
            # read the bytes first: np.load leaves its file open when the content is not an npz
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
                stored, vector = str(data["sentence"]), np.array(data["embedding"])
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception as exc:  # truncated, not an npz, missing keys: recompute and rewrite
            log.debug("ignoring the unreadable text-embedding file %s (%s)", path, exc)
            self.misses += 1
            return None
        norm = float(np.linalg.norm(vector)) if vector.ndim == 1 and vector.size else 0.0
        if stored != sentence or vector.dtype != np.float32 or vector.ndim != 1 or not abs(norm - 1.0) < 1e-3:
            log.debug("ignoring the invalid text-embedding file %s", path)
            self.misses += 1
            return None
        self.hits += 1
        return torch.from_numpy(vector)

    def put(self, sentence, embedding):
        if self.folder is None:
            return
        vector = embedding.detach().cpu().float().numpy()
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=owned_prefix("."), suffix=".part", dir=self.folder)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, sentence=np.array(sentence), embedding=vector)
            os.replace(tmp, self._path(sentence))
        except OSError as exc:  # a read-only or full cache folder: the run goes on without it
            log.debug("cannot write a text embedding to %s (%s)", self.folder, exc)
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
