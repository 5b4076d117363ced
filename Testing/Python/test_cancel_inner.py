"""Ctrl-C and cancel (issue 33): the saliency loops stop within a batch or a step, and a signal is answered
at once with "stopping..." (a terminal line, a JSON progress record for the Slicer panel)."""

import io
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedCLIPSAMLib.errors import Cancelled
from MedCLIPSAMLib.progress import ProgressReporter


def _inputs(clip, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = clip.preprocess_array(np.random.default_rng(seed).integers(0, 256, (224, 224, 3)).astype(np.uint8))
    text = F.normalize(torch.randn(clip.model.visual.head.proj.out_features, generator=g), dim=0)
    return image, text


class CancelOnForward:
    """Cancels `reporter` on the image tower's `at`-th pass through its projection head (the end of every
    forward pass, whichever shortcut it takes through the blocks) and counts the passes."""

    def __init__(self, clip, reporter, at):
        self.calls, self.at, self.reporter = 0, at, reporter
        self.handle = clip.model.visual.head.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.calls += 1
        if self.calls == self.at:
            self.reporter.cancel()


@pytest.mark.parametrize("method", ["gscorecam", "m2ib"])
def test_saliency_loops_stop_at_the_next_batch_or_step(tiny_clip, method):
    from MedCLIPSAMLib.saliency.gscorecam import run_gscorecam
    from MedCLIPSAMLib.saliency.m2ib import run_m2ib

    image, text = _inputs(tiny_clip)
    reporter = ProgressReporter("none")
    reporter.stage("key-slices", 1)           # the stage the pipeline runs saliency in
    # gScoreCAM: pass 1 ranks the channels, then 4 batches of 2 masked images; M2IB: one pass per step
    run = ((lambda: run_gscorecam(tiny_clip, image, text, topk=8, batch_size=2)) if method == "gscorecam"
           else (lambda: run_m2ib(tiny_clip, image, text, steps=4, batch_size=2)))
    counter = CancelOnForward(tiny_clip, reporter, at=2)
    try:
        with pytest.raises(Cancelled):
            run()
    finally:
        counter.handle.remove()
    assert counter.calls == 2      # the cancel came during pass 2; nothing ran after it (without the
    #                                checks, all 5 / 4 passes run and the call returns its maps)
    # the cancelled run is over: saliency called later on this thread without a reporter runs to the end
    assert run() is not None


@pytest.mark.parametrize("mode", ["json", "bar", "pseudo-label"])
def test_a_signal_says_stopping_at_once(mode):
    stream = io.StringIO()
    # pseudo-label: a silent inner reporter owns the signals, the outer one (JSON for the panel) speaks
    reporter = ProgressReporter("json" if mode == "pseudo-label" else mode, stream=stream)
    inner = ProgressReporter("none", stream=io.StringIO()) if mode == "pseudo-label" else reporter
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        inner.install_signal_handlers(announcer=reporter)
        reporter.stage("key-slices", 3, "saliency + SAM on key slices")
        reporter.advance(1)
        os.kill(os.getpid(), signal.SIGINT)   # Python runs the handler in this thread before the next line
        text = stream.getvalue()
    finally:
        reporter._close_bar()
        for s, h in previous.items():
            signal.signal(s, h)
    assert inner.cancelled
    if mode != "bar":
        assert json.loads(text.splitlines()[-1]) == {"stage": "stopping", "done": 1, "total": 3,
                                                     "message": "stopping..."}
    else:
        assert "stopping... (press Ctrl-C again to stop at once)\n" in text
    with pytest.raises(Cancelled):
        inner.check_cancelled()
