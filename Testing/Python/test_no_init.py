"""Loading without random init (models/no_init.py) gives exactly the model that init-then-load gives."""

import threading

import torch

from MedCLIPSAMLib.models import no_init


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
