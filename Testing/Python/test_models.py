"""The model registry, cache and loaders, exercised on random-weight checkpoints in the real file layouts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from MedCLIPSAMLib.errors import MedCLIPSAMError
from MedCLIPSAMLib.models import cache, load_clip, load_sam2, random_models, resolve_model_set
from MedCLIPSAMLib.models.download import download, required_files
from MedCLIPSAMLib.models.registry import BIOMEDBERT_REPO, REGISTRY


def test_tiny_random_clip_is_the_biomedclip_architecture(tiny_clip):
    import torch

    model = tiny_clip.model
    names = dict(model.named_modules())
    # the layers the saliency methods hook into exist under the real names
    assert "visual.trunk.blocks.11.norm2" in names and "visual.trunk.blocks.9" in names
    assert type(model).__name__ == "CustomTextCLIP" and tiny_clip.is_random
    x = torch.stack([tiny_clip.preprocess_array(np.full((50, 50, 3), v, np.uint8)) for v in (10, 200)])
    img = tiny_clip.encode_image(x)
    txt = tiny_clip.encode_text(["brain tumor", "a large bright lesion in the left kidney"])
    assert img.shape == txt.shape == (2, 64)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    # different text gives different embeddings (the tokenizer works offline)
    assert not torch.allclose(txt[0], txt[1])


def test_random_models_are_seeded_and_reloaded_identically(tmp_path):
    import torch

    a = random_models.build_random_sam2(tmp_path / "a", seed=3)
    b = random_models.build_random_sam2(tmp_path / "b", seed=3)
    sa = torch.load(a / "model.pt", weights_only=True)["model"]
    sb = torch.load(b / "model.pt", weights_only=True)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    model = load_sam2(str(a))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], sa[k]) for k in sa)


def _place_in_cache(src, name):
    """Copy a random checkpoint into a registry model's cache folder under the publisher's file names."""
    folder = cache.model_dir(name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def cached_biomedclip(tiny_clip):
    """The tiny random CLIP laid out exactly like a BiomedCLIP download, adopted into the cache."""
    folder = _place_in_cache(tiny_clip.folder, "biomedclip")
    src = tiny_clip.folder
    shutil.copy(src / "open_clip_pytorch_model.bin", folder)
    config = json.loads((src / "open_clip_config.json").read_text())
    # the hub config names the text tower by its hub repository, not a folder
    config["model_cfg"]["text_cfg"]["hf_model_name"] = BIOMEDBERT_REPO
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = BIOMEDBERT_REPO
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    shutil.copytree(src / "text", folder / "text")
    return folder


def test_registry_clip_loads_offline_after_adopt(cached_biomedclip):
    import torch

    from MedCLIPSAMLib.cli import main

    assert main(["models", "verify", "--adopt", "biomedclip"]) == 0
    bundle = load_clip("biomedclip", reuse=False)
    reference = load_clip("tiny-random")
    assert not bundle.is_random
    ref_state = reference.model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in bundle.model.state_dict().items())
    assert torch.allclose(bundle.encode_text(["liver"]), reference.encode_text(["liver"]))


class _LeavesATrace:
    """Unpickling this writes a file: a checkpoint holding it shows whether anything unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checksum_mismatch_is_refused_before_loading(cached_biomedclip, tmp_path):
    import torch

    from MedCLIPSAMLib.cli import main

    assert main(["models", "verify", "--adopt", "biomedclip"]) == 0
    weights = cached_biomedclip / "open_clip_pytorch_model.bin"
    # one byte changed inside a tensor's data: the zip and the pickle stay intact, the file still loads
    state = torch.load(weights, weights_only=True)
    name, tensor = next((k, v) for k, v in state.items() if v.numel() > 1000)
    raw = weights.read_bytes()
    needle = tensor.contiguous().numpy().tobytes()[:64]
    offset = raw.index(needle) + 1
    weights.write_bytes(raw[:offset] + bytes([raw[offset] ^ 0x01]) + raw[offset + 1:])
    changed = torch.load(weights, weights_only=True)
    assert not torch.equal(changed[name], tensor) and changed.keys() == state.keys()
    with pytest.raises(MedCLIPSAMError, match="checksum mismatch.*open_clip_pytorch_model.bin"):
        load_clip("biomedclip", reuse=False)
    assert main(["models", "verify", "biomedclip"]) == 1
    # a swapped checkpoint whose unpickling would leave a trace: refused by checksum, never unpickled
    marker = tmp_path / "unpickled"
    torch.save({**state, "trace": _LeavesATrace(marker)}, weights)
    with pytest.raises(MedCLIPSAMError, match="checksum mismatch.*open_clip_pytorch_model.bin"):
        load_clip("biomedclip", reuse=False)
    assert not marker.exists()


def test_missing_file_names_the_file_the_folder_and_the_source(cached_biomedclip):
    (cached_biomedclip / "text" / "vocab.txt").unlink()
    with pytest.raises(MedCLIPSAMError) as info:
        load_clip("biomedclip", reuse=False)
    msg = str(info.value)
    assert "text/vocab.txt" in msg and str(cached_biomedclip) in msg and BIOMEDBERT_REPO in msg


def _load_sam2_as_published(src, checkpoint, name, published_file):
    """Put the random checkpoint `src/checkpoint` into registry entry `name`'s cache folder under the
    publisher's file name and load it through the registry; returns (model, the checkpoint's state dict)."""
    import torch

    folder = _place_in_cache(src, name)
    shutil.copy(src / checkpoint, folder / published_file)
    cache.record_files(folder, {published_file: None}, source="test")
    return load_sam2(name), torch.load(src / checkpoint, weights_only=True)["model"]


def test_registry_sam2_loads_from_publisher_layout(tiny_sam2):
    """A SAM 2.1 tiny checkpoint (random weights, real architecture) in the publisher's file name loads via the registry."""
    import torch

    src = random_models.ensure_random("sam2", "sam2.1_hiera_t")
    model, expected = _load_sam2_as_published(src, "model.pt", "sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt")
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert model.image_size == 1024


def test_medsam2_loads_from_its_publisher_layout_at_512():
    """MedSAM2 as published (MedSAM2_latest.pt = {"model": ...}, no config) loads through the registry entry:
    SAM 2.1 tiny at 512; the random stand-in is written in that layout and loads through the same path."""
    import torch

    src = random_models.ensure_random("sam2", "medsam2")
    assert sorted(p.name for p in src.iterdir()) == ["MedSAM2_latest.pt", cache.MANIFEST]
    model, expected = _load_sam2_as_published(src, "MedSAM2_latest.pt", "medsam2", "MedSAM2_latest.pt")
    got = model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert model.image_size == 512 and model.sam_prompt_encoder.image_embedding_size == (32, 32)
    stand_in = load_sam2("random-medsam2")
    assert stand_in.image_size == 512 and stand_in.medclipsam_is_random


def test_offline_download_says_exactly_what_to_put_where():
    entry = REGISTRY["sam2.1-hiera-large"]
    with pytest.raises(MedCLIPSAMError) as info:
        download("sam2.1-hiera-large")
    msg = str(info.value)
    assert "offline" in msg and "sam2.1_hiera_large.pt" in msg
    assert str(cache.model_dir(entry.name)) in msg and "huggingface.co/facebook/sam2.1-hiera-large" in msg


def test_unknown_model_and_arbitrary_pickles_are_refused(tmp_path):
    import torch

    with pytest.raises(MedCLIPSAMError, match="unknown model 'no-such-model'"):
        load_sam2("no-such-model")
    # a checkpoint that needs arbitrary code to unpickle is refused (weights_only loading)
    folder = tmp_path / "evil"
    shutil.copytree(random_models.ensure_random("sam2", "tiny-shrunk"), folder)
    (folder / cache.MANIFEST).unlink()
    torch.save({"model": {"x": Path("/etc/passwd")}}, folder / "model.pt")
    with pytest.raises(MedCLIPSAMError, match="cannot read the SAM2 checkpoint"):
        load_sam2(str(folder))


def test_model_sets():
    assert resolve_model_set("tiny-random") == ("tiny-random", "tiny-random")
    assert resolve_model_set("default") == ("biomedclip", "medsam2")
    assert resolve_model_set("sam2.1-hiera-tiny") == ("biomedclip", "sam2.1-hiera-tiny")
    assert resolve_model_set("medsam2") == ("biomedclip", "medsam2")
    assert resolve_model_set("biomedclip,sam2.1-hiera-large") == ("biomedclip", "sam2.1-hiera-large")
    assert required_files(REGISTRY["biomedclip"])[-1] == "text/tokenizer_config.json"


def test_help_is_instant_and_imports_nothing_heavy():
    code = ("import sys, MedCLIPSAMLib.cli as c; c.build_parser(); "
            "heavy = [m for m in ('torch', 'open_clip', 'sam2', 'SimpleITK', 'vtk') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "MedCLIPSAMLib", "--help"], capture_output=True, text=True, check=True)
    assert "segment" in out.stdout or "models" in out.stdout


def test_device_selection_errors_are_one_sentence():
    from MedCLIPSAMLib.runtime import select_device

    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(MedCLIPSAMError, match="unknown device"):
        select_device("tpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(MedCLIPSAMError, match="no CUDA GPU"):
            select_device("cuda")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_autocast_uses_bf16_on_a_cpu_only_with_native_bf16(monkeypatch, native_bf16):
    import torch

    from MedCLIPSAMLib import runtime
    from MedCLIPSAMLib.pipeline.presets import get_preset

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    assert get_preset("v2").autocast == "auto"
    with runtime.autocast("cpu", "auto"):
        x = torch.ones(4, 4) @ torch.ones(4, 4)
    assert x.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    with runtime.autocast("cpu", True):  # asked for explicitly: always
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with runtime.autocast("cpu", False):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    from MedCLIPSAMLib.runtime import atomic_output

    target = tmp_path / "out.seg.nrrd"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            assert tmp.endswith(".seg.nrrd")
            Path(tmp).write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.seg.nrrd"]
    with atomic_output(target) as tmp:
        Path(tmp).write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.seg.nrrd"]
    with pytest.raises(MedCLIPSAMError, match="does not exist"):
        with atomic_output(tmp_path / "nope" / "x.nrrd"):
            pass


def test_staged_outputs_renames_all_files_together_or_none(tmp_path):
    from MedCLIPSAMLib.runtime import staged_outputs

    seg, report = tmp_path / "a.seg.nrrd", tmp_path / "a.report.json"
    report.write_text("old report")
    with pytest.raises(RuntimeError):
        with staged_outputs() as staged:
            Path(staged(seg)).write_text("seg")
            Path(staged(report)).write_text("new report")
            assert staged(None) is None  # an output not asked for
            raise RuntimeError("cancelled after both were written")
    assert sorted(os.listdir(tmp_path)) == ["a.report.json"] and report.read_text() == "old report"
    with staged_outputs() as staged:
        Path(staged(seg)).write_text("seg")
        Path(staged(report)).write_text("new report")
        assert not seg.exists()  # nothing is in place before the block ends
    assert seg.read_text() == "seg" and report.read_text() == "new report"
    assert sorted(os.listdir(tmp_path)) == ["a.report.json", "a.seg.nrrd"]


def test_models_list_aligns_its_columns_with_long_names(monkeypatch, capsys):
    from MedCLIPSAMLib.cli import main
    from MedCLIPSAMLib.models import registry

    long_name = "random-" + "x" * 40
    monkeypatch.setitem(registry.RANDOM_MODELS, long_name, "a name longer than any column width")
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]  # after the "cache: ..." line
    header = lines[0]
    assert any(line.startswith(long_name + " ") for line in lines)
    for column in ("kind", "licence", "cached", "source"):  # left-aligned: every cell starts under its title
        at = header.index(column)
        assert all(line[at - 1] == " " and line[at] != " " for line in lines), column
    end = header.index("size") + len("size")  # right-aligned: every cell ends under its title
    assert all(line[end - 1] != " " and line[end] == " " for line in lines)
