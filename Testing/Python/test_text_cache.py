"""The on-disk cache of sentence embeddings: identical vectors in a new process, corrupt files recomputed."""

import pytest

from MedCLIPSAMLib.pipeline import text as text_module
from MedCLIPSAMLib.pipeline.text import TextEmbeddings, make_prompt
from MedCLIPSAMLib.pipeline.text_cache import ENV, DiskTextCache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "text"))
    return tmp_path / "text"


def _no_encoding(*args, **kwargs):
    raise AssertionError("the text tower ran although every sentence was on disk")


def test_disk_cache_returns_identical_embeddings(tiny_clip, cache_dir, monkeypatch):
    import torch

    prompt = make_prompt("brain tumor")
    first = TextEmbeddings(tiny_clip)
    expected = first.sentences(prompt.sentences).clone()
    ensemble = first(prompt).clone()
    files = sorted(cache_dir.rglob("*.npz"))
    assert len(files) == len(set(prompt.sentences))
    assert not list(cache_dir.rglob("*.part"))
    # a new TextEmbeddings (a new process) reads them back without running the text tower
    monkeypatch.setattr(text_module, "encode_sentences", _no_encoding)
    second = TextEmbeddings(tiny_clip)
    assert torch.equal(second.sentences(prompt.sentences), expected)
    assert torch.equal(second(prompt), ensemble)
    assert second._disk.hits == len(files)


def test_corrupt_or_foreign_files_are_recomputed(tiny_clip, cache_dir):
    import numpy as np
    import torch

    sentences = ("a brain MRI showing a tumor", "an axial slice of the liver", "a chest x-ray")
    reference = TextEmbeddings(tiny_clip, disk=False).sentences(sentences)
    TextEmbeddings(tiny_clip).sentences(sentences)
    disk = DiskTextCache(tiny_clip)
    truncated, garbage, foreign = (disk._path(s) for s in sentences)
    truncated.write_bytes(truncated.read_bytes()[:40])
    garbage.write_bytes(b"not an npz file")
    # a valid file under the wrong sentence's name (as a hash collision would give)
    with open(foreign, "wb") as f:
        np.savez(f, sentence=np.array("something else"), embedding=reference[0].numpy())
    again = TextEmbeddings(tiny_clip)
    assert torch.allclose(again.sentences(sentences), reference, atol=1e-6)
    assert again._disk.hits == 0
    # and the files were rewritten: a third reader hits every one
    third = DiskTextCache(tiny_clip)
    assert all(torch.equal(third.get(s), v) for s, v in zip(sentences, again.sentences(sentences)))


def test_cache_off_and_other_models_do_not_share(tiny_clip, cache_dir, monkeypatch):
    from dataclasses import replace

    TextEmbeddings(tiny_clip).sentences(("a liver",))
    other = replace(tiny_clip, device=__import__("torch").device("meta"))  # another device type: another identity
    assert DiskTextCache(other).get("a liver") is None
    monkeypatch.setenv(ENV, "off")
    assert DiskTextCache(tiny_clip).get("a liver") is None
