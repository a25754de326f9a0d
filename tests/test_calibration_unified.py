"""One calibration collector (engines.calibration) under the pruner's pass, the sequential one-shot path
and the structured path: the same statistics, padding left out everywhere, masks as before."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.targets import find_targets
from prunekit.engines import calibration as engine
from prunekit.oneshot import activations, wanda_keep
from prunekit.oneshot import calibration as sequential_calibration
from prunekit.oneshot import prune_structured_with_calibration as prune_structured


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, attention_mask=None):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """Position-wise layers only: a real token's activations do not depend on the padding."""

    def __init__(self):
        super().__init__()
        self.inp, self.layers, self.head = nn.Linear(4, 8), nn.ModuleList([Block(), Block()]), nn.Linear(8, 3)

    def forward(self, x, attention_mask=None):
        h = self.inp(x)
        for block in self.layers:
            h = block(h, attention_mask=attention_mask)
        return self.head(h)


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def padded_batches() -> list[dict]:
    generator, found = torch.Generator().manual_seed(1), []
    for lengths in ([5, 3], [4, 5], [2, 1]):
        x = torch.randn(2, 5, 4, generator=generator)
        mask = torch.zeros(2, 5, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        found.append({"x": x, "attention_mask": mask})
    return found


def unpadded(batches: list[dict]) -> list[dict]:
    """Every real sequence as its own batch of one, without padding."""
    found = []
    for batch in batches:
        for x, mask in zip(batch["x"], batch["attention_mask"]):
            n = int(mask.sum())
            found.append({"x": x[None, :n], "attention_mask": torch.ones(1, n, dtype=torch.long)})
    return found


# Packed masks computed by the three collectors before they were merged into one (commit 8cbfa26).
PINNED = {
    ("wanda", 0.5): "1e93568e74f01b9cb1f09cca1e875c33 2db23d91b4e135a329b329b935b1a9d2 "
    "2e1ed2c91e569a995c9996ca95d287cc 1f07b706bd413a477e416f429c655e45",
    ("wanda", None): "5a93569655955a9c93599cca3aa65c33 a9aa359935a935a339a339a935a9a9c3 "
    "6c9a93c956569a995c9a96ca955a95cc 593335663cc33a663c6365c69c655665",
    ("sparsegpt", 0.5): "1f1b4f0f55550f1f13510f4a1e0f1f13 09ba3d01b4f1356f29bb09bd3533095b "
    "0e4f474f464f0f4f444b0f4b154f074f 191f27063dc7080f3e4f67c68ce5564d",
    ("sparsegpt", None): "563353965953563c935c3c5a3ac65533 a9393533353a3939399339393539aa53 "
    "665a5a5a5655965956539663555695c9 599335a63ca35a333cc965639c6556a9",
}


@pytest.mark.parametrize("criterion, sparsity", list(PINNED))
def test_sequential_masks_are_those_computed_before_the_collectors_were_merged(criterion, sparsity):
    model = net()
    shape = dict(sparsity=sparsity) if sparsity else dict(granularity=pk.NM(2, 4))
    pk.prune(
        model, criterion=criterion, calibration=padded_batches(), blocks="layers", progress=False, sequential=True,
        **shape,
    )  # fmt: skip
    found = [
        getattr(model.layers[b], name)._buffers["_pk_mask_weight"].numpy().tobytes().hex()
        for b in range(2)
        for name in ("up", "down")
    ]
    assert found == PINNED[(criterion, sparsity)].split()


@pytest.mark.parametrize(
    "criterion, mode, kept_first, kept_second",
    [("wanda", False, [3, 4, 5, 7], [1, 3, 4]), ("wanda", True, [3, 4, 5, 7], [1, 3, 4]),
     ("flap", False, [2, 4, 5, 6], [1, 2, 4]), ("flap", True, [2, 4, 5, 6], [1, 2, 4])],
)  # fmt: skip
def test_structured_channels_are_those_kept_before_the_collectors_were_merged(criterion, mode, kept_first, kept_second):
    torch.manual_seed(2)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5),
    ).eval()  # fmt: skip
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-0.5, 0.5)
        cnn[1].running_var.uniform_(0.5, 2)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    pk.prune(cnn, sparsity=0.5, granularity="out_channel", criterion=criterion, calibration=batches,
             example_inputs=batches[0], reconstruct=mode)  # fmt: skip
    for layer, kept in ((cnn[0], kept_first), (cnn[3], kept_second)):
        assert (layer.weight.flatten(1).abs().sum(1) != 0).nonzero().flatten().tolist() == kept


def naive_rows(model: nn.Module, layer: nn.Module, batches: list[dict]) -> torch.Tensor:
    """The layer's inputs at real tokens only, concatenated: (tokens, channels)."""
    rows = []
    handle = layer.register_forward_pre_hook(lambda _m, args: rows.append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            count = len(rows)
            model(**batch)
            mask = batch["attention_mask"].bool()
            rows[count:] = [x[mask] for x in rows[count:]]
    handle.remove()
    return torch.cat(rows)


def test_every_statistic_equals_a_hand_computation_over_real_tokens():
    model, batches = net(), padded_batches()
    targets = find_targets(model)
    stats = engine.collect_statistics(model, targets, batches, engine.STATISTICS)
    record = activations.collect_statistics(model, batches, {t.name: t.module for t in targets})
    for t in targets:
        x = naive_rows(model, t.module, batches).double()
        found = stats[t.full_name]
        assert int(found["tokens"]) == x.shape[0] == record.statistics[t.name].tokens == 20
        torch.testing.assert_close(found["input_sq_norm"].double(), x.square().sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(found["input_mean"].double(), x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(found["input_gram"].double(), x.T @ x, rtol=1e-5, atol=1e-5)
        structured = record.statistics[t.name]
        torch.testing.assert_close(structured.norm, x.norm(dim=0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(structured.mean, x.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(structured.variance, x.var(0, unbiased=False), rtol=1e-10, atol=1e-12)


def test_structured_statistics_of_a_padded_batch_equal_those_of_the_unpadded_sequences():
    model, batches = net(), padded_batches()
    with torch.no_grad():  # garbage in the padding must not matter
        for batch in batches:
            batch["x"][~batch["attention_mask"].bool()] = 1e3
    layers = {t.name: t.module for t in find_targets(model)}
    padded = activations.collect_statistics(model, batches, layers)
    alone = activations.collect_statistics(model, unpadded(batches), layers)
    for name in layers:
        a, b = padded.statistics[name], alone.statistics[name]
        assert a.tokens == b.tokens == 20
        for value in ("norm", "mean", "variance"):  # float32 layers on other batch shapes: rounding only
            torch.testing.assert_close(getattr(a, value), getattr(b, value), rtol=1e-6, atol=1e-7)


def test_structured_pruning_and_refit_ignore_the_padding():
    batches = padded_batches()
    with torch.no_grad():
        for batch in batches:
            batch["x"][~batch["attention_mask"].bool()] = 1e3
    padded, alone = net(), net()
    for model, data in ((padded, batches), (alone, unpadded(batches))):
        prune_structured(model, 0.25, calibration=data, example_inputs=data[0], criterion="flap",
                         reconstruct=True, include=[r"layers\..*"])  # fmt: skip
    for (name, a), b in zip(padded.state_dict().items(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(padded.layers[0].down.weight, net().layers[0].down.weight)


def test_one_pass_wanda_equals_wanda_on_the_dense_models_statistics():
    """sequential=False: each layer's Σ X_j² is that of the dense model's activations."""
    model, batches = net(), padded_batches()
    dense = copy.deepcopy(model)
    targets = [t for t in find_targets(dense) if t.name.startswith("layers.")]
    stats = engine.collect_statistics(dense, targets, batches, ("input_sq_norm",))
    pk.prune(model, 0.5, criterion="wanda", calibration=batches, blocks="layers", progress=False, sequential=False)
    for t in targets:
        expected = wanda_keep(t.param, stats[t.full_name]["input_sq_norm"], 0.5)
        assert torch.equal(model.get_submodule(t.name).weight != 0, expected), t.name
    default = copy.deepcopy(dense)  # one pass is Wanda's default
    pk.prune(default, 0.5, criterion="wanda", calibration=batches, blocks="layers", progress=False)
    assert all(torch.equal(default.get_submodule(t.name).weight, model.get_submodule(t.name).weight) for t in targets)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(criterion="sparsegpt", sequential=False), ValueError, "SparseGPT updates"),
        (dict(criterion="magnitude", layer_sparsity="owl", sequential=False), ValueError, "reads no activations"),
        (dict(criterion="wanda", sequential="no"), TypeError, "sequential must be True, False or None"),
    ],
)
def test_sequential_false_is_refused_where_it_has_no_meaning(options, error, match):
    model, batches = net(), padded_batches()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        pk.prune(model, 0.5, calibration=batches, blocks="layers", progress=False, **options)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_one_calibration_error_type_everywhere():
    assert activations.CalibrationError is engine.CalibrationError
    assert sequential_calibration.CalibrationError is engine.CalibrationError
    assert pk.oneshot.CalibrationError is engine.CalibrationError


def test_the_structured_refit_copies_only_the_changed_tensors(monkeypatch):
    """No copy of the whole model: a layer that pruning does not touch is not copied."""
    import prunekit.oneshot.structured as structured

    copied = []
    original = structured.TensorSnapshot

    def recording(modules, memory_bytes):
        snapshot = original(modules, memory_bytes)
        copied.append({id(module) for module, _ in snapshot.tensors})
        return snapshot

    monkeypatch.setattr(structured, "TensorSnapshot", recording)
    torch.manual_seed(0)
    sizes = (4, 8, 16, 8, 3)
    layers = [m for i in range(4) for m in (nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU())][:-1]
    model = nn.Sequential(*layers).eval()
    batches = [torch.randn(16, 4) for _ in range(2)]
    pruner = prune_structured(model, 0.5, calibration=batches, example_inputs=batches[0], reconstruct=True,
                              include=["4", "6"])  # fmt: skip
    assert id(model[0]) not in copied[0] and {id(model[4]), id(model[6])} <= copied[0]
    assert [r.layer for r in pruner.reconstruction] == ["6"] and model[6].weight.abs().sum(0).eq(0).sum() == 4
