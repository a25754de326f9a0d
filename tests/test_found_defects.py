"""Issue 10 defects 1, 4, 5, 9 and 12, each reproduced as the reliability work first found it (they are
fixed; these stay as regression tests beside tests/test_pruner_contracts.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from fuzz_networks import SequenceNet
from model_state import assert_unchanged, snapshot
from torch import nn

import prunekit as pk


@pytest.mark.parametrize("sparsity", [float("nan"), "0.5"])
def test_nm_sparsity_is_type_and_nan_checked(sparsity):
    model = SequenceNet(8, [("linear", 8, 1)], 4)
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match="sparsity"):
        pk.prune(model, sparsity, granularity=pk.NM(2, 4))
    assert_unchanged(model, before)


def test_coupled_pruning_respects_include():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    first = model[0].weight.detach().clone()
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=torch.randn(2, 8), include=["2"])
    assert torch.equal(model[0].weight, first)  # layer 0 is not included: its filters stay
    assert int((model[2].weight.abs().sum(dim=1) == 0).sum()) == 8  # the included layer loses half its neurons


def test_failed_load_pruned_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 8)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x)
    buffer = io.BytesIO()
    pk.save_pruned(pk.compact(model, x), buffer)
    buffer.seek(0)
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))  # another classifier size
    before = snapshot(other)
    with pytest.raises((ValueError, RuntimeError)):
        pk.load_pruned(other, buffer)
    assert_unchanged(other, before)


def test_pruner_state_with_another_config_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    state = pk.Pruner(copy.deepcopy(model), 0.9).state_dict()
    with pytest.raises(ValueError, match="sparsity"):
        pk.Pruner(model, 0.5).load_state_dict(state)


def test_the_advice_for_an_lstm_can_be_followed():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.fc = nn.Linear(8, 8), nn.Linear(8, 8)
            self.rnn, self.head = nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.rnn(self.fc(torch.relu(self.inner(x))))[0])

    model, x = Recurrent(), torch.randn(2, 3, 8)
    pk.prune(model, 0.5, granularity="out_channel", example_inputs=x, exclude=["rnn"])
