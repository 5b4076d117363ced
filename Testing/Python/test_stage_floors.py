"""benchmarks/stage_floors.py (issue 37): the FLOPs it counts equal hand formulas of the networks, and the
floor arithmetic (floor, share, a stage that did not run, a warm text cache) is right. Tiny random CLIP:
seconds. Timings themselves belong to the benchmark, never here."""

import pytest

from benchmarks.cpu_minute import stage_done
from benchmarks.stage_floors import floors, gate_flops, m2ib_flops, run_floors, stage_parts


def _vit(clip):
    """(d, depth, MLP hidden width, patch side, tokens, projection width) of the tiny CLIP's timm ViT."""
    trunk = clip.model.visual.trunk
    patch = trunk.patch_embed.proj.kernel_size[0]
    tokens = (clip.image_size // patch) ** 2 + trunk.num_prefix_tokens
    return (trunk.embed_dim, len(trunk.blocks), trunk.blocks[0].mlp.fc1.out_features, patch, tokens,
            clip.model.visual.head.proj.out_features)


def _block(d, hidden, tokens, queries):
    """(linear, attention) forward FLOPs of a pre-norm ViT block whose output is needed for `queries`
    tokens (all of them, or 1: the pooled CLS token of the last block, models/clip_image.py): q for the
    queries, k and v for every token, q k^T and the weighted sum of v, the output projection and the MLP
    for the queries. A multiply-add is 2 FLOPs."""
    linear = 2 * queries * d * d + 2 * tokens * d * 2 * d + 2 * queries * d * d + 2 * 2 * queries * d * hidden
    attention = 2 * 2 * queries * tokens * d
    return linear, attention


def _input(clip):
    import torch

    torch.manual_seed(0)
    return torch.randn(1, 3, clip.image_size, clip.image_size)


def test_gate_flops_equal_the_vit_formula(tiny_clip):
    # patch embedding + depth-1 full blocks + the last block for the CLS token only + the projection
    d, depth, hidden, patch, tokens, out = _vit(tiny_clip)
    full, pooled = sum(_block(d, hidden, tokens, tokens)), sum(_block(d, hidden, tokens, 1))
    expected = 2 * (tokens - 1) * 3 * patch * patch * d + (depth - 1) * full + pooled + 2 * d * out
    assert gate_flops(tiny_clip, _input(tiny_clip)) == expected


def test_m2ib_step_counts_forward_and_backward_of_the_copies(tiny_clip):
    # one step on `copies` noisy copies runs blocks 10 (full) and 11 (CLS only) and the projection forward,
    # then the gradient to alpha only: each linear layer once more (its input's gradient, no weight
    # gradient), attention 2.5x its forward (torch's count: scores recomputed, then the gradients of v, of
    # the scores, of q and of k). Counting the forward alone gives 1x, weight gradients would add 1x more.
    import torch

    d, depth, hidden, _, tokens, out = _vit(tiny_clip)
    copies = 3
    lin_full, att_full = _block(d, hidden, tokens, tokens)
    lin_pool, att_pool = _block(d, hidden, tokens, 1)
    linear, attention = lin_full + lin_pool + 2 * d * out, att_full + att_pool
    text = torch.nn.functional.normalize(torch.ones(out), dim=0)
    prefix, step = m2ib_flops(tiny_clip, _input(tiny_clip), text, {"beta": 1.0, "steps": 10, "batch_size": copies})
    assert step == copies * (2 * linear + 3.5 * attention)
    patch = tiny_clip.model.visual.trunk.patch_embed.proj.kernel_size[0]
    assert prefix == 2 * (tokens - 1) * 3 * patch * patch * d + 10 * sum(_block(d, hidden, tokens, tokens))
    assert depth == 12   # blocks 0..9 before the bottleneck, 10 and 11 in each step


PER_UNIT = {name: {"flops": f} for name, f in (("text sentence", 2e9), ("gate slice", 4e9), ("M2IB prefix", 1e9),
                                                ("M2IB step", 3e9), ("SAM2 encoder", 5e9), ("SAM2 decoder box", 1e9))}
GFLOPS = {"fp32": 10.0, "bf16": 40.0}
PLAN = {"gate": "bf16", "saliency": "bf16", "sam": "fp32"}


def test_floor_share_and_a_stage_that_did_not_run():
    parts = stage_parts({"sentences": 5, "scored": 8, "key": 2, "carried": 0}, PLAN, steps=10)
    rows = floors(parts, PER_UNIT, GFLOPS, {"text": 2.0, "gate": 1.6, "key-slices": 4.0},
                  {"load CLIP": {"bytes": 2e9, "read_gb_s": 4.0}})
    assert rows["text"]["floor_s"] == pytest.approx(5 * 2e9 / 10e9)        # the text tower runs in fp32
    assert rows["text"]["share"] == pytest.approx(1.0 / 2.0)
    assert rows["gate"]["floor_s"] == pytest.approx(8 * 4e9 / 40e9)
    assert rows["gate"]["share"] == pytest.approx(0.8 / 1.6)
    # M2IB in bf16 (the saliency precision), SAM2 in fp32 here: each part at its own throughput
    m2ib = (2 * 1e9 + 20 * 3e9) / 40e9
    sam = (2 * 5e9 + 2 * 1e9) / 10e9
    assert rows["key-slices"]["floor_s"] == pytest.approx(m2ib + sam)
    assert rows["key-slices"]["gflop"] == pytest.approx(2 + 60 + 10 + 2)
    assert rows["key-slices"]["share"] == pytest.approx((m2ib + sam) / 4.0)
    assert rows["propagate"]["floor_s"] == 0 and rows["propagate"]["wall_s"] is None
    assert rows["propagate"]["share"] is None                                # no wall time: no share
    assert rows["load CLIP"]["floor_s"] == pytest.approx(0.5) and rows["load CLIP"]["share"] is None


def test_run_floors_reads_the_run_counts():
    # a cpu_minute run: the carry stopped after 3 of its 6 slices; a warm text cache encoded nothing
    events = [("gate", 0, 8, 1.0, 1.0), ("gate", 8, 8, 2.0, 2.0), ("propagate", 0, 6, 3.0, 3.0),
              ("propagate", 1, 6, 4.0, 4.0), ("propagate", 2, 6, 5.0, 5.0), ("propagate", 3, 6, 6.0, 6.0),
              ("finished", 1, 1, 7.0, 7.0)]
    assert stage_done(events) == {"gate": 8, "propagate": 3}
    # a second prompt carries again: its slices add up
    second = [("key-slices", 0, 1, 7.0, 7.0), ("propagate", 0, 4, 8.0, 8.0), ("propagate", 2, 4, 9.0, 9.0)]
    assert stage_done(events[:-1] + second) == {"gate": 8, "propagate": 5, "key-slices": 0}
    record = {"precision_plan": {"gate": "fp32", "saliency": "fp32", "sam": "fp32"}, "m2ib": {"steps": 10},
              "per_unit": PER_UNIT, "gflops": GFLOPS}
    run = {"stage_done": stage_done(events), "text_cache": "warm", "runtime": {"precision": PLAN},
           "report": [{"sentences": 20, "scored": 8, "saliency_slices": [3, 4]}],
           "stages": {"text": {"wall_s": 0.1}, "gate": {"wall_s": 1.0}, "key-slices": {"wall_s": 9.0},
                      "propagate": {"wall_s": 3.0}}}
    rows = run_floors(run, record)
    assert rows["text"]["gflop"] == 0 and rows["text"]["share"] == 0
    assert rows["propagate"]["floor_s"] == pytest.approx(3 * 6e9 / 10e9)    # the run's precision: sam fp32
    assert rows["gate"]["floor_s"] == pytest.approx(8 * 4e9 / 40e9)         # gate bf16, from the report
    assert [p["units"] for p in rows["key-slices"]["parts"]] == [2, 20, 2, 2]
    run["text_cache"] = "cold"
    assert run_floors(run, record)["text"]["gflop"] == pytest.approx(20 * 2)
