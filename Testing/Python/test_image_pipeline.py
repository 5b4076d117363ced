"""The 2D pipeline: geometry of non-square images, presets and overrides, the segment-image CLI."""

import numpy as np
import pytest
from PIL import Image

import MedCLIPSAMLib.pipeline.image as image_module
from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.errors import MedCLIPSAMError
from MedCLIPSAMLib.pipeline.image import ImageSegmenter
from MedCLIPSAMLib.pipeline.presets import get_preset
from MedCLIPSAMLib.pipeline.text import make_prompt


def brightness_saliency(method, clip, x, text_embedding, **settings):
    """A constructed saliency: the CLIP input's own brightness (so we know where the map must be)."""
    g = x.mean(0).numpy()
    return (g - g.min()) / (g.max() - g.min())


def blob_image(h, w, box):
    img = np.full((h, w), 20, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 220
    return img


@pytest.mark.parametrize("shape,box", [((60, 140), (100, 10, 125, 30)), ((150, 70), (5, 110, 30, 140)),
                                       ((97, 97), (40, 40, 60, 70))])
def test_non_square_images_map_back_to_their_own_pixels(monkeypatch, tiny_clip, shape, box):
    import MedCLIPSAMLib.saliency as saliency

    monkeypatch.setattr(saliency, "compute_saliency", brightness_saliency)
    settings = get_preset("v1", ["sam=none", "postprocess=threshold"])
    result = ImageSegmenter(tiny_clip, None, settings)(blob_image(*shape, box), "brain tumor")
    truth = blob_image(*shape, box) > 100
    assert result.mask.shape == result.saliency.shape == shape
    inter = (result.mask & truth).sum()
    assert 2 * inter / (result.mask.sum() + truth.sum()) > 0.9
    # the SAM box is the blob's box in the image's own pixel coordinates (within resampling of the 224 map)
    assert np.abs(result.prompts["boxes"][0] - np.array(box)).max() <= max(shape) / 224 * 2 + 1


def test_sam_gets_a_square_image_and_shifted_boxes(monkeypatch, tiny_clip, tiny_sam2):
    import MedCLIPSAMLib.saliency as saliency

    monkeypatch.setattr(saliency, "compute_saliency", brightness_saliency)
    seen = {}
    original = image_module.predict_mask

    def spy(predictor, prompts, threshold, keep):
        seen["image_shape"] = predictor._orig_hw[0]
        seen["boxes"] = prompts["boxes"].copy()
        return original(predictor, prompts, threshold, keep)

    monkeypatch.setattr(image_module, "predict_mask", spy)
    settings = get_preset("v1", ["postprocess=threshold"])
    img = blob_image(60, 140, (100, 10, 125, 30))
    result = ImageSegmenter(tiny_clip, tiny_sam2, settings)(img, "brain tumor")
    assert seen["image_shape"] == (140, 140)               # padded square, never stretched
    assert np.allclose(seen["boxes"][0] - result.prompts["boxes"][0], [0, 40, 0, 40])  # (140-60)/2 rows of padding
    assert result.mask.shape == (60, 140) and result.probability.shape == (60, 140)


def test_presets_and_overrides():
    v1, v2 = get_preset("v1"), get_preset("v2")
    assert (v1.saliency, v1.postprocess, v1.prompt_mode, v1.saliency_settings["topk"]) == ("gscorecam", "crf", "box", 300)
    assert (v2.saliency, v2.postprocess, v2.prompt_mode, v2.top_n) == ("m2ib", "kmeans", "boxes", 2)
    s = get_preset("v2", ["saliency=gscorecam", "saliency_settings.topk=50", "sam=none", "mask_threshold=0.3"])
    assert (s.saliency, s.saliency_settings["topk"], s.sam, s.mask_threshold) == ("gscorecam", 50, "none", 0.3)
    assert get_preset("v2").saliency == "m2ib"  # overrides never leak into the preset itself
    with pytest.raises(MedCLIPSAMError, match="unknown setting"):
        get_preset("v1", ["nope=1"])
    with pytest.raises(MedCLIPSAMError, match="saliency must be one of"):
        get_preset("v1", ["saliency=magic"])


def test_prompt_ensembles_and_text_cache(tiny_clip):
    import torch

    from MedCLIPSAMLib.pipeline.text import TextEmbeddings, known_targets

    assert {"brain tumor", "breast tumor", "lung", "liver", "kidney"} <= set(known_targets())
    p = make_prompt("Brain  Tumour")
    assert p.target == "brain tumor" and len(p.sentences) >= 15 and p.text == "Brain Tumour"
    assert "Neoplasm" in p.terminology and p.color is not None
    own = make_prompt("a dark cyst | a fluid-filled lesion")
    assert own.sentences == ("a dark cyst", "a fluid-filled lesion")
    with pytest.raises(MedCLIPSAMError, match="empty"):
        make_prompt("  ")
    cache = TextEmbeddings(tiny_clip)
    e = cache(p)
    assert cache(p) is e and torch.allclose(e.norm(), torch.tensor(1.0))
    expected = torch.nn.functional.normalize(tiny_clip.encode_text(list(p.sentences)).mean(0), dim=0)
    assert torch.allclose(e, expected, atol=1e-6)


def test_segment_image_cli(tmp_path):
    img = (np.random.default_rng(0).random((70, 110)) * 60).astype(np.uint16) * 500  # 16-bit, non-square
    img[20:40, 60:90] = 60000
    Image.fromarray(img).save(tmp_path / "in.png")
    out, sal, ov = tmp_path / "mask.png", tmp_path / "sal.png", tmp_path / "ov.png"
    assert main(["segment-image", str(tmp_path / "in.png"), "--prompt", "breast tumor", "--output", str(out),
                 "--saliency-output", str(sal), "--overlay-output", str(ov), "--models", "tiny-random",
                 "--preset", "fast", "--device", "cpu"]) == 0
    for path in (out, sal):
        a = np.asarray(Image.open(path))
        assert a.shape == (70, 110)
    assert set(np.unique(np.asarray(Image.open(out)))) <= {0, 255}
    assert np.asarray(Image.open(ov)).shape == (70, 110, 3)
    # bad input: missing file, one clear error and no output
    assert main(["segment-image", str(tmp_path / "nope.png"), "--prompt", "x", "--output", str(tmp_path / "m2.png"),
                 "--models", "tiny-random"]) == 2
    assert not (tmp_path / "m2.png").exists()


def test_absent_sentences_on_one_image(tiny_clip, tmp_path, capsys):
    """2D presence against its formula: lead = best prompt sentence - best absent sentence on the image's
    CLIP embedding; at a margin above the lead the result is empty, below it the pipeline runs."""
    import torch

    from MedCLIPSAMLib.pipeline.preprocess import pad_to_square, to_rgb

    gray = blob_image(64, 80, (20, 40, 30, 60))
    settings = get_preset("fast", ["sam=none", "autocast=false"])
    seg = ImageSegmenter(tiny_clip, None, settings)
    prompt = make_prompt("a bright mass | a tumor", absent="a normal scan | a chest x-ray")
    with torch.no_grad():
        f = tiny_clip.encode_image(tiny_clip.preprocess_array(to_rgb(pad_to_square(gray)[0]))[None]).float()
    cos = lambda texts: (f @ torch.nn.functional.normalize(tiny_clip.encode_text(list(texts)).float(), dim=1).T)
    lead = float(cos(prompt.sentences).max() - cos(prompt.absent).max())

    empty = seg(gray, prompt, absent_margin=lead + 1e-4)
    assert empty.absent and f"{lead:+.3f}" in empty.absent
    assert not empty.mask.any() and not empty.saliency.any() and empty.prompts["boxes"] is None
    ran = seg(gray, prompt, absent_margin=lead - 1e-4)
    plain = seg(gray, prompt)  # no margin: no presence test (the volume driver decides on its own)
    assert ran.absent is None and ran.saliency.any() and np.array_equal(ran.mask, plain.mask)

    Image.fromarray(gray).save(tmp_path / "in.png")
    out = tmp_path / "mask.png"
    assert main(["segment-image", str(tmp_path / "in.png"), "--prompt", "liver", "--no-ensemble", "--output", str(out),
                 "--absent-if", "a head MRI | liver", "--models", "tiny-random", "--preset", "fast",
                 "--device", "cpu", "--sam", "none"]) == 0
    assert not np.asarray(Image.open(out)).any() and "absent: " in capsys.readouterr().out
