"""Shared test setup: offline, a private model cache per run, few threads (CI has 2 cores)."""

import atexit
import os
import shutil
import tempfile

# set before anything imports torch / huggingface_hub
os.environ.setdefault("MEDCLIPSAM_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "MEDCLIPSAM_HOME" not in os.environ:
    # random-weight checkpoints are written here (hundreds of MB): removed when the run ends
    _home = tempfile.mkdtemp(prefix="medclipsam-test-home-")
    os.environ["MEDCLIPSAM_HOME"] = _home
    atexit.register(shutil.rmtree, _home, True)
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip():
    from MedCLIPSAMLib.models import load_clip

    return load_clip("tiny-random")


@pytest.fixture(scope="session")
def tiny_sam2():
    from MedCLIPSAMLib.models import load_sam2

    return load_sam2("tiny-random")
