"""``Block``: submodules found without ``nn.Module.__getattr__``, never stale."""

from __future__ import annotations

import copy

import torch
from torch import nn

from rosetta.model.layers import Block


class Pair(Block):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(2, 2)
        self.second = nn.Linear(2, 2)


def test_submodules_are_plain_attributes_and_still_registered():
    pair = Pair()
    assert pair.__dict__["first"] is pair._modules["first"]
    assert list(pair.state_dict()) == ["first.weight", "first.bias", "second.weight", "second.bias"]
    assert len(list(pair.parameters())) == 4


def test_reassigning_or_deleting_a_submodule_never_leaves_a_stale_copy():
    pair = Pair()
    replacement = nn.Linear(2, 2)
    pair.first = replacement
    assert pair.first is replacement and pair._modules["first"] is replacement
    pair.first = torch.nn.Parameter(torch.zeros(2))  # a parameter under the same name
    assert "first" not in pair._modules and "first" not in pair.__dict__
    assert isinstance(pair.first, torch.nn.Parameter)
    del pair.second
    assert not hasattr(pair, "second")
    pair.note = "plain"  # ordinary attributes behave as ever
    del pair.note
    assert not hasattr(pair, "note")


def test_copies_keep_their_own_submodules():
    pair = Pair()
    clone = copy.deepcopy(pair)
    assert clone.first is clone._modules["first"] and clone.first is not pair.first
