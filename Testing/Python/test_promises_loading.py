"""Loading without random init keeps what the constructor set up: a parameter shared between two DIFFERENT
modules (tied weights, `b.weight = a.weight`) stays one parameter, and a frozen parameter stays frozen, from
build_without_init through a strict checkpoint load (MedCLIPSAMLib/models/no_init.py)."""

import torch

from MedCLIPSAMLib.models.no_init import build_without_init


class Tied(torch.nn.Module):
    """An embedding and an output layer tied as language models tie them, plus a frozen layer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 3, bias=False)
        self.head = torch.nn.Linear(4, 3, bias=False)
        self.head.weight = self.embed.weight            # one parameter, registered in two modules
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.embed(x) + self.head(x))


def test_a_parameter_tied_across_two_modules_stays_tied_and_frozen_stays_frozen():
    torch.manual_seed(0)
    reference = Tied()
    model = build_without_init(Tied, "cpu")
    assert model is not None
    assert model.head.weight is model.embed.weight
    assert len(list(model.parameters())) == len(list(reference.parameters())) == 3   # weight, frozen w + b
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]
    model.load_state_dict(reference.state_dict(), strict=True)
    assert model.head.weight is model.embed.weight and not model.embed.weight.is_meta
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    # training moves one shared weight: both modules see the change, the frozen layer gets no gradient
    model(x).sum().backward()
    assert model.frozen.weight.grad is None and model.embed.weight.grad is not None
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    torch.testing.assert_close(model.head.weight, reference.head.weight + 1.0)
