"""OWL through pk.prune: the block sparsities are the paper's, computed here by hand from the dense model's
activations, and its options (pk.OWL) are honoured and validated before anything changes."""

import copy

import pytest
import torch

import prunekit as pk
from prunekit.core.masks import masked_parameters

pytest.importorskip("transformers")

from test_oneshot_models import block_linears, calibration, squared_input_norms, tiny  # noqa: E402


def expected_block_sparsities(dense, path, batches, target, multiplier, spread):
    """OWL by hand (Yin et al. 2024, reference code): per block, the Wanda scores of all its Linear layers
    on the *dense* model's activations, concatenated; outlier ratio = share above M × their mean; ratios
    min-max normalised onto [0, 2λ]; sparsity = target − (r − mean r) (blocks of equal size here)."""
    ratios = []
    for i in range(len(dense.get_submodule(path))):
        scores = []
        for name, module in block_linears(dense, path):
            if name.startswith(f"{path}.{i}."):
                norms = squared_input_norms(dense, module, batches).sqrt()
                scores.append((module.weight.abs() * norms.unsqueeze(0)).flatten())
        together = torch.cat(scores)
        ratios.append(int((together > multiplier * together.mean()).sum()) / together.numel())
    ratios = torch.tensor(ratios, dtype=torch.float64)
    normalised = (ratios - ratios.min()) / (ratios.max() - ratios.min()) * 2 * spread
    return (target - (normalised - normalised.mean())).tolist(), ratios.tolist()


def block_targets(report, path):
    per_block = {}
    for name, value in report.target_sparsity.items():
        per_block.setdefault(int(name[len(path) + 1 :].split(".")[0]), set()).add(value)
    assert all(len(values) == 1 for values in per_block.values())  # one sparsity per block
    return [per_block[i].pop() for i in sorted(per_block)]


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("options", ["owl", pk.OWL(outlier_multiplier=3, spread=0.05)], ids=["paper", "M3-l0.05"])
def test_block_sparsities_are_the_papers_from_the_dense_activations(criterion, options):
    dense, path = tiny("llama")
    dense.eval()
    batches = calibration()
    model = copy.deepcopy(dense)
    report = pk.prune(
        model, sparsity=0.6, criterion=criterion, calibration=batches, layer_sparsity=options, progress=False
    ).calibration_report
    owl = pk.OWL() if options == "owl" else options
    expected, ratios = expected_block_sparsities(dense, path, batches, 0.6, owl.outlier_multiplier, owl.spread)
    assert len(set(ratios)) > 1  # the case is not degenerate
    got = block_targets(report, path)
    assert got == pytest.approx(expected, abs=1e-9)
    assert max(got) - min(got) == pytest.approx(2 * owl.spread)
    assert sum(got) / len(got) == pytest.approx(0.6)


def test_a_larger_multiplier_counts_fewer_outliers_and_equal_ratios_give_uniform_sparsity():
    dense, path = tiny("llama")
    batches = calibration()
    # With M so large that no score is an outlier, every block's ratio is 0: uniform, like no OWL at all.
    model = copy.deepcopy(dense)
    report = pk.prune(
        model,
        0.6,
        criterion="wanda",
        calibration=batches,
        layer_sparsity=pk.OWL(outlier_multiplier=1e6),
        progress=False,
    ).calibration_report
    assert block_targets(report, path) == [0.6, 0.6, 0.6]
    uniform = copy.deepcopy(dense)
    pk.prune(uniform, 0.6, criterion="wanda", calibration=batches, progress=False)
    masks, uniform_masks = masked_parameters(model), masked_parameters(uniform)
    assert masks.keys() == uniform_masks.keys() and all(torch.equal(masks[k], uniform_masks[k]) for k in masks)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sparsity=0.1, layer_sparsity="owl"), r"sparsity in \[0.16, 0.84\]"),
        (dict(sparsity=0.95, layer_sparsity=pk.OWL(spread=0.04)), r"sparsity in \[0.08, 0.92\]"),
        (dict(granularity=pk.NM(2, 4), layer_sparsity=pk.OWL()), "N:M"),
        (dict(sparsity=0.5, layer_sparsity=pk.OWL()), "calibration= is missing"),
    ],
)
def test_refused_owl_calls_leave_the_model_untouched(options, message):
    model, _ = tiny("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if "calibration" not in message:
        options = {**options, "calibration": calibration()}
    with pytest.raises(ValueError, match=message):
        pk.prune(model, criterion="wanda", **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert masked_parameters(model) == {}
