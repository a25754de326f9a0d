"""``prunekit prune`` and ``prunekit summary`` on factories, saved pruned files and Hugging Face folders,
run as the user runs them (a subprocess), with good and bad recipes, paths and factories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit as pk

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import cli_models  # noqa: E402

MAGNITUDE = "sparsity: 0.5\ncriterion: magnitude\n"
CHANNELS = "sparsity: 0.5\ngranularity: out_channel\n"


def prunekit(*args, cwd=HELPERS):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "prunekit", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def prunekit_here(*args, cwd=HELPERS, capsys=None, monkeypatch=None):
    """The same command in this process (fast: no new interpreter importing torch)."""
    from prunekit.cli import main

    monkeypatch.chdir(cwd)
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: "), err
    return lines[0]


@pytest.fixture
def recipe(tmp_path):
    def write(text, name="r.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.mark.slow  # a new interpreter importing torch
def test_prune_a_factory_model_then_read_it_back(tmp_path, recipe):
    out = tmp_path / "mlp.pt"
    code, stdout, err = prunekit("prune", "cli_models:make_mlp", "--recipe", recipe(MAGNITUDE), "--out", out)
    assert code == 0, err
    assert "written to" in stdout and "sparsity" in stdout
    model = pk.load_pruned(cli_models.make_mlp(), out)
    for layer in (model[0], model[2]):
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    code, stdout, err = prunekit("summary", out, "--factory", "cli_models:make_mlp", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["nonzero_params"] == sum(int((p != 0).sum()) for p in model.parameters())


@pytest.mark.slow  # a new interpreter importing torch
def test_prune_and_compact_a_structured_recipe(tmp_path, recipe):
    out = tmp_path / "small.pt"
    code, stdout, err = prunekit(
        "prune", "cli_models:make_mlp", "--recipe", recipe(CHANNELS), "--out", out, "--compact", "--input-shape", "2,8",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["total_params"] < sum(p.numel() for p in cli_models.make_mlp().parameters())
    small = pk.load_pruned(cli_models.make_mlp(), out)
    assert small[0].out_features == 16 and small[2].in_features == 16


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sparsty: 0.5\n", "unknown key 'sparsty'"),
        ("sparsity: 1.5\n", "line 1"),
        ("sparsity: [0.5\n", "not valid YAML"),
        ("sparsity: 0.5\ncriterion: nope\n", "not registered"),
        ("sparsity: 0.5\nschedule: {gradual: {start: 0, end: 100, every: 10}}\n", "prunes during training"),
        ("sparsity: 0.5\nexclude: [nothing_matches_this]\n", "pruning cli_models:make_mlp failed"),
    ],
)
def test_bad_recipes_are_one_line_errors_that_write_nothing(tmp_path, recipe, text, expected, capsys, monkeypatch):
    out = tmp_path / "out.pt"
    code, _, err = prunekit_here(
        "prune", "cli_models:make_mlp", "--recipe", recipe(text), "--out", out, capsys=capsys, monkeypatch=monkeypatch
    )
    assert expected in one_line_error(code, err)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


@pytest.mark.parametrize(
    ("model", "extra", "expected"),
    [
        ("no_such_module:make", [], "cannot import 'no_such_module'"),
        ("cli_models:make_broken", [], "make_broken() failed: RuntimeError: this factory is broken"),
        ("cli_models:nothing", [], "has no attribute 'nothing'"),
        ("missing/folder", [], "got 'missing/folder'"),
        ("r.yaml", [], "say which architecture"),
        ("cli_models:make_mlp", ["--calibration", "missing.pt"], "no such file"),
    ],
)
def test_bad_models_and_paths_are_one_line_errors_that_write_nothing(
    tmp_path, recipe, model, extra, expected, capsys, monkeypatch
):
    path = recipe(MAGNITUDE)
    out = tmp_path / "out.pt"
    cwd = tmp_path if model == "r.yaml" else HELPERS
    code, _, err = prunekit_here(
        "prune", model, "--recipe", path, "--out", out, *extra, cwd=cwd, capsys=capsys, monkeypatch=monkeypatch
    )
    assert expected in one_line_error(code, err)
    assert not out.exists()


@pytest.mark.slow  # a new interpreter importing torch
def test_errors_through_the_command_line(tmp_path, recipe):
    """A bad recipe and a bad factory, as a user's shell sees them: status 2, one line, nothing written."""
    out = tmp_path / "out.pt"
    code, _, err = prunekit("prune", "cli_models:make_mlp", "--recipe", recipe("sparsty: 0.5\n"), "--out", out)
    assert "line 1: unknown key 'sparsty'" in one_line_error(code, err)
    code, _, err = prunekit("prune", "cli_models:make_broken", "--recipe", recipe(MAGNITUDE), "--out", out)
    assert "make_broken() failed" in one_line_error(code, err)
    assert not out.exists()


def test_an_existing_out_is_never_overwritten(tmp_path, recipe):
    out = tmp_path / "out.pt"
    out.write_text("keep me")
    from prunekit.cli import main

    assert main(["prune", "cli_models:make_mlp", "--recipe", str(recipe(MAGNITUDE)), "--out", str(out)]) == 2
    assert out.read_text() == "keep me"


def test_calibration_batches_from_a_tensor_file(tmp_path, recipe, capsys):
    from prunekit.cli import main

    batches = tmp_path / "calibration.pt"
    torch.save(torch.randn(40, 8), batches)
    text = "sparsity: 0.5\ncriterion: input_energy\ncalibration: {batch_size: 16}\n"
    out = tmp_path / "out.pt"
    assert (
        main(
            [
                "prune",
                "cli_models:make_mlp",
                "--recipe",
                str(recipe(text)),
                "--out",
                str(out),
                "--calibration",
                str(batches),
            ]
        )
        == 0
    )
    # the same batches through the API give the same model
    expected = pk.prune(
        cli_models.make_mlp(), 0.5, criterion="input_energy", calibration=list(torch.load(batches).split(16))
    )
    saved = pk.load_pruned(cli_models.make_mlp(), out)
    assert torch.equal(saved[0].weight, expected.remove()[0].weight)
    # a criterion that reads no calibration data refuses it
    assert (
        main(
            [
                "prune",
                "cli_models:make_mlp",
                "--recipe",
                str(recipe(MAGNITUDE, "m.yaml")),
                "--out",
                str(tmp_path / "x.pt"),
                "--calibration",
                str(batches),
            ]
        )
        == 2
    )
    assert "does not read calibration data" in capsys.readouterr().err


def test_summary_groups_rows_by_depth(capsys, monkeypatch):
    code, out, err = prunekit_here(
        "summary", "cli_models:make_mlp", "--max-depth", "1", "--json", capsys=capsys, monkeypatch=monkeypatch
    )
    assert code == 0, err
    assert [row["name"] for row in json.loads(out)["layers"]] == ["0", "2"]
    code, _, err = prunekit_here(
        "summary", "cli_models:make_mlp", "--max-depth", "0", capsys=capsys, monkeypatch=monkeypatch
    )
    assert "--max-depth" in one_line_error(code, err)
