"""The default SAM (MedSAM2: SAM 2.1 tiny at 512 px) runs the v2 preset end to end (outputs only)."""

import numpy as np
import pytest

from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.io import geometry_equal, read_segmentation, write_volume
from MedCLIPSAMLib.models import resolve_model_set
from MedCLIPSAMLib.phantoms import make_volume


def test_default_sam_is_medsam2():
    assert resolve_model_set("default")[1] == "medsam2"


@pytest.mark.parametrize("mode", ["auto", "propagate"])   # auto is carry on a CPU; propagate is the GPU default
def test_v2_with_the_512_px_sam_writes_a_valid_segmentation(tmp_path, mode):
    # tiny random CLIP; the SAM is MedSAM2's architecture, loaded from its real file layout (random weights)
    ph = make_volume("mr", shape=(5, 36, 32), direction="oblique", seed=1, lesion={"size": "large"})
    src, out, report = tmp_path / "in.nrrd", tmp_path / "out.seg.nrrd", tmp_path / "r.json"
    write_volume(str(src), ph.image)
    assert main(["segment", str(src), "--prompt", "brain tumor", "--output", str(out), "--preset", "v2",
                 "--mode", mode, "--key-slices", "1", "--models", "tiny-random,random-medsam2", "--device", "cpu",
                 "--threads", "1", "--progress", "none", "--report-output", str(report)]) == 0
    segments, ref = read_segmentation(str(out))
    assert geometry_equal(ref, ph.image, tol=1e-5)
    assert [s["name"] for s in segments] == ["brain tumor"]
    mask = segments[0]["mask"]
    assert mask.shape == ph.labels["brain"].shape and set(np.unique(mask)) <= {0, 1}
