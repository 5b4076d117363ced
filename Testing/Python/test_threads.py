"""--threads / MEDCLIPSAM_THREADS decide torch's CPU threads (outputs only, no timings)."""

import pytest

from MedCLIPSAMLib.errors import MedCLIPSAMError
from MedCLIPSAMLib.runtime import THREADS_ENV, configure_threads, usable_cpus


@pytest.fixture
def restore_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_flag_env_and_default(monkeypatch, restore_threads):
    import torch

    from MedCLIPSAMLib.cli import build_parser
    from MedCLIPSAMLib.cli.options import runtime_device

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert configure_threads() == usable_cpus() == torch.get_num_threads()
    monkeypatch.setenv(THREADS_ENV, "1")
    assert configure_threads() == 1 == torch.get_num_threads()
    # the flag wins over the environment, through the CLI's own option handling
    args = build_parser().parse_args(["segment", "in.nrrd", "--prompt", "x", "--output", "o.seg.nrrd",
                                      "--device", "cpu", "--threads", "2"])
    runtime_device(args)
    assert torch.get_num_threads() == 2
    for bad in ("0", "many"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(MedCLIPSAMError):
            configure_threads()
