"""Loading without random init (models/no_init.py) gives exactly the model that init-then-load gives."""

import shutil
import threading

import pytest
import torch

from MedCLIPSAMLib.errors import MedCLIPSAMError
from MedCLIPSAMLib.models import builders, load_sam2, no_init, random_models, sam
from MedCLIPSAMLib.models.builders import build_open_clip, instantiate_sam2


@pytest.fixture
def no_init_results(monkeypatch):
    """What each build_without_init call returned (None would mean the loader fell back to init)."""
    results = []

    def spy(*args, **kwargs):
        results.append(no_init.build_without_init(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(builders, "build_without_init", spy)
    monkeypatch.setattr(sam, "build_without_init", spy)
    return results


def assert_same_model(new, ref):
    """Same parameters and persistent buffers (bit for bit), same non-persistent buffers, none left on meta."""
    a, b = new.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    buffers_a, buffers_b = dict(new.named_buffers()), dict(ref.named_buffers())
    assert buffers_a.keys() == buffers_b.keys() and all(torch.equal(buffers_a[k], buffers_b[k]) for k in buffers_a)
    assert not any(p.is_meta for p in new.parameters()) and not any(b.is_meta for b in new.buffers())
    assert ({n: p.requires_grad for n, p in new.named_parameters()}
            == {n: p.requires_grad for n, p in ref.named_parameters()})


def test_clip_without_init_equals_init_then_load(no_init_results):
    import open_clip

    folder = random_models.ensure_random("clip", "tiny")
    weights = folder / "open_clip_pytorch_model.bin"
    new, tokenizer = build_open_clip(folder)
    assert no_init_results == [new]  # the init-free path was taken
    torch.manual_seed(1)
    ref, _ = build_open_clip(folder, weights=None)  # random init (as random checkpoints are written)...
    assert len(no_init_results) == 1  # ...which does not skip it
    key = "visual.trunk.patch_embed.proj.weight"
    assert not torch.equal(ref.state_dict()[key], torch.load(weights, weights_only=True)[key])
    open_clip.load_checkpoint(ref, str(weights), weights_only=True)  # ...then the checkpoint
    ref.eval()
    assert_same_model(new, ref)
    # BERT's non-persistent buffers are not in the checkpoint: they keep their constructed values
    assert set(dict(new.named_buffers())) - set(new.state_dict()) == {
        "text.transformer.embeddings.position_ids", "text.transformer.embeddings.token_type_ids"}
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer(["brain tumor", "a large bright lesion in the left kidney"])
    with torch.no_grad():
        assert torch.equal(new.encode_image(images), ref.encode_image(images))
        assert torch.equal(new.encode_text(tokens), ref.encode_text(tokens))


def test_sam2_without_init_equals_init_then_load(no_init_results):
    cfg, checkpoint, overrides, _ = sam.resolve_sam2("tiny-random")
    new = load_sam2("tiny-random")
    assert no_init_results == [new]
    ref = instantiate_sam2(cfg, overrides=overrides)
    ref.load_state_dict(torch.load(checkpoint, weights_only=True)["model"], strict=True)
    ref.eval()
    assert_same_model(new, ref)
    image = torch.randn(1, 3, new.image_size, new.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_new, out_ref = new.forward_image(image), ref.forward_image(image)
    for key in ("vision_features", "vision_pos_enc", "backbone_fpn"):
        got, want = out_new[key], out_ref[key]
        got, want = (got, want) if isinstance(got, list) else ([got], [want])
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_clip_checkpoint_not_matching_every_weight_is_refused(tmp_path, change):
    folder = tmp_path / "clip"
    shutil.copytree(random_models.ensure_random("clip", "tiny"), folder)
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    if change == "missing":
        del state["visual.trunk.blocks.0.norm1.weight"]
    else:
        state["visual.trunk.extra"] = torch.zeros(1)
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(MedCLIPSAMError, match="cannot load CLIP weights"):
        build_open_clip(folder)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_sam2_checkpoint_not_matching_every_weight_is_refused(tmp_path, change):
    src = random_models.ensure_random("sam2", "tiny-shrunk")
    folder = tmp_path / "sam2"
    folder.mkdir()
    shutil.copy(src / "config.yaml", folder)  # no manifest: loaded without a checksum check
    state = torch.load(src / "model.pt", weights_only=True)
    if change == "missing":
        del state["model"]["sam_mask_decoder.iou_prediction_head.layers.0.weight"]
    else:
        state["model"]["sam_mask_decoder.extra"] = torch.zeros(1)
    torch.save(state, folder / "model.pt")
    with pytest.raises(MedCLIPSAMError, match=f"does not match its config .*1 {change}"):
        load_sam2(str(folder))


def test_skip_init_is_per_thread_and_keeps_tied_parameters_tied():
    entered, release = threading.Event(), threading.Event()
    built = {}

    def build_without_init_in_a_thread():
        with no_init.skip_init():
            entered.set()
            release.wait(10)
            shared = torch.nn.Linear(3, 3)
            built["tied"] = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)

    thread = threading.Thread(target=build_without_init_in_a_thread)
    thread.start()
    entered.wait(10)
    elsewhere = torch.nn.Linear(3, 3)  # built by another thread meanwhile: initialised as usual
    release.set()
    thread.join(10)
    assert not elsewhere.weight.is_meta and elsewhere.weight.abs().sum() > 0
    tied = built["tied"]
    assert tied[0].weight.is_meta
    no_init.materialize(tied, "cpu")
    assert tied[0].weight is tied[2].weight and not tied[0].weight.is_meta and tied[0].weight.requires_grad


def test_a_buffer_derived_from_a_parameter_falls_back_to_init():
    class Derived(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2))
            self.register_buffer("twice", self.weight.detach() * 2)

    assert no_init.build_without_init(Derived, "cpu") is None
    assert torch.equal(Derived().twice, torch.full((2,), 2.0))


def test_torch_is_left_as_it_was_after_skip_init():
    import torch

    from MedCLIPSAMLib.models.no_init import skip_init

    before = torch.nn.Module.register_parameter
    with skip_init():
        with skip_init():  # nested: still wrapped until the outer one ends
            pass
        assert torch.nn.Module.register_parameter is not before
    assert torch.nn.Module.register_parameter is before
